"""Which devices each branch gets: in proportion to its estimated work, so that on devices that really
run in parallel both branches end at about the same time.

Work of a branch = steps x model FLOPs of one step (models/flops.py): forward + backward over
batch_size x seq_len tokens, plus one forward of the frozen reference for objectives that have one
(DPO; counted whether it runs inside the step or once up front into the reference cache, since the
cache covers the rows the run reads).  Evaluation passes are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from paft_jax.mesh import resolve_axis_sizes
from paft_jax.models import flops as flops_lib
from paft_jax.models.config import ModelConfig
from paft_jax.train.config import TrainConfig


@dataclass
class Estimate:
    step_flops: float
    steps: int
    reference: bool

    @property
    def total(self) -> float:
        return self.step_flops * self.steps


def estimate(tc: TrainConfig, mcfg: ModelConfig) -> Estimate:
    ref = tc.objective.needs_reference
    return Estimate(flops_lib.step_flops(mcfg, tc.data.batch_size, tc.data.seq_len, reference_forward=ref),
                    tc.steps, ref)


def fits(tc: TrainConfig, n: int) -> str | None:
    """Why `n` devices cannot hold this branch's mesh and batch (None if they can)."""
    try:
        sizes = resolve_axis_sizes(tc.mesh.axis_sizes(), n)
    except ValueError as e:
        return str(e)
    dp = sizes["data"] * sizes["fsdp"]
    micro = tc.data.batch_size // tc.grad_accum
    if micro % dp:
        return f"micro-batch {micro} not divisible by data x fsdp = {dp}"
    return None


def choose_split(n_devices: int, works: list[float], cfgs: list[TrainConfig], granularity: int = 1,
                 requested=None) -> list[int]:
    """Device counts per branch.  `requested`: explicit counts or shares; otherwise the feasible split
    (each count a multiple of `granularity`, i.e. whole processes on multi-host) that minimizes the
    later branch's end time max(work_i / n_i), ties broken toward the exact proportional share."""
    if requested is not None and requested != "auto":
        if all(isinstance(x, int) for x in requested):
            counts = list(requested)
            if sum(counts) != n_devices:
                raise ValueError(f"split={counts} uses {sum(counts)} devices, but {n_devices} are available")
        else:
            total = float(sum(requested))
            first = int(round(requested[0] / total * n_devices / granularity)) * granularity
            counts = [first, n_devices - first]
        for c, tc, name in zip(counts, cfgs, ("sft", "preference")):
            if c <= 0 or c % granularity:
                raise ValueError(f"split gives the {name} branch {c} devices; it needs a positive multiple of "
                                 f"{granularity} (whole processes)")
            why = fits(tc, c)
            if why:
                raise ValueError(f"split gives the {name} branch {c} devices: {why}")
        return counts
    if n_devices < 2 * granularity:
        raise ValueError(f"{n_devices} devices in steps of {granularity} (whole processes) cannot be split between "
                         f"two branches: run on at least {2 * granularity} devices, or use mode=sequential")
    best, reasons = None, []
    ideal = works[0] / sum(works) * n_devices
    for first in range(granularity, n_devices, granularity):
        counts = [first, n_devices - first]
        why = [fits(tc, c) for tc, c in zip(cfgs, counts)]
        if any(why):
            reasons.append(f"{counts}: {'; '.join(w for w in why if w)}")
            continue
        key = (max(w / c for w, c in zip(works, counts)), abs(first - ideal))
        if best is None or key < best[0]:
            best = (key, counts)
    if best is None:
        raise ValueError(f"no split of {n_devices} devices (in steps of {granularity}) fits both branches' "
                         f"meshes and batches: " + " | ".join(reasons))
    return best[1]


def branch_meshes(mode: str, split, cfgs: list[TrainConfig], works: list[float], devices: list,
                  granularity: int = 1) -> tuple[list[int], list]:
    """(device counts, meshes) of the two branches over `devices`: sequential mode gives each branch every
    device; parallel mode splits them (whole processes of `granularity` devices) by `choose_split`."""
    from paft_jax.mesh import build_mesh, split_devices
    names = ("sft", "preference")
    if mode == "sequential":  # one branch after the other, each on every device
        for n, tc in zip(names, cfgs):
            why = fits(tc, len(devices))
            if why:
                raise ValueError(f"sequential mode runs {n} on all {len(devices)} devices: {why}")
        return [len(devices)] * 2, [build_mesh(tc.mesh, devices) for tc in cfgs]
    if len(devices) < 2:
        raise ValueError("parallel mode needs at least 2 devices (one per branch); on CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8, or use mode: sequential")
    counts = choose_split(len(devices), works, cfgs, granularity, split)
    return counts, [build_mesh(tc.mesh, g) for tc, g in zip(cfgs, split_devices(devices, counts))]


def predicted_end(works: list[float], counts: list[int]) -> list[float]:
    """Relative end times if the devices ran independently at equal speed (1.0 = the later one)."""
    t = [w / c for w, c in zip(works, counts)]
    return [x / max(t) for x in t]


def describe(works: list[float], counts: list[int]) -> str:
    share = [w / sum(works) for w in works]
    return (f"estimated work sft {works[0] / 1e12:.2f} / preference {works[1] / 1e12:.2f} TFLOP "
            f"({share[0]:.0%} / {share[1]:.0%}); devices {counts[0]} / {counts[1]}; "
            f"predicted end times (independent devices) "
            + " / ".join(f"{x:.2f}" for x in predicted_end(works, counts)))


def ideal_counts(works: list[float], n: int) -> list[float]:
    return [w / sum(works) * n for w in works] if n else [math.nan, math.nan]
