"""How the programs' loops compile, chosen by platform: the layer scan, the log-softmax's vocab chunks and
the micro-batch loops.  `auto` settings resolve here, from the platform of the devices a program runs on.

TPU / GPU: a rolled layer scan (one compiled layer: the shortest compile and the scan's memory plan) and
8192-column vocab chunks (logits memory bounded at 7-8B); micro-batch loops stay loops.

CPU: the layer scan unrolled and the logits computed whole, for two reasons.
- Speed: XLA:CPU fuses across an unrolled stack, and full logits need no recompute in the backward pass
  (benchmarks/train_throughput.py measures both against a plain PyTorch step).
- Correctness on simulated devices (`--xla_force_host_platform_device_count=N`): XLA:CPU orders a
  program's collectives only by when they start, and a `while` whose body holds collectives can finish on
  pool threads after a later top-level collective has started on some devices but not others; the
  in-process rendezvous then waits forever and XLA aborts the process.  A program with no collective
  inside any loop cannot do that, so on a CPU mesh of more than one device every loop whose body may hold
  one (the layer scan, the vocab chunks, the micro-batches) is unrolled (tests/test_loop_collectives.py
  checks the optimized HLO of every program).
"""
from __future__ import annotations

from typing import Any

import jax

AUTO = "auto"
ACCELERATOR_LOGITS_CHUNK = 8192


def platform_of(mesh: Any) -> str:
    """"cpu" | "gpu" | "tpu": the platform of a mesh's devices (the default backend without a mesh)."""
    if mesh is None:
        return jax.default_backend()
    return mesh.devices.flat[0].platform


def unroll_loops(mesh: Any) -> bool:
    """Whether loops whose bodies may hold collectives are unrolled: on a CPU mesh of several devices."""
    return mesh is not None and mesh.devices.size > 1 and platform_of(mesh) == "cpu"


def layer_unroll(setting: int | str, num_layers: int, mesh: Any, remat: bool = False) -> int:
    """Layers per trip of the layer scan: `setting` as given, or for `auto` every layer on CPU, 1 elsewhere.
    With `remat`, `auto` keeps the scan rolled on one CPU device too: XLA:CPU drops the barriers that keep
    a recomputation apart from the forward pass, so across unrolled layers it merges them and remat saves
    no memory.  On a CPU mesh of several devices the stack is always unrolled, an explicit setting
    included (a rolled scan there can deadlock, see above; remat then saves nothing)."""
    if unroll_loops(mesh):
        return num_layers
    if setting == AUTO:
        return num_layers if platform_of(mesh) == "cpu" and not remat else 1
    return min(int(setting), num_layers)


def logits_chunk(setting: int | str, mesh: Any) -> int:
    """Vocab columns per chunk of the log-softmax (0: whole logits): for `auto`, 0 on CPU, 8192 elsewhere."""
    if setting == AUTO:
        return 0 if platform_of(mesh) == "cpu" else ACCELERATOR_LOGITS_CHUNK
    return int(setting)


def check(name: str, setting: Any, minimum: int) -> str | None:
    """A config error for a loop setting that is neither `auto` nor an integer >= `minimum` (None: valid)."""
    if setting == AUTO or (isinstance(setting, int) and not isinstance(setting, bool) and setting >= minimum):
        return None
    return f"{name}={setting!r}: expected 'auto' or an integer >= {minimum}"
