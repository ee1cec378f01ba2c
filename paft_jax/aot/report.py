"""Compile programs ahead of time and read their per-chip memory (XLA's memory analysis of the executable)."""
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
    hbm: int | None         # the chip's memory, when known
    compile_s: float
    kernels: int = 0        # Pallas (Mosaic) kernel calls in the executable, e.g. splash attention's

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    @property
    def headroom(self) -> float | None:
        return None if not self.hbm else 1.0 - self.peak / self.hbm

    def to_json(self) -> dict:
        return {**asdict(self), "peak": self.peak, "headroom": self.headroom}


def compile_memory(branch: str, name: str, fn, args: tuple, mesh, hbm: int | None) -> ProgramMemory:
    """Lower `fn` at the abstract `args`, compile it for the mesh's devices, and read its memory."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    return ProgramMemory(branch, name, mesh.size, dict(mesh.shape), int(m.argument_size_in_bytes),
                         int(m.output_size_in_bytes), int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                         hbm, round(seconds, 1), kernels)


def table(rows: list[ProgramMemory]) -> str:
    """Per program and per chip, in GiB: argument, output, alias, temporary and peak against the HBM."""
    head = ("branch", "program", "chips", "mesh", "args GiB", "output GiB", "alias GiB", "temp GiB", "peak GiB",
            "HBM GiB", "headroom", "fits", "kernels", "compile")
    lines = []
    for r in rows:
        mesh = "x".join(f"{k}{v}" for k, v in r.mesh.items() if v > 1) or "1"
        hr = r.headroom
        lines.append((r.branch, r.program, str(r.devices), mesh, *(f"{b / GIB:.2f}" for b in (
            r.argument, r.output, r.alias, r.temp, r.peak)), f"{r.hbm / GIB:.1f}" if r.hbm else "?",
            f"{hr:.1%}" if hr is not None else "?", ("yes" if hr >= 0 else "NO") if hr is not None else "?",
            str(r.kernels), f"{r.compile_s:.0f}s"))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])
