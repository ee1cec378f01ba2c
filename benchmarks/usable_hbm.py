"""Usable HBM per chip of each TPU generation `launch compile` supports, as libtpu's compiler sees it.

    XLA_FLAGS= python benchmarks/usable_hbm.py [--topologies v4-8,v4-32,...] [--step-kib 64]

The deviceless TPU client exposes no HBM figure (its devices have no memory_stats, and no device attribute
or executable field carries one), so it is measured from the compiler's verdicts.  For two slice sizes of each
generation (by default), in a fresh process each, a probe program holds one large temporary (an iota's sine,
behind an optimization barrier so that it is materialized), sharded over all chips:

1. a probe of twice the nominal HBM per chip is refused; libtpu's message names the limit,
   "... exceeds available HBM (30.75G)" (G = GiB, two decimals; near the limit v4 words it "Used 30.75G of
   30.75G hbm. Exceeded hbm capacity by 136.5K");
2. the exact limit is bisected between a probe that fits and one that is refused, in steps of --step-kib of
   temporary per chip.  The largest probe that fits gives `fits`: its peak per chip as `launch compile`
   reports it (argument + output - alias + temp, from the executable's memory analysis).  The probe one
   step larger is refused.  `fits` lies a few MiB under the figure in libtpu's message: the compiler
   counts some bytes of its own that the memory analysis does not report.

Prints one table (bytes and GiB) with jax, libtpu and the git revision; the committed output is
benchmarks/results/compile/usable_hbm.txt, and paft_jax/aot/topology.py's USABLE_HBM holds, per generation,
the smallest `fits` over the slices probed.  A probe compiles in well under a second; the default run takes
about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
COLS = 16 * 1024  # float32 columns: one row of the probe is 64 KiB


def _probe(devices, temp_rows: int):
    """The probe program for these devices, lowered: `temp_rows` rows of 64 KiB of temporary per chip."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    n = len(devices)
    rows = NamedSharding(Mesh(np.array(devices), ("x",)), P("x"))

    def f(a):
        big = jax.lax.broadcasted_iota(jnp.float32, (temp_rows * n, COLS), 1)
        big = jax.lax.optimization_barrier(jnp.sin(jax.lax.with_sharding_constraint(big, rows)))
        return a + big.sum()

    return jax.jit(f, in_shardings=rows, out_shardings=rows).lower(
        jax.ShapeDtypeStruct((n, COLS), jnp.float32, sharding=rows))


def _compile(devices, temp_rows: int) -> dict:
    """{"fits": True, "peak": bytes per chip, ...} or {"fits": False, "message": the compiler's refusal}."""
    try:
        m = _probe(devices, temp_rows).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"fits": False, "message": str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]}
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    return {"fits": True, "peak": int(peak), "peak_memory_in_bytes": int(m.peak_memory_in_bytes),
            "temp": int(m.temp_size_in_bytes)}


def measure(accelerator: str, step_kib: int) -> dict:
    """The usable HBM per chip of `accelerator`'s generation (run in a process of its own)."""
    from paft_jax.aot.topology import parse_accelerator, topology_devices
    topo = parse_accelerator(accelerator)
    devices = topology_devices(topo)
    try:  # what the deviceless client says of its own accord (nothing, with libtpu 0.0.42.1)
        exposed = repr(devices[0].memory_stats())
    except Exception as e:  # noqa: BLE001 - the answer is the error
        exposed = f"{type(e).__name__}: {e}"
    step_rows = max(1, step_kib * 1024 // (COLS * 4))
    rows_per_gib = GIB // (COLS * 4)
    over = _compile(devices, 2 * topo.hbm_bytes // GIB * rows_per_gib)
    if over["fits"]:
        raise RuntimeError(f"{accelerator}: a probe of twice the nominal HBM fit ({over['peak']:,} bytes per chip)")
    said = re.search(r"available HBM \(([\d.]+)([KMGT])\)", over["message"])
    if said is None:
        raise RuntimeError(f"{accelerator}: unexpected refusal: {over['message']}")
    stated = float(said.group(1)) * 1024 ** "KMGT".index(said.group(2)) * 1024
    # bisect in rows: lo fits, hi is refused; start just around the stated figure (it is rounded)
    lo = int((stated - 0.05 * GIB) // (COLS * 4)) // step_rows * step_rows
    hi = lo + int(0.1 * GIB // (COLS * 4)) // step_rows * step_rows + step_rows
    compiles = 1
    at_lo, at_hi = _compile(devices, lo), _compile(devices, hi)
    compiles += 2
    while at_lo["fits"] is False:  # the program's own bytes pushed it over: widen downwards
        lo, hi, at_hi = lo - (hi - lo), lo, at_lo
        at_lo = _compile(devices, lo)
        compiles += 1
    while at_hi["fits"] is True:
        lo, at_lo, hi = hi, at_hi, hi + (hi - lo)
        at_hi = _compile(devices, hi)
        compiles += 1
    while hi - lo > step_rows:
        mid = (lo + hi) // 2 // step_rows * step_rows
        if mid in (lo, hi):
            break
        at_mid = _compile(devices, mid)
        compiles += 1
        if at_mid["fits"]:
            lo, at_lo = mid, at_mid
        else:
            hi, at_hi = mid, at_mid
    return {"accelerator": topo.accelerator, "topology": topo.name, "chips": topo.chips,
            "device_kind": devices[0].device_kind, "nominal": topo.hbm_bytes, "stated": said.group(0),
            "stated_bytes": int(stated), "fits": at_lo["peak"], "fits_peak_memory_in_bytes":
                at_lo["peak_memory_in_bytes"], "refused_temp_rows": hi, "fits_temp_rows": lo,
            "step_bytes": step_rows * COLS * 4, "refusal": at_hi["message"], "compiles": compiles,
            "memory_stats": exposed, "memories": [m.kind for m in devices[0].addressable_memories()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topologies", default="v4-8,v4-32,v5litepod-1,v5litepod-64,v5p-8,v5p-16,v6e-1,v6e-16",
                    help="accelerator types to probe: at least one per generation")
    ap.add_argument("--step-kib", type=int, default=64, help="bisection step of temporary per chip, KiB")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the per-generation child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.step_kib)))
        return 0
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TPU_ACCELERATOR_TYPE",
                                                            "TPU_WORKER_HOSTNAMES")}
    env["JAX_PLATFORMS"] = "cpu"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "paft_jax/aot", "benchmarks/usable_hbm.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"# XLA_FLAGS= python benchmarks/usable_hbm.py --topologies {args.topologies} --step-kib {args.step_kib}")
    print(f"# jax {importlib.metadata.version('jax')}, jaxlib {importlib.metadata.version('jaxlib')}, "
          f"libtpu {importlib.metadata.version('libtpu')}; git {rev}{' (+ uncommitted changes)' if dirty else ''}")
    results = []
    for accel in args.topologies.split(","):
        p = subprocess.run([sys.executable, __file__, "--one", accel, "--step-kib", str(args.step_kib)], cwd=ROOT,
                           env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{accel}: the probe failed:\n" + "\n".join(p.stderr.strip().splitlines()[-20:]))
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    head = ("accelerator", "topology", "kind", "nominal GiB", "libtpu says", "fits (bytes)", "fits GiB",
            "refused at +", "compiles")
    lines = [(r["accelerator"], r["topology"], r["device_kind"], f"{r['nominal'] / GIB:.2f}", r["stated"],
              f"{r['fits']:,}", f"{r['fits'] / GIB:.4f}", f"{r['step_bytes'] // 1024} KiB", str(r["compiles"]))
             for r in results]
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    print("\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines]))
    print("\n# fits: the largest probe peak per chip (argument + output - alias + temp) the compiler accepted; the "
          "probe one step larger was refused with:")
    for r in results:
        print(f"# {r['accelerator']}: {r['refusal']}")
    gens = {}
    for r in results:  # the generation's figure: the smallest over the slices probed
        gen = r["topology"].split(":")[0]
        gens[gen] = min(gens.get(gen, r["fits"]), r["fits"])
    print("\n# per generation (smallest fits over the slices probed; paft_jax/aot/topology.py USABLE_HBM):")
    for gen, b in gens.items():
        print(f"#   {gen}: {b:,} bytes = {b / GIB:.4f} GiB")
    print(f"# deviceless device.memory_stats(): {results[0]['memory_stats']}")
    print(f"# deviceless device memories: {', '.join(results[0]['memories'])} (no size attribute)")
    print("# raw: " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
