"""How often XLA:CPU aborts the tiny PAFT pipeline in a collective rendezvous, on a loaded 2-core machine.

Runs `launch paft --config configs/paft_tiny.yaml` `--runs` times, one after the other, each into a fresh
output directory, beside two `yes > /dev/null` busy loops (the load under which the ordering deadlock
showed), and counts the runs whose stderr carries XLA's rendezvous abort.  Every run's exit code, wall time
and, for an abort, the collectives XLA reported stuck go to a JSON-lines log; a summary line ends it.

    python benchmarks/rendezvous_stress.py --runs 60 --label after \
        --log benchmarks/results/rendezvous_stress_after.jsonl
    python benchmarks/rendezvous_stress.py --repo /tmp/before --label before ...   # older code, same script

`--repo` runs another checkout (a `git worktree` of an older commit): its directory is the working
directory and comes first on PYTHONPATH.  Runs share one persistent XLA compilation cache, so only the
first compiles.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ABORT = "Exiting to ensure a consistent program state"  # XLA:CPU's fatal rendezvous-timeout message
STUCK = re.compile(r"This thread has been waiting for `(?P<op>[a-z -]+) RendezvousKey\{run_id=RunId: (?P<run>-?\d+)"
                   r", global_devices=\[(?P<devs>[\d, ]*)\][^`]*op_id=(?P<op_id>\d+)\}`")


def stuck(stderr: str) -> list[str]:
    """The distinct rendezvous XLA reported waiting on: 'op op_id=N run R devices [..]'."""
    seen = {f"{m['op']} op_id={m['op_id']} run {m['run']} devices [{m['devs']}]" for m in STUCK.finditer(stderr)}
    return sorted(seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--busy", type=int, default=2, help="busy loops beside the runs")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--config", default="configs/paft_tiny.yaml")
    ap.add_argument("--label", default="")
    ap.add_argument("--log", type=Path, required=True, help="JSON-lines log: one line per run, then a summary")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a run counts as hung")
    args = ap.parse_args()

    repo = args.repo.resolve()
    rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="paft_stress_"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               JAX_COMPILATION_CACHE_DIR=str(work / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TOKENIZERS_PARALLELISM="false")
    env.pop("PJRT_NPROC", None)  # the launcher sizes XLA:CPU's pools itself
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still ends the busy loops (finally below)
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.busy)]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    aborted = failed = 0
    try:
        with args.log.open("w") as log:
            for i in range(args.runs):
                out = work / f"run{i}"
                cmd = [sys.executable, "-m", "paft_jax.launch", "paft", "--config", args.config,
                       f"output_dir={out}", f"cache_dir={work / 'cache'}", "--no-progress"]
                t0 = time.time()
                try:
                    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=args.timeout)
                    rc, stderr = p.returncode, p.stderr
                except subprocess.TimeoutExpired as e:
                    rc, stderr = "timeout", (e.stderr or b"").decode(errors="replace")
                row = {"run": i, "rc": rc, "wall_s": round(time.time() - t0, 1), "abort": ABORT in stderr,
                       "stuck": stuck(stderr) if ABORT in stderr else []}
                if rc != 0 and not row["abort"]:
                    row["stderr_tail"] = stderr[-2000:]
                aborted += row["abort"]
                failed += rc != 0
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"[{args.label}] run {i + 1}/{args.runs}: rc {rc}, {row['wall_s']} s"
                      + (f", ABORT {row['stuck']}" if row["abort"] else ""), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            summary = {"summary": True, "label": args.label, "rev": rev, "runs": args.runs, "aborted": aborted,
                       "failed": failed, "busy_loops": args.busy, "config": args.config, "cores": os.cpu_count()}
            log.write(json.dumps(summary) + "\n")
    finally:
        for b in busy:
            b.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
