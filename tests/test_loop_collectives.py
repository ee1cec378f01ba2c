"""No collective inside a loop on simulated CPU meshes: the optimized HLO of every program a run executes.

XLA:CPU can deadlock a program whose `while` body holds collectives beside a top-level collective
(tests/hlo_loops.py says how), so on a CPU mesh of several devices every such loop is unrolled
(paft_jax/models/loops.py).  Checked two ways: the branch programs compiled here from shapes (train step,
eval step, reference pass; SFT with L1, DPO, ORPO; micro-batch loops on), and every module a whole PAFT
run compiles, dumped by XLA (the on-mesh merge, its statistics, restores and gathers included).
"""
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from hlo_loops import collective_count, loop_collectives
from paft_jax.config import MeshConfig
from paft_jax.mesh import build_mesh
from paft_jax.models.config import ModelConfig
from paft_jax.train.config import load_train_config
from paft_jax.train.programs import abstract_programs

ROOT = Path(__file__).resolve().parents[1]

BRANCHES = {
    "sft-l1": ("configs/tiny_sft.yaml", ["objective.l1_lambda=0.5"]),
    "sft-l1-penalty": ("configs/tiny_sft.yaml", ["objective.l1_lambda=0.5", "objective.l1_mode=penalty"]),
    "sft-chunked-logits": ("configs/tiny_sft.yaml", ["objective.logits_chunk=128", "scan_unroll=1"]),
    "dpo-ref-cache": ("configs/tiny_dpo.yaml", ["ref_cache=true"]),
    "dpo-ref-in-step": ("configs/tiny_dpo.yaml", ["ref_cache=false"]),
    "orpo": ("configs/tiny_dpo.yaml", ["objective.kind=orpo"]),
    "dpo-lora": ("configs/tiny_dpo.yaml", ["ref_cache=true", "delta.kind=lora"]),
}


CASES = [(b, n) for b in ("sft-l1", "dpo-ref-cache", "orpo") for n in (4, 8)] + \
    [(b, 4) for b in BRANCHES if b not in ("sft-l1", "dpo-ref-cache", "orpo")]


@pytest.mark.parametrize("branch, devices", CASES)
def test_branch_programs_have_no_collective_inside_a_loop(branch, devices):
    config, extra = BRANCHES[branch]
    rows = 2 * devices  # two micro-batches of one row per device: the micro-batch loops are there too
    tc = load_train_config(config, extra + [
        f"mesh.fsdp={devices}", f"data.batch_size={rows}", f"eval_data.batch_size={rows}", "grad_accum=2",
        f"eval_micro_batch={devices}"])
    mcfg = ModelConfig(**tc.model_config, vocab_size=512)
    mesh = build_mesh(MeshConfig(data=1, fsdp=devices, tensor=1), devices=jax.devices()[:devices])
    programs = abstract_programs(tc, mcfg, mesh)
    names = [name.split(" ")[0] for name, _, _ in programs]
    assert {"train_step", "eval_step"} <= set(names)
    assert ("reference_logps" in names) == (tc.objective.needs_reference and tc.ref_cache)
    for name, fn, args in programs:
        text = fn.lower(*args).compile().as_text()
        assert collective_count(text) > 0, f"{name}: no collective seen (the parser missed them?)"
        inside = loop_collectives(text, name)
        assert not inside, "\n".join(map(str, inside[:5]))


@pytest.mark.slow
def test_every_module_of_a_paft_run_on_the_mesh(tmp_path):
    """A whole tiny PAFT run, both branches on 4-device sub-meshes and the merge on all 8 (with the
    L1-rescaled TIES, whose statistics pass runs row by row), with XLA dumping every module it compiles."""
    dump = tmp_path / "hlo"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 --xla_dump_to={dump} "
                                     "--xla_dump_hlo_as_text")
    cmd = [sys.executable, "-m", "paft_jax.launch", "paft", "--config", "configs/paft_tiny.yaml",
           f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", "merge.on_mesh=true",
           "merge.parameters.rescale=l1", "prompts=[]", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = sorted(dump.glob("*after_optimizations.txt"))
    texts = {p.name: p.read_text() for p in modules}
    with_collectives = [n for n, t in texts.items() if collective_count(t)]
    assert any("train_step" in n for n in with_collectives) and any("apply_rows" in n for n in with_collectives), \
        sorted(with_collectives)
    inside = [f for n, t in texts.items() for f in loop_collectives(t, n)]
    assert not inside, "\n".join(map(str, inside[:10]))
