"""Branch checkpoints with Orbax: delta + optimizer state + step, the data-iterator state and run metadata.

Orbax writes each checkpoint under a temporary name and renames it when complete, so a save killed
midway is never listed, and `resume: auto` picks the latest complete one.  Restores take the target
shardings of the *current* mesh, so a checkpoint saved on one mesh restores on another.  A checkpoint
that exists but cannot be read is an error naming it, unless `fallback: true` asks for the previous one.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

import jax

log = logging.getLogger("paft_jax")


@dataclass
class CheckpointConfig:
    enabled: bool = True
    directory: str | None = None   # default: <output_dir>/checkpoints (local path or gs://bucket/...)
    save_every: int = 100          # steps between saves (0: only at the end and on preemption)
    keep_last: int = 3             # most recent checkpoints kept
    keep_every: int = 0            # also keep every step divisible by this forever (0: none)
    async_save: bool = True        # write in the background while training continues
    resume: str = "auto"           # auto (latest complete checkpoint, if any) | never | a checkpoint step dir
    fallback: bool = False         # on an unreadable checkpoint, resume from the previous readable one
    on_signal: bool = True         # SIGTERM/SIGINT: finish the step, save, exit 0

    def validate(self) -> None:
        if self.save_every < 0 or self.keep_last < 1 or self.keep_every < 0:
            raise ValueError("checkpoint.save_every and keep_every must be >= 0, keep_last >= 1")
        if self.resume not in ("auto", "never") and not self.resume:
            raise ValueError("checkpoint.resume must be auto, never or a path")


class CheckpointError(RuntimeError):
    pass


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


class BranchCheckpointer:
    """One branch's checkpoints: `save(step, state, data_state, meta)`, `restore(...)`."""

    def __init__(self, cfg: CheckpointConfig, directory: str):
        ocp = _ocp()
        cfg.validate()
        self.cfg, self.directory = cfg, directory
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last, keep_period=cfg.keep_every or None, create=True,
            enable_async_checkpointing=cfg.async_save, save_interval_steps=1)
        self.manager = ocp.CheckpointManager(directory, options=opts)

    # ------------------------------------------------------------------------------------------ save
    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.cfg.save_every > 0 and step % self.cfg.save_every == 0)

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *, wait: bool = False) -> None:
        ocp = _ocp()
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------------------------------ restore
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of `step` (default: the latest complete one), or None if there is none.

        `abstract_state` carries the target shardings (jax.ShapeDtypeStruct with .sharding)."""
        ocp = _ocp()
        candidates = self.steps() if step is None else [step]
        if not candidates:
            return None
        tried = []
        for s in reversed(candidates):
            try:
                got = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                if tried:
                    log.warning("resuming from step %d: the later checkpoint(s) %s could not be read", s, tried)
                return s, got["state"], dict(got["data"]), dict(got["meta"])
            except Exception as e:  # noqa: BLE001  (Orbax/tensorstore raise many kinds)
                where = f"{self.directory}/{s}"
                if not self.cfg.fallback or step is not None:
                    older = [x for x in candidates if x < s]
                    hint = (f"; set checkpoint.fallback=true to resume from step {older[-1]} instead"
                            if older else "")
                    detail = " ".join(str(e).split())[:300]
                    raise CheckpointError(f"checkpoint {where} cannot be restored ({type(e).__name__}: "
                                          f"{detail} ...){hint}") from None
                log.error("checkpoint %s cannot be restored (%s: %s); trying the previous one",
                          where, type(e).__name__, str(e)[:200])
                tried.append(s)
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried {tried})")


def abstract_like(state: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class StopRequest:
    """SIGTERM/SIGINT set a flag the loop reads between steps (the step in flight finishes first).

    A second SIGINT interrupts at once.  With several processes the flag is agreed on collectively, so
    every process saves the same step."""

    def __init__(self, enabled: bool = True):
        self.signum: int | None = None
        self._old: dict = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)

    def requested(self) -> bool:
        flag = self.signum is not None
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils
            flag = bool(np.max(multihost_utils.process_allgather(np.asarray(int(flag)))))
        return flag

    def restore_handlers(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
