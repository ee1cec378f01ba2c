"""`launch paft output_dir=gs://...` against the GCS emulator (the `gcs_env` fixture, conftest.py): the run
directory lives in the bucket, the files are written in a local mirror under cache_dir and uploaded.
Every run here starts with a fresh cache_dir, i.e. an empty mirror, as on another machine: what a rerun
knows, it learned from the bucket."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline import CONFIG, ROOT, assert_same_tensors

URL = "gs://paft/runs/paft-tiny"
LISTING = r"""
import json, sys
from paft_jax import storage
print(json.dumps(storage._listing(*storage._fs(sys.argv[1]))))
"""
STALE_UPLOAD = r"""
import json, sys
from paft_jax import storage
url = sys.argv[1]
storage.write_text(f"{url}/.merged.tmp-0123456789ab/model.safetensors", "junk")  # a publish killed midway:
storage.write_text(f"{url}/merged/config.json", "{}")                            # its temporary prefix, a partly
storage.write_text(f"{url}/merged/{storage.INCOMPLETE}", "being written")        # copied merged/ still marked
storage.write_text(f"{url}/merge.json", json.dumps({"stale": True}))             # and an older run's marker
print(json.dumps({}))
"""
READ_JSON = r"""
import json, sys
from paft_jax import storage
print(json.dumps(json.loads(storage.read_text(sys.argv[1]))))
"""
FETCH = r"""
import json, sys
from paft_jax import storage
storage.fetch_dir(sys.argv[1], sys.argv[2])
print(json.dumps({}))
"""


def paft(env, out: str, cache: Path, *extra, fault: str | None = None) -> subprocess.CompletedProcess:
    """`launch paft` (or tests/fault_run.py FAULT paft) with its run directory at `out`, in a fresh process."""
    launch = [str(ROOT / "tests" / "fault_run.py"), fault] if fault else ["-m", "paft_jax.launch"]
    return subprocess.run([sys.executable, *launch, "paft", "--config", CONFIG, "--no-progress", f"output_dir={out}",
                           f"cache_dir={cache}", *extra], cwd=ROOT, env=env, timeout=600, capture_output=True,
                          text=True)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stderr


def script(env, code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def listing(env, url: str) -> dict[str, list]:
    """{object name under url: [size, generation]}."""
    return script(env, LISTING, url)


def metrics(env, url: str, tmp: Path) -> list[dict]:
    script(env, FETCH, url, tmp)
    return [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same run with a local output_dir: the reference for the merged tensors."""
    out = tmp_path_factory.mktemp("local") / "run"
    proc = subprocess.run([sys.executable, "-m", "paft_jax.launch", "paft", "--config", CONFIG, "--no-progress",
                           f"output_dir={out}", "prompts=[]", "report=false"], cwd=ROOT,
                          env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)
    ok(proc)
    return out


@pytest.mark.slow
def test_paft_with_its_run_directory_in_a_bucket(gcs_env, local_run, tmp_path):
    from transformers import AutoModelForCausalLM
    err = ok(paft(gcs_env, URL, tmp_path / "cache1"))
    got = listing(gcs_env, URL)
    names = set(got)
    for branch in ("sft", "preference"):
        for f in ("metrics.jsonl", "config.json", "done.json"):
            assert f"{branch}/{f}" in names, (branch, f, sorted(names))
        assert any(n.startswith(f"{branch}/checkpoints/6/") for n in names), branch   # Orbax, in the bucket
        assert any(n.startswith(f"{branch}/tb/events.out.tfevents") for n in names), branch
    for f in ("merge.json", "merged/config.json", "merged/model.safetensors", "report.md", "report.json",
              "img/loss.png", "img/timeline.png", "img/sparsity.png", "paft_config.json"):
        assert f in names, (f, sorted(names))
    assert not [n for n in names if n.startswith(".") or "/." in n or "tmp" in n], sorted(names)  # no leftovers
    assert f"report: {URL}/report.md" in err
    # the export is a loadable HF model, equal to the local run's (bitwise)
    script(gcs_env, FETCH, f"{URL}/merged", tmp_path / "merged")
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_same_tensors(tmp_path / "merged", local_run / "merged")
    script(gcs_env, FETCH, URL, tmp_path / "run")  # the whole run directory, as the bucket has it
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["output_dir"] == URL and rep["merge"]["verified"] and rep["merge"]["dir"] == f"{URL}/merged"
    assert rep["branches"]["sft"]["last_loss"] < rep["branches"]["sft"]["first_loss"]
    assert "sparsity" in rep and rep["answers"]
    assert [r["step"] for r in map(json.loads, (tmp_path / "run/sft/metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3, 4, 5, 6]

    # the same command again, on "another machine" (an empty mirror): nothing is retrained or re-merged
    again = ok(paft(gcs_env, URL, tmp_path / "cache2"))
    for text in ("sft: already trained", "preference: already trained", "merge: already done"):
        assert text in again, (text, again[-3000:])
    after = listing(gcs_env, URL)
    kept = {n: v for n, v in got.items() if not n.startswith(("report.", "img/", "paft_config.json"))}
    assert {n: after.get(n) for n in kept} == kept      # same objects, same generations: nothing rewritten
    assert set(after) == set(got)


@pytest.mark.slow
def test_a_branch_killed_midway_resumes_from_the_bucket_on_another_machine(gcs_env, local_run, tmp_path):
    url = f"{URL}-killed"
    killed = paft(gcs_env, url, tmp_path / "cache1", "prompts=[]", "lock_lease_s=8", fault="sft-step-5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    lock = script(gcs_env, READ_JSON, f"{url}/.paft-lock")     # the killed run's lock is left in the bucket
    assert lock["pid"] and lock["lease_s"] == 8
    names = set(listing(gcs_env, url))
    assert "sft/done.json" not in names and "merge.json" not in names
    assert any(n.startswith("sft/checkpoints/4/") for n in names)
    before = [r["step"] for r in metrics(gcs_env, f"{url}/sft", tmp_path / "before") if "loss" in r]
    assert before[:4] == [1, 2, 3, 4]           # uploaded with the step-4 checkpoint (or later)
    script(gcs_env, STALE_UPLOAD, url)
    time.sleep(max(0.0, lock["expires"] - time.time() + 0.5))  # a preempted run's lease runs out, then:
    again = ok(paft(gcs_env, url, tmp_path / "cache2", "prompts=[]", "lock_lease_s=8"))   # an empty mirror
    for text in ("resumed from", "removing the unfinished upload", "taking over the run lock of"):
        assert text in again, (text, again[-3000:])
    names = set(listing(gcs_env, url))
    assert not [n for n in names if n.startswith(".") or "/." in n or "tmp" in n], sorted(names)
    marker = script(gcs_env, READ_JSON, f"{url}/merge.json")
    assert "stale" not in marker and marker["verified"]
    steps = [r["step"] for r in metrics(gcs_env, f"{url}/sft", tmp_path / "after") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]          # the history is continuous across the machines
    script(gcs_env, FETCH, f"{url}/merged", tmp_path / "merged")
    assert_same_tensors(tmp_path / "merged", local_run / "merged")
