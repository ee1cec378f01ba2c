"""Running a multi-device CLI command in a fresh process, once more if XLA:CPU aborted it in a rendezvous.

On 2-core machines, a few times in a hundred runs, XLA:CPU aborted a 4-device train step (one sub-mesh of
the PAFT pipeline, concurrent or serial schedule) when its 40 s rendezvous timeout expired: ranks took a
top-level collective and the layer scan's collectives in different orders (paft_jax/cpu_devices.py says
what gdb showed).  That abort is XLA's, not
the behaviour under test, so such a run is run once more, with a warning in the test report that names the
stuck rendezvous.  With XLA_ABORT_LOG_DIR set, each aborted run's whole stderr is kept there (XLA prints every
thread's stack when it aborts)."""
import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path

ABORT = "Exiting to ensure a consistent program state"  # XLA:CPU's fatal rendezvous-timeout message


RETRIES = 2  # a full suite saw the abort twice in a row in one fixture (2026-12-06): two more runs at most


def run(cmd: list[str], *, fresh: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs); after an XLA rendezvous abort, again, up
    to RETRIES times (`fresh`: a directory emptied first, for a run that must start from nothing)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    for _ in range(RETRIES):
        if not (proc.returncode == -6 and ABORT in proc.stderr):
            break
        if os.environ.get("XLA_ABORT_LOG_DIR"):  # keep the whole stderr (XLA prints every thread's stack)
            log = Path(os.environ["XLA_ABORT_LOG_DIR"]) / f"abort_{os.getpid()}_{time.time_ns()}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{cmd}\n{proc.stderr}")
        warnings.warn(f"XLA:CPU rendezvous abort in {' '.join(map(str, cmd[1:]))} (stuck: "
                      f"{'; '.join(stuck(proc.stderr)) or '?'}); running it once more")
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return proc


_KEY = (r"`(?P<op>[a-z -]+) RendezvousKey\{run_id=RunId: (?P<run>-?\d+), global_devices=\[(?P<devs>[\d, ]*)\]"
        r"[^`]*op_id=(?P<op_id>\d+)\}`")


def _key(m: re.Match) -> tuple[str, str, str, str]:
    return m["op"], m["op_id"], m["run"], m["devs"]


def stuck(stderr: str) -> list[str]:
    """The rendezvous still waited on when XLA aborted, one line each: the collective, its program's run
    (two run ids: two programs), its devices, and how many ranks had arrived ("waiting" lines that XLA
    later logged as unstuck are left out)."""
    waiting: dict[tuple, set[str]] = {}
    for m in re.finditer(r"\[id=(?P<rank>\d+)\] This thread has been waiting for " + _KEY, stderr):
        waiting.setdefault(_key(m), set()).add(m["rank"])
    for m in re.finditer(r"\[id=(?P<rank>\d+)\] This thread is unstuck waiting for " + _KEY, stderr):
        waiting.get(_key(m), set()).discard(m["rank"])
    arrived = {_key(m): m["n"] for m in re.finditer(
        r"Termination timeout for " + _KEY + r"(?:[^\n]*?only (?P<n>\d+) of them)?", stderr)}
    out = []
    for key in sorted(set(waiting) | set(arrived)):
        op, op_id, run, devs = key
        if arrived.get(key):
            how = f"{arrived[key]} of {len(devs.split(','))} arrived"
        elif waiting.get(key):
            how = f"{len(waiting[key])} waiting"
        elif key in arrived:
            how = "timed out"
        else:
            continue
        out.append(f"{op} op_id={op_id} run {run} devices [{devs}] {how}")
    return out
