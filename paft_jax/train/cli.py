"""`launch train|sft|dpo|orpo|simpo --config CFG [key=value ...]`: one branch."""
from __future__ import annotations

import json
import logging

log = logging.getLogger("paft_jax")

KINDS = {"sft": "sft", "dpo": "dpo", "orpo": "orpo", "simpo": "simpo"}


def cmd_train(args) -> int:
    from paft_jax.mesh import build_mesh
    from paft_jax.train.config import load_train_config
    from paft_jax.train.loop import train
    overrides = list(args.overrides or [])
    if args.command != "train":
        overrides.insert(0, f"objective.kind={KINDS[args.command]}")
    try:
        cfg = load_train_config(args.config, overrides)
        if args.command != "train" and cfg.objective.kind != KINDS[args.command]:
            raise ValueError(f"objective.kind={cfg.objective.kind!r} contradicts the `{args.command}` command")
        mesh = build_mesh(cfg.mesh)
        cfg.validate(data_parallel=mesh.shape["data"] * mesh.shape["fsdp"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    result = train(cfg, mesh=mesh, progress=not args.no_progress)
    if result.preempted:
        log.warning("stopped early by a signal; the same command resumes from the saved checkpoint")
    final = {k: v for r in result.history for k, v in r.items() if not k.startswith("time")}
    log.info("done in %.1fs; metrics in %s/metrics.jsonl", result.wall_s, cfg.output_dir)
    print(json.dumps(final))
    return 0


def register(subparsers) -> None:
    helps = {"train": "train one branch; the objective comes from the config (objective.kind)",
             "sft": "supervised fine-tuning branch (objective.kind=sft; L1 via objective.l1_lambda)",
             "dpo": "DPO branch against the frozen base as reference (objective.loss_type picks the variant)",
             "orpo": "ORPO branch (no reference)", "simpo": "SimPO branch (no reference)"}
    for name, text in helps.items():
        p = subparsers.add_parser(name, help=text, description=text + ". Keys: see README 'Training config'.")
        p.add_argument("--config", required=name == "train", default=None,
                       help="YAML training config, e.g. configs/tiny_sft.yaml")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides applied after the YAML, e.g. steps=50 optim.learning_rate=1e-5")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(fn=cmd_train)
