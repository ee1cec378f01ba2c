"""The CI memory probe: per-chip memory of the Llama-3-8B SFT and DPO train steps, exactly as the shipped
configs run them on their v4-32, compiled deviceless with libtpu; tests/test_memory_probe.py holds every
figure to the committed reference.

    XLA_FLAGS= python benchmarks/memory_probe.py               # rewrite the reference (after an intended change)
    XLA_FLAGS= python benchmarks/memory_probe.py --json F      # measure into F, the reference untouched

The whole 8B compiles as fast as a cut-down one: on TPU the layer stack is a rolled scan (scan_unroll auto
is 1 there), so its body is compiled once whatever the layer count, and the time goes into generating code
for the 8B-sized matrix fusions, which any model with the 8B's layer has (measured on 2 cores: 35-38 s per
train step for 32 layers on a v4-32, for 2 layers on a v4-32 and for 2 layers on a v4-8).  So the probe
compiles the real thing: the shipped configs unchanged (splash attention, remat: full, the delta added
inside each layer, bf16 first moments, 4 micro-batches of one 4096-token row per chip), train steps only
(the eval step and reference pass would double the time).  A change to the step that moves per-chip memory
(where the delta is added, what is rematerialized, how the batch is split) moves these figures at the size
it has in a real run.

Each probe is exactly a `launch compile` command (PROBES below, plus `--json`); the reference holds, per
probe and program, the bytes per chip the compiler reports (argument, output, alias, temp, peak), the
Pallas kernel count, the compile time, and the jax, jaxlib and libtpu versions and git revision it was
made with.  XLA_FLAGS and LIBTPU_INIT_ARGS must be empty: compiler flags can move memory (the tests' own
XLA_FLAGS, a CPU device count, is dropped by the test before it starts this script).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks/results/compile/memory_probe.json"
COMMAND = "XLA_FLAGS= python benchmarks/memory_probe.py"
FIGURES = ("argument", "output", "alias", "temp", "peak")
# the configs' own slice and mesh (v4-32, fsdp=16): the figures docs/tpu.md tabulates for them
_COMMON = ["--topology", "v4-32", "--model-shape", "llama3-8b", "--programs", "train_step"]
PROBES = {
    "sft": ["--config", "configs/llama3_8b_sft.yaml", *_COMMON],
    "dpo": ["--config", "configs/llama3_8b_dpo.yaml", *_COMMON],   # ref_cache: the step without the reference
}


def versions() -> dict:
    """jax, jaxlib and libtpu versions and the git revision (with -dirty for uncommitted changes)."""
    out = {}
    for pkg in ("jax", "jaxlib", "libtpu"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    rev = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, capture_output=True,
                         text=True)
    out["git"] = rev.stdout.strip() or None
    return out


def measure() -> dict:
    """Run every probe's `launch compile` in this process; the figures per probe and program."""
    from paft_jax.launch import main
    probes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in PROBES.items():
            out = Path(tmp) / f"{name}.json"
            t0 = time.perf_counter()
            main(["compile", *argv, "--no-progress", "--json", str(out)])
            res = json.loads(out.read_text())
            probes[name] = {
                "command": "python -m paft_jax.launch compile " + " ".join(argv),
                "where": res["where"], "model": res["model"], "seconds": round(time.perf_counter() - t0, 1),
                "programs": {f"{r['branch']}/{r['program']}": {**{f: r[f] for f in FIGURES},
                                                               "kernels": r["kernels"], "compile_s": r["compile_s"]}
                             for r in res["programs"]}}
    return probes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(REFERENCE), help="where to write the figures (default: the reference, "
                                                           f"{REFERENCE.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    flags = {k: os.environ[k] for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS") if os.environ.get(k)}
    if flags:
        sys.exit(f"memory_probe: unset {', '.join(f'{k}={v!r}' for k, v in flags.items())} (compiler flags can "
                 f"move memory; the reference is made without any): {COMMAND}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # deviceless: nothing runs, no attached device is wanted
    os.chdir(ROOT)  # the probes name configs/ relative to the repository
    t0 = time.perf_counter()
    probes = measure()
    doc = {"regenerate": COMMAND, **versions(), "seconds": round(time.perf_counter() - t0, 1), "probes": probes}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json} in {doc['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
