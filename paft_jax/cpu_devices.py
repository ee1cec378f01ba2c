"""Thread pools for simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, N > 1).

XLA:CPU runs each device's share of a program as a task on one pool of max(cores, N) threads, and a
collective blocks its task's thread until all N ranks have arrived.  JAX dispatches asynchronously, so the
tasks of several programs are queued at once; when the blocked ranks of in-flight programs hold every
thread, a rank still in the queue never runs and XLA aborts the process after its rendezvous timeout.
Sixteen threads per device keep the pool from running out; idle threads cost nothing but their stacks.
The CPU client reads PJRT_NPROC once, when JAX creates its backend: `configure()` must run before that
(the launcher calls it first; the tests' conftest too).  A PJRT_NPROC already set is kept.

The other way XLA:CPU can stall simulated devices, collectives inside a loop beside a top-level one, is
ruled out by how the programs are built (paft_jax/models/loops.py).
"""
from __future__ import annotations

import os
import re
from typing import MutableMapping

THREADS_PER_DEVICE = 16


def pool_size(environ: MutableMapping[str, str]) -> int | None:
    """The PJRT_NPROC to set for the simulated devices `environ`'s XLA_FLAGS asks for (None: leave it)."""
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    if m is None or int(m.group(1)) < 2 or environ.get("PJRT_NPROC"):
        return None
    return THREADS_PER_DEVICE * int(m.group(1))


def configure(environ: MutableMapping[str, str] = os.environ) -> None:
    size = pool_size(environ)
    if size is not None:
        environ["PJRT_NPROC"] = str(size)
