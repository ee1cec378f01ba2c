"""`launch paft` end to end on the tiny config: concurrency, equivalence with separate runs, sequential mode,
and kill-and-rerun at three points (real processes, SIGKILL at exact named points)."""
import json
import math
import os
import shutil
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
    # the CLI in a fresh process, as a user runs it
    out = tmp_path_factory.mktemp("paft") / "run"
    run = _run_cli(out, extra=["merge.on_mesh=true"])  # on CPU the default streams; this run merges on the mesh
    assert run.returncode == 0, run.stderr[-3000:]
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
    assert math.prod(rep["merge"]["mesh"].values()) == 8  # merged on all the run's devices
    assert rep["sparsity"]["total"]["models"][0]["zero_frac"] > 0.1  # L1 (proximal) on the SFT delta
    for f in ("report.md", "img/loss.png", "img/timeline.png", "img/sparsity.png", "merged/config.json"):
        assert (paft_run / f).stat().st_size > 0, f
    assert [a["prompt"] for a in rep["answers"]] == ["What is 12 + 7?"]


def test_answers_are_the_merged_models_own(paft_run, capsys):
    """The report's answer (transformers, greedy, on the export) is what paft_jax's own generation gives
    from the same export: the tiny model's words mean nothing, but they must be the merged model's."""
    rep = json.loads((paft_run / "report.json").read_text())
    capsys.readouterr()
    assert main(["generate", "--model", str(paft_run / "merged"), "--prompt", "What is 12 + 7?",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == rep["answers"][0]["answer"].strip()


def test_rerun_of_a_finished_run_redoes_nothing(paft_run, capsys):
    before = (paft_run / "merge.json").stat().st_mtime_ns
    assert main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={paft_run}"]) == 0
    err = capsys.readouterr().err
    assert "sft: already trained" in err and "preference: already trained" in err and "merge: already done" in err
    assert (paft_run / "merge.json").stat().st_mtime_ns == before


def test_rerun_with_changed_settings(paft_run, tmp_path, capsys):
    """A branch setting that changes what was trained is refused, naming it; a new merge recipe redoes the merge."""
    run = tmp_path / "run"
    shutil.copytree(paft_run, run)
    saved = (run / "sft" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"sft\.optim\.learning_rate: 0\.003 -> 0\.0001"):
        main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={run}", "sft.optim.learning_rate=1e-4"])
    assert (run / "sft" / "config.json").read_text() == saved
    capsys.readouterr()
    assert main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={run}", "merge.method=dare_ties"]) == 0
    err = capsys.readouterr().err
    assert "already trained" in err and "redoing the merge" in err
    assert json.loads((run / "merge.json").read_text())["method"] == "dare_ties"
    a, b = tensors(paft_run / "merged"), tensors(run / "merged")
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # and it is the new merge


def test_more_steps_may_not_stretch_a_branch_lr_schedule_unasked(paft_run):
    """As for one branch (tests/test_rerun.py): a rerun raising a trained branch's steps is refused before
    anything loads when that would stretch the branch's lr schedule, naming the key that says what to do;
    with the key set, the rerun may go on."""
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    from paft_jax.pipeline.run import check_rerun, run_dir
    before = sorted((p, p.stat().st_mtime_ns) for p in paft_run.rglob("*"))
    with pytest.raises(ValueError, match=r"sft\.steps=8 would change the lr schedule this run was trained with "
                                         r"\(cosine decay ending at step 6, now 8\); to go on, set "
                                         r"sft\.optim\.schedule_steps=8 to stretch it"):
        main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={paft_run}", "sft.steps=8"])
    assert sorted((p, p.stat().st_mtime_ns) for p in paft_run.rglob("*")) == before
    cfg = load_paft_config(CONFIG, [f"output_dir={paft_run}", "sft.steps=8", "sft.optim.schedule_steps=8"])
    tcs = branch_configs(cfg)
    check_rerun(cfg, tcs, run_dir(cfg, tcs))


def test_report_wall_times_add_up_the_sessions_of_a_resumed_run(tmp_path):
    """metrics.jsonl as a run killed mid-training (SIGKILL: its sessions have no end record, and its steps
    after the checkpoint were cut by the resume) then rerun to the end leaves it: the report's wall times are
    both sessions', the 840 s between them not counted; done.json describes the last session only."""
    from paft_jax.pipeline import report
    from paft_jax.pipeline.base import base_model_config
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    from paft_jax.pipeline.run import Plan

    def step(n, end):
        return {"step": n, "loss": 1.0, "time_start": end - 1.0, "time_end": end}

    def session(start, end=None, step=0):
        return {"step": step, "event": "session", "start": start, **({"end": end} if end else {})}

    first = {"sft": [session(100.0), step(1, 110.0), step(2, 120.0)],       # killed at 130, after step 3
             "preference": [session(101.0), step(1, 115.0), step(2, 125.0)]}
    second = {"sft": [session(1000.0, step=2), {"step": 2, "event": "resumed", "time": 1010.0}, step(3, 1020.0),
                      step(4, 1030.0), session(1000.0, 1040.0, step=2)],
              "preference": [session(1001.0, step=2), step(3, 1030.0), step(4, 1045.0),
                             session(1001.0, 1050.0, step=2)]}
    for n in ("sft", "preference"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first[n] + second[n]))
    assert report.sessions(first["sft"] + second["sft"]) == [(100.0, 120.0), (1000.0, 1040.0)]
    cfg = load_paft_config(CONFIG, [f"output_dir={tmp_path}"])
    tcs = branch_configs(cfg)
    plan = Plan("parallel", list(range(8)), [4, 4], [1e12, 1e12], {}, {}, ["sft", "preference"])
    done = {"sft": {"wall_s": 40.0, "start": 1000.0, "end": 1040.0, "resumed_from": 2},
            "preference": {"wall_s": 49.0, "start": 1001.0, "end": 1050.0, "resumed_from": 2}}
    s = report.summarize(cfg, tcs, plan, {"branches": done}, {}, [], base_model_config(tcs["sft"]), 60.0)
    assert s["branches"]["sft"]["wall_s"] == pytest.approx(20.0 + 40.0)
    assert s["branches"]["preference"]["wall_s"] == pytest.approx(24.0 + 49.0)
    assert s["branches"]["sft"]["sessions"] == s["branches"]["preference"]["sessions"] == 2
    assert s["training_wall_s"] == pytest.approx(25.0 + 50.0)    # either branch in a session: [100, 125] + [1000, 1050]
    assert s["branch_wall_sum_s"] == pytest.approx(133.0)
    md = report.markdown({**s, "merge": {}, "leaderboard": None})
    assert "Training wall time: **75.0 s** (all sessions" in md and "| 60.0 (2) |" in md


def test_eval_tasks_score_the_base_the_branches_and_the_merge(paft_run, tmp_path, capsys):
    """eval_tasks added to a finished run: nothing is retrained or merged again, the four models of the paper's
    Table 1 are scored; the SFT row is `launch eval --checkpoint` of the SFT branch, the PAFT row `launch eval`
    of the export; a rerun scores nothing again."""
    run = tmp_path / "run"
    shutil.copytree(paft_run, run)
    tasks = ["eval_tasks=[arc_easy,winogrande]", "eval_limit=3"]
    capsys.readouterr()
    assert main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={run}", *tasks]) == 0
    err = capsys.readouterr().err
    assert "already trained" in err and "merge: already done" in err and "leaderboard: paft:" in err
    board = json.loads((run / "report.json").read_text())["leaderboard"]
    assert list(board["models"]) == ["base", "sft", "preference", "paft"]
    assert board["documents"] == {"arc_easy": 3, "winogrande": 3}
    for row, source in (("sft", ["--checkpoint", str(run / "sft")]), ("paft", ["--model", str(run / "merged")])):
        assert main(["eval", *source, "--tasks", "arc_easy,winogrande", "--limit", "3", "--no-progress",
                     "--output", str(tmp_path / f"{row}.json")]) == 0
        ev = json.loads((tmp_path / f"{row}.json").read_text())["results"]
        for t in ("arc_easy", "winogrande"):
            for m in ("acc", "acc_norm") if t == "arc_easy" else ("acc",):
                assert board["models"][row][f"task/{t}/{m}"] == pytest.approx(ev[t][m]), (row, t, m)
    r = board["models"]["base"]
    assert r["task/average"] == pytest.approx((r["task/arc_easy/acc_norm"] + r["task/winogrande/acc"]) / 2)
    md = (run / "report.md").read_text()
    assert "## Leaderboard tasks" in md and "| paft |" in md and "arc_easy (acc_norm)" in md
    capsys.readouterr()
    assert main(["paft", "--config", CONFIG, "--no-progress", f"output_dir={run}", *tasks]) == 0
    assert "leaderboard: already scored" in capsys.readouterr().err


TRAIN_ON_GROUPS = r"""
import json, sys
from pathlib import Path
import jax
from paft_jax.hf.export import export_hf
from paft_jax.mesh import build_mesh
from paft_jax.pipeline.config import branch_configs, load_paft_config
from paft_jax.train.base import load_base
from paft_jax.train.loop import train
config, root, run, out = sys.argv[1:]
rep = json.loads((Path(run) / "report.json").read_text())
tcs = branch_configs(load_paft_config(config, [f"output_dir={out}"]), Path(root))
devs = sorted(jax.devices(), key=lambda d: d.id)
groups = {"sft": devs[:rep["split"][0]], "preference": devs[rep["split"][0]:]}
for name, tc in tcs.items():
    mesh = build_mesh(tc.mesh, groups[name])
    base = load_base(tc, mesh, tc.mesh.logical_rules())
    train(tc, mesh=mesh, base=base, progress=False)
export_hf(base.params, base.cfg, Path(out) / "base", tokenizer=base.tokenizer)
"""


def test_paft_equals_separate_sft_dpo_and_merge(paft_run, tmp_path):
    """The same branches trained by `sft` and `dpo` on the same device groups, then `launch merge` on their
    checkpoints, give the pipeline's merged tensors (trained in a fresh process)."""
    out = tmp_path / "separate"
    proc = subprocess.run([sys.executable, "-c", TRAIN_ON_GROUPS, CONFIG, str(ROOT), str(paft_run), str(out)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=900, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = {"merge_method": "ties", "base_model": str(out / "base"),
              "models": [{"model": str(out / "sft"), "parameters": {"weight": 1.0, "density": 1.0}},
                         {"model": str(out / "preference"), "parameters": {"weight": 1.0, "density": 0.5}}],
              "parameters": {"normalize": True}}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    assert main(["merge", "--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "merged"),
                 "--no-verify"]) == 0
    assert_same_tensors(tmp_path / "merged", paft_run / "merged")


@pytest.mark.parametrize("method, per", [
    ("ties", [{"weight": 1.0, "density": 0.7}, {"weight": 0.8, "density": 0.3}]),       # a top-k per tensor
    ("dare_ties", [{"weight": 1.0, "density": 0.6}, {"weight": 0.8, "density": 0.4}]),  # random masks, rescaled
    ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.8}]),
])
def test_merge_of_branch_checkpoints_on_the_mesh_equals_the_one_device_merge(paft_run, tmp_path, method, per):
    """The two branch deltas restored sharded over all 8 devices (fsdp 4 x tensor 2) and merged there
    (merge.tree, jitted, on the devices) equal the streamed merge of the same checkpoints on one device."""
    from paft_jax.config import MeshConfig
    from paft_jax.hf.layout import get_path, iter_hf_tensors, to_hf
    from paft_jax.hf.st_io import SafetensorsFile
    from paft_jax.merge import merge_to_hf
    from paft_jax.merge.params_source import ParamsSource
    from paft_jax.merge.recipe import MergeSpec
    from paft_jax.merge.tree import merge_deltas
    from paft_jax.mesh import build_mesh
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    from paft_jax.train.base import load_base
    from paft_jax.train.restore import CheckpointSource, restore_delta
    spec = MergeSpec(method, 2, {"seed": 3} if method == "dare_ties" else {}, per)
    tc = branch_configs(load_paft_config(CONFIG, [f"output_dir={paft_run}"]), ROOT)["sft"]
    one = MeshConfig(data=1, fsdp=1, tensor=1)
    base1 = load_base(tc, build_mesh(one, jax.devices()[:1]), one.logical_rules())
    res = merge_to_hf(spec, ParamsSource(base1.params, base1.cfg, "base"),
                      [CheckpointSource(paft_run / n) for n in ("sft", "preference")], tmp_path / "out", verify=False)
    written = SafetensorsFile(res.out / "model.safetensors")

    sharded = MeshConfig(fsdp=4, tensor=2)
    mesh, rules = build_mesh(sharded), sharded.logical_rules()
    base = load_base(tc, mesh, rules)
    deltas = [restore_delta(paft_run / n, mesh, rules)[3] for n in ("sft", "preference")]
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree_util.tree_leaves(deltas))  # really spread over the mesh
    merged = merge_deltas(base.params, deltas, spec, cfg=base.cfg)
    changed = 0
    for e, i, name in iter_hf_tensors(base.cfg):
        leaf = get_path(merged, e.path)
        assert leaf.sharding == get_path(base.params, e.path).sharding, name
        got = to_hf(e, np.asarray(leaf if i is None else leaf[i]))
        np.testing.assert_array_equal(got, written.get(name), err_msg=name)
        before = get_path(base1.params, e.path)
        changed += not np.array_equal(got, to_hf(e, np.asarray(before if i is None else before[i])))
    assert changed  # the deltas moved the base


def test_sequential_mode_trains_and_exports_the_same_model(tmp_path):
    """bf16 base and compute, as on a TPU: the preference branch trains on the SFT model rounded to bf16,
    and the export is that model + d_pref, the model it trained: weights and logits bitwise equal."""
    out = tmp_path / "seq"
    dtypes = ["param_dtype=bfloat16", "compute_dtype=bfloat16"]
    proc = _run_cli(out, extra=["mode=sequential", "prompts=[]", "report=false", "merge.on_mesh=true", *dtypes])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft = [json.loads(l) for l in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    pref = [json.loads(l) for l in (out / "preference" / "metrics.jsonl").read_text().splitlines()]
    # the preference branch starts where SFT ended: its reference is the SFT model, so step 1 is log 2
    assert next(r for r in pref if "loss" in r)["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(r["time_end"] for r in sft if "time_end" in r) < min(r["time_start"] for r in pref if "time_start" in r)
    from paft_jax.config import MeshConfig
    from paft_jax.hf.load import load_model
    from paft_jax.mesh import build_mesh
    from paft_jax.models.decoder import Decoder
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    from paft_jax.train.base import load_base
    from paft_jax.train.restore import merged_params, restore_delta
    one = MeshConfig(data=1, fsdp=1, tensor=1)
    mesh, rules = build_mesh(one, jax.devices()[:1]), one.logical_rules()
    tc = branch_configs(load_paft_config(CONFIG, [f"output_dir={out}", *dtypes]), ROOT)["sft"]
    base = load_base(tc, mesh, rules)
    d_sft, d_pref = (restore_delta(out / n, mesh, rules)[3] for n in ("sft", "preference"))
    trained_on = merged_params(base.params, d_sft)          # what the preference branch's base was
    exported = load_model(str(out / "merged"), mesh=mesh, rules=rules)
    assert exported.cfg.param_dtype == "bfloat16"
    want = merged_params(trained_on, d_pref)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(exported.params)):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ids = jax.random.randint(jax.random.key(0), (2, 24), 0, base.cfg.vocab_size)
    cfg = base.cfg.replace(remat="none")
    trained = Decoder(cfg).apply({"params": trained_on, "delta": d_pref}, ids)[0]  # the training forward
    served = Decoder(cfg).apply({"params": exported.params}, ids)[0]
    assert np.array_equal(np.asarray(trained, np.float32), np.asarray(served, np.float32))
    assert np.abs(np.asarray(jax.tree_util.tree_leaves(d_pref)[0])).max() > 0


def _run_cli(out: Path, fault: str | None = None, extra=()) -> subprocess.CompletedProcess:
    """`launch paft` (or tests/fault_run.py FAULT paft) into `out`, in a fresh process."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
    launch = [str(ROOT / "tests" / "fault_run.py"), fault] if fault else ["-m", "paft_jax.launch"]
    cmd = [sys.executable, *launch, "paft", "--config", CONFIG, "--no-progress", f"output_dir={out}", *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("fault, expect", [
    # mid-SFT: checkpoints every 2 steps, saved asynchronously; the save of step 4 first waits for step 2's,
    # so at step 5 a complete checkpoint exists for sure (at step 3 step 2's may still be in flight)
    ("sft-step-5", ["resumed from"]),
    # (between training and merge: test_rerun_with_changed_settings reruns a trained run into a new merge)
    ("export-tensor-10", ["removing the unfinished export"]),            # mid-export
])
def test_kill_and_rerun_continues_to_the_same_result(paft_run, tmp_path, fault, expect):
    """Killed and rerun, it ends with the uninterrupted run's tensors."""
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
    if fault.startswith("sft"):  # the report's SFT wall time is both sessions', not the rerun's alone
        sft, done = json.loads((out / "report.json").read_text())["branches"]["sft"], json.loads(
            (out / "sft" / "done.json").read_text())
        assert sft["sessions"] == 2 and sft["wall_s"] > done["wall_s"]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 4])
def test_multi_process_paft(paft_run, tmp_path, procs):
    """N JAX processes on localhost (gloo): each drives one branch's sub-mesh, checkpoints and barriers
    are scoped to the branch's processes.  With 2 processes each branch is one process with 4 devices, as in
    the single-process run, so the merged tensors match it; both processes then merge on one mesh over all 8
    devices (each restores its shards of the deltas and the base, process 0 writes).  With 4, process 0
    streams the merge alone."""
    out, port = tmp_path / "run", _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // procs}", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "paft_jax.launch", "paft", "--config", CONFIG, "--no-progress", f"output_dir={out}",
           "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
           f"distributed.num_processes={procs}", "distributed.cpu_collectives=gloo"]
    if procs == 4:  # two processes per branch: whole processes each (2 devices per process)
        cmd.append("split=[4,4]")
    else:
        cmd.append("merge.on_mesh=true")
    ps = [subprocess.Popen(cmd + [f"distributed.process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT) for i in range(procs)]
    outs = [p.communicate(timeout=900) for p in ps]
    for i, (p, (so, se)) in enumerate(zip(ps, outs)):
        assert p.returncode == 0, f"process {i}:\n{se[-4000:]}"
    rep = json.loads((out / "report.json").read_text())
    assert rep["merge"]["verified"]
    merged_on = json.loads((out / "merge.json").read_text())["mesh"]
    assert merged_on == ({"data": 1, "fsdp": 8, "tensor": 1} if procs == 2 else None), merged_on
    owners = {n: rep["branches"][n]["processes"] for n in ("sft", "preference")}
    assert not set(owners["sft"]) & set(owners["preference"]), owners   # each process drives one branch
    assert len(owners["sft"]) == procs // 2
    assert rep["overlap"]["both_stepping_s"] > 0
    assert rep["branches"]["preference"]["eval_last"]["eval_rewards/accuracies"] > 0.5
    if procs == 2:  # same branches on the same device counts; reductions differ in the last bit only
        assert_same_tensors(out / "merged", paft_run / "merged", atol=1e-6)
