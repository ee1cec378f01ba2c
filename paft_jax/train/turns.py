"""Device programs one at a time while branch threads share an XLA:CPU process.

On CPU the PAFT branches train in parallel threads of one process, each on its own sub-mesh of simulated
devices, and every device's share of every program runs on one shared XLA:CPU thread pool.  Without
turns, one run in 29 of `benchmarks/rendezvous_stress.py` (two busy loops beside it) hung in a branch's
checkpoint save while the other branch stepped: Orbax's save futures never started and it gave up after
300 s.  On CPU nothing is gained by overlapping the branches' programs, so inside `taking_turns()` every
program wrapped by `one_at_a_time` holds one process-wide lock until its outputs are ready, and a `turn()`
(host code that dispatches programs of its own: a branch's set-up, a restore, a save) holds it until
everything it dispatched has finished.  Entering `taking_turns()` also waits for work dispatched before
(placing the base on the second sub-mesh).  Elsewhere (accelerators, a single branch) the wrapper calls
straight through and dispatch stays asynchronous.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import jax

_lock = threading.RLock()
_active = 0


@contextlib.contextmanager
def taking_turns() -> Iterator[None]:
    """While active (CPU backend only), wrapped programs run one at a time across threads."""
    global _active
    on = jax.default_backend() == "cpu"
    if on:
        with _lock:
            _settle()
            _active += 1
    try:
        yield
    finally:
        if on:
            with _lock:
                _active -= 1


@contextlib.contextmanager
def turn() -> Iterator[None]:
    """Hold the device for a block of host code that runs programs (setting up a branch)."""
    if not _active:
        yield
        return
    with _lock:
        try:
            yield
        finally:
            _settle()


def _settle() -> None:
    """Wait until no program is computing any live array (JAX dispatches asynchronously: a block of host code
    returns before the programs it launched have run)."""
    jax.block_until_ready(jax.live_arrays())


def active() -> bool:
    """Whether programs are taking turns now (a caller may then prefer to finish work before returning)."""
    return bool(_active)


def one_at_a_time(fn: Callable) -> Callable:
    """`fn` (a jitted program) that, inside `taking_turns()`, runs alone and returns ready outputs."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not _active:
            return fn(*args, **kwargs)
        with _lock:
            return jax.block_until_ready(fn(*args, **kwargs))
    return call
