"""Faults with real processes: SIGKILL then resume (bitwise equal to an uninterrupted run), SIGKILL while
an async save is in flight, SIGTERM (checkpoint, exit 0, resume), a full disk during a save, a checkpoint
restored on another mesh, a corrupted checkpoint."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from paft_jax.checkpoint import BranchCheckpointer, CheckpointError
from paft_jax.config import MeshConfig
from paft_jax.mesh import build_mesh
from paft_jax.train.config import load_train_config
from paft_jax.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
ARGS = [f"steps={STEPS}", "eval_data=null", "checkpoint.save_every=1", "checkpoint.keep_last=2",
        "optim.warmup_steps=1"]


def launch(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "paft_jax.launch", "sft", "--config", "configs/tiny_sft.yaml",
                             *ARGS, f"output_dir={out}", "--no-progress", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if any(r.get("step") == step and "loss" in r for r in records(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def final_delta(out: Path) -> dict:
    import orbax.checkpoint as ocp
    mgr = ocp.CheckpointManager(str(out / "checkpoints"))
    step = mgr.latest_step()
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mgr.close()
    return step, jax.tree_util.tree_map(np.asarray, got["state"]["delta"])


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run the killed ones are compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    ref = launch(out)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]
    return out


def assert_same_as(reference: Path, run: Path) -> None:
    assert losses(run) == losses(reference)                  # same metrics, step by step, exactly
    step_a, a = final_delta(reference)
    step_b, b = final_delta(run)
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(x, y)                          # bitwise


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(reference, tmp_path):
    run = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("PAFT_FAULT_SEED", "0")))
    for kill_at in sorted(rng.sample(range(2, STEPS), 2)):  # two kills, at random steps, then finish
        proc = launch(run)
        wait_for_step(proc, run, kill_at)
        proc.send_signal(signal.SIGKILL)  # may land while an async save is being written
        proc.wait()
    proc = launch(run)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert_same_as(reference, run)


def wait_for_held_save(proc: subprocess.Popen, ckpts: Path, step: int, timeout: float = 300) -> Path:
    """Orbax's temporary directory of `step` once its arrays and array metadata are written: a checkpoint
    that looks nearly complete but is not finalized."""
    t = time.time()
    while time.time() - t < timeout:
        for tmp in ckpts.glob(f"{step}.orbax-checkpoint-tmp*"):
            if list(tmp.glob("state*/_METADATA")):
                return tmp
        if proc.poll() is not None:
            raise AssertionError(f"run ended before saving step {step}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no in-flight save of step {step} within {timeout}s")


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(reference, tmp_path):
    """The test-only hook PAFT_TEST_SLOW_SAVE holds step 5's async save unfinalized (its arrays written),
    so the SIGKILL lands inside the save every time, not by chance."""
    run, held = tmp_path / "killed", 5
    proc = launch(run, env={"PAFT_TEST_SLOW_SAVE": f"{held}:300"})
    partial = wait_for_held_save(proc, run / "checkpoints", held)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists()                                     # the half-written step is on disk ...
    complete = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert complete == [held - 2, held - 1]                     # ... and never listed as a checkpoint
    proc = launch(run)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoints'}/{held - 1}" in out
    assert_same_as(reference, run)
    assert not list((run / "checkpoints").glob("*orbax-checkpoint-tmp*"))  # rewritten by the resumed run


@pytest.mark.slow
def test_sigterm_saves_exits_stopped_and_the_same_command_continues(tmp_path):
    from paft_jax.checkpoint import EXIT_STOPPED
    run = tmp_path / "run"
    proc = launch(run)
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_STOPPED == 75, out[-3000:]
    assert '"status": "stopped"' in out
    assert "stopped by SIGTERM" in out
    stopped_at = max(s for s, _ in losses(run))
    assert stopped_at < STEPS
    assert final_delta(run)[0] == stopped_at                  # the checkpoint of the last finished step
    proc = launch(run)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run / 'checkpoints'}/{stopped_at}" in out
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))


def _cfg(out, *extra):
    # one lr schedule (decay to step 8) for every length these runs are given: a resumed run keeps its schedule
    return load_train_config("configs/tiny_sft.yaml", [*ARGS, "steps=4", "optim.schedule_steps=8",
                                                        "checkpoint.save_every=2",
                                                        "checkpoint.async_save=false", f"output_dir={out}", *extra])


def test_checkpoint_restores_on_another_mesh(tmp_path):
    res = train(_cfg(tmp_path / "a"), mesh=build_mesh(MeshConfig(data=1, fsdp=8, tensor=1)), progress=False)
    saved = jax.tree_util.tree_map(np.asarray, res.state.delta)
    cfg = _cfg(tmp_path / "a", "steps=5", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    from paft_jax.train.base import load_base
    from paft_jax.train.loop import Branch, _resume
    mesh = build_mesh(cfg.mesh)
    branch = Branch(cfg, load_base(cfg, mesh, cfg.mesh.logical_rules()), mesh, cfg.mesh.logical_rules())
    ckpt = BranchCheckpointer(cfg.checkpoint, str(tmp_path / "a" / "checkpoints"))
    assert _resume(branch, ckpt, cfg) == 4
    ckpt.close()
    leaf = branch.state.delta["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    for x, y in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(branch.state.delta)):
        assert np.array_equal(x, np.asarray(y))
    assert branch.train_it.state()["step"] == 4


def test_restores_for_merge_and_export_read_the_delta_alone_into_the_mesh(tmp_path, monkeypatch):
    """Merge inputs, exports and reports restore the delta only (Orbax partial restore): the whole train
    state, Adam's two moments with it, is never read; the delta lands in the given mesh's shardings."""
    from paft_jax.train.restore import CheckpointSource, restore_delta
    res = train(_cfg(tmp_path / "a"), progress=False)
    trained = jax.tree_util.tree_map(np.asarray, res.state.delta)

    def whole_state(*a, **k):
        raise AssertionError("the whole train state (delta + optimizer moments) was restored")
    monkeypatch.setattr(BranchCheckpointer, "restore", whole_state)
    mc = MeshConfig(data=1, fsdp=4, tensor=2)
    mesh = build_mesh(mc)
    cfg, _, step, delta = restore_delta(tmp_path / "a", mesh, mc.logical_rules())
    assert step == 4 and "opt_state" not in str(jax.tree_util.tree_structure(delta))
    leaf = delta["layers"]["mlp"]["up_proj"]["kernel"]
    assert leaf.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
    for x, y in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(delta)):
        assert np.array_equal(x, np.asarray(y))
    src = CheckpointSource(tmp_path / "a")  # the merge's input, on one device
    assert np.array_equal(src.get("model.norm.weight"), trained["norm"]["weight"])

    # leaf by leaf (the merges): a partial restore of that one leaf, sharded, nothing else read
    from paft_jax.checkpoint import BranchCheckpointer as BC
    from paft_jax.train.restore import DeltaReader
    asked = []
    plain = BC.restore_delta
    monkeypatch.setattr(BC, "restore_delta", lambda self, step, item: asked.append(item) or plain(self, step, item))
    reader = DeltaReader(tmp_path / "a", mesh, mc.logical_rules())
    up = reader.leaf(("layers", "mlp", "up_proj", "kernel"))
    reader.close()
    assert len(jax.tree_util.tree_leaves(asked)) == 1          # one leaf asked for
    assert up.sharding == leaf.sharding
    assert np.array_equal(np.asarray(up), trained["layers"]["mlp"]["up_proj"]["kernel"])


def test_resume_from_a_named_checkpoint_given_as_a_relative_path(tmp_path):
    """checkpoint.resume=<relative path>/checkpoints/2 (Orbax itself refuses relative paths)."""
    train(_cfg(tmp_path / "a"), progress=False)
    rel = os.path.relpath(tmp_path / "a" / "checkpoints" / "2")
    res = train(_cfg(tmp_path / "b", f"checkpoint.resume={rel}"), progress=False)
    assert res.resumed_from == 2 and [r["step"] for r in res.history if "loss" in r] == [3, 4]


def tensorboard_steps(directory, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows them: its reader applies the purge a restart writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_corrupted_checkpoint_is_an_error_naming_it_unless_fallback(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out), progress=False)
    # truncated garbage where the array data was: every data file of the state (the delta and the moments
    # share them; a restore for an export reads the delta alone, so it must be hit too)
    victims = [p for p in (out / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert victims
    for victim in victims:
        victim.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"checkpoints/4 cannot be restored.*fallback=true.*step 2"):
        train(_cfg(out, "steps=6"), progress=False)
    # `export --checkpoint RUN` (restore_delta) offers the same way out (issue 14)
    from paft_jax.train.restore import restore_delta
    with pytest.raises(CheckpointError, match=r"checkpoints/4 cannot be restored.*the previous checkpoint, "
                                              r".*checkpoints/2, may be readable"):
        restore_delta(out)
    res = train(_cfg(out, "steps=6", "checkpoint.fallback=true"), progress=False)
    assert res.resumed_from == 2
    assert [r["step"] for r in res.history if "loss" in r] == [3, 4, 5, 6]
    # TensorBoard rewinds with metrics.jsonl: read back as TensorBoard reads them, steps 3-4 of the first
    # session are gone and every step is there once, with the value metrics.jsonl has
    logged = {json.loads(l)["step"]: json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(out / "tb", "loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in sorted(logged.items())]
    # a deleted _METADATA is named (Orbax reports it as a pytree structure error)
    (out / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    for read in (lambda: restore_delta(out), lambda: train(_cfg(out, "steps=8"), progress=False)):
        with pytest.raises(CheckpointError, match=r"checkpoints/6/state/_METADATA is missing: the checkpoint was "
                                                  r"damaged") as e:
            read()
        assert "pytree" not in str(e.value)


def test_a_flipped_byte_in_array_data_is_refused_before_any_step_or_fallen_back_from(tmp_path, caplog):
    """64 bytes XORed inside the latest step's array data (same size, so Orbax reads it): the checksums
    written when the step was saved refuse it at resume, before any step runs, naming the file; the export
    path refuses it too; checkpoint.fallback=true resumes from the newest intact step and says so."""
    from paft_jax import checksums
    out = tmp_path / "run"
    train(_cfg(out), progress=False)
    for step in (2, 4):
        assert checksums.verify(str(out / "checkpoints" / str(step))) is None
    victim = max((p for p in (out / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xA5 for b in data[mid:mid + 64])
    victim.write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_text()
    rel = victim.relative_to(out / "checkpoints" / "4")
    with pytest.raises(CheckpointError, match=rf"checkpoints/4 cannot be restored \(damaged: {rel} has another "
                                              r"checksum \(crc32 .*fallback=true.*step 2"):
        train(_cfg(out, "steps=6"), progress=False)
    assert (out / "metrics.jsonl").read_text() == before        # no step ran
    from paft_jax.train.restore import restore_delta
    with pytest.raises(CheckpointError, match=rf"checkpoints/4 cannot be restored \(damaged: {rel} has another "
                                              r"checksum.*checkpoints/2, may be readable"):
        restore_delta(out)
    with caplog.at_level("WARNING", logger="paft_jax"):
        res = train(_cfg(out, "steps=6", "checkpoint.fallback=true"), progress=False)
    assert res.resumed_from == 2 and [r["step"] for r in res.history if "loss" in r] == [3, 4, 5, 6]
    assert "checkpoints/4 cannot be restored (damaged" in caplog.text
    assert "resuming from step 2" in caplog.text


def test_a_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
    from paft_jax import checksums
    out = tmp_path / "run"
    train(_cfg(out), progress=False)
    (out / "checkpoints" / "4" / checksums.MANIFEST).unlink()     # saved by an older paft_jax
    with caplog.at_level("WARNING", logger="paft_jax"):
        res = train(_cfg(out, "steps=5"), progress=False)
    assert res.resumed_from == 4
    assert f"has no {checksums.MANIFEST}" in caplog.text and "restoring it unverified" in caplog.text


def test_export_of_a_lora_checkpoint_is_base_plus_folded_delta(tmp_path):
    from safetensors.numpy import load_file
    from paft_jax.hf.layout import iter_hf_tensors, get_path, to_hf
    from paft_jax.launch import main
    from paft_jax.train import delta as delta_lib
    out = tmp_path / "run"
    res = train(_cfg(out, "steps=2", "delta.kind=lora", "delta.lora_rank=4", "optim.learning_rate=1e-2"),
                progress=False)
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0  # verified by transformers
    cfg = _cfg(out, "delta.kind=lora", "delta.lora_rank=4")
    from paft_jax.train.base import load_base
    mesh = build_mesh(cfg.mesh)
    base = load_base(cfg, mesh, cfg.mesh.logical_rules())
    dense = delta_lib.materialize(res.state.delta, cfg.delta, base.params)
    got = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        got.update(load_file(f))
    checked = 0
    for entry, layer, name in iter_hf_tensors(base.cfg):
        w = np.asarray(get_path(base.params, entry.path)) + np.asarray(get_path(dense, entry.path))
        w = w if layer is None else w[layer]
        np.testing.assert_allclose(got[name], to_hf(entry, w), rtol=0, atol=1e-6)
        checked += "o_proj" in name and float(np.abs(np.asarray(get_path(dense, entry.path))).max()) > 0
    assert checked  # the LoRA delta really moved o_proj, and the export carries it
    # a merge's leaf-by-leaf read folds the same factors (and gives zeros where LoRA trains nothing)
    from paft_jax.train.restore import DeltaReader
    reader = DeltaReader(out, mesh, cfg.mesh.logical_rules())
    for path in (("layers", "self_attn", "o_proj", "kernel"), ("layers", "mlp", "up_proj", "kernel"), ("norm", "weight")):
        np.testing.assert_allclose(np.asarray(reader.leaf(path)), np.asarray(get_path(dense, path)), rtol=0, atol=1e-7)
    reader.close()


FULL_DISK = r"""
set -u
mount -t tmpfs -o size=64m paft_full_disk "$MNT" || exit 99
run() { "$PY" -m paft_jax.launch sft --config configs/tiny_sft.yaml eval_data=null optim.warmup_steps=1 \
          optim.schedule_steps=4 checkpoint.save_every=2 "checkpoint.directory=$MNT/checkpoints" "output_dir=$OUT/run" \
          --no-progress "$@"; }
run steps=2 > "$OUT/1.log" 2>&1; echo $? > "$OUT/1.rc"
# fill the disk so that only half of a checkpoint still fits
avail=$(df --output=avail -B1 "$MNT" | tail -1); size=$(du -sb "$MNT/checkpoints/2" | cut -f1)
fallocate -l $((avail - size / 2)) "$MNT/filler" || exit 98
run steps=4 > "$OUT/2.log" 2>&1; echo $? > "$OUT/2.rc"
cp "$OUT/run/metrics.jsonl" "$OUT/2.metrics.jsonl"; ls -A "$MNT/checkpoints" > "$OUT/2.ls"
rm "$MNT/filler"
run steps=4 > "$OUT/3.log" 2>&1; echo $? > "$OUT/3.rc"
ls -A "$MNT/checkpoints" > "$OUT/3.ls"
"""


@pytest.mark.slow
def test_full_disk_during_a_save_is_an_error_and_the_previous_checkpoint_restores(tmp_path):
    """A real ENOSPC: the checkpoint directory is a 64 MiB tmpfs in a private mount namespace (unshare;
    a user namespace when not root), filled with fallocate so the next checkpoint does not fit."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to mount a private tmpfs")
    ns = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    mnt, out = tmp_path / "disk", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", MNT=str(mnt), OUT=str(out),
               PY=sys.executable)
    proc = subprocess.run(["unshare", *ns, "bash", "-c", FULL_DISK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode == 99 or (proc.returncode and "unshare:" in proc.stderr):
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = {k: (out / f"{k}.log").read_text() for k in (1, 2, 3)}
    rc = {k: int((out / f"{k}.rc").read_text()) for k in (1, 2, 3)}
    assert rc[1] == 0, log[1][-3000:]
    ckpts = f"{mnt}/checkpoints"
    # the failing run: a clear error naming the step, the cause and the intact checkpoint; no success claimed
    assert rc[2] != 0
    # the CLI's one-line error, and no traceback (orbax's and tensorstore's echoes of the same error are dropped)
    errors = [line for line in log[2].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log[2], log[2][-3000:]
    last = errors[0]
    assert last.startswith("error: checkpoint step 4 could not be saved to " + ckpts)
    assert "the disk is full (No space left on device)" in last
    assert f"latest complete checkpoint, {ckpts}/2, is intact; free space, then run the same command" in last
    assert "done in" not in log[2] and '"step": 4' not in log[2]   # no final metrics printed
    assert (out / "2.ls").read_text().split() == ["2"]          # no step 4, its partial files removed
    # space freed: the same command resumes from step 2 and recomputes steps 3-4 exactly
    assert rc[3] == 0, log[3][-3000:]
    assert f"resumed from {ckpts}/2" in log[3]
    failed = [json.loads(line) for line in (out / "2.metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in failed if r["step"] > 2] == \
        [(s, v) for s, v in losses(out / "run") if s > 2]
    assert (out / "3.ls").read_text().split() == ["2", "4"]
