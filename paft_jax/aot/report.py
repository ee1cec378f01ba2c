"""Compile programs ahead of time and read their per-chip memory (XLA's memory analysis of the executable).

A program's headroom is measured against the chip's usable HBM, what the TPU compiler lets a program use
(30.75 of v4's 32 GiB; topology.USABLE_HBM), not against the nominal figure: a peak between the two is
refused by the compiler, or, when it just fits, leaves less room than the nominal figure suggests."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

GIB = 2 ** 30


@dataclass
class ProgramMemory:
    branch: str
    program: str
    devices: int
    mesh: dict
    argument: int           # bytes per chip: inputs (params, state, batch)
    output: int
    alias: int              # outputs written in place of donated inputs (counted once)
    temp: int               # XLA temporaries at the peak (activations, gradients, ...)
    hbm: int | None         # the chip's nominal HBM, when known
    compile_s: float
    kernels: int = 0        # Pallas (Mosaic) kernel calls in the executable, e.g. splash attention's
    usable_hbm: int | None = None  # what the compiler lets a program use per chip, when known

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    @property
    def limit(self) -> int | None:
        """The bytes the headroom is measured against: usable HBM, or the nominal figure when that alone is known."""
        return self.usable_hbm or self.hbm

    @property
    def headroom(self) -> float | None:
        return None if not self.limit else 1.0 - self.peak / self.limit

    @property
    def headroom_nominal(self) -> float | None:
        return None if not self.hbm else 1.0 - self.peak / self.hbm

    def to_json(self) -> dict:
        return {**asdict(self), "peak": self.peak, "headroom": self.headroom,
                "headroom_nominal": self.headroom_nominal}


def compile_memory(branch: str, name: str, fn, args: tuple, mesh, hbm: int | None,
                   usable_hbm: int | None = None) -> ProgramMemory:
    """Lower `fn` at the abstract `args`, compile it for the mesh's devices, and read its memory."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    return ProgramMemory(branch, name, mesh.size, dict(mesh.shape), int(m.argument_size_in_bytes),
                         int(m.output_size_in_bytes), int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                         hbm, round(seconds, 1), kernels, usable_hbm)


def short_of_headroom(rows: list[ProgramMemory], min_headroom: float) -> str | None:
    """Why the programs do not fit with `min_headroom` of usable HBM left free per chip, or None when they do.

    Names the program with the least headroom, its peak and the chip's usable (and nominal) HBM; programs
    whose chip's memory is unknown are not judged."""
    short = [r for r in rows if r.headroom is not None and r.headroom < min_headroom]
    if not short:
        return None
    r = min(short, key=lambda r: r.headroom)
    has = (f"{r.usable_hbm / GIB:.2f} GiB of usable HBM" + (f" ({r.hbm / GIB:.1f} GiB nominal)" if r.hbm else "")
           if r.usable_hbm else f"{r.hbm / GIB:.1f} GiB HBM")
    return (f"{r.branch}/{r.program} does not fit: it needs {r.peak / GIB:.2f} GiB per chip ({r.peak:,} bytes) "
            f"and the chip has {has}" + (f" less the {min_headroom:.0%} headroom asked for" if min_headroom else "")
            + (f" ({len(short)} programs short)" if len(short) > 1 else ""))


def table(rows: list[ProgramMemory]) -> str:
    """Per program and per chip, in GiB: argument, output, alias, temporary and peak against usable HBM
    (nominal HBM beside it)."""
    head = ("branch", "program", "chips", "mesh", "args GiB", "output GiB", "alias GiB", "temp GiB", "peak GiB",
            "usable GiB", "nominal GiB", "headroom", "fits", "kernels", "compile")
    lines = []
    for r in rows:
        mesh = "x".join(f"{k}{v}" for k, v in r.mesh.items() if v > 1) or "1"
        hr = r.headroom
        lines.append((r.branch, r.program, str(r.devices), mesh, *(f"{b / GIB:.2f}" for b in (
            r.argument, r.output, r.alias, r.temp, r.peak)), *(f"{b / GIB:.2f}" if b else "?" for b in (
                r.usable_hbm, r.hbm)),
            f"{hr:.1%}" if hr is not None else "?", ("yes" if hr >= 0 else "NO") if hr is not None else "?",
            str(r.kernels), f"{r.compile_s:.0f}s"))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])
