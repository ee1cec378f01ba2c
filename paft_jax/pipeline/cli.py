"""`launch paft --config CFG [key=value ...]`: the whole PAFT pipeline (see pipeline/run.py)."""
from __future__ import annotations

import json
import logging


def cmd_paft(args) -> int:
    from paft_jax.pipeline.config import load_paft_config
    from paft_jax.pipeline.run import run_paft
    cfg = load_paft_config(args.config, list(args.overrides or []))
    if args.fresh:
        from paft_jax.rundir import fresh_dir
        new = fresh_dir(cfg.output_dir)
        if new != cfg.output_dir:
            logging.getLogger("paft_jax").info("--fresh: %s holds a run; this one goes to %s", cfg.output_dir, new)
        cfg.output_dir = new
    from paft_jax import compile_cache
    where = compile_cache.start(cfg.compile_cache, cfg.output_dir)
    summary = run_paft(cfg, progress=not args.no_progress)
    compile_cache.log_stats(where)
    if summary.get("status") == "done" and summary.get("branches"):
        print(json.dumps({"status": "done", "report": str(f"{cfg.output_dir}/report.md"),
                          "training_wall_s": summary.get("training_wall_s"), "merged": f"{cfg.output_dir}/merged"}))
    else:
        print(json.dumps({k: v for k, v in summary.items() if k in ("status", "reason")}))
    if summary.get("status") == "stopped":
        from paft_jax.checkpoint import EXIT_STOPPED
        return EXIT_STOPPED  # saved; the same command continues
    return 0


def register(subparsers) -> None:
    text = ("PAFT: train the SFT and preference branches from one base concurrently on disjoint sub-meshes, "
            "merge their deltas, export and verify the HF model, write a report; rerun to continue")
    p = subparsers.add_parser("paft", help=text, description=text + ". Keys: README.md, Config reference, PAFT; docs/pipeline.md.")
    p.add_argument("--config", default=None, help="YAML PAFT config, e.g. configs/paft_smollm2.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. sft.steps=20 merge.method=dare_ties split=[4,4]")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: a log line every log_every steps and at each evaluation instead")
    p.add_argument("--fresh", action="store_true",
                   help="start a new run: when output_dir already holds one, write to the first free output_dir-2, "
                        "-3, ... (without it, a rerun continues, and refuses settings that change what was trained)")
    p.set_defaults(fn=cmd_paft)
