"""`launch experiment --config CFG [key=value ...]`: the paper's comparison at small scale (see run.py)."""
from __future__ import annotations

import json


def cmd_experiment(args) -> int:
    from paft_jax.experiment.config import load_experiment_config
    from paft_jax.experiment.run import run_experiment
    cfg = load_experiment_config(args.config, list(args.overrides or []))
    s = run_experiment(cfg, progress=not args.no_progress)
    print(json.dumps({"status": "done", "results": f"{cfg.output_dir}/results.md",
                      "models": len(s["models"]), "wall_s_this_run": round(s["wall_s_this_run"], 1)}))
    return 0


def register(subparsers) -> None:
    text = ("experiment: base vs SFT vs DPO vs sequential SFT->DPO vs PAFT merges (x dense / L1 SFT delta), each "
            "branch trained once, every model evaluated on held-out skill, preference and general text")
    p = subparsers.add_parser("experiment", help=text, description=text + ". Keys: README.md, Config reference, Experiment.")
    p.add_argument("--config", default=None, help="YAML experiment config, e.g. configs/experiments/smollm2.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. output_dir=/tmp/x paft_overrides.sft.steps=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_experiment)
