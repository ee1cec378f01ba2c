"""`launch paft`: both branches from one base, concurrently on disjoint sub-meshes, then merge, export,
verify, report.  Every stage leaves a marker in the run directory, so the same command run again after
an interruption continues: finished branches are not retrained (an unfinished one resumes from its
checkpoint), a finished merge is not redone, a half-written export is removed and redone.

    output_dir/
      sft/ preference/        each branch: config.json, metrics.jsonl, checkpoints/, done.json
      merged/                 the exported HF model (atomic rename; verified in transformers)
      merge.json              written after the export verified: the merge is complete
      leaderboard.json        with eval_tasks: base, SFT, preference and merged model on the leaderboard tasks
      report.md report.json   the summary; plots in img/

output_dir may be a gs:// URL (paft_jax/rundir.py): files are written in a local mirror under the run's
cache_dir and uploaded (a branch's metrics at each checkpoint save and at its end; the report at the end);
checkpoints go to the bucket through Orbax; the markers are read and written on the bucket (one atomic
object write each); the export is published with storage.publish_dir (atomic for marker-honouring
readers).  A rerun on another machine sees the same markers, so it too continues rather than redoes.

Single process: one thread per branch drives its sub-mesh (JAX releases the GIL while devices compute).
Several processes (a multi-host slice): each process drives the one branch its devices belong to;
checkpoints, stop requests and epoch agreements are scoped to the branch's processes; everyone meets at
a global barrier before process 0 merges.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from paft_jax import runlock
from paft_jax.checkpoint import StopRequest
from paft_jax.mesh import barrier, init_distributed, mesh_processes, select_devices
from paft_jax.models.config import ModelConfig
from paft_jax.pipeline import split as split_lib
from paft_jax.pipeline.base import StackedSource, base_model_config, base_source, place, say
from paft_jax.pipeline.config import BRANCHES, PaftConfig, branch_configs
from paft_jax.rundir import RunDir
from paft_jax.train.base import Base, load_base
from paft_jax.train.config import TrainConfig
from paft_jax.train import turns
from paft_jax.train.loop import Branch, run_branch

log = logging.getLogger("paft_jax")


def run_dir(cfg: PaftConfig, tcs: dict[str, TrainConfig]) -> RunDir:
    """The run directory; a gs:// one is mirrored under the branches' (shared) cache_dir."""
    return RunDir.of(cfg.output_dir, tcs["sft"].cache_dir)


def check_rerun(cfg: PaftConfig, tcs: dict[str, TrainConfig], rd: RunDir) -> None:
    """A rerun continues the run in output_dir: refuse, before anything loads, settings that change what a
    branch has already trained (a branch with a checkpoint or done.json), naming the keys, and a raised
    `steps` that would stretch a branch's lr schedule (optim.horizon_change).  The merge
    recipe may change: merge_and_export redoes the merge then."""
    from paft_jax import storage
    from paft_jax.config import to_dict
    from paft_jax.train.config import RESUMABLE_KEYS, resume_conflicts
    from paft_jax.train.optim import horizon_change
    conflicts, stretched = [], []
    saved = rd.read_json("paft_config.json") or {}
    if saved.get("mode", cfg.mode) != cfg.mode:
        conflicts.append(f"mode: {saved['mode']!r} -> {cfg.mode!r}")
    for n in BRANCHES:
        if cfg.adapter(n) is not None:  # imported, not trained: a changed adapter is imported again
            continue
        prev = rd.read_json(f"{n}/config.json")
        trained = prev is not None and (rd.read_json(f"{n}/done.json") is not None or any(
            c.isdigit() for c in storage.child_names(rd.join(n, "checkpoints"))))
        if trained:
            conflicts += [f"{n}.{c}" for c in resume_conflicts(prev, to_dict(tcs[n]))]
            stretched.append(horizon_change(prev, tcs[n].optim, tcs[n].steps, prefix=f"{n}."))
    if conflicts:
        raise ValueError(f"{rd.url} holds a run trained with other settings ({'; '.join(conflicts)}); a rerun "
                         f"continues it and may change only the merge and, per branch, {', '.join(RESUMABLE_KEYS)}. "
                         "To train with the new settings, give a new output_dir or pass --fresh "
                         "(a new run directory beside this one)")
    stretched = [s for s in stretched if s]
    if stretched:
        raise ValueError(f"{rd.url}: {'; '.join(stretched)}")


def merge_key(cfg: PaftConfig) -> dict:
    """What the merged export depends on besides the checkpoints: the recipe (on placeholder names) and layout,
    and the weights of the adapters a branch is imported from."""
    from paft_jax.pipeline.adapter_branch import adapter_digest
    key = {"recipe": cfg.merge.recipe("base", "sft", "preference", cfg.mode), "dtype": cfg.merge.dtype,
           "max_shard_size": cfg.merge.max_shard_size}
    adapters = {n: adapter_digest(cfg.adapter(n)) for n in BRANCHES if cfg.adapter(n) is not None}
    if adapters:
        key["adapters"] = adapters
    return key


def branch_done(rd: RunDir, name: str, tc: TrainConfig) -> dict | None:
    done = rd.read_json(f"{name}/done.json")
    return done if done and done.get("steps") == tc.steps else None


# ------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Plan:
    mode: str
    devices: list
    counts: list[int]
    works: list[float]
    meshes: dict
    rules: dict
    mine: list[str]


def plan(cfg: PaftConfig, tcs: dict[str, TrainConfig], mcfg: ModelConfig) -> Plan:
    """The devices of each branch: split by estimated work, or all of them for each in sequential mode or when
    a branch is imported from an adapter (only the other trains)."""
    devices = select_devices(cfg.devices)
    imported = [n for n in BRANCHES if cfg.adapter(n) is not None]
    works = [0.0 if n in imported else split_lib.estimate(tcs[n], mcfg).total for n in BRANCHES]
    rules = {n: tcs[n].mesh.logical_rules() for n in BRANCHES}
    multi = jax.process_count() > 1
    granularity = jax.local_device_count() if multi else 1
    layout = "sequential" if imported else cfg.mode
    counts, meshes = split_lib.branch_meshes(layout, cfg.split, [tcs[n] for n in BRANCHES], works, devices,
                                             granularity)
    meshes = dict(zip(BRANCHES, meshes))
    if cfg.mode == "sequential":
        return Plan("sequential", devices, counts, works, meshes, rules, [n for n in BRANCHES if n not in imported])
    me = jax.process_index()
    mine = [n for n in BRANCHES if n not in imported and any(d.process_index == me for d in meshes[n].devices.flat)]
    if imported:
        return Plan("parallel", devices, counts, works, meshes, rules, mine)
    if multi and len(mine) != 1:
        raise ValueError(f"process {me} owns devices of {len(mine)} branches; each process must drive exactly one "
                         f"(split {counts} over {jax.process_count()} processes of {granularity} devices)")
    return Plan("parallel", devices, counts, works, meshes, rules, mine)


def train_branches(cfg: PaftConfig, tcs: dict[str, TrainConfig], p: Plan, progress: bool) -> dict[str, Any]:
    """Train what is not finished yet; returns per-branch info (done.json contents) and the loaded base."""
    rd = run_dir(cfg, tcs)
    info: dict[str, Any] = {n: branch_done(rd, n, tcs[n]) for n in BRANCHES}
    todo = [n for n in p.mine if info[n] is None]
    for n in p.mine:
        if info[n] is not None:
            say(f"{n}: already trained ({tcs[n].steps} steps, {rd.join(n)}); not retrained")
    bases: dict[str, Base] = {}
    if not todo:
        return {"branches": info, "bases": bases, "train_wall_s": None}
    first = todo[0]
    t_load = time.time()
    base = load_base(tcs[first], p.meshes[first], p.rules[first])
    bases[first] = base
    say(f"base {base.source} loaded in {time.time() - t_load:.1f}s")
    stop = StopRequest(enabled=True)
    errors: dict[str, BaseException] = {}
    t0 = time.time()

    def run(name: str, position: int, base_for: Base) -> None:
        try:
            t_start = time.time()
            with turns.turn():  # its set-up runs programs too (the delta's init, the reference pass)
                branch = Branch(tcs[name], base_for, p.meshes[name], p.rules[name])
            res = run_branch(branch, progress=progress, name=name, stop=stop, bar_position=position,
                             started=t_start)
            if res.preempted:
                return
            record = {"branch": name, "steps": tcs[name].steps, "objective": tcs[name].objective.kind,
                      "devices": [d.id for d in p.meshes[name].devices.flat],
                      "processes": mesh_processes(p.meshes[name]),
                      "mesh": dict(p.meshes[name].shape), "wall_s": time.time() - t_start,
                      "start": t_start, "end": time.time(), "resumed_from": res.resumed_from,
                      "first_step": res.step_times[0][0] if res.step_times else None,
                      "last_step": res.step_times[-1][1] if res.step_times else None}
            from paft_jax.mesh import is_mesh_primary
            if is_mesh_primary(p.meshes[name]):
                rd.write_json(f"{name}/done.json", record)
            info[name] = record
        except BaseException as e:  # noqa: BLE001 - the other branch must stop and save, then we re-raise
            errors[name] = e
            stop.request(f"the {name} branch failing ({type(e).__name__})")

    try:
        if p.mode == "sequential":
            for name in todo:
                b = base if name == "sft" else _stacked_base(base, rd.join("sft"), p.meshes[name], p.rules[name])
                run(name, 0, b)
                if errors or stop.pending():
                    break
        elif cfg.schedule == "serial" or len(todo) == 1:
            for i, name in enumerate(todo):
                run(name, 0, base if name == first else place(base, p.meshes[name], p.rules[name]))
                if errors or stop.pending():
                    break
        else:  # both at once, each thread driving its own sub-mesh
            placed = {n: base if n == first else place(base, p.meshes[n], p.rules[n]) for n in todo}
            bases.update(placed)
            threads = [threading.Thread(target=run, args=(n, i, placed[n]), name=f"paft-{n}", daemon=True)
                       for i, n in enumerate(todo)]
            with turns.taking_turns():  # on CPU, their programs run one at a time (train/turns.py)
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():  # join with a timeout so the main thread still receives signals
                        t.join(0.5)
    finally:
        stop.restore_handlers()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"the {name} branch failed: {type(err).__name__}: {err}") from err
    return {"branches": info, "bases": bases, "train_wall_s": time.time() - t0,
            "stopped": stop.describe() if stop.pending() else None}


def _stacked_base(base: Base, sft_dir: str, mesh, rules) -> Base:
    """Sequential mode: the preference branch starts from (and is referenced to) the SFT model."""
    from paft_jax.train.restore import merged_params, restore_delta
    _, _, step, delta = restore_delta(sft_dir, mesh, rules)
    say(f"sequential: the preference branch starts from the SFT model (step {step} of {sft_dir})")
    return dataclasses.replace(base, params=merged_params(place(base, mesh, rules).params, delta),
                               source=f"{base.source} + SFT delta of {sft_dir}")


# ------------------------------------------------------------------------------------ merge and export


def finished_merge(cfg: PaftConfig, rd: RunDir) -> dict | None:
    """merge.json of a merge already done (its export complete, the same recipe), else None after removing
    what an unfinished or outdated merge left behind (process 0)."""
    from paft_jax import storage
    merged = rd.join("merged")
    done = rd.read_json("merge.json")
    changed = done is not None and done.get("key", merge_key(cfg)) != merge_key(cfg)
    if changed:
        say(f"merge: the recipe changed since {merged} was merged ({done.get('method')} then, {cfg.merge.method} "
            "now, or its parameters); redoing the merge")
    elif done is not None and (storage.is_complete_dir(merged) if rd.remote else Path(merged).is_dir()):
        say(f"merge: already done ({merged}); not redone")
        return done
    if done is not None:  # the marker of an export that is gone or being replaced
        rd.remove("merge.json")
    if rd.remote:  # a publish killed midway leaves its temporary prefix beside merged/ (and merged/ marked)
        for stale in sorted(n for n in storage.child_names(rd.url) if n.startswith(".merged.tmp-")):
            say(f"merge: removing the unfinished upload {rd.join(stale)}")
            storage.remove(rd.join(stale))
    else:
        for stale in rd.local.glob(".merged.tmp-*"):  # a killed export's temporary directory
            say(f"merge: removing the unfinished export {stale}")
            shutil.rmtree(stale, ignore_errors=True)
        if Path(merged).exists() and not changed:  # renamed but not verified (killed during verification)
            shutil.rmtree(merged)  # (a changed recipe's old export stays readable until the new one replaces it)
    return None


def merge_and_export(cfg: PaftConfig, tcs: dict[str, TrainConfig], bases: dict[str, Base], devices: list) -> dict | None:
    """Merge the two branch checkpoints into the base and export (atomic), verified; skipped if done.
    On the run's `devices` (pipeline/mesh_merge.py), or streamed on one device (merge.on_mesh: false, auto on
    CPU).  With several processes merging on the mesh every process calls this and takes part; process 0
    decides whether to merge, keeps the books and returns the result (the others None); streamed, process 0
    alone calls it."""
    from paft_jax.merge import load_recipe, merge_to_hf
    from paft_jax.train.restore import CheckpointSource
    rd = run_dir(cfg, tcs)
    merged = rd.join("merged")
    lead = jax.process_index() == 0
    done = finished_merge(cfg, rd) if lead else None
    if jax.process_count() > 1 and cfg.merge.merges_on_mesh():  # everyone follows process 0's decision
        from jax.experimental import multihost_utils
        if int(multihost_utils.broadcast_one_to_all(np.int32(done is not None))):
            return done
    elif done is not None:
        return done
    if lead:
        rd.local.mkdir(parents=True, exist_ok=True)
    branches = {n: rd.join(n) for n in BRANCHES}
    if cfg.merge.merges_on_mesh():
        from paft_jax.pipeline.mesh_merge import merge_and_export_on_mesh
        recipe = load_recipe(cfg.merge.recipe(tcs["sft"].model, branches["sft"], branches["preference"], cfg.mode))
        say(f"merge: {recipe.spec.method} of {[Path(m).name for m in recipe.models]} into the base -> {merged}")
        t0 = time.time()
        res = merge_and_export_on_mesh(spec=recipe.spec, recipe_text=recipe.text, inputs=recipe.models,
                                       branches=branches, tc=tcs["sft"], bases=bases, devices=devices,
                                       sequential=cfg.mode == "sequential", out=merged, dtype=cfg.merge.dtype,
                                       max_shard_size=cfg.merge.max_shard_size, verify=cfg.merge.verify,
                                       atol=cfg.merge.atol)
        if not lead:
            return None
        rep, sparsity = res["verify"], res["sparsity"]
        numbers = {"merge_seconds": res["merge_seconds"], "tensors": res["tensors"], "bytes": res["bytes"],
                   "mesh": res["mesh"]}
    else:  # streamed tensor by tensor on one device of process 0 (the other processes wait at a barrier)
        base_src = base_source(tcs["sft"], bases, rd.local)
        ckpts = {p: CheckpointSource(p) for p in branches.values()}
        if cfg.mode == "sequential":  # the preference branch trained on base + d_sft in the base's dtype
            base_src = StackedSource(base_src, ckpts[branches["sft"]])
        recipe = load_recipe(cfg.merge.recipe(base_src.label, branches["sft"], branches["preference"], cfg.mode))
        models = [ckpts.get(m) or (base_src if m == base_src.label else None) for m in recipe.models]
        if any(m is None for m in models):
            raise ValueError(f"merge: cannot place inputs {recipe.models}")
        say(f"merge: {recipe.spec.method} of {[Path(m).name for m in recipe.models]} into the base -> {merged} "
            "(streamed on one device)")
        from paft_jax.merge.sparsity import SparsityStats, analyze, describe
        # parallel mode: the deltas' sparsity as the merge reads them (no second restore, no second base load)
        stats = SparsityStats() if cfg.mode != "sequential" else None
        t0 = time.time()
        res = merge_to_hf(recipe.spec, base_src, models, merged, recipe_text=recipe.text, overwrite=True,
                          max_shard_size=cfg.merge.max_shard_size, verify=cfg.merge.verify, atol=cfg.merge.atol,
                          stats=stats)
        rep = res.verify
        if stats is not None:
            sparsity = stats.report(base_src.label, [m.label for m in models], [describe(m) for m in models])
        else:  # the merge's only input is the preference delta: SFT's is read once more, leaf by leaf
            sparsity = analyze(base_src.base, list(ckpts.values()))
        sparsity.pop("tensors")
        numbers = {"merge_seconds": res.seconds, "tensors": res.tensors, "bytes": res.bytes_written, "mesh": None}
    info = {"method": recipe.spec.method, "key": merge_key(cfg), "sparsity": sparsity, "recipe": recipe.text,
            "seconds": time.time() - t0, **numbers, "dir": str(merged), "verified": rep is not None,
            "verify_max_abs_diff": getattr(rep, "max_abs_diff", None), "verify_atol": cfg.merge.atol}
    rd.write_json("merge.json", info)
    say(f"merge: done in {info['seconds']:.1f}s" + (f", verified in transformers (max |logit diff| "
                                                   f"{info['verify_max_abs_diff']:.2e})" if rep else ""))
    return info


def local_export(rd: RunDir) -> Path:
    """A local copy of the merged export (transformers reads local directories): the export itself, or
    for a remote run a fresh download into the mirror."""
    if not rd.remote:
        return rd.local / "merged"
    from paft_jax import storage
    local = rd.local / "merged"
    shutil.rmtree(local, ignore_errors=True)
    return storage.fetch_dir(rd.join("merged"), local)


def answer(merged: Path, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """The exported model, loaded by transformers, answers each prompt (chat template, greedy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    out = []
    for q in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        out.append({"prompt": q, "answer": tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)})
    return out


# ------------------------------------------------------------------------------------------- the run


def run_paft(cfg: PaftConfig, *, progress: bool = True) -> dict:
    """The whole pipeline; returns the summary (also written to output_dir/report.json on process 0)."""
    init_distributed(cfg.distributed)
    tcs = branch_configs(cfg)
    for n in BRANCHES:
        tcs[n].validate()
    mcfg = base_model_config(tcs["sft"])
    p = plan(cfg, tcs, mcfg)
    rd = run_dir(cfg, tcs)
    check_rerun(cfg, tcs, rd)
    from paft_jax.pipeline import leaderboard
    tasks = leaderboard.prepare(cfg)  # the eval tasks' data, read before training: a missing set fails now
    with runlock.holding(cfg.output_dir, lease_s=cfg.lock_lease_s):  # one writer per output_dir, before any write
        return _train_merge_report(cfg, tcs, p, mcfg, rd, tasks, progress)


def import_adapters(cfg: PaftConfig, tcs: dict[str, TrainConfig], mcfg: ModelConfig, rd: RunDir) -> None:
    """Each `<branch>.from_adapter` written as that branch's finished LoRA checkpoint (pipeline/adapter_branch.py),
    unless this adapter already is."""
    from paft_jax.pipeline.adapter_branch import adapter_digest, import_adapter, imported
    for n in BRANCHES:
        adapter = cfg.adapter(n)
        if adapter is None:
            continue
        digest = adapter_digest(adapter)
        if imported(rd, n, adapter, digest):
            say(f"{n}: the adapter {adapter} (sha256 {digest[:12]}) is already this run's {n} branch")
            continue
        record = import_adapter(rd, n, tcs[n], mcfg, adapter, digest)
        say(f"{n}: imported the LoRA adapter {adapter} (rank {record['r']}, {', '.join(record['target_modules'])}) "
            f"as the branch's result; not trained here")


def _train_merge_report(cfg: PaftConfig, tcs: dict[str, TrainConfig], p, mcfg, rd: RunDir, tasks,
                        progress: bool) -> dict:
    """run_paft's work once its inputs are checked and its run lock is held."""
    from paft_jax.pipeline import leaderboard
    out = rd.join()
    if jax.process_index() == 0:
        rd.local.mkdir(parents=True, exist_ok=True)
        from paft_jax.config import to_dict
        rd.write_json("paft_config.json", to_dict(cfg))
    what = {n: f"from the adapter {cfg.adapter(n)}" if cfg.adapter(n) else
            f"{tcs[n].objective.kind}, {tcs[n].steps} steps" for n in BRANCHES}
    say(f"{cfg.mode} run of sft ({what['sft']}) and preference ({what['preference']}) from {tcs['sft'].model} "
        f"into {out}")
    if p.mode == "parallel" and not any(cfg.adapter(n) for n in BRANCHES):
        say(split_lib.describe(p.works, p.counts) + f"; schedule {cfg.schedule}")
    t0 = time.time()
    if jax.process_index() == 0:
        import_adapters(cfg, tcs, mcfg, rd)
    if jax.process_count() > 1 and any(cfg.adapter(n) for n in BRANCHES):
        barrier(f"paft: adapters imported ({out})")
    trained = train_branches(cfg, tcs, p, progress)
    if trained.get("stopped"):
        say(f"stopped by {trained['stopped']}: checkpoints saved; run the same command again to continue")
        return {"status": "stopped", "reason": trained["stopped"]}
    if jax.process_count() > 1:
        barrier(f"paft: branches trained ({out})")
    summary: dict[str, Any] = {"status": "done"}  # processes other than 0 train (and merge on the mesh)
    together = jax.process_count() > 1 and cfg.merge.merges_on_mesh()
    merge = merge_and_export(cfg, tcs, trained["bases"], p.devices) if together else None
    if jax.process_index() == 0:
        for n in BRANCHES:  # branches other processes trained: their done.json (written before the barrier)
            trained["branches"][n] = trained["branches"][n] or rd.read_json(f"{n}/done.json")
        merge = merge if together else merge_and_export(cfg, tcs, trained["bases"], p.devices)
        exported = local_export(rd) if cfg.prompts or tasks else None
        answers = answer(exported, cfg.prompts, cfg.max_new_tokens) if cfg.prompts else []
        for a in answers:
            say(f"merged model (transformers) answers {a['prompt']!r}:\n    {a['answer'].strip()}")
        board = (leaderboard.score_run(cfg, tcs, rd, tasks, exported, merge_key(cfg), progress, say)
                 if tasks else None)
        from paft_jax.pipeline import report as report_lib
        for n in BRANCHES:  # a remote run: the branches' metrics as the bucket has them (trained elsewhere?)
            rd.pull(f"{n}/metrics.jsonl")
        summary = {"status": "done", **report_lib.summarize(cfg, tcs, p, trained, merge, answers, mcfg,
                                                            time.time() - t0, local=rd.local),
                   "leaderboard": board}
        if cfg.report:
            paths = report_lib.write_report(rd.local, summary)
            uploaded = rd.upload([str(Path(f).relative_to(rd.local)) for f in paths.values()] + ["report.json"])
            say(f"report: {rd.join('report.md')}" + (f" ({len(uploaded)} files uploaded from {rd.local})"
                                                     if rd.remote else "") + "\n" + report_lib.headline(summary))
    if jax.process_count() > 1:
        barrier(f"paft: done ({out})")
    return summary
