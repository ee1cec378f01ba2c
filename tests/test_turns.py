"""Branch threads on XLA:CPU take turns on the device (train/turns.py)."""
import threading
import time

import jax
import jax.numpy as jnp

from paft_jax.train import turns


def _overlap_counter():
    state = {"inside": 0, "most": 0}
    guard = threading.Lock()

    def work(x):
        with guard:
            state["inside"] += 1
            state["most"] = max(state["most"], state["inside"])
        time.sleep(0.02)  # room for another thread to enter, if it may
        with guard:
            state["inside"] -= 1
        return jnp.asarray(x) + 1
    return work, state


def _run_threads(f, n=4):
    out = [None] * n

    def go(i):
        out[i] = f(i)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_programs_run_one_at_a_time_while_branches_take_turns():
    assert jax.default_backend() == "cpu"
    work, state = _overlap_counter()
    f = turns.one_at_a_time(work)
    with turns.taking_turns():
        out = _run_threads(f)
        with turns.turn():  # re-entrant: a branch's set-up holds the device while its programs run
            assert int(f(10)) == 11
    assert state["most"] == 1
    assert [int(x) for x in out] == [1, 2, 3, 4]


def test_outside_taking_turns_the_wrapper_only_calls_through():
    work, state = _overlap_counter()
    f = turns.one_at_a_time(work)
    gate = threading.Barrier(2, timeout=10)

    def both_inside(x):  # two threads inside at once: would deadlock (then time out) under the lock
        gate.wait()
        return work(x)
    g = turns.one_at_a_time(both_inside)
    assert [int(x) for x in _run_threads(g, 2)] == [1, 2]
    assert int(f(1)) == 2


@jax.jit
def _slow(x):  # ~0.1-1 s of matmuls on CPU: still running when an asynchronous dispatch returns
    return jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ y), x)


def test_a_turn_ends_only_when_the_programs_it_dispatched_have_finished():
    """Host code in a turn (a branch's set-up, a restore) dispatches programs that JAX runs asynchronously;
    the next branch's program must not start while they still compute.  The same for work dispatched
    before the branches start taking turns (the base placed on the second sub-mesh)."""
    x = jnp.full((768, 768), 1e-3)
    _slow(x).block_until_ready()  # compiled: what follows times only the dispatch
    before = _slow(x)
    assert not before.is_ready()  # the check below can fail: dispatch alone does not wait
    with turns.taking_turns():
        assert before.is_ready()
        with turns.turn():
            inside = _slow(x)
        assert inside.is_ready()
