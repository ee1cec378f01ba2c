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

It also raises that rendezvous timeout to RENDEZVOUS_TIMEOUT_S.  The 40 s default is XLA's guess at "this
rank will never come"; on a busy 2-core machine a rank of 8 simulated devices can just be late (a rank held
back 6 s on purpose arrives, and XLA logs "unstuck"; tests/test_cpu_devices.py).  The aborts left after the
larger pool look like that: one test run aborted in pytest after 23 minutes, and three kill-and-rerun runs
aborted in a row once, then none again.  A true deadlock now aborts after RENDEZVOUS_TIMEOUT_S instead.  A
timeout already in XLA_FLAGS is kept.
"""
from __future__ import annotations

import os
import re
from typing import MutableMapping

THREADS_PER_DEVICE = 16
RENDEZVOUS_TIMEOUT_S = 300
_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


def device_count(environ: MutableMapping[str, str]) -> int:
    """The simulated CPU device count `environ`'s XLA_FLAGS asks for (1 when it asks for none)."""
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    return 1 if m is None else int(m.group(1))


def pool_size(environ: MutableMapping[str, str]) -> int | None:
    """The PJRT_NPROC to set for the simulated devices `environ`'s XLA_FLAGS asks for (None: leave it)."""
    n = device_count(environ)
    if n < 2 or environ.get("PJRT_NPROC"):
        return None
    return THREADS_PER_DEVICE * n


def configure(environ: MutableMapping[str, str] = os.environ) -> None:
    """PJRT_NPROC and the rendezvous timeout for simulated devices (nothing for one device)."""
    size = pool_size(environ)
    if size is not None:
        environ["PJRT_NPROC"] = str(size)
    flags = environ.get("XLA_FLAGS", "")
    if device_count(environ) > 1 and _TIMEOUT_FLAG not in flags:
        environ["XLA_FLAGS"] = f"{flags} {_TIMEOUT_FLAG}={RENDEZVOUS_TIMEOUT_S}"
