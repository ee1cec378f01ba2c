"""The one training loop, for every objective: set up (validate, mesh, base, data, step), then step,
log, evaluate; resume from checkpoints and rewrite metrics.jsonl to the step resumed.  Everything numeric
lives in step_fn.py / objectives.py and the base in base.py; this file only orchestrates.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from paft_jax.config import to_dict
from paft_jax.data import make_loader, one_pass, to_global
from paft_jax.mesh import build_mesh, is_mesh_primary, mesh_processes, process_rank
from paft_jax.models import flops as flops_lib
from paft_jax.train import delta as delta_lib
from paft_jax.train import objectives
from paft_jax.train.base import Base, load_base
from paft_jax.train.config import TrainConfig, eval_view
from paft_jax.train.programs import branch_programs
from paft_jax.train.step_fn import TrainState, init_state
from paft_jax.train.turns import active as turns_active, one_at_a_time, turn

log = logging.getLogger("paft_jax")


@dataclass
class BranchResult:
    state: TrainState
    history: list[dict] = field(default_factory=list)   # one record per logged step / evaluation
    wall_s: float = 0.0
    preempted: bool = False           # stopped by SIGTERM/SIGINT after saving a checkpoint
    resumed_from: int | None = None
    step_times: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each step, epoch s


class Branch:
    """One branch (SFT, DPO, ...) ready to step: its data, delta state and jitted step on its mesh."""

    def __init__(self, cfg: TrainConfig, base: Base, mesh: Mesh, rules: tuple):
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        cfg.validate(data_parallel=dp)
        self.cfg, self.base, self.mesh, self.rules = cfg, base, mesh, rules
        if len(base.tokenizer) > base.cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(base.tokenizer)} tokens but the model's vocab is "
                             f"{base.cfg.vocab_size}")
        # each process reads its share of the rows among this branch's processes only
        rank, count = process_rank(mesh)
        self.train_it = make_loader(cfg.data, base.tokenizer, process_index=rank, process_count=count)
        self.eval_it = (make_loader(eval_view(cfg.eval_data), base.tokenizer, process_index=rank,
                                    process_count=count) if cfg.eval_data else None)
        p = branch_programs(cfg, base.cfg, mesh, rules)
        self.lr, self.base_sh, self.state_sh, self.data_sharding = p.lr, p.base_sh, p.state_sh, p.data_sharding
        self.train_step, self.eval_sums = one_at_a_time(p.train_step), one_at_a_time(p.eval_sums)
        delta = delta_lib.init_delta(base.cfg, cfg.delta, jax.random.key(cfg.seed + 1), mesh, rules)
        self.state = init_state(delta, p.opt, self.state_sh)
        reference = cfg.objective.needs_reference and not cfg.ref_cache
        self.flops_per_step = flops_lib.step_flops(base.cfg, cfg.data.batch_size, cfg.data.seq_len,
                                                   reference_forward=reference)
        self.peak_flops = flops_lib.peak_flops(list(mesh.devices.flat))
        self.ref_tables: dict[str, Any] = {}
        if cfg.objective.needs_reference and cfg.ref_cache:
            from paft_jax.train.ref_cache import reference_table
            self.ref_tables["train"] = reference_table(self, self.train_it, "train")
            if self.eval_it is not None:
                self.ref_tables["eval"] = reference_table(self, self.eval_it, "eval")

    def device_batch(self, batch: dict, split: str) -> dict:
        table = self.ref_tables.get(split)
        if table is not None:
            batch = dict(batch, **table.lookup(batch["example_index"]))
        return to_global(batch, self.mesh, self.data_sharding)

    def step(self, batch: dict) -> dict:
        self.state, metrics = self.train_step(self.state, self.base.params, self.device_batch(batch, "train"))
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The held-out set once (all processes run the same number of batches), TRL's eval_ names."""
        total = None
        for batch in one_pass(self.eval_it, self.cfg.eval_batches, mesh=self.mesh):
            sums = jax.device_get(self.eval_sums(self.state.delta, self.base.params, self.device_batch(batch, "eval")))
            total = sums if total is None else jax.tree_util.tree_map(np.add, total, sums)
        metrics = objectives.finalize(self.cfg.objective, total)
        return {f"eval_{k}": float(v) for k, v in metrics.items()}


def train(cfg: TrainConfig, *, mesh: Mesh | None = None, base: Base | None = None, progress: bool = True,
          name: str | None = None) -> BranchResult:
    """Run one branch for `cfg.steps` steps; metrics go to `output_dir/metrics.jsonl`.  Holds output_dir's
    run lock (paft_jax/runlock.py) from before the base loads to the end."""
    started = time.time()
    mesh = mesh or build_mesh(cfg.mesh)
    rules = cfg.mesh.logical_rules()
    cfg.validate(data_parallel=mesh.shape["data"] * mesh.shape["fsdp"])  # before loading anything
    from paft_jax import runlock
    with runlock.holding(cfg.output_dir, lease_s=cfg.lock_lease_s):  # one writer per output_dir, before the load
        base = base or load_base(cfg, mesh, rules)
        branch = Branch(cfg, base, mesh, rules)
        return run_branch(branch, progress=progress, name=name, started=started)


def run_branch(branch: Branch, *, progress: bool = True, name: str | None = None, stop=None,
               bar_position: int = 0, started: float | None = None) -> BranchResult:
    """Train `branch` to `cfg.steps` (resuming from its checkpoints).  `stop`: a shared StopRequest when
    the caller runs several branches (signal handlers live in the main thread only).  `started`: when this
    session's set-up began (loading the base, building the branch), default now: metrics.jsonl gets an
    `event: session` record from then, written as the session starts and again with its end as it ends
    (whichever way), so that wall time adds up across the sessions of a resumed run (a session killed
    outright has only the first; pipeline/report.py `sessions`)."""
    started = time.time() if started is None else started
    cfg = branch.cfg
    from paft_jax.rundir import RunDir
    rd = RunDir.of(cfg.output_dir, cfg.cache_dir)  # a gs:// output_dir is written in a local mirror
    out = rd.local
    primary = is_mesh_primary(branch.mesh)
    ckpt = _checkpointer(cfg, mesh_processes(branch.mesh))
    result = BranchResult(branch.state)
    if ckpt is not None and cfg.checkpoint.resume != "never":
        with turn():
            result.resumed_from = _resume(branch, ckpt, cfg)
    start_step = int(jax.device_get(branch.state.step))
    finished_before = start_step >= cfg.steps  # a rerun of a finished run: nothing to train, nothing to re-log
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
        rd.pull("metrics.jsonl")  # a remote run: the history so far is the store's (the mirror may be empty)
        _truncate_metrics(out / "metrics.jsonl", start_step)
    metrics_file = (out / "metrics.jsonl").open("a") if primary else None
    session = {"step": start_step, "event": "session", "start": started}  # kept as long as its first step is
    if metrics_file and not finished_before:
        metrics_file.write(json.dumps(session) + "\n")
    if metrics_file and result.resumed_from is not None and not finished_before:  # the timeline marks the gap
        metrics_file.write(json.dumps({"step": start_step, "event": "resumed", "time": time.time()}) + "\n")
    if metrics_file:
        metrics_file.flush()
    tb = _tensorboard(out / "tb", start_step) if primary else None

    def sync() -> None:
        """A remote run: upload config.json, metrics.jsonl and the TensorBoard files (primary only)."""
        if not (rd.remote and primary):
            return
        if tb is not None:
            tb.flush()
        rd.upload(["config.json", "metrics.jsonl"] + sorted(f"tb/{p.name}" for p in (out / "tb").glob("*")))

    sync()
    name = name or cfg.objective.kind
    meta = {"config": to_dict(cfg), "base": branch.base.source, "model_config": dataclasses.asdict(branch.base.cfg),
            "ref_cache": {k: str(t.path) for k, t in branch.ref_tables.items()}}

    def save(step: int, wait: bool = False) -> None:
        # taking turns (CPU, parallel branches): the save finishes inside its turn, so that whatever Orbax runs
        # on the devices cannot overlap the other branch's programs (train/turns.py)
        with turn():
            ckpt.save(step, branch.state, branch.train_it.state(), {**meta, "step": step},
                      wait=wait or turns_active())

    def write(rec: dict) -> None:  # on the recorder's thread, one record at a time, in order
        result.history.append(rec)
        if metrics_file:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
        if tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time_start", "time_end") and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, rec["step"])
        if "loss" in rec and "time_start" in rec:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            if bar.disable and primary and (rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.steps):
                log.info("[%s] step %d/%d: %s", name, rec["step"], cfg.steps, _summary(rec))
        elif primary and "eval_loss" in rec and rec.get("step", 0) < cfg.steps:
            line = f"[{name}] eval at step {rec['step']}: {_summary(rec)}"
            if bar.disable:
                log.info("%s", line)
            else:  # above the bars (stderr), which keep their place
                bar.write(line, file=sys.stderr)

    from paft_jax.checkpoint import StopRequest
    from tqdm.auto import tqdm
    own_stop = stop is None
    stop = stop if stop is not None else StopRequest(cfg.checkpoint.on_signal)
    scope = branch.mesh if jax.process_count() > 1 else None
    bar = tqdm(total=cfg.steps, initial=start_step, desc=name, disable=not (progress and primary),
               dynamic_ncols=True, position=bar_position)
    from paft_jax.train.recorder import MetricsRecorder, ProfileWindow
    recorder = MetricsRecorder(write)
    profile = ProfileWindow(cfg.profile, str(out / "profile"))
    t_start = time.time()
    finished = False
    if finished_before:
        log.info("[%s] already trained to step %d (%s); nothing to do (raise steps to train on)", name,
                 start_step, ckpt.directory)
        if (out / "metrics.jsonl").exists():
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            result.history = [r for r in rows if "event" not in r]
    try:
        if cfg.eval_at_start and start_step == 0 and branch.eval_it is not None:
            recorder.record({"step": 0, **branch.evaluate()})
        for step in range(start_step, cfg.steps):
            profile.before(step + 1, recorder.drain)
            batch = next(branch.train_it)  # read and placed while the step before still computes
            tokens = float(batch["loss_mask"].sum()), int((batch["segment_ids"] > 0).sum())
            recorder.reserve()
            t0 = time.time()
            metrics = branch.step(batch)  # dispatched: returns before the devices finish
            recorder.step(step, metrics, t0, tokens, branch.flops_per_step, branch.peak_flops)
            done = step + 1
            profile.after(done, recorder.drain)
            if stop.requested(scope):
                if ckpt is not None:
                    recorder.drain()
                    sync()  # before the checkpoint: a saved step always has its metrics on the store
                    save(done, wait=True)
                bar.write(f"[{name}] stopped by {stop.describe()} after step {done}" +
                          (f"; checkpoint saved in {ckpt.directory}" if ckpt else ""))
                result.preempted = True
                break
            if ckpt is not None and ckpt.should_save(done, cfg.steps):
                recorder.drain()  # a non-finite loss is raised here, before it is saved
                sync()
                save(done)
            if (cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps
                    and branch.eval_it is not None):
                recorder.record({"step": done, **branch.evaluate()})
        recorder.drain()
        if branch.eval_it is not None and not result.preempted and not finished_before:
            ev = branch.evaluate()
            recorder.record({"step": cfg.steps, **ev})
            recorder.drain()
            bar.write(f"[{name}] eval at step {cfg.steps}: " + _summary(ev))
        finished = True
    finally:
        profile.close()
        recorder.close()
        if own_stop:
            stop.restore_handlers()
        bar.close()
        if metrics_file:
            if not finished_before:
                metrics_file.write(json.dumps({**session, "end": time.time()}) + "\n")
            metrics_file.close()
        if tb is not None:
            tb.close()
            tb = None
        try:
            sync()  # the branch's final files (also after a failure: what was recorded is kept)
        except Exception as e:  # noqa: BLE001
            if finished:
                raise
            log.warning("could not upload %s's files to %s: %s", name, rd.url, e)
        finally:
            if ckpt is not None:
                ckpt.close()
    result.state = branch.state
    result.wall_s = time.time() - t_start
    result.step_times = [(r["time_start"], r["time_end"]) for r in result.history if "time_start" in r]
    return result


def _tensorboard(directory: Path, start_step: int):
    """TensorBoard event files (tensorboardX: no TensorFlow needed); one file per (re)start of the run.
    A resumed run's file starts with a purge at the first step it redoes (TensorBoard then drops what
    earlier files logged from that step on), so TensorBoard rewinds with metrics.jsonl."""
    from tensorboardX import SummaryWriter
    return SummaryWriter(str(directory), flush_secs=10, purge_step=start_step + 1 if start_step else None)


def _checkpointer(cfg: TrainConfig, processes: list[int] | None = None):
    if not cfg.checkpoint.enabled:
        return None
    from paft_jax.checkpoint import BranchCheckpointer
    from paft_jax import storage
    directory = cfg.checkpoint.directory or (storage.join(cfg.output_dir, "checkpoints") if
                                             storage.is_url(cfg.output_dir) else
                                             str(Path(cfg.output_dir).absolute() / "checkpoints"))
    return BranchCheckpointer(cfg.checkpoint, directory, processes)


def _resume(branch: Branch, ckpt, cfg: TrainConfig) -> int | None:
    """Restore the latest complete checkpoint (or the one `checkpoint.resume` names) into the branch, after
    checking that it was trained with this run's settings (check_resumable)."""
    from paft_jax.checkpoint import BranchCheckpointer, abstract_like
    abstract = abstract_like(branch.state, branch.state_sh)
    source, reader, step_wanted = ckpt.directory, ckpt, None
    if cfg.checkpoint.resume != "auto":
        from paft_jax import storage
        parent, _, step_name = str(cfg.checkpoint.resume).rstrip("/").rpartition("/")  # no pathlib on gs://
        if not storage.is_url(parent):
            parent = str(Path(parent or ".").absolute())  # Orbax refuses relative paths
        if not step_name.isdigit():
            raise ValueError(f"checkpoint.resume={cfg.checkpoint.resume!r}: expected auto, never, or a "
                             "checkpoint step directory such as runs/x/checkpoints/200")
        source, step_wanted = parent, int(step_name)
        reader = BranchCheckpointer(dataclasses.replace(cfg.checkpoint, fallback=False), parent,
                                    mesh_processes(branch.mesh))
    try:
        steps = reader.steps()
        latest = step_wanted if step_wanted is not None else (steps[-1] if steps else None)
        meta = reader.saved_meta(latest) if latest is not None else None
        if meta is not None:  # before the restore: a changed delta shape would fail inside Orbax, unexplained
            check_resumable(meta, cfg, f"{source}/{latest}")
        got = reader.restore(abstract, step_wanted)
    finally:
        if reader is not ckpt:
            reader.close()
    if got is None:
        return None
    step, state, data_state, meta = got
    check_resumable(meta, cfg, f"{source}/{step}")  # the step restored (a fallback may read an older one)
    branch.state = state
    branch.train_it.restore(data_state)
    log.info("resumed from %s/%d", source, step)
    return step


def check_resumable(meta: dict, cfg: TrainConfig, where: str) -> None:
    """Refuse to continue a checkpoint under settings that change what it trains, naming the keys, or that
    would change its lr schedule unasked (a raised `steps` stretching the decay: optim.horizon_change)."""
    from paft_jax.train.config import RESUMABLE_KEYS, resume_conflicts
    conflicts = resume_conflicts(meta.get("config") or {}, to_dict(cfg))
    if conflicts:
        raise ValueError(f"checkpoint {where} was trained with other settings than this run's ("
                         f"{'; '.join(conflicts)}); a resumed run may change only {', '.join(RESUMABLE_KEYS)}. "
                         "To train with the new settings, give a new output_dir or pass --fresh "
                         "(a new run directory beside this one)")
    step = meta.get("step")
    if isinstance(step, int) and step > cfg.steps:
        raise ValueError(f"checkpoint {where} is at step {step}, past steps={cfg.steps}: resuming would train "
                         f"nothing; set steps >= {step}, or export that step with `export --checkpoint {where}`")
    from paft_jax.train.optim import horizon_change
    stretched = horizon_change(meta.get("config") or {}, cfg.optim, cfg.steps)
    if stretched:
        raise ValueError(f"checkpoint {where}: {stretched}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after `step` (written before a crash, redone after the resume)."""
    if not path.exists():
        return
    if step == 0:  # a fresh run
        path.unlink()
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


_SHOWN = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu")


def _summary(rec: dict) -> str:
    """A metrics record as one log line: the step's headline numbers, or every eval_ metric."""
    keys = [k for k in _SHOWN if k in rec] or [k for k in rec if k.startswith("eval_")]
    return ", ".join(f"{k}={rec[k]:.4g}" for k in keys)
