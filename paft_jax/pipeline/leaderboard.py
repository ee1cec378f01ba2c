"""The paper's Table 1 for one PAFT run: the base, the SFT model, the preference model and the merged (PAFT)
model scored on the leaderboard tasks (paft_jax.evals: lm-eval's prompts and metrics), on this process's
devices, after the export.

The task data is read and checked before training (`prepare`): a missing data set must not surface after
hours of it.  The scores are kept in leaderboard.json, keyed by the tasks' settings and the merge, so a rerun
of a finished run scores nothing again, and a new merge recipe scores the models again.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from paft_jax.config import MeshConfig
from paft_jax.evals import run as tasks_run
from paft_jax.evals.engine import Scorer
from paft_jax.evals.tasks import LEADERBOARD_METRIC
from paft_jax.mesh import build_mesh
from paft_jax.pipeline.config import PaftConfig
from paft_jax.rundir import RunDir

ROWS = {"parallel": ("base", "sft", "preference", "paft"), "sequential": ("base", "sft", "sft_then_preference")}


def prepare(cfg: PaftConfig) -> list[tasks_run.Prepared]:
    """The tasks' documents and few-shot contexts (no model needed); [] when `eval_tasks` is empty."""
    if not cfg.eval_tasks:
        return []
    try:
        return tasks_run.prepare(cfg.eval_tasks, split=None, limit=cfg.eval_limit, num_fewshot=cfg.eval_fewshot,
                                 data_dir=cfg.eval_data_dir)
    except (ValueError, FileNotFoundError) as e:  # named as this config names them
        text = str(e).replace("--data-dir", "eval_data_dir").replace("--num-fewshot", "eval_fewshot")
        raise type(e)(f"eval_tasks: {text.replace('--limit', 'eval_limit').replace('--split', 'split')}") from None


def settings(cfg: PaftConfig, merge_key: dict) -> dict:
    return {"tasks": list(cfg.eval_tasks), "limit": cfg.eval_limit, "fewshot": cfg.eval_fewshot,
            "data_dir": cfg.eval_data_dir, "merge": merge_key}


def score_run(cfg: PaftConfig, tcs: dict, rd: RunDir, prepared: list, merged: Path, merge_key: dict,
              progress: bool, say) -> dict[str, Any]:
    """{"models": {row: {"task/<t>/<metric>": v, ..., "task/average": v}}, "wall_s": s, ...}."""
    key = settings(cfg, merge_key)
    done = rd.read_json("leaderboard.json")
    if done is not None and done.get("key") == key:
        say(f"leaderboard: already scored ({rd.join('leaderboard.json')}); not redone")
        return done
    from paft_jax.hf.load import load_model
    from paft_jax.train.base import load_base, resolve_compute_dtype
    from paft_jax.train.restore import merged_params, restore_delta
    t0 = time.time()
    mc = MeshConfig()
    mesh, rules = build_mesh(mc, jax.local_devices()), mc.logical_rules()
    base = load_base(dataclasses.replace(tcs["sft"], remat="none"), mesh, rules)
    scorer = Scorer(base.params, base.cfg, base.tokenizer, mesh, rules, cfg.eval_batch_size)
    tasks_run.tokenize(prepared, scorer)

    def delta(name: str):
        return restore_delta(rd.join(name), mesh, rules)[3]

    def exported():
        dtype = resolve_compute_dtype(tcs["sft"].compute_dtype)
        return load_model(str(merged), mesh=mesh, rules=rules, dtype=dtype, with_tokenizer=False).params

    models = {"base": lambda: base.params, "sft": lambda: merged_params(base.params, delta("sft")),
              "preference": lambda: merged_params(base.params, delta("preference")),
              "paft": exported, "sft_then_preference": exported}
    rows: dict[str, dict] = {}
    for row in ROWS[cfg.mode]:
        t_row = time.time()
        params = models[row]()
        scorer.params = params
        rep = tasks_run.score(prepared, scorer, params, base.cfg, base.tokenizer, cfg.eval_batch_size,
                              progress=progress)["results"]
        rows[row] = {f"task/{t}/{m}": float(v) for t, r in rep.items() if t in cfg.eval_tasks
                     for m, v in r.items() if isinstance(v, float)}
        rows[row]["task/average"] = float(np.mean([rep[t][LEADERBOARD_METRIC[t]] for t in cfg.eval_tasks]))
        rows[row]["eval_s"] = round(time.time() - t_row, 1)
        del params
        say(f"leaderboard: {row}: " + ", ".join(f"{t} {100 * rows[row][f'task/{t}/{LEADERBOARD_METRIC[t]}']:.1f}"
                                               for t in cfg.eval_tasks)
            + f"; average {100 * rows[row]['task/average']:.1f} ({rows[row]['eval_s']:.0f}s)")
    out = {"key": key, "models": rows, "documents": {p.task.name: len(p.docs) for p in prepared},
           "shots": {p.task.name: p.shots for p in prepared}, "wall_s": round(time.time() - t0, 1)}
    rd.write_json("leaderboard.json", tasks_run.json_safe(out))
    return out
