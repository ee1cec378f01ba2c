"""`launch train|sft|dpo|orpo|simpo --config CFG [key=value ...]`: one branch."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("paft_jax")

KINDS = {"sft": "sft", "dpo": "dpo", "orpo": "orpo", "simpo": "simpo"}


def cmd_train(args) -> int:
    from paft_jax.mesh import build_mesh
    from paft_jax.train.config import load_train_config
    from paft_jax.train.loop import train
    overrides = list(args.overrides or [])
    if args.command != "train":
        said = _config_kind(args.config)
        if said is not None and said != KINDS[args.command] and not any(
                o.startswith("objective.kind=") for o in overrides):
            raise ValueError(f"{args.config} says objective.kind: {said}, which contradicts the `{args.command}` "
                             f"command; run `{said}` or `train` with it, or add objective.kind={KINDS[args.command]}")
        overrides.insert(0, f"objective.kind={KINDS[args.command]}")
    cfg = load_train_config(args.config, overrides)
    if args.fresh:
        from paft_jax.rundir import fresh_dir
        new = fresh_dir(cfg.output_dir)
        if new != cfg.output_dir:
            log.info("--fresh: %s holds a run; this one goes to %s", cfg.output_dir, new)
        cfg.output_dir = new
    if args.command != "train" and cfg.objective.kind != KINDS[args.command]:
        raise ValueError(f"objective.kind={cfg.objective.kind!r} contradicts the `{args.command}` command")
    mesh = build_mesh(cfg.mesh)
    cfg.validate(data_parallel=mesh.shape["data"] * mesh.shape["fsdp"])
    from paft_jax import compile_cache
    where = compile_cache.start(cfg.compile_cache, cfg.output_dir)
    result = train(cfg, mesh=mesh, progress=not args.no_progress)
    compile_cache.log_stats(where)
    final = {k: v for r in result.history for k, v in r.items() if not k.startswith("time")}
    print(json.dumps({"status": "stopped" if result.preempted else "done", **final}))
    if result.preempted:
        from paft_jax.checkpoint import EXIT_STOPPED
        log.warning("stopped early by a signal (exit code %d); the same command resumes from the saved "
                    "checkpoint", EXIT_STOPPED)
        return EXIT_STOPPED
    log.info("done in %.1fs; metrics in %s/metrics.jsonl", result.wall_s, cfg.output_dir)
    return 0


def _config_kind(path: str | None) -> str | None:
    """The objective.kind a training config file names, if it names one."""
    if path is None:
        return None
    import yaml
    from paft_jax.config import yaml_load
    try:
        data = yaml_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # load_train_config reports it, naming the file
    objective = data.get("objective") if isinstance(data, dict) else None
    return objective.get("kind") if isinstance(objective, dict) else None


def register(subparsers) -> None:
    helps = {"train": "train one branch; the objective comes from the config (objective.kind)",
             "sft": "supervised fine-tuning branch (objective.kind=sft; L1 via objective.l1_lambda)",
             "dpo": "DPO branch against the frozen base as reference (objective.loss_type picks the variant)",
             "orpo": "ORPO branch (no reference)", "simpo": "SimPO branch (no reference)"}
    for name, text in helps.items():
        p = subparsers.add_parser(name, help=text, description=text + ". Keys: README.md, Config reference, Training; docs/training.md.")
        example = {"train": "configs/tiny_sft.yaml", "sft": "configs/tiny_sft.yaml", "dpo": "configs/tiny_dpo.yaml",
                   "orpo": "configs/tiny_dpo.yaml objective.kind=orpo",
                   "simpo": "configs/tiny_dpo.yaml objective.kind=simpo"}[name]
        p.add_argument("--config", required=name == "train", default=None,
                       help=f"YAML training config, e.g. {example} (a config naming another objective.kind is "
                            "refused unless objective.kind is given on the command line)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides applied after the YAML, e.g. steps=50 optim.learning_rate=1e-5")
        p.add_argument("--no-progress", action="store_true",
                       help="no progress bar: a log line every log_every steps and at each evaluation instead")
        p.add_argument("--fresh", action="store_true",
                       help="start a new run: when output_dir already holds one, write to the first free "
                            "output_dir-2, -3, ... (without it, a rerun resumes, and refuses changed settings)")
        p.set_defaults(fn=cmd_train)
