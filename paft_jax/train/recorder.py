"""Step metrics fetched off the training thread, so the loop never waits on the host between steps.

The loop dispatches a step (JAX returns at once), hands its metrics (device arrays) to the recorder and
goes on to read and place the next batch while the devices compute.  The recorder's thread waits for
each step's metrics in order, stamps when they arrived, and writes the record (metrics.jsonl,
TensorBoard, the progress bar, log lines): every step keeps its own row.  At most `max_in_flight` steps
are dispatched and not yet recorded; `drain()` waits for all of them (before a checkpoint, an evaluation,
a stop), and re-raises what went wrong there (a non-finite loss) in the loop's thread.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from typing import Callable

import jax


class MetricsRecorder:
    def __init__(self, write: Callable[[dict], None], *, max_in_flight: int | None = None):
        """`write(record)`: called on the recorder's thread, one record at a time, in step order.
        `max_in_flight` (default 2 on accelerators, 1 on CPU, where a step already keeps every core busy;
        branch threads sharing an XLA:CPU process also take turns, see train/turns.py)."""
        if max_in_flight is None:
            max_in_flight = 1 if jax.default_backend() == "cpu" else 2
        self._write, self._queue = write, queue.Queue()
        self._slots = threading.Semaphore(max_in_flight)
        self._error: BaseException | None = None
        self._last_end: float | None = None
        self._thread = threading.Thread(target=self._run, name="paft-metrics", daemon=True)
        self._thread.start()

    def reserve(self) -> None:
        """Before dispatching a step: wait until fewer than max_in_flight steps are still unrecorded."""
        self.check()
        self._slots.acquire()
        self.check()

    def step(self, step: int, metrics: dict, t0: float, tokens: tuple[float, int], flops: float,
             peak: float | None) -> None:
        """Step `step` (0-based), dispatched at `t0` after reserve(), with these (trained, total) token counts."""
        self._queue.put(("step", (step, metrics, t0, tokens, flops, peak)))

    def record(self, rec: dict) -> None:
        """A finished record (an evaluation), written after every step queued before it."""
        self.check()
        self._queue.put(("record", rec))

    def drain(self) -> None:
        self._queue.join()
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, payload = item
            try:
                if self._error is None:
                    self._write(self._step_record(*payload) if kind == "step" else payload)
            except BaseException as e:  # noqa: BLE001 - re-raised in the loop's thread
                self._error = e
            finally:
                if kind == "step":
                    self._slots.release()
                self._queue.task_done()
        self._queue.task_done()

    def _step_record(self, step, metrics, t0, tokens, flops, peak) -> dict:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for this step only
        t1 = time.time()
        # the devices run the steps back to back: a step starts when it was dispatched or when the one
        # before it finished, whichever is later
        start = t0 if self._last_end is None else max(t0, self._last_end)
        self._last_end = t1
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"step {step + 1}: loss is {m['loss']} (metrics {m}); stopping before any "
                                     "later checkpoint is saved (those saved so far predate this step; each is "
                                     "checked against its checksums when restored)")
        dt = max(t1 - start, 1e-9)
        rec = {"step": step + 1, **m, "trained_tokens": tokens[0], "tokens": tokens[1], "time_start": start,
               "time_end": t1, "tokens_per_second": tokens[1] / dt, "model_tflops_per_second": flops / dt / 1e12}
        if peak:  # known accelerators only (flops.PEAK_FLOPS)
            rec["mfu"] = flops / dt / peak
        return rec


def parse_profile(spec: str | None) -> tuple[int, int] | None:
    """`profile: START:STOP` (steps, 1-based, inclusive) -> (START, STOP)."""
    if spec in (None, ""):
        return None
    try:
        a, b = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"profile={spec!r}: expected START:STOP steps, e.g. 5:8") from None
    if not 1 <= a <= b:
        raise ValueError(f"profile={spec!r}: expected 1 <= START <= STOP")
    return a, b


class ProfileWindow:
    """`profile: START:STOP`: a jax.profiler trace of exactly those steps (1-based, inclusive) into
    `directory` (TensorBoard's profile plugin or Perfetto read it)."""

    def __init__(self, spec: str | None, directory: str):
        self.window, self.directory, self.on = parse_profile(spec), directory, False

    def before(self, step: int, drain: Callable[[], None]) -> None:
        if self.window and step == self.window[0] and not self.on:
            drain()  # the trace starts with this step, not inside an earlier one
            jax.profiler.start_trace(self.directory)
            self.on = True

    def after(self, step: int, drain: Callable[[], None]) -> None:
        if self.on and step >= self.window[1]:
            drain()  # the traced steps have finished on the devices
            self.close()

    def close(self) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on = False
