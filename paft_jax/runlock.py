"""One writer per run directory: a lock taken before a run writes anything, released on every exit path.

The lock names its holder (host, process id, start time, command), so a second writer is refused at once
with a one-line error that says who holds the directory.  Readers (`export --checkpoint`,
`eval --checkpoint`) do not take it.

Local directories: `<output_dir>/.paft-lock` held with flock(2).  The kernel releases it when the holder
exits, however it exits (SIGKILL included), so a crashed run never blocks its rerun; the rerun says whose
lock it found and takes over.  flock works across hosts on NFSv4, not on every network file system.

Object stores (gs://): the lock object `<output_dir>/.paft-lock` is created with a precondition that it
does not exist (GCS's `ifGenerationMatch=0`), so of two writers exactly one creates it.  It carries a
lease: the holder rewrites it every `lease_s / 4` seconds from a background thread (after reading that it
is still its own).  A lock whose lease has run out (a preempted slice, a killed process) is taken over by
deleting the generation that was read (`ifGenerationMatch=<generation>`: of two takers one wins) and
creating it again; the taker says whose lease expired.  Expiry is judged by the reader's clock against
the holder's, so clocks may disagree by a small part of the lease.  A holder that could not renew for a
whole lease (its host stalled) may lose the lock: its next renewal finds another holder's token, logs
that it lost the lock, and it does not delete the new holder's lock when it ends.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from paft_jax import storage

log = logging.getLogger("paft_jax")

LOCK_NAME = ".paft-lock"
LEASE_S = 300.0  # an object-store lock is renewed every LEASE_S / 4 and taken over LEASE_S after its last renewal


class RunLockedError(RuntimeError):
    """Another process holds the run directory (a user error: one line naming the holder)."""


def _holder(token: str, lease_s: float | None) -> dict:
    now = time.time()
    info = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
    if lease_s is not None:
        info.update(lease_s=lease_s, expires=now + lease_s)
    return info


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock holds no description yet)"
    return (f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('started', '?')} "
            f"(`{holder.get('command', '?')}`)")


def _parse(text: str | bytes | None) -> dict | None:
    try:
        data = json.loads(text) if text else None
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


class RunLock:
    """A held lock on `output_dir`; `release()` (or leaving the `with` block) gives it back."""

    def __init__(self, output_dir: str, *, lease_s: float = LEASE_S):
        self.output_dir = str(output_dir).rstrip("/") or str(output_dir)
        self.remote = storage.is_url(output_dir)
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._fd: int | None = None
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        (self._acquire_remote if self.remote else self._acquire_local)()

    # ------------------------------------------------------------------------------------------ local
    def _acquire_local(self) -> None:
        import fcntl
        from paft_jax.publish import existing_ancestor
        d = Path(self.output_dir)
        ancestor = existing_ancestor(d)
        if not ancestor.is_dir():
            raise NotADirectoryError(f"output_dir {d}: {ancestor} is a file, not a directory")
        self._created_dir = not d.exists()
        d.mkdir(parents=True, exist_ok=True)
        path = d / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 65536, 0))
                os.close(fd)
                self._remove_created_dir()
                raise RunLockedError(f"{self.output_dir} is in use by {describe(holder)}; wait for that run to end "
                                     "or stop it, or give this one another output_dir (or --fresh)") from None
            try:  # a holder that was releasing may have unlinked the file we opened: lock the one on disk
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = _parse(os.pread(fd, 65536, 0))
        if left:
            log.warning("%s: taking over the run lock left by %s, which is no longer running", self.output_dir,
                        describe(left))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder(self.token, None)) + "\n").encode(), 0)
        self._fd = fd

    def _release_local(self) -> None:
        path = Path(self.output_dir) / LOCK_NAME
        try:
            path.unlink(missing_ok=True)  # unlinked while still held: a waiter re-checks the inode (above)
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        """A directory this lock created and nothing else was written to goes again (a refused or failed
        start leaves no empty output_dir behind)."""
        if self._created_dir:
            try:
                os.rmdir(self.output_dir)
            except OSError:
                pass

    # ------------------------------------------------------------------------------------------ remote
    @property
    def _url(self) -> str:
        return storage.join(self.output_dir, LOCK_NAME)

    def _acquire_remote(self) -> None:
        url = self._url
        for _ in range(3):
            if storage.create_text(url, json.dumps(_holder(self.token, self.lease_s)) + "\n"):
                self._thread = threading.Thread(target=self._renew_loop, name="paft-run-lock", daemon=True)
                self._thread.start()
                return
            text, generation = storage.read_versioned(url)
            if text is None:
                continue  # released between our create and our read: try again
            holder = _parse(text)
            expires = holder.get("expires") if holder else None
            if isinstance(expires, (int, float)) and expires > time.time():
                raise RunLockedError(f"{self.output_dir} is in use by {describe(holder)}; its lease runs until "
                                     f"{_utc(expires)} ({expires - time.time():.0f} s from now, renewed while it "
                                     "runs): wait for that run to end or stop it, or give this one another "
                                     "output_dir (or --fresh)")
            if storage.remove_version(url, generation):
                log.warning("%s: taking over the run lock of %s, whose lease expired at %s without renewal "
                            "(a preempted or killed run)", self.output_dir, describe(holder),
                            _utc(expires) if isinstance(expires, (int, float)) else "an unknown time")
            # else another writer removed or replaced it first: the next create decides
        raise RunLockedError(f"{self.output_dir}: could not take the run lock {url} (other writers kept "
                             "changing it); is another run starting there?")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4) and not self.lost:
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001  (a failed renewal is retried; the lease has slack)
                log.warning("%s: renewing the run lock failed (%s: %s); retrying", self.output_dir,
                            type(e).__name__, e)

    def renew(self) -> None:
        """Extend the lease (read, check it is still ours, rewrite: it can race only with a takeover,
        which needs this holder silent for a whole lease first)."""
        text, _ = storage.read_versioned(self._url)
        holder = _parse(text)
        if not holder or holder.get("token") != self.token:
            self.lost = True
            log.error("%s: this run lost its lock to %s (not renewed for a whole lease?); another writer may "
                      "now be writing here", self.output_dir, describe(holder) if holder else "nobody")
            return
        storage.write_text(self._url, json.dumps(_holder(self.token, self.lease_s)) + "\n")

    def _release_remote(self) -> None:
        self._stop.set()
        self._thread.join()
        self._thread = None
        text, generation = storage.read_versioned(self._url)
        holder = _parse(text)
        if holder and holder.get("token") == self.token:
            storage.remove_version(self._url, generation)

    # ------------------------------------------------------------------------------------------ both
    def release(self) -> None:
        if self.remote:
            if self._thread is not None:
                self._release_remote()
        elif self._fd is not None:
            self._release_local()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def holding(output_dir: str, *, lease_s: float = LEASE_S) -> Iterator[RunLock | None]:
    """Hold `output_dir`'s lock for the `with` block.  With several JAX processes only process 0 takes it
    (the primary writes the run's files) and tells the others whether it could, so all of them stop."""
    import jax
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(output_dir, lease_s=lease_s)
        except RunLockedError as e:
            refused = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not taken and refused is None:
            refused = RunLockedError(f"{output_dir}: process 0 could not take the run lock (its log names the "
                                     "holder)")
    if refused is not None:
        raise refused
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
