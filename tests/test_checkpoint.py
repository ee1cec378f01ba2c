"""Faults with real processes: SIGKILL then resume (bitwise equal to an uninterrupted run), SIGTERM
(checkpoint, exit 0, resume), a checkpoint restored on another mesh, a corrupted checkpoint."""
import json
import os
import random
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


def launch(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONUNBUFFERED="1")
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


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(tmp_path):
    ref = launch(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]
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
    assert losses(run) == losses(tmp_path / "ref")          # same metrics, step by step, exactly
    step_a, a = final_delta(tmp_path / "ref")
    step_b, b = final_delta(run)
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(x, y)                          # bitwise


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_the_same_command_continues(tmp_path):
    run = tmp_path / "run"
    proc = launch(run)
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
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
    return load_train_config("configs/tiny_sft.yaml", [*ARGS, "steps=4", "checkpoint.save_every=2",
                                                        "checkpoint.async_save=false", f"output_dir={out}", *extra])


def test_checkpoint_restores_on_another_mesh(tmp_path):
    res = train(_cfg(tmp_path / "a"), mesh=build_mesh(MeshConfig(data=1, fsdp=8, tensor=1)), progress=False)
    saved = jax.tree_util.tree_map(np.asarray, res.state.delta)
    cfg = _cfg(tmp_path / "a", "steps=5", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    from paft_jax.train.loop import Branch, _resume, load_base
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


def test_corrupted_checkpoint_is_an_error_naming_it_unless_fallback(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out), progress=False)
    victim = max((p for p in (out / "checkpoints" / "4").rglob("*") if p.is_file() and "state" in str(p)),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" * 64)  # truncated garbage where array data was
    with pytest.raises(CheckpointError, match=r"checkpoints/4 cannot be restored.*fallback=true.*step 2"):
        train(_cfg(out, "steps=6"), progress=False)
    res = train(_cfg(out, "steps=6", "checkpoint.fallback=true"), progress=False)
    assert res.resumed_from == 2
    assert [r["step"] for r in res.history if "loss" in r] == [3, 4, 5, 6]


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
    from paft_jax.train.loop import load_base
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
