"""Branch threads on XLA:CPU take turns on the device (train/turns.py): the fix for the rendezvous deadlock
two concurrent collective programs hit on 2-core machines."""
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
