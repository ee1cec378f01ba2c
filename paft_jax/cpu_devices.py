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

The aborts left are another deadlock, inside one program (caught under gdb, 2026-12-06: the DPO train
step on 4 of 8 devices, 1 hang in 14 runs of configs/paft_tiny.yaml with two busy loops beside it).
XLA:CPU ran a top-level all-reduce (the gradient of the final norm and the LM head) and the backward layer
scan's while loop, which holds all-gathers, in different orders on different ranks, one rank even both at
once: three ranks waited at the all-reduce, two threads at an all-gather in the loop.  The HLO schedules
the all-reduce first and nothing orders them by data.  `step_fn.in_order` was meant to order one such pair
(batch totals before the forward scan), but XLA:CPU drops its barrier, and that pair deadlocked in CI too;
only a real data dependency or unrolled scans would rule it out.  Raising XLA's timeout
(`--xla_cpu_collective_call_terminate_timeout_seconds=300`) did not help: CI still aborted twice.
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
