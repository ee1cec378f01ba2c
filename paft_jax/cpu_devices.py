"""Thread pools for simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, N > 1).

XLA:CPU runs each device's share of a program as a task on one pool of max(cores, N) threads, and a
collective blocks its task's thread until all N ranks have arrived.  JAX dispatches asynchronously, so the
tasks of several programs are queued at once; when the blocked ranks of in-flight programs hold every
thread, a rank still in the queue never runs and XLA aborts the process after its 40 s rendezvous timeout
(seen on 2 cores: 7 of 8 ranks at an all-gather while the on-mesh merge dispatched its per-tensor programs;
3 of 4 ranks in a train step, in CI).  Sixteen threads per device make that exhaustion far less likely
(the merge that aborted then ran through; one abort still came in a later 32-minute test run, cause not
found); idle threads cost nothing but their stacks.  The CPU client reads PJRT_NPROC once, when JAX
creates its backend: `configure()` must run before that (the launcher calls it first; the tests'
conftest too).  A PJRT_NPROC already set is kept.

The aborts left are not late ranks: with XLA's timeout raised to 300 s
(`--xla_cpu_collective_call_terminate_timeout_seconds`), CI still aborted two 4-device pipeline runs, so a
rank never arrived.  Leaving the timeout at its default keeps such a run's cost at 40 s.
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
