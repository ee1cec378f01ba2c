"""XLA:CPU settings for simulated devices (`--xla_force_host_platform_device_count=N`, N > 1).

XLA:CPU runs a program's collectives, and the thunks it splits off, on one intra-op thread pool (as many
threads as devices here), where a collective waits, blocking its thread, for the other devices' ranks.  A
rank whose next step is queued behind such waiters (a split-off thunk, or the parallel pieces of its own
matmul) never arrives, and XLA aborts the process after its 40 s rendezvous timeout: seen a few times in
a hundred 2-core test runs, in the PAFT pipeline's 4-device train steps, with one program in flight.
With simulated devices the cores are already shared by the devices, so multi-threaded Eigen inside an op
buys nothing (measured: the train-step tests took the same time): ops run single-threaded, and the pools
get 4 threads per device.  Both only take effect before JAX creates its CPU backend, so they are applied
when paft_jax is imported; settings already in the environment are kept.
"""
from __future__ import annotations

import os
import re
from typing import MutableMapping

_FORCED = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def simulated_device_settings(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The variables to set (name -> value) for the simulated devices `environ`'s XLA_FLAGS asks for."""
    flags = environ.get("XLA_FLAGS", "")
    m = _FORCED.search(flags)
    if m is None or int(m.group(1)) < 2:
        return {}
    out = {}
    if "xla_cpu_multi_thread_eigen" not in flags:
        out["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    if not environ.get("PJRT_NPROC"):  # read by the CPU client for its thread pools' sizes
        out["PJRT_NPROC"] = str(4 * int(m.group(1)))
    return out


def configure(environ: MutableMapping[str, str] = os.environ) -> None:
    environ.update(simulated_device_settings(environ))
