"""What every command-line entry shares (`python -m paft_jax.launch`, `python -m paft_jax.merge.cli`): the
argparse parser whose usage errors are one line, and `run`, which runs an entry and prints a user's mistake
as one line `error: ...` (exit code 2).  Imports nothing of JAX: the CLIs import the heavy modules lazily.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (`error: ...`, exit 2), like every other user mistake."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def user_error(e: BaseException) -> bool:
    """Whether `e` is a mistake of the user's (bad config, data, path, checkpoint) rather than a bug of ours.

    The project's errors are ValueErrors (RecipeError, DataError, DestinationError, config errors), its
    CheckpointError and IncompleteDirectoryError; the OS errors are those a path given by the user causes.
    The classes are looked up in sys.modules: an error of a module never imported cannot have been raised.
    """
    import errno
    if isinstance(e, (ValueError, FloatingPointError)) or any(c.__name__ == "YAMLError" for c in type(e).__mro__):
        return True
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.ENAMETOOLONG,
                                              errno.ENOTEMPTY, errno.ELOOP, errno.EDQUOT, errno.EXDEV):
        return True
    for module, name in (("paft_jax.checkpoint", "CheckpointError"), ("paft_jax.storage", "IncompleteDirectoryError"),
                         ("paft_jax.hf.verifier", "ExportMismatchError"), ("paft_jax.runlock", "RunLockedError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def one_line(e: BaseException) -> str:
    """`error: <message>` on one line (a multi-line message is joined with '; ')."""
    text = str(e) if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror and e.args and str(e).startswith("[Errno"):
        text = f"{e.filename}: {e.strerror}"   # "[Errno 2] No such file or directory: 'x'" -> "x: No such file ..."
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "error: " + "; ".join(lines)


def skip_absent_tpu() -> None:
    """libtpu (the `tpu` extra, for compiling for TPU topologies) makes JAX probe for TPUs at start; on a
    machine with no accelerator that prints a screen of warnings before every command.  With no TPU or
    GPU device files present (and JAX_PLATFORMS unset) JAX is told to use the CPU; the deviceless TPU
    compile does not need the TPU backend."""
    import glob
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def run(entry, argv: list[str] | None = None) -> int:
    """A command-line entry: `entry(argv)` (default argv: sys.argv[1:]), with a user's mistake printed as one
    line on stderr (exit code 2) instead of a traceback; `--debug` keeps the traceback.  Unexpected exceptions
    (our bugs) keep theirs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_absent_tpu()
    from paft_jax import cpu_devices
    cpu_devices.configure()  # before JAX creates its backend (simulated CPU devices: see cpu_devices.py)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(entry(argv) or 0)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and stops after the step in flight)
        if debug:
            raise
        print("error: interrupted at once by a second Ctrl-C; the same command resumes from the latest complete "
              "checkpoint", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if not user_error(e):
            raise
        if debug:  # the traceback too, with a user's mistake's exit code
            import traceback
            traceback.print_exc()
        for handler in logging.getLogger().handlers:  # what was logged comes before the message
            handler.flush()
        print(one_line(e), file=sys.stderr, flush=True)
        return 2
