"""`launch compile`: compile every device program of a run ahead of time, for a TPU slice described by its
accelerator type (no TPU needed) or for the attached devices, and print the per-chip memory of each, with
its headroom against the chip's usable HBM (what the TPU compiler lets a program use; report.py says why).

A PAFT config is compiled branch by branch on the sub-meshes its split gives (whole hosts); a branch
config on its own mesh.  Shapes come from the model directory's config.json when it is on this machine,
else from `--model-shape`.  Nothing is loaded: no weights, no data, no tokenizer.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from paft_jax.models import loops

log = logging.getLogger("paft_jax")

PROGRAMS = ("train_step", "eval_step", "reference_logps")


def _is_paft_config(path: str | None) -> bool:
    from paft_jax.config import yaml_load
    if path is None:
        raise ValueError("compile needs --config (a branch config or a PAFT config)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    data = yaml_load(Path(path).read_text()) or {}
    return isinstance(data, dict) and bool({"sft", "preference", "split", "merge"} & set(data))


def model_shape(tc, named: str | None, on_cpu: bool):
    """The base's ModelConfig with the run's dtypes and remat, from shapes only."""
    from paft_jax.models.config import ModelConfig
    from paft_jax.models.shapes import SHAPES, named_shape
    compute = tc.compute_dtype if tc.compute_dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    stored = None
    if named is not None:
        mcfg = named_shape(named)
    elif tc.model == "random":
        mc = dict(tc.model_config)
        if "vocab_size" not in mc:  # the tokenizer decides it (a local one: tiny configs)
            from paft_jax.train.base import resolve_tokenizer
            mc["vocab_size"] = len(resolve_tokenizer(tc.tokenizer, None))
        mcfg = ModelConfig(**mc)
    else:
        if tc.model != "smollm2" and not Path(tc.model).exists():
            raise ValueError(f"model {tc.model} is not on this machine: give --model-shape NAME to compile with a "
                             f"named shape (known: {', '.join(SHAPES)})")
        from paft_jax.hf.load import read_model_config
        hf, mcfg = read_model_config(tc.model)
        stored = hf.get("torch_dtype") or hf.get("dtype")
    if tc.param_dtype != "auto":
        param = tc.param_dtype
    elif stored in ("float32", "bfloat16", "float16"):
        param = stored
    else:  # a named shape: 7-8B bases ship in bfloat16
        param = "bfloat16" if named is not None else mcfg.param_dtype
    return mcfg.replace(dtype=compute, param_dtype=param, remat=tc.remat, scan_unroll=tc.scan_unroll)


def plan_branches(args) -> tuple[list[tuple[str, object, object]], object, tuple[int | None, int | None], str]:
    """[(branch name, TrainConfig, mesh)], the model shape, the chip's (nominal, usable) HBM bytes, and a
    description."""
    import jax
    from paft_jax.aot.topology import device_hbm, parse_accelerator, topology_devices
    from paft_jax.mesh import build_mesh
    topo = parse_accelerator(args.topology) if args.topology else None
    paft = _is_paft_config(args.config)
    if paft:
        from paft_jax.pipeline.config import branch_configs, load_paft_config
        cfg = load_paft_config(args.config, args.overrides)
        tcs = branch_configs(cfg)
        if args.branch is not None:  # that branch alone on the whole topology: a slice of its own
            if args.branch not in tcs:
                raise ValueError(f"--branch {args.branch!r}: a PAFT config has the branches {', '.join(tcs)}")
            tcs, paft = {args.branch: tcs[args.branch]}, False
    else:
        if args.branch is not None:
            raise ValueError("--branch selects a branch of a PAFT config; this is a branch config")
        from paft_jax.train.config import load_train_config
        tc = load_train_config(args.config, args.overrides)
        tcs = {tc.objective.kind: tc}
    for tc in tcs.values():
        tc.validate()
    if topo is not None:
        devices, granularity = topology_devices(topo), topo.devices_per_host
        hbm = topo.hbm_bytes, topo.usable_hbm_bytes
        where = (f"{topo.accelerator} ({topo.name}, {topo.chips} chips on {topo.hosts} hosts, "
                 f"{hbm[1] / 2 ** 30:.2f} GiB of {hbm[0] / 2 ** 30:.0f} GiB HBM usable per chip)")
    else:
        devices = jax.devices()
        granularity = jax.local_device_count() if jax.process_count() > 1 else 1
        hbm = device_hbm(devices[0])
        where = f"the attached devices ({len(devices)} x {devices[0].device_kind})"
    on_cpu = devices[0].platform == "cpu"
    mcfg = model_shape(next(iter(tcs.values())), args.model_shape, on_cpu)
    if paft:
        from paft_jax.pipeline import split as split_lib
        from paft_jax.mesh import select_devices
        if topo is None:
            devices = select_devices(cfg.devices)
        elif cfg.devices:
            devices = devices[:cfg.devices]
        names = list(tcs)
        works = [split_lib.estimate(tcs[n], mcfg).total for n in names]
        counts, meshes = split_lib.branch_meshes(cfg.mode, cfg.split, [tcs[n] for n in names], works, devices,
                                                 granularity)
        where += f"; split {counts[0]} + {counts[1]}" if cfg.mode == "parallel" else "; sequential"
        return [(n, tcs[n], m) for n, m in zip(names, meshes)], mcfg, hbm, where
    (name, tc), = tcs.items()
    return [(name, tc, build_mesh(tc.mesh, devices))], mcfg, hbm, where


def cmd_compile(args) -> int:
    from tqdm.auto import tqdm
    from paft_jax.aot.report import GIB, compile_memory, short_of_headroom, table
    from paft_jax.train.programs import abstract_programs
    wanted = set(args.programs.split(",")) if args.programs else set(PROGRAMS)
    bad = wanted - set(PROGRAMS)
    if bad:
        raise ValueError(f"--programs: unknown {sorted(bad)}; expected some of {', '.join(PROGRAMS)}")
    branches, mcfg, hbm, where = plan_branches(args)
    jax_devices = {d for _, _, m in branches for d in m.devices.flat}
    unroll = loops.layer_unroll(mcfg.scan_unroll, mcfg.num_layers, branches[0][2], remat=mcfg.remat != "none")
    print(f"compile {args.config} for {where}\nmodel {mcfg.family}: {mcfg.num_params():,} params, "
          f"{mcfg.num_layers} layers, hidden {mcfg.hidden_size}; params {mcfg.param_dtype}, compute {mcfg.dtype}, "
          f"remat {mcfg.remat}, layer scan unroll {unroll}", file=sys.stderr)
    for name, tc, _ in branches:
        print(f"{name}: attention {tc.attention} (block {tc.attention_block}), remat {tc.remat}", file=sys.stderr)
    jobs = [(name, prog, fn, a, mesh) for name, tc, mesh in branches
            for prog, fn, a in abstract_programs(tc, mcfg, mesh) if prog.split(" ")[0] in wanted]
    if not jobs:  # e.g. --programs reference_logps on branches without a reference cache
        raise ValueError(f"--programs {args.programs}: no branch of {args.config} runs "
                         + ("that program" if len(wanted) == 1 else "these programs")
                         + " (the reference pass runs only with ref_cache: true)" * ("reference_logps" in wanted))
    rows, refused = [], []
    for name, prog, fn, a, mesh in tqdm(jobs, desc="compiling", unit="program", disable=not args.progress):
        try:
            rows.append(compile_memory(name, prog, fn, a, mesh, *hbm))
        except Exception as e:  # noqa: BLE001 - only the compiler's verdicts on the config are results
            if "RESOURCE_EXHAUSTED" in str(e):
                refused.append(f"{name}/{prog} does not fit: the compiler ran out of memory ("
                               + str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0] + ")")
            elif "limited ICI routing" in str(e):  # v5e / v6e: a program must span the whole slice
                refused.append(f"{name}/{prog} cannot run on {mesh.size} of the slice's {len(jax_devices)} chips: "
                               "the TPU compiler requires a program on this chip to use the whole slice (limited "
                               "ICI routing); run the branches on separate slices, or one after the other")
            else:
                raise
            log.info(refused[-1])
            continue
        log.info("compiled %s/%s in %.0fs: peak %.2f GiB per chip", name, prog, rows[-1].compile_s,
                 rows[-1].peak / GIB)
    print(table(rows))
    for line in refused:
        print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "config": args.config, "branch": args.branch, "overrides": args.overrides, "topology": args.topology,
            "where": where, "hbm": hbm[0], "usable_hbm": hbm[1],
            "model": {"family": mcfg.family, "params": mcfg.num_params(), "param_dtype": mcfg.param_dtype,
                      "dtype": mcfg.dtype, "remat": mcfg.remat,
                      "scan_unroll": unroll},
            "min_headroom": args.min_headroom, "programs": [r.to_json() for r in rows], "refused": refused},
            indent=2) + "\n")
    if refused:
        raise ValueError(refused[0] + (f" ({len(refused)} programs refused)" if len(refused) > 1 else ""))
    short = short_of_headroom(rows, args.min_headroom)
    if short:
        raise ValueError(short)
    return 0


def register(sub) -> None:
    from paft_jax.aot.topology import size_ranges  # light: no JAX
    p = sub.add_parser("compile", help="compile a run's device programs ahead of time and report per-chip memory",
                       description="Compile every device program of a branch or PAFT config (train step, eval "
                                   "step, DPO reference pass) from shapes alone, for a TPU slice given by its "
                                   "accelerator type (needs libtpu: pip install -e '.[tpu]'; no TPU attached) or "
                                   "for the attached devices, and print per-chip memory. Exits non-zero when a "
                                   "program does not fit.")
    p.add_argument("--config", default=None, help="a branch config (configs/llama3_8b_sft.yaml) or a PAFT config")
    p.add_argument("--topology", default=None,
                   help=f"gcloud accelerator type: {size_ranges()} (default: the attached devices)")
    p.add_argument("--model-shape", default=None,
                   help="named model shape when the model directory is not on this machine: llama3-8b, "
                        "llama3.1-8b, llama3.2-1b, mistral-7b, qwen2-7b, qwen3-8b, qwen3-14b, gemma3-4b, gemma3-12b, "
                        "olmo2-7b, olmo3-7b, smollm3-3b, smollm2-135m")
    p.add_argument("--branch", default=None, choices=["sft", "preference"],
                   help="a PAFT config's branch alone, on the whole topology (each branch on a slice of its own)")
    p.add_argument("--programs", default=None, help=f"comma list of programs to compile (default all: "
                                                    f"{','.join(PROGRAMS)})")
    p.add_argument("--min-headroom", type=float, default=0.0,
                   help="fraction of the chip's usable HBM (what the compiler lets a program use, e.g. 30.75 of "
                        "v4's 32 GiB) that must stay free per chip (e.g. 0.1); default 0")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (e.g. sft.grad_accum=16)")
    p.set_defaults(fn=cmd_compile)
