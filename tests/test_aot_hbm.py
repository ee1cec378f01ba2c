"""Headroom against usable HBM: what libtpu's compiler lets a program use per chip (topology.USABLE_HBM, measured
by benchmarks/usable_hbm.py), not the chip's nominal HBM.  No TPU compile here: rows are built from peaks."""
import re
from pathlib import Path

import pytest

from paft_jax.aot.report import GIB, ProgramMemory, short_of_headroom, table
from paft_jax.aot.topology import GENERATIONS, USABLE_HBM, device_hbm, parse_accelerator

ROOT = Path(__file__).resolve().parents[1]
SLICES = ("v4-32", "v5litepod-64", "v5p-16", "v6e-16")


def _row(peak: int, hbm: int | None, usable: int | None) -> ProgramMemory:
    """A train step whose per-chip peak is `peak` bytes (all of it temporaries)."""
    return ProgramMemory("sft", "train_step", 16, {"data": 1, "fsdp": 16, "tensor": 1}, 0, 0, 0, peak, hbm, 1.0,
                         0, usable)


def test_usable_hbm_is_the_committed_measurement():
    """The table in the code is the one benchmarks/usable_hbm.py printed; libtpu's refusals round it to 2 decimals
    of GiB (30.75G on v4: benchmarks/results/compile/*v4-32* refusals say so too)."""
    text = (ROOT / "benchmarks/results/compile/usable_hbm.txt").read_text()
    measured = {g: int(b.replace(",", "")) for g, b in re.findall(r"^#\s+(v\w+): ([\d,]+) bytes", text, re.M)}
    assert measured == USABLE_HBM
    said = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}
    assert {g: round(b / GIB, 2) for g, b in USABLE_HBM.items()} == said
    for accel in SLICES:
        t = parse_accelerator(accel)
        assert t.usable_hbm_bytes == USABLE_HBM[t.name.split(":")[0]]
    assert {prefix for prefix, *_ in GENERATIONS.values()} == set(USABLE_HBM)


@pytest.mark.parametrize("accel", [a for a in SLICES if not a.startswith("v5p")])  # v5p: usable > nominal 95 GiB
def test_a_peak_between_90_percent_of_usable_and_of_nominal_hbm_is_refused(accel):
    """With --min-headroom 0.1 a peak above 90% of usable HBM is short, though it is under 90% of nominal HBM."""
    t = parse_accelerator(accel)
    peak = int(0.9 * (t.usable_hbm_bytes + t.hbm_bytes) / 2)  # between 0.9 x usable and 0.9 x nominal
    assert 0.9 * t.usable_hbm_bytes < peak < 0.9 * t.hbm_bytes
    row = _row(peak, t.hbm_bytes, t.usable_hbm_bytes)
    assert row.headroom < 0.1 < row.headroom_nominal
    msg = short_of_headroom([row], 0.1)
    assert msg == (f"sft/train_step does not fit: it needs {peak / GIB:.2f} GiB per chip ({peak:,} bytes) and the "
                   f"chip has {t.usable_hbm_bytes / GIB:.2f} GiB of usable HBM ({t.hbm_bytes / GIB:.1f} GiB "
                   "nominal) less the 10% headroom asked for")
    assert short_of_headroom([row], 0.05) is None  # it fits the compiler, with under 10% to spare
    assert short_of_headroom([_row(peak, t.hbm_bytes, None)], 0.1) is None  # nominal HBM alone would pass it


def test_short_of_headroom_names_the_tightest_program_and_skips_unknown_chips():
    t = parse_accelerator("v4-32")
    rows = [_row(int(0.95 * t.usable_hbm_bytes), t.hbm_bytes, t.usable_hbm_bytes),
            _row(int(1.01 * t.usable_hbm_bytes), t.hbm_bytes, t.usable_hbm_bytes),
            _row(10 * GIB, None, None)]
    rows[1].program = "eval_step"
    msg = short_of_headroom(rows, 0.1)
    assert msg.startswith("sft/eval_step does not fit") and msg.endswith("(2 programs short)")
    assert short_of_headroom(rows[2:], 0.5) is None
    assert "-1.0%" in table(rows[1:2]) and " NO " in table(rows[1:2])


def test_table_shows_usable_and_nominal_hbm():
    t = parse_accelerator("v4-32")
    peak = int(26.69 * GIB)  # configs/paft_llama3_8b.yaml's train step on v4-32 (benchmarks/results/compile)
    lines = table([_row(peak, t.hbm_bytes, t.usable_hbm_bytes), _row(peak, None, None)]).splitlines()
    assert re.search(r"peak GiB\s+usable GiB\s+nominal GiB\s+headroom\s+fits", lines[0])
    assert re.search(r" 26\.69\s+30\.75\s+32\.00\s+13\.2%\s+yes ", lines[2])  # against 32 GiB it was 16.6%
    assert re.search(r" 26\.69\s+\?\s+\?\s+\?\s+\? ", lines[3])  # a chip whose memory is unknown: not judged

def test_attached_devices_report_live_usable_hbm_and_fall_back_to_the_table():
    class Chip:
        def __init__(self, kind, stats):
            self.device_kind, self._stats = kind, stats

        def memory_stats(self):
            if self._stats is None:
                raise RuntimeError("not reported")
            return self._stats

    assert device_hbm(Chip("TPU v4", {"bytes_limit": 30 * GIB})) == (32 * GIB, 30 * GIB)
    assert device_hbm(Chip("TPU v5 lite", None)) == (16 * GIB, USABLE_HBM["v5e"])
    assert device_hbm(Chip("NVIDIA H100 80GB HBM3", {"bytes_limit": 60 * GIB})) == (None, 60 * GIB)
    assert device_hbm(Chip("cpu", None)) == (None, None)
