"""Branch checkpoints with Orbax: delta + optimizer state + step, the data-iterator state and run metadata.

Orbax writes each checkpoint under a temporary name and renames it when complete, so a save killed
midway is never listed, and `resume: auto` picks the latest complete one.  Restores take the target
shardings of the *current* mesh, so a checkpoint saved on one mesh restores on another.  A checkpoint
that exists but cannot be read is an error naming it, unless `fallback: true` asks for the previous one.
A save that fails (a full disk, a lost bucket) is a `CheckpointError` naming the step and the latest
complete checkpoint, which the failed save never touches; its partial files are removed.

Test-only hook: `PAFT_TEST_SLOW_SAVE=STEP:SECONDS` holds the save of STEP in its temporary, unfinalized
state for SECONDS (an extra item whose background write sleeps first), so a test can kill a run while
an async save is in flight, deterministically.  Never set it outside tests.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import math
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from paft_jax import checksums
from paft_jax.storage import join as storage_join

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
    on_signal: bool = True         # SIGTERM/SIGINT: finish the step, save, exit EXIT_STOPPED (75)

    def validate(self) -> None:
        if self.save_every < 0 or self.keep_last < 1 or self.keep_every < 0:
            raise ValueError("checkpoint.save_every and keep_every must be >= 0, keep_last >= 1")
        if self.resume not in ("auto", "never") and not str(self.resume or "").rstrip("/").rpartition("/")[2].isdigit():
            raise ValueError(f"checkpoint.resume={self.resume!r}: expected auto, never, or a checkpoint step "
                             "directory such as runs/x/checkpoints/200")


class CheckpointError(RuntimeError):
    pass


class _Damaged(Exception):
    """A step whose files differ from the checksums written when it was saved."""


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


class BranchCheckpointer:
    """One branch's checkpoints: `save(step, state, data_state, meta)`, `restore(...)`."""

    def __init__(self, cfg: CheckpointConfig, directory: str, processes: list[int] | None = None):
        """`processes`: the processes owning the branch's mesh (default: all); with several branches on
        disjoint sub-meshes each checkpointer's barriers involve only its own processes."""
        ocp = _ocp()
        cfg.validate()
        self.cfg, self.directory = cfg, directory
        self.primary = processes[0] if processes else 0   # the process that writes files alone
        mp = ocp.options.MultiprocessingOptions()
        if processes and jax.process_count() > 1:
            mp = ocp.options.MultiprocessingOptions(
                primary_host=processes[0], active_processes=set(processes),
                barrier_sync_key_prefix="branch-" + "-".join(map(str, processes)))
        scoped = mp.active_processes is not None
        if scoped:  # Orbax refuses create=True with active_processes: every branch process makes it (idempotent)
            from etils import epath
            epath.Path(directory).mkdir(parents=True, exist_ok=True)
            _array_primary(mp.primary_host)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last, keep_period=cfg.keep_every or None, create=not scoped,
            enable_async_checkpointing=cfg.async_save, save_interval_steps=1, multiprocessing_options=mp)
        # the handlers need the branch's primary host too (by default process 0 writes the JSON items)
        handlers = ({"state": ocp.StandardCheckpointHandler(multiprocessing_options=mp),
                     "host_state": _host_state_args()[2](mp.primary_host),
                     "data": ocp.JsonCheckpointHandler(multiprocessing_options=mp),
                     "meta": ocp.JsonCheckpointHandler(multiprocessing_options=mp)} if scoped else None)
        self.manager = ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)
        self._mp = mp
        self._in_flight: int | None = None   # step of the async save not yet waited for
        self._failed: CheckpointError | None = None
        self._failed_step: int | None = None
        self._slow = slow_save_hook()
        self._verified: set[int] = set()     # steps whose checksums matched in this process

    # ------------------------------------------------------------------------------------------ save
    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.cfg.save_every > 0 and step % self.cfg.save_every == 0)

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *, wait: bool = False) -> None:
        ocp = _ocp()
        if self._failed is not None:  # no save after a failed one: nothing may look safe that is not
            raise self._failed
        self.wait()  # a failed previous save is reported as that step's failure, before starting this one
        if step in self.manager.all_steps():
            return
        if _host_local(state):  # see _host_state_args: Orbax cannot save this branch's arrays itself
            items = dict(host_state=_host_state_args()[0](jax.device_get(state)))
        else:
            items = dict(state=ocp.args.StandardSave(state))
        items.update(data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
        if self._slow and self._slow[0] == step:
            log.warning("PAFT_TEST_SLOW_SAVE (test-only): holding the save of step %d unfinalized for %gs",
                        step, self._slow[1])
            items["test_slow_save"] = _slow_save_args()({"delay_s": self._slow[1]})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001  (tensorstore/Orbax raise ValueError, OSError, ...)
            raise self._save_failed(step, e) from e
        self._in_flight = step
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until the async save in flight is complete; its failure is a CheckpointError naming it."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(step, e) from e
        if step is not None and jax.process_index() == self.primary:
            self._write_checksums(step)

    def _write_checksums(self, step: int) -> None:
        """The committed step's checksum manifest (paft_jax/checksums.py); a step left without one restores
        unverified, with a warning, so failing to write it is a warning too."""
        where = storage_join(self.directory, str(step))
        try:
            stats = checksums.write(where)
        except Exception as e:  # noqa: BLE001  (an I/O error of the store or disk)
            log.warning("checkpoint %s: its checksums could not be written (%s: %s); it will restore unverified",
                        where, type(e).__name__, e)
            return
        log.info("checkpoint %s: checksums of %d files (%.1f MB) written in %.2fs", where, stats["files"],
                 stats["bytes"] / 1e6, stats["seconds"])

    def verify(self, step: int) -> str | None:
        """None when `step`'s files match the checksums written when it was saved (or it has none: then a
        warning); else what differs, naming the file."""
        if step in self._verified:  # a merge reads a step leaf by leaf: its files are checked once
            return None
        where = storage_join(self.directory, str(step))
        t0 = time.perf_counter()
        try:
            problem = checksums.verify(where)
        except FileNotFoundError:
            log.warning("checkpoint %s has no %s (saved by an older paft_jax, or stopped before the checksums "
                        "were written): restoring it unverified", where, checksums.MANIFEST)
            return None
        log.info("checkpoint %s: checksums %s in %.2fs", where, "differ" if problem else "verified",
                 time.perf_counter() - t0)
        if problem is None:
            self._verified.add(step)
        return problem

    def close(self) -> None:
        if self._failed is not None:  # already reported; Orbax would re-raise the same failure
            with contextlib.suppress(Exception):
                self.manager.close()
            # Orbax reports a save's first failed write while its other writes may still be running (its gather
            # does not cancel them), and tensorstore recreates the temporary directory removed then as they
            # finish: remove it until it stays gone
            if self._failed_step is not None and jax.process_index() == self.primary:
                _remove_partial_until_quiet(self.directory, self._failed_step)
            return
        try:
            self.wait()
        except CheckpointError:
            with contextlib.suppress(Exception):
                self.manager.close()
            raise
        self.manager.close()

    def _save_failed(self, step: int | None, e: Exception) -> CheckpointError:
        """The error for a failed save; removes the step's partial (temporary) files to free the space."""
        if self._failed is not None:
            return self._failed
        self._failed_step = step
        if step is not None and jax.process_index() == self.primary:
            _remove_partial(self.directory, step)
        done = [s for s in self.manager.all_steps() if s != step]
        latest = (f"the latest complete checkpoint, {self.directory}/{max(done)}, is intact" if done
                  else "there is no earlier complete checkpoint")
        detail = " ".join(str(e).split())
        full = "No space left on device" in detail or getattr(e, "errno", None) == errno.ENOSPC
        reason = ("the disk is full (No space left on device)" if full
                  else f"{type(e).__name__}: {detail[:400]}")  # the full cause is chained to the error
        self._failed = CheckpointError(
            f"checkpoint step {step if step is not None else '?'} could not be saved to {self.directory}: "
            f"{reason}; {latest}" + ("; free space, then run the same command to resume" if full else ""))
        log.error("%s (%s: %s)", self._failed, type(e).__name__, detail)
        return self._failed

    # ------------------------------------------------------------------------------------------ restore
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def saved_meta(self, step: int) -> dict | None:
        """The metadata a step was saved with (its run's config), read without the arrays; None if unreadable
        (the restore then reports why)."""
        ocp = _ocp()
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception:  # noqa: BLE001  (Orbax/tensorstore raise many kinds)
            return None

    def restore_delta(self, step: int, abstract_delta: Any) -> Any | None:
        """Only the trained delta of `step`, into the shardings `abstract_delta` carries (each process of the
        mesh reads its own shards): an Orbax partial restore, so the optimizer's moments (twice the delta's
        bytes) stay on disk.  None for a checkpoint a process wrote alone (host_state) or in a multi-process
        job: restore() it."""
        ocp = _ocp()
        from etils import epath
        path = epath.Path(self.directory) / str(step) / "state"
        alone = jax.process_count() > 1 and len(self._mp.active_processes or range(jax.process_count())) \
            < jax.process_count()
        if not path.exists() or alone:
            # some processes of several: Orbax's partial restore set up gloo collectives with every process even
            # for a process reading alone (the streamed merge on process 0) and timed out; the whole-state
            # restore works.  Every process together (the merge on the mesh) reads the delta alone.
            return None
        missing = _missing_metadata(self.directory, step)
        if missing:  # the arrays might still read, but a copy that lost this may have lost more
            raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored ({missing} is missing: "
                                  "the checkpoint was damaged or copied incompletely)")
        damaged = self.verify(step)
        if damaged:
            raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored (damaged: {damaged})")
        item = {"delta": abstract_delta}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=self._mp))
        try:
            return reader.restore(path, args=args)["delta"]
        except Exception as e:  # noqa: BLE001  (Orbax/tensorstore raise many kinds)
            missing = _missing_metadata(self.directory, step)
            detail = (f"{missing} is missing: the checkpoint was damaged or copied incompletely" if missing else
                      f"{type(e).__name__}: " + " ".join(str(e).split())[:300] + " ...")
            raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored ({detail})") from None
        finally:
            reader.close()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of `step` (default: the latest complete one), or None if there is none.

        `abstract_state` carries the target shardings (jax.ShapeDtypeStruct with .sharding)."""
        ocp = _ocp()
        candidates = self.steps() if step is None else [step]
        if not candidates:
            return None
        tried = []
        local = _host_local(abstract_state)
        # a process reading alone in a multi-process job restores as numpy (np.zeros: untouched pages cost no
        # memory), then places the arrays itself
        target = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract_state) if local \
            else abstract_state
        from etils import epath
        for s in reversed(candidates):
            try:
                damaged = self.verify(s)
                if damaged:
                    raise _Damaged(damaged)
                if (epath.Path(self.directory) / str(s) / "host_state").exists():
                    item = dict(host_state=_host_state_args()[1](abstract_state))
                else:
                    item = dict(state=ocp.args.StandardRestore(target))
                got = self.manager.restore(s, args=ocp.args.Composite(
                    **item, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
                state = got["host_state"] if "host_state" in item else got["state"]
                if local or "host_state" in item:
                    state = jax.tree_util.tree_map(lambda x, a: jax.device_put(np.asarray(x), a.sharding),
                                                   state, abstract_state)
                if tried:
                    log.warning("resuming from step %d: the later checkpoint(s) %s could not be read", s, tried)
                return s, state, dict(got["data"]), dict(got["meta"])
            except Exception as e:  # noqa: BLE001  (Orbax/tensorstore raise many kinds)
                where = f"{self.directory}/{s}"
                if not self.cfg.fallback or step is not None:
                    older = [x for x in candidates if x < s]
                    hint = (f"; set checkpoint.fallback=true to resume from step {older[-1]} instead"
                            if older else "")
                    detail = (f"damaged: {e}" if isinstance(e, _Damaged) else
                              f"{type(e).__name__}: " + " ".join(str(e).split())[:300] + " ...")
                    missing = _missing_metadata(self.directory, s)
                    if missing:
                        detail = f"{missing} is missing: the checkpoint was damaged or copied incompletely"
                    raise CheckpointError(f"checkpoint {where} cannot be restored ({detail}){hint}") from None
                log.error("checkpoint %s cannot be restored (%s); trying the previous one", where,
                          f"damaged: {e}" if isinstance(e, _Damaged) else f"{type(e).__name__}: {str(e)[:200]}")
                tried.append(s)
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried {tried})")


def _missing_metadata(directory: str, step: int) -> str | None:
    """The first Orbax metadata file a step directory lacks (whose absence Orbax reports as a pytree error)."""
    from etils import epath
    root = epath.Path(directory) / str(step)
    try:
        for item in ("state", "host_state", "data", "meta"):
            d = root / item
            if d.exists():
                name = "_METADATA" if item in ("state", "host_state") else "metadata"
                if not (d / name).exists():
                    return f"{root}/{item}/{name}"
    except Exception:  # noqa: BLE001  (a better message only; the restore error is reported anyway)
        return None
    return None


def _host_local(tree: Any) -> bool:
    """A multi-process job whose branch is driven by this process alone: every array (or target
    sharding) lives on this process's devices, which Orbax treats as pmap-style host-local data."""
    if jax.process_count() == 1:
        return False
    leaves = jax.tree_util.tree_leaves(tree)
    return all((x.sharding.is_fully_addressable if getattr(x, "sharding", None) is not None
                else getattr(x, "is_fully_addressable", True)) for x in leaves)


def _remove_partial(directory: str, step: int) -> None:
    """Delete Orbax's temporary directory of `step` (a save that failed); never a finalized step."""
    from etils import epath
    ocp = _ocp()
    root = epath.Path(directory)
    try:
        for p in root.glob(f"{step}{ocp.utils.TMP_DIR_SUFFIX}*"):
            p.rmtree()
    except Exception as e:  # noqa: BLE001  (best effort: the error being reported matters more)
        log.warning("could not remove the partial checkpoint of step %d in %s: %s", step, directory, e)


def _remove_partial_until_quiet(directory: str, step: int, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
    """`_remove_partial` again and again until no write of the failed save brings the directory back for
    `quiet_s` (at most `limit_s`: then what is left is logged)."""
    from etils import epath
    ocp = _ocp()
    root, t0 = epath.Path(directory), time.monotonic()
    while True:
        _remove_partial(directory, step)
        time.sleep(quiet_s)
        left = list(root.glob(f"{step}{ocp.utils.TMP_DIR_SUFFIX}*"))
        if not left:
            return
        if time.monotonic() - t0 > limit_s:
            log.warning("the partial checkpoint of step %d keeps reappearing in %s (a write of the failed save "
                        "still running?): %s", step, directory, [str(p) for p in left])
            return


def slow_save_hook() -> tuple[int, float] | None:
    """PAFT_TEST_SLOW_SAVE=STEP:SECONDS (test-only) -> (step, seconds), or None when unset."""
    spec = os.environ.get("PAFT_TEST_SLOW_SAVE")
    if not spec:
        return None
    step, sep, seconds = spec.partition(":")
    try:
        return int(step), float(seconds)
    except ValueError:
        raise ValueError(f"PAFT_TEST_SLOW_SAVE={spec!r}: expected STEP:SECONDS, e.g. 5:60") from None


@functools.cache
def _slow_save_args():
    """Checkpoint args whose handler sleeps in the background write before writing a small JSON file:
    the whole checkpoint stays under its temporary name until then (Orbax finalizes after every item)."""
    ocp = _ocp()

    class SlowJsonHandler(ocp.JsonCheckpointHandler):
        async def _save_fn(self, x, directory):
            await asyncio.sleep(float(x["delay_s"]))
            await super()._save_fn(x, directory)

    @ocp.args.register_with_handler(SlowJsonHandler, for_save=True)
    @dataclasses.dataclass
    class SlowSave(ocp.args.CheckpointArgs):
        item: dict

    @ocp.args.register_with_handler(SlowJsonHandler, for_restore=True)  # Orbax wants both directions
    @dataclasses.dataclass
    class SlowRestore(ocp.args.CheckpointArgs):
        item: dict | None = None

    return SlowSave


def _array_primary(primary: int) -> None:
    """Orbax's jax.Array handler (a process-wide registry entry) writes array metadata from its primary
    host, process 0 by default: a branch without process 0 would finalize a checkpoint with no metadata.
    In a multi-process PAFT run each process saves for exactly one branch, so pointing the process's
    handler at its branch's primary is consistent (reads do not depend on it)."""
    ocp = _ocp()
    from orbax.checkpoint._src.metadata import array_metadata_store
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(primary_host=primary, array_metadata_store=array_metadata_store.Store()),
        override=True)


@functools.cache
def _host_state_args():
    """(Save args, Restore args, handler class) for the train state of a branch driven by one process of
    a multi-process job.  Its arrays live on that process's devices only, which Orbax takes for pmap-style
    host-local data and refuses to save (and its numpy handler writes on process 0 only).  This handler
    writes the leaves as raw bytes in one file from the branch's primary process; the checkpoint is still
    an Orbax step (temporary name until every item is written, then renamed)."""
    ocp = _ocp()

    class HostStateHandler(ocp.CheckpointHandler):
        def __init__(self, primary: int | None = 0):
            self.primary = primary or 0

        def save(self, directory, args):
            leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(args.state)]  # tobytes() is C order
            if jax.process_index() == self.primary:
                index = [{"dtype": x.dtype.name, "shape": list(x.shape)} for x in leaves]
                (directory / "index.json").write_text(json.dumps(index))
                with (directory / "leaves.bin").open("wb") as f:
                    for x in leaves:
                        f.write(x.tobytes())

        def restore(self, directory, args):
            import ml_dtypes  # noqa: F401,I001  (registers bfloat16 with numpy)
            index = json.loads((directory / "index.json").read_text())
            leaves, treedef = jax.tree_util.tree_flatten(args.abstract)
            if len(index) != len(leaves):
                raise ValueError(f"{directory}: {len(index)} arrays saved, the state has {len(leaves)}")
            out = []
            with (directory / "leaves.bin").open("rb") as f:
                for e, a in zip(index, leaves):
                    x = np.frombuffer(f.read(np.dtype(e["dtype"]).itemsize * math.prod(e["shape"])),
                                      e["dtype"]).reshape(e["shape"])
                    if x.shape != tuple(a.shape):
                        raise ValueError(f"{directory}: saved shape {x.shape} != expected {tuple(a.shape)}")
                    out.append(x)
            return jax.tree_util.tree_unflatten(treedef, out)

        def metadata(self, directory):
            return None

    @ocp.args.register_with_handler(HostStateHandler, for_save=True)
    @dataclasses.dataclass
    class HostStateSave(ocp.args.CheckpointArgs):
        state: Any

    @ocp.args.register_with_handler(HostStateHandler, for_restore=True)
    @dataclasses.dataclass
    class HostStateRestore(ocp.args.CheckpointArgs):
        abstract: Any = None

    return HostStateSave, HostStateRestore, HostStateHandler


def abstract_like(state: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# The exit code of a run stopped by SIGTERM/SIGINT after saving (sysexits' EX_TEMPFAIL: "try again"): a
# scheduler tells it from success (0), a user's mistake (2) and a crash (1); the same command resumes it.
EXIT_STOPPED = 75


class StopRequest:
    """SIGTERM/SIGINT set a flag the loop reads between steps (the step in flight finishes first).

    A second SIGINT interrupts at once.  With several processes the flag is agreed on collectively, so
    every process saves the same step."""

    def __init__(self, enabled: bool = True):
        self.signum: int | None = None
        self.reason: str | None = None    # a stop asked for by code (e.g. the other PAFT branch failed)
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

    def requested(self, mesh=None) -> bool:
        """Whether to stop now; with `mesh`, agreed among that mesh's processes only (one branch)."""
        flag = self.signum is not None or self.reason is not None
        if mesh is not None:
            from paft_jax.mesh import mesh_max
            return bool(mesh_max(float(flag), mesh))
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils
            flag = bool(np.max(multihost_utils.process_allgather(np.asarray(int(flag)))))
        return flag

    def pending(self) -> bool:
        """This process's own flag (no collective): what a caller outside the step loop checks."""
        return self.signum is not None or self.reason is not None

    def request(self, reason: str) -> None:
        self.reason = reason

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum else (self.reason or "a stop request")

    def restore_handlers(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
