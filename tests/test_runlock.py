"""One writer per run directory (paft_jax/runlock.py): a second writer is refused at once, naming the
holder; a lock left by a dead holder is taken over; on gs:// (the emulator) the lock object is created
once and a holder's expired lease is taken over."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paft_jax import runlock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = str(Path(__file__).with_name("lock_holder.py"))


def start_holder(target: str, lease_s: float, env=None, hold_s: float = 3600) -> subprocess.Popen:
    """A process holding `target`'s lock (its first stdout line says whether it got it)."""
    env = dict(env or os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, HOLDER, target, str(lease_s), str(hold_s)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    first = json.loads(p.stdout.readline())
    assert first == {"held": True}, first
    return p


def try_lock(target: str, lease_s: float, env=None) -> subprocess.CompletedProcess:
    env = dict(env or os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, HOLDER, target, str(lease_s), "0"], capture_output=True, text=True,
                          env=env, timeout=120)


def test_second_writer_refused_naming_the_holder(tmp_path):
    d = tmp_path / "run"
    with runlock.RunLock(str(d)):
        holder = json.loads((d / runlock.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(runlock.RunLockedError, match=rf"in use by .* pid {os.getpid()} since "):
            runlock.RunLock(str(d))
    assert not (d / runlock.LOCK_NAME).exists()      # released: the lock file goes
    assert not d.exists()                            # the lock made the directory and nothing else was written
    with runlock.RunLock(str(d)):                    # and can be taken again
        (d / "kept.txt").write_text("x")
    assert (d / "kept.txt").exists()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path, caplog):
    d = tmp_path / "run"
    p = start_holder(str(d), 60)
    refused = try_lock(str(d), 60)
    assert refused.returncode == 3 and f"pid {p.pid}" in json.loads(refused.stdout)["refused"]
    p.send_signal(signal.SIGKILL)
    p.wait()
    with caplog.at_level("WARNING", logger="paft_jax"), runlock.RunLock(str(d)):
        pass
    assert f"pid {p.pid}" in caplog.text and "no longer running" in caplog.text


def test_cli_second_run_refused_and_first_run_intact(tmp_path):
    """Two `launch sft` on one output_dir, the second started while the first trains: the second stops at
    once with a one-line error naming the first; the first finishes, its files its own."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "paft_jax.launch", "sft", "--config", "configs/tiny_sft.yaml", "--no-progress",
           f"output_dir={out}", "steps=6", "eval_every=0", "checkpoint.save_every=3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lock = out / runlock.LOCK_NAME
    for _ in range(1200):  # its lock names it once it holds the directory
        if lock.exists() and lock.read_text().strip() or first.poll() is not None:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)  # paused while holding it: the second start certainly meets a live holder
    try:
        second = subprocess.run(cmd + ["optim.learning_rate=1e-4"], cwd=ROOT, capture_output=True, text=True,
                                env=env, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    lines = [l for l in second.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "in use by" in lines[-1] and f"pid {first.pid}" in lines[-1]
    assert "Traceback" not in second.stderr
    assert json.loads((out / "config.json").read_text())["optim"]["learning_rate"] == 3.0e-3
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    assert not (out / runlock.LOCK_NAME).exists()


@pytest.mark.slow
def test_gcs_lock_created_once_renewed_and_taken_over_after_its_lease(gcs_env):
    url = "gs://paft/runs/locked"
    a = start_holder(url, 10, gcs_env)                    # renews every 2.5 s
    time.sleep(12)                                        # longer than one lease: renewals keep it
    refused = try_lock(url, 10, gcs_env)
    assert refused.returncode == 3, refused.stderr[-2000:]
    msg = json.loads(refused.stdout)["refused"]
    assert f"pid {a.pid}" in msg and "lease runs until" in msg
    a.send_signal(signal.SIGKILL)                         # a preempted holder: no release, no more renewals
    a.wait()
    assert try_lock(url, 10, gcs_env).returncode == 3     # its lease (7.5-10 s left) has not run out yet
    time.sleep(11)
    b = try_lock(url, 10, gcs_env)
    assert b.returncode == 0, b.stdout + b.stderr[-2000:]
    assert "taking over the run lock" in b.stderr and f"pid {a.pid}" in b.stderr
    c = start_holder(url, 10, gcs_env, hold_s=0)          # b released it: free again at once
    c.wait(timeout=60)


def test_gcs_two_writers_one_lock(gcs_env):
    """Three writers start at once on one gs:// run directory: exactly one holds it."""
    url = "gs://paft/runs/race"
    cmd = [sys.executable, HOLDER, url, "60", "60"]
    env = dict(gcs_env, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    try:
        outs = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted("held" in o for o in outs) == [False, False, True], outs
    assert all("in use by" in o["refused"] for o in outs if "refused" in o)


def test_an_output_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"output_dir {tmp_path}/f/run: {tmp_path}/f is a file"):
        runlock.RunLock(str(tmp_path / "f" / "run"))
