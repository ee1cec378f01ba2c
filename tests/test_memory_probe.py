"""The CI memory probe: a change that moves the 8B train steps' per-chip memory fails here, naming the figure.

benchmarks/memory_probe.py compiles the Llama-3-8B SFT and DPO train steps of the shipped configs
(configs/llama3_8b_{sft,dpo}.yaml on their v4-32: splash attention, remat, the delta added inside each layer)
with libtpu, no TPU needed; each byte figure per chip must match the committed reference,
benchmarks/results/compile/memory_probe.json, within TOLERANCE.  About 75 s on 2 cores (35 s a train step:
the layer scan is compiled once, so two layers would compile no faster; the script says more).  When a
change moves memory on purpose, regenerate the reference with the command the failure prints and commit it
with the change.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks/results/compile/memory_probe.json"
GIB = 2 ** 30
# The compiler is deterministic: separate runs (2 cores, 1 core, fresh processes) gave the same bytes for every
# figure, so the tolerance only has to let through what does not matter and catch what does.  0.5% of the
# temporaries (9.55 GiB per chip) is 49 MiB: under one more bf16 [4096, 4096] activation kept per layer
# (32 x 32 MiB, 10%) or one more fp32 logits chunk ([4096, 16384], 256 MiB, 2.6%), far above a new scalar
# metric.  1 MiB at least, for figures near zero.
TOLERANCE = 0.005
FLOOR = 2 ** 20


def _outside(ref: int, new: int) -> bool:
    return abs(new - ref) > max(TOLERANCE * abs(ref), FLOOR)


def mismatches(ref: dict, new: dict) -> list[str]:
    """One line per figure outside the tolerance (or program missing), naming probe, program, figure and values."""
    out = []
    for probe, r in ref["probes"].items():
        n = new["probes"].get(probe, {"programs": {}})
        for prog, want in r["programs"].items():
            got = n["programs"].get(prog)
            if got is None:
                out.append(f"{probe}: program {prog} was not compiled")
                continue
            for fig in ("argument", "output", "alias", "temp", "peak"):
                a, b = want[fig], got[fig]
                if _outside(a, b):
                    change = f"{(b - a) / a:+.2%}" if a else "from 0"
                    out.append(f"{probe}: {prog} {fig} per chip is {b:,} bytes ({b / GIB:.3f} GiB), the reference "
                               f"{a:,} ({a / GIB:.3f} GiB): {change}, beyond the {TOLERANCE:.1%} tolerance")
            if got["kernels"] != want["kernels"]:
                out.append(f"{probe}: {prog} has {got['kernels']} Pallas kernels, the reference {want['kernels']} "
                           "(splash attention no longer compiled in?)")
    return out


def test_mismatches_name_the_program_the_figure_and_both_values():
    """The comparison alone, on made-up figures: within the tolerance passes, beyond it names everything."""
    fig = {"argument": 4 * GIB, "output": 3 * GIB, "alias": 3 * GIB, "temp": 5 * GIB, "peak": 9 * GIB, "kernels": 3}
    ref = {"probes": {"sft": {"programs": {"sft/train_step": fig}}}}
    same = {"probes": {"sft": {"programs": {"sft/train_step": {**fig, "temp": fig["temp"] + 20 * 2 ** 20}}}}}
    assert mismatches(ref, same) == []
    moved = {"probes": {"sft": {"programs": {"sft/train_step": {**fig, "temp": 6 * GIB, "peak": 10 * GIB}}}}}
    assert mismatches(ref, moved) == [
        f"sft: sft/train_step temp per chip is {6 * GIB:,} bytes (6.000 GiB), the reference {5 * GIB:,} (5.000 GiB): "
        "+20.00%, beyond the 0.5% tolerance",
        f"sft: sft/train_step peak per chip is {10 * GIB:,} bytes (10.000 GiB), the reference {9 * GIB:,} "
        "(9.000 GiB): +11.11%, beyond the 0.5% tolerance"]
    assert mismatches(ref, {"probes": {}}) == ["sft: program sft/train_step was not compiled"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu]'; `make install` and CI install it)")
def test_8b_train_steps_per_chip_memory_is_the_reference(tmp_path):
    """Compile the probe in a fresh process (no XLA_FLAGS: the tests' CPU device count is no flag for a TPU
    compile; no persistent cache: the compile is what is measured) and compare every figure."""
    ref = json.loads(REFERENCE.read_text())
    out = tmp_path / "probe.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_COMPILATION_CACHE_DIR") and not k.startswith("TPU_")}
    proc = subprocess.run([sys.executable, "benchmarks/memory_probe.py", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = json.loads(out.read_text())
    bad = mismatches(ref, new)
    made = ", ".join(f"{k} {ref.get(k)}" for k in ("jax", "jaxlib", "libtpu", "git"))
    now = ", ".join(f"{k} {new.get(k)}" for k in ("jax", "jaxlib", "libtpu", "git"))
    assert not bad, ("per-chip memory of the 8B probe moved:\n  " + "\n  ".join(bad)
                     + f"\nIf intended, regenerate the reference and commit it with the change: {ref['regenerate']}"
                     + f"\n(reference made with {made}; this run {now})")
