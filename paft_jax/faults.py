"""Test-only fault injection: `PAFT_JAX_FAULT=<point>` makes the process SIGKILL itself when it reaches
that named point, so kill-and-rerun tests hit exact places (mid-branch, between training and merge,
mid-export) instead of racing a timer.  Unset (always, outside tests), a point costs one dict lookup."""
from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("PAFT_JAX_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
