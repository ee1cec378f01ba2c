"""TPU slices by their gcloud accelerator type (v4-32, v5litepod-64, v5p-8, v6e-16, ...), as devices to
compile for on a machine without TPUs (libtpu describes the topology; nothing runs).

Chip counts, shapes and hosts follow Cloud TPU's published slice shapes: v4 and v5p name TensorCores
(two per chip, one megacore device each), v5e and v6e name chips.  HBM per chip comes in two figures: the
nominal one, what each generation is sold with (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB), and the
usable one, the largest per-chip peak libtpu's compiler accepts (USABLE_HBM), which is what a program has to
fit in.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

GIB = 2 ** 30

# generation: (topology prefix, chip config, HBM bytes per chip, chips in the accelerator type's number)
GENERATIONS = {
    "v4": ("v4", "megacore", 32 * GIB, 0.5),
    "v5p": ("v5p", "megacore", 95 * GIB, 0.5),
    "v5litepod": ("v5e", "default", 16 * GIB, 1),
    "v5e": ("v5e", "default", 16 * GIB, 1),
    "v6e": ("v6e", "default", 32 * GIB, 1),
}
# usable HBM by libtpu's topology prefix: the largest per-chip peak (argument + output - alias + temp, as
# report.py counts it) that libtpu 0.0.42.1's compiler accepts, in bytes.  Measured by benchmarks/usable_hbm.py
# (bisecting a probe program between a compile that fits and one refused, 64 KiB steps, two slice sizes per
# generation: the smaller figure); raw output benchmarks/results/compile/usable_hbm.txt.  libtpu's refusals
# round them to 30.75G, 15.75G, 95.74G and 31.25G.  The deviceless client has no live figure to read: its
# devices refuse memory_stats() and carry no HBM attribute.  v5p's is above its nominal 95 GiB (Google's spec
# sheet says "95 GB"; the compiler sees 95.74 GiB).
USABLE_HBM = {
    "v4": 33_013_530_112,    # 30.75 GiB
    "v5e": 16_908_975_616,   # 15.75 GiB
    "v5p": 102_803_079_136,  # 95.74 GiB
    "v6e": 33_549_877_216,   # 31.25 GiB
}
# a TPU device's device_kind (as libtpu 0.0.42.1 names the topologies' devices) -> its generation
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
       512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)}
_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclass(frozen=True)
class Topology:
    accelerator: str           # the gcloud accelerator type, e.g. v4-32
    name: str                  # libtpu's topology name, e.g. v4:2x2x4
    chip_config: str
    chips: int
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int             # nominal HBM per chip
    usable_hbm_bytes: int      # what the compiler lets a program use per chip (USABLE_HBM)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)

    @property
    def devices_per_host(self) -> int:
        return math.prod(self.chips_per_host)


def size_ranges() -> str:
    """The accelerator types parse_accelerator knows, as ranges (for help texts)."""
    out = []
    for gen, (_, _, _, per) in GENERATIONS.items():
        sizes = sorted(int(c / per) for c in (_3D if gen in ("v4", "v5p") else _2D))
        out.append(f"{gen}-{sizes[0]} ... {gen}-{sizes[-1]}")
    return ", ".join(out)


def parse_accelerator(accel: str) -> Topology:
    """'v4-32' -> its topology; an unknown or impossible type is refused, naming the known sizes."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accel.strip().lower())
    if not m:
        raise ValueError(f"--topology {accel!r}: expected a gcloud accelerator type such as v4-32, "
                         "v5litepod-64, v5p-8 or v6e-16")
    gen, number = m.group(1), int(m.group(2))
    prefix, chip_config, hbm, per = GENERATIONS[gen]
    chips = int(number * per)
    shapes = _3D if gen in ("v4", "v5p") else _2D
    if chips not in shapes or chips * (1 / per) != number:
        sizes = sorted(int(c / per) for c in shapes)
        raise ValueError(f"--topology {accel!r}: no such {gen} slice; known sizes: "
                         + ", ".join(f"{gen}-{s}" for s in sizes))
    dims = shapes[chips]
    if gen in ("v4", "v5p"):
        per_host = (2, 2, 1) if chips >= 4 else dims
    else:  # v5e / v6e: up to 8 chips on one host; larger slices have 4 chips a host
        per_host = (*dims, 1) if chips <= 8 else (2, 2, 1)
    return Topology(f"{gen}-{number}", f"{prefix}:{'x'.join(map(str, dims))}", chip_config, chips, per_host, hbm,
                    USABLE_HBM[prefix])


def topology_devices(topo: Topology) -> list:
    """The slice's devices (one per chip), described by libtpu; no TPU needs to be attached.

    libtpu's start-up reads the accelerator type and the workers' hostnames from the metadata server, or
    from TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES.  With neither (a machine without TPUs) it takes its own
    "WARNING: could not determine ..." text as their values and prints two errors on stderr, "Failed to find
    host bounds for accelerator type" and "unexpected worker hostname" (a source location trace with it),
    then describes the topology it is given all the same: a deviceless compile contacts no worker.  So they
    are set here to what is true of this process (the slice it describes; one worker, itself), unless the
    user has set them."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask on a CPU machine
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip is used: several compiles may run at once
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
                         "(or pip install 'jax[tpu]')") from None
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, chip_config_name=topo.chip_config,
                                        chips_per_host_bounds=topo.chips_per_host, num_slices=1)
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise ValueError(f"{topo.accelerator}: libtpu described {len(devices)} devices, expected {topo.chips}")
    return devices


def device_hbm(device) -> tuple[int | None, int | None]:
    """(nominal, usable) HBM bytes of an attached device, None where unknown.

    Usable is read live where the device reports it (the allocator's limit in memory_stats()), else for a
    TPU chip the generation's measured figure (USABLE_HBM); nominal is the generation's figure for a TPU
    chip, and None elsewhere (a GPU's limit is the only figure it has)."""
    gen = DEVICE_KINDS.get(device.device_kind)
    nominal = next((hbm for prefix, _, hbm, _ in GENERATIONS.values() if prefix == gen), None)
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices and some plugins do not report
        stats = {}
    return nominal, stats.get("bytes_limit") or USABLE_HBM.get(gen)
