"""`launch experiment`: train each branch once, build every model, evaluate them all, write the results.

    output_dir/
      branches/<name>/       sft (dense), sft_l1, preference (from the base), sequential (preference on
                             the dense SFT model): metrics.jsonl, checkpoints/, done.json
      evals/<model>.json     one model's metrics (written when done: a rerun skips it)
      results.json           every model's metrics, the delta sparsity, wall times
      results.md, img/       the table and plots

Training runs one branch after the other on the same devices (on a shared CPU the two PAFT branches gain
nothing from running at once; `launch paft` is the concurrent pipeline).  A rerun continues: finished
branches and evaluations are reused, an unfinished branch resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paft_jax import runlock, storage
from paft_jax.evals.tasks import LEADERBOARD_METRIC
from paft_jax.experiment.config import ExperimentConfig
from paft_jax.experiment.evaluate import read_rows, score_generations
from paft_jax.merge.sparsity import bf16_visible
from paft_jax.mesh import build_mesh, select_devices
from paft_jax.pipeline.base import say
from paft_jax.rundir import RunDir
from paft_jax.train.base import Base, load_base
from paft_jax.train.config import TrainConfig
from paft_jax.train.loop import Branch, run_branch
from paft_jax.train.restore import merged_params, restore_delta

TRAIN_ORDER = ("sft", "sft_l1", "preference", "sequential")


def model_names(cfg: ExperimentConfig) -> list[str]:
    names = ["base", "sft", "sft_l1", "preference", "sequential"]
    return names + [f"paft/{m}/{v}" for m in cfg.merges for v in ("dense", "l1")]


def train_all(cfg: ExperimentConfig, tcs: dict[str, TrainConfig], base: Base, mesh, rules, progress: bool) -> dict:
    info = {}
    for name in TRAIN_ORDER:
        tc, rd = tcs[name], RunDir.of(tcs[name].output_dir, tcs[name].cache_dir)
        done = rd.read_json("done.json")
        if done and done.get("steps") == tc.steps:
            say(f"{name}: already trained ({tc.steps} steps); not retrained")
            info[name] = done
            continue
        b = base
        if name == "sequential":  # starts from, and is referenced to, the dense SFT model
            b = dataclasses.replace(base, params=merged_params(base.params, restore(tcs["sft"], mesh, rules)),
                                    source=f"{base.source} + SFT delta")
        say(f"{name}: training {tc.steps} steps ({tc.objective.kind}"
            f"{f', L1 {tc.objective.l1_mode} {tc.objective.l1_lambda:g}' if tc.objective.l1_lambda else ''})")
        t0 = time.time()
        res = run_branch(Branch(tc, b, mesh, rules), progress=progress, name=name)
        if res.preempted:
            raise SystemExit(f"{name}: stopped by a signal after a checkpoint; run the same command to continue")
        info[name] = {"steps": tc.steps, "wall_s": time.time() - t0, "resumed_from": res.resumed_from,
                      "final": res.history[-1] if res.history else None}
        rd.write_json("done.json", info[name])
    return info


def _generations_path(path: str) -> str:
    return path.replace(".json", ".generations.json")


def rescore(cfg: ExperimentConfig, rd: RunDir, path: str, rows: dict) -> dict | None:
    """A finished evaluation, its generation scores recomputed from the stored generations (so a change of
    the scoring rules needs no new generations); None when there is none, or it was made for other prompts."""
    cached = rd.read_json(path)
    gens, base_gens = rd.read_json(_generations_path(path)), rd.read_json(_generations_path("evals/base.json"))
    if cached is None or gens is None or base_gens is None:
        return None
    if any(f"task/{t}/{LEADERBOARD_METRIC[t]}" not in cached for t in cfg.eval.tasks):
        return None   # made before these eval.tasks were asked for: score the model again
    try:
        scores = score_generations(cfg.eval.generate, rows, gens, base_gens)
    except (KeyError, ValueError):
        return None
    updated = {**{k: v for k, v in cached.items() if not k.startswith("gen/")}, **scores}
    if updated != cached:
        rd.write_json(path, updated)
    return updated


def restore(tc: TrainConfig, mesh, rules):
    return restore_delta(Path(tc.output_dir) / "checkpoints", mesh, rules)[3]


def delta_sparsity(delta: Any, base_params: Any, tols: list[float]) -> dict[str, float]:
    """Exact zeros, |delta| <= each tolerance, mean |delta|, and the fraction of entries that change the
    weight once base + delta is cast to bf16 (merge.sparsity.bf16_visible)."""
    leaves = [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(delta)]
    bases = [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(base_params)]
    n = sum(x.size for x in leaves)
    out = {"params": n, "exact_zero": sum(int((x == 0).sum()) for x in leaves) / n,
           "mean_abs": sum(float(np.abs(x, dtype=np.float64).sum()) for x in leaves) / n,
           "bf16_visible": sum(int(np.count_nonzero(bf16_visible(b, x))) for b, x in zip(bases, leaves)) / n}
    for t in tols:
        out[f"abs_le_{t:g}"] = sum(int((np.abs(x) <= t).sum()) for x in leaves) / n
    return out


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict:
    t_start = time.time()
    if jax.process_count() > 1:
        raise ValueError("launch experiment runs in one process (one host, any number of its devices); "
                         "on a multi-host slice run `launch paft` / `sft` / `dpo` / `merge` as separate jobs")
    tcs = cfg.branch_configs()
    if storage.is_url(cfg.output_dir):
        raise ValueError(f"output_dir={cfg.output_dir}: the experiment writes to a local directory")
    rd = RunDir.of(cfg.output_dir, tcs["sft"].cache_dir)
    devices = select_devices(cfg.devices)
    mesh = build_mesh(tcs["sft"].mesh, devices)
    rules = tcs["sft"].mesh.logical_rules()
    for name, tc in tcs.items():
        tc.validate(data_parallel=mesh.shape["data"] * mesh.shape["fsdp"])
    with runlock.holding(cfg.output_dir):  # one writer per output_dir (paft_jax/runlock.py)
        return _experiment(cfg, tcs, rd, devices, mesh, rules, progress, t_start)


def _experiment(cfg: ExperimentConfig, tcs: dict, rd: RunDir, devices, mesh, rules, progress: bool,
                t_start: float) -> dict:
    """run_experiment's work once its inputs are checked and its run lock is held."""
    from paft_jax.experiment.evaluate import Evaluator
    from paft_jax.experiment.report import write_results
    from paft_jax.merge import load_recipe
    from paft_jax.merge.tree import merge_deltas
    base = load_base(tcs["sft"], mesh, rules)
    say(f"base {base.source}; {len(devices)} device(s), mesh {dict(mesh.shape)}")
    t_train = time.time()
    trained = train_all(cfg, tcs, base, mesh, rules, progress)
    train_s = time.time() - t_train

    deltas = {n: restore(tcs[n], mesh, rules) for n in TRAIN_ORDER}
    sparsity = {n: delta_sparsity(d, base.params, cfg.eval.sparsity_tols) for n, d in deltas.items()}
    for n, s in sparsity.items():
        say(f"{n} delta: {100 * s['exact_zero']:.1f}% exact zeros, {100 * s['bf16_visible']:.1f}% change the "
            f"bf16 weight, mean |delta| {s['mean_abs']:.3g}")

    def build(name: str):
        if name == "base":
            return base.params
        if name in ("sft", "sft_l1", "preference"):
            return merged_params(base.params, deltas[name])
        if name == "sequential":
            return merged_params(merged_params(base.params, deltas["sft"]), deltas["sequential"])
        _, method, variant = name.split("/")
        spec = load_recipe(cfg.recipe(method), where=f"merges.{method}").spec
        sft = deltas["sft" if variant == "dense" else "sft_l1"]
        inputs = [sft, deltas["preference"]]
        if spec.num_models == 3:  # linear: the base itself is the third model (delta 0)
            inputs.append(jax.tree_util.tree_map(jnp.zeros_like, sft))
        return merge_deltas(base.params, inputs, spec, cfg=base.cfg)

    t_eval = time.time()
    evaluator = None
    rows = {t.name: read_rows(t) for t in cfg.eval.generate}
    results = {}
    names = model_names(cfg)
    for i, name in enumerate(names):
        path = f"evals/{name.replace('/', '__')}.json"
        cached = rescore(cfg, rd, path, rows)
        if cached is not None:
            results[name] = cached
            continue
        if evaluator is None:
            say("evaluation: reference log-probs and generations of the base")
            evaluator = Evaluator(base.params, base.cfg, base.tokenizer, tcs, cfg.eval, mesh, rules)
        t0 = time.time()
        res = evaluator.evaluate(build(name))
        res["eval_s"] = time.time() - t0
        # every generation in its own file (for reading them); the results keep the first three per task
        generations = res.pop("generations")
        rd.write_json(_generations_path(path), generations)
        res["samples"] = {task: texts[:3] for task, texts in generations.items()}
        rd.write_json(path, res)
        results[name] = res
        say(f"[{i + 1}/{len(names)}] {name}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float) and not k.endswith("_s")))
    summary = {"config": dataclasses.asdict(cfg), "devices": len(devices), "mesh": dict(mesh.shape),
               "base": base.source, "trained": trained, "sparsity": sparsity, "models": results,
               "train_s_this_run": train_s, "eval_s_this_run": time.time() - t_eval,
               "wall_s_this_run": time.time() - t_start}
    write_results(rd, summary)
    return summary
