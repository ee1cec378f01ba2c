"""`launch paft` end to end on the tiny config: concurrency, equivalence with separate runs, sequential mode,
and kill-and-rerun at three points (real processes, SIGKILL at exact named points)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from paft_jax.launch import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/paft_tiny.yaml")


def tensors(d: Path) -> dict:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: Path, b: Path, atol: float = 0.0):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if atol:
            np.testing.assert_allclose(ta[k], tb[k], rtol=0, atol=atol, err_msg=k)
        else:
            assert np.array_equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def paft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paft") / "run"
    assert main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={out}"]) == 0
    return out


def test_paft_runs_both_branches_concurrently_then_merges(paft_run):
    rep = json.loads((paft_run / "report.json").read_text())
    assert rep["status"] == "done" and rep["mode"] == "parallel"
    assert sum(rep["split"]) == 8 and all(c > 0 for c in rep["split"])
    # devices are disjoint and both branches stepped at the same time (not one after the other)
    sft, pref = (set(rep["branches"][n]["devices"]) for n in ("sft", "preference"))
    assert sft and pref and not sft & pref
    assert rep["overlap"]["both_stepping_s"] > 0
    starts = {n: json.loads((paft_run / n / "done.json").read_text()) for n in ("sft", "preference")}
    assert starts["sft"]["first_step"] < starts["preference"]["last_step"]
    assert starts["preference"]["first_step"] < starts["sft"]["last_step"]
    # both learned; the merge was verified in transformers; the report and its plots exist
    b = rep["branches"]
    assert b["sft"]["last_loss"] < b["sft"]["first_loss"]
    assert b["preference"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = base
    assert b["preference"]["eval_last"]["eval_rewards/accuracies"] > 0.5
    assert rep["merge"]["verified"] and rep["merge"]["verify_max_abs_diff"] < 1e-3
    assert rep["sparsity"]["total"]["models"][0]["zero_frac"] > 0.1  # L1 (proximal) on the SFT delta
    for f in ("report.md", "img/loss.png", "img/timeline.png", "img/sparsity.png", "merged/config.json"):
        assert (paft_run / f).stat().st_size > 0, f
    assert rep["answers"] and isinstance(rep["answers"][0]["answer"], str)


def test_rerun_of_a_finished_run_redoes_nothing(paft_run, capsys):
    before = (paft_run / "merge.json").stat().st_mtime_ns
    assert main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={paft_run}"]) == 0
    err = capsys.readouterr().err
    assert "sft: already trained" in err and "preference: already trained" in err and "merge: already done" in err
    assert (paft_run / "merge.json").stat().st_mtime_ns == before


def test_paft_equals_separate_sft_dpo_and_merge(paft_run, tmp_path):
    """The same branches trained by `sft` and `dpo` on the same device groups, then `launch merge` on their
    checkpoints, give the pipeline's merged tensors."""
    from paft_jax.hf.export import export_hf
    from paft_jax.mesh import build_mesh
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    from paft_jax.train.loop import load_base, train
    rep = json.loads((paft_run / "report.json").read_text())
    cfg = load_paft_config(CONFIG, [f"output_dir={tmp_path}"])
    tcs = branch_configs(cfg, ROOT)
    devs = sorted(jax.devices(), key=lambda d: d.id)
    groups = {"sft": devs[:rep["split"][0]], "preference": devs[rep["split"][0]:]}
    for name, tc in tcs.items():
        mesh = build_mesh(tc.mesh, groups[name])
        base = load_base(tc, mesh, tc.mesh.logical_rules())
        train(tc, mesh=mesh, base=base, progress=False)
    export_hf(base.params, base.cfg, tmp_path / "base", tokenizer=base.tokenizer)
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / "sft"), "parameters": {"weight": 1.0, "density": 1.0}},
                         {"model": str(tmp_path / "preference"), "parameters": {"weight": 1.0, "density": 0.5}}],
              "parameters": {"normalize": True}}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    assert main(["merge", "--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "merged"),
                 "--no-verify"]) == 0
    assert_same_tensors(tmp_path / "merged", paft_run / "merged")


def test_sequential_mode_trains_preference_on_the_sft_model(tmp_path):
    out = tmp_path / "seq"
    assert main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={out}", "mode=sequential",
                 "prompts=[]", "report=false"]) == 0
    sft = [json.loads(l) for l in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    pref = [json.loads(l) for l in (out / "preference" / "metrics.jsonl").read_text().splitlines()]
    # the preference branch starts where SFT ended: its reference is the SFT model, so step 1 is log 2
    assert pref[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(r["time_end"] for r in sft if "time_end" in r) < min(r["time_start"] for r in pref if "time_start" in r)
    # the exported model is base + d_sft + d_pref
    from paft_jax.train.restore import CheckpointSource
    merged = tensors(out / "merged")
    d_sft, d_pref = CheckpointSource(out / "sft"), CheckpointSource(out / "preference")
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    from paft_jax.pipeline.run import base_source
    base = base_source(branch_configs(load_paft_config(CONFIG, [f"output_dir={out}"]), ROOT)["sft"], {}, out)
    for k in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        want = base.get(k).astype(np.float32) + d_sft.get(k) + d_pref.get(k)
        np.testing.assert_allclose(merged[k], want, rtol=0, atol=1e-6, err_msg=k)
        assert np.abs(d_pref.get(k)).max() > 0


def _run_cli(out: Path, fault: str | None = None, extra=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
    env.pop("PAFT_JAX_FAULT", None)
    if fault:
        env["PAFT_JAX_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "paft_jax.launch", "paft", "--config", CONFIG, "--no-progress",
                           f"output_dir={out}", *extra], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("fault, expect", [
    # mid-SFT: checkpoints every 2 steps, saved asynchronously; the save of step 4 first waits for step 2's,
    # so at step 5 a complete checkpoint exists for sure (at step 3 step 2's may still be in flight)
    ("sft-step-5", ["resumed from"]),
    ("after-training", ["sft: already trained", "preference: already trained"]),  # between training and merge
    ("export-tensor-10", ["removing the unfinished export"]),            # mid-export
])
def test_kill_and_rerun_continues_to_the_same_result(paft_run, tmp_path, fault, expect):
    out = tmp_path / "run"
    killed = _run_cli(out, fault)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / "merge.json").exists()
    if fault.startswith("export"):
        assert list(out.glob(".merged.tmp-*")) and not (out / "merged").exists()
    again = _run_cli(out)
    assert again.returncode == 0, again.stderr[-3000:]
    for text in expect:
        assert text in again.stderr, (text, again.stderr[-3000:])
    assert not list(out.glob(".merged.tmp-*"))
    # the interrupted-then-continued run ends exactly where the uninterrupted one did
    assert_same_tensors(out / "merged", paft_run / "merged")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 4])
def test_multi_process_paft(paft_run, tmp_path, procs):
    """N JAX processes on localhost (gloo): each drives one branch's sub-mesh, checkpoints and barriers
    are scoped to the branch's processes, process 0 merges.  With 2 processes each branch is one process
    with 4 devices, as in the single-process run, so the merged tensors match it."""
    out, port = tmp_path / "run", _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // procs}", PYTHONPATH=str(ROOT))
    env.pop("PAFT_JAX_FAULT", None)
    cmd = [sys.executable, "-m", "paft_jax.launch", "paft", "--config", CONFIG, "--no-progress", f"output_dir={out}",
           "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
           f"distributed.num_processes={procs}", "distributed.cpu_collectives=gloo"]
    if procs == 4:  # two processes per branch: whole processes each (2 devices per process)
        cmd.append("split=[4,4]")
    ps = [subprocess.Popen(cmd + [f"distributed.process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT) for i in range(procs)]
    outs = [p.communicate(timeout=900) for p in ps]
    for i, (p, (so, se)) in enumerate(zip(ps, outs)):
        assert p.returncode == 0, f"process {i}:\n{se[-4000:]}"
    rep = json.loads((out / "report.json").read_text())
    assert rep["merge"]["verified"]
    owners = {n: rep["branches"][n]["processes"] for n in ("sft", "preference")}
    assert not set(owners["sft"]) & set(owners["preference"]), owners   # each process drives one branch
    assert len(owners["sft"]) == procs // 2
    assert rep["overlap"]["both_stepping_s"] > 0
    assert rep["branches"]["preference"]["eval_last"]["eval_rewards/accuracies"] > 0.5
    if procs == 2:  # same branches on the same device counts; reductions differ in the last bit only
        assert_same_tensors(out / "merged", paft_run / "merged", atol=1e-6)
