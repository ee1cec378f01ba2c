"""Compiling from shapes alone: the 8B step traces on CPU, a reduced config compiles for a TPU topology,
the compile command refuses what does not fit; the batch layout the compiler is given is the loader's."""
import json
import re

import numpy as np
import pytest

from paft_jax.aot.topology import USABLE_HBM, parse_accelerator
from paft_jax.config import MeshConfig
from paft_jax.mesh import build_mesh
from paft_jax.models.shapes import named_shape
from paft_jax.train.config import load_train_config
from paft_jax.train.programs import abstract_programs


def _libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("config, extra", [
    ("configs/llama3_8b_sft.yaml", ["data.batch_size=8", "data.seq_len=256", "eval_data.batch_size=8",
                                    "eval_data.seq_len=256", "mesh.fsdp=8", "remat=full"]),
    ("configs/llama3_8b_dpo.yaml", ["data.batch_size=8", "data.seq_len=256", "ref_cache=false", "mesh.fsdp=8"]),
    ("configs/llama3_8b_dpo.yaml", ["data.batch_size=8", "data.seq_len=256", "ref_cache=true", "mesh.fsdp=8",
                                    "delta.kind=lora"]),
])
def test_8b_shaped_programs_lower_on_cpu(config, extra):
    """Above 2**31 parameters nothing may overflow int32 (delta statistics, counts): every program traces."""
    tc = load_train_config(config, extra + ["mesh.data=1", "mesh.tensor=1"])
    mcfg = named_shape("llama3-8b", dtype="bfloat16", param_dtype="bfloat16", remat=tc.remat)
    assert mcfg.num_params() > 2 ** 31
    mesh = build_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    programs = abstract_programs(tc, mcfg, mesh)
    names = [n for n, _, _ in programs]
    assert names[0] == "train_step"
    if tc.objective.needs_reference and tc.ref_cache:
        assert any(n.startswith("reference_logps") for n in names)
    for name, fn, args in programs:
        text = fn.lower(*args).as_text()
        assert "stablehlo" in text or "func.func" in text, name


def test_accelerator_types():
    t = parse_accelerator("v4-32")
    assert (t.name, t.chips, t.hosts, t.chip_config, t.hbm_bytes) == ("v4:2x2x4", 16, 4, "megacore", 32 * 2 ** 30)
    t = parse_accelerator("v5litepod-64")
    assert (t.name, t.chips, t.hosts, t.hbm_bytes) == ("v5e:8x8", 64, 16, 16 * 2 ** 30)
    assert parse_accelerator("v5litepod-8").hosts == 1 and parse_accelerator("v5p-8").chips == 4
    for bad, match in (("v4-33", "no such v4 slice"), ("v9-8", "accelerator type"), ("v5litepod-3", "known sizes")):
        with pytest.raises(ValueError, match=match):
            parse_accelerator(bad)


def test_batch_shapes_are_what_the_loader_makes():
    from paft_jax.data import to_global
    from paft_jax.data.batching import batch_shapes, fill_pairs, fill_sft

    class Ex:
        def __init__(self, i, n):
            self.index, self.seqs = i, [(np.arange(1, n + 1), np.ones(n)), (np.arange(1, n), np.ones(n - 1))]

    examples = [Ex(0, 5), Ex(1, 4)]
    mesh = build_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    for batch, want in ((fill_sft(examples, [[0], [1]], 8, 16, 0), batch_shapes(8, 16)),
                        (fill_pairs(examples, [[0, 1]], 8, 16, 0, 2), batch_shapes(8, 16, 2))):
        got = to_global(batch, mesh)
        assert {k: (v.shape, np.dtype(v.dtype)) for k, v in got.items()} == \
            {k: (s, np.dtype(d)) for k, (s, d) in want.items()}


def test_compile_needs_a_shape_for_a_model_that_is_not_here():
    from paft_jax.aot.cli import model_shape
    tc = load_train_config("configs/llama3_8b_sft.yaml")
    with pytest.raises(ValueError, match="--model-shape"):
        model_shape(tc, None, on_cpu=False)
    m = model_shape(tc, "llama3-8b", on_cpu=False)
    assert (m.param_dtype, m.dtype, m.num_layers) == ("bfloat16", "bfloat16", 32)
    with pytest.raises(ValueError, match="did you mean 'mistral-7b'"):
        named_shape("mistral-7")


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_reduced_config_compiles_for_a_tpu_topology(tmp_path, capsys):
    from paft_jax.launch import main
    out = tmp_path / "table.json"
    assert main(["compile", "--config", "configs/tiny_dpo.yaml", "--topology", "v4-8", "--no-progress",
                 "--json", str(out), "ref_cache=true"]) == 0
    table = capsys.readouterr().out
    assert "train_step" in table and "reference_logps" in table and "kernels" in table
    assert "usable GiB  nominal GiB  headroom" in table  # headroom is against the first
    assert all(re.search(r" 30\.75\s+32\.00\s+\d+\.\d%\s+yes ", line) for line in table.splitlines()[2:])
    res = json.loads(out.read_text())
    assert (res["hbm"], res["usable_hbm"]) == (32 * 2 ** 30, USABLE_HBM["v4"])
    rows = res["programs"]
    assert {r["program"] for r in rows} >= {"train_step", "eval_step", "reference_logps (train)"}
    for r in rows:
        assert r["devices"] == 4 and r["hbm"] == 32 * 2 ** 30 and r["usable_hbm"] == USABLE_HBM["v4"]
        assert 0 < r["peak"] < r["usable_hbm"] and r["peak"] == r["argument"] + r["output"] - r["alias"] + r["temp"]
        assert r["headroom"] == pytest.approx(1 - r["peak"] / r["usable_hbm"])
        assert r["headroom_nominal"] == pytest.approx(1 - r["peak"] / r["hbm"])


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_compile_refuses_a_program_that_does_not_fit(tmp_path):
    """Refused by the compiler (a tiny model whose batch needs ~1 TiB of attention scores per chip), and by the
    headroom check after a successful compile: each names the program, the bytes needed and the chip's usable HBM.
    (attention=naive: splash, auto's choice on TPU, never holds those scores.)"""
    from paft_jax.launch import main
    with pytest.raises(ValueError, match=r"sft/train_step does not fit: the compiler ran out of memory \(.*"
                                         r"required .*\([\d.]+T\) exceeds available HBM"):
        main(["compile", "--config", "configs/tiny_sft.yaml", "--topology", "v5litepod-1", "--no-progress",
              "--programs", "train_step", "mesh.fsdp=1", "data.batch_size=256", "data.seq_len=8192",
              "attention=naive"])
    with pytest.raises(ValueError, match=r"sft/train_step does not fit: it needs [\d.]+ GiB per chip "
                                         r"\([\d,]+ bytes\) and the chip has 15.75 GiB of usable HBM "
                                         r"\(16.0 GiB nominal\) less the 100% headroom"):
        main(["compile", "--config", "configs/tiny_sft.yaml", "--topology", "v5litepod-1", "--no-progress",
              "--programs", "train_step", "mesh.fsdp=1", "--min-headroom", "0.999999"])


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_paft_config_compiles_per_branch_on_its_split_and_alone(tmp_path):
    """A PAFT config: each branch on the whole hosts its split gives; --branch: one branch on the whole slice."""
    from paft_jax.launch import main
    out = tmp_path / "t.json"
    assert main(["compile", "--config", "configs/paft_tiny.yaml", "--topology", "v4-16", "--no-progress",
                 "--programs", "train_step", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["programs"]
    assert [(r["branch"], r["devices"]) for r in rows] == [("sft", 4), ("preference", 4)]  # 2 hosts of 4 chips
    assert main(["compile", "--config", "configs/paft_tiny.yaml", "--branch", "preference", "--topology", "v4-16",
                 "--no-progress", "--programs", "train_step", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["programs"]
    assert [(r["branch"], r["devices"]) for r in rows] == [("preference", 8)]
    with pytest.raises(ValueError, match="--branch selects a branch of a PAFT config"):
        main(["compile", "--config", "configs/tiny_sft.yaml", "--branch", "sft", "--no-progress"])


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_splash_attention_compiles_for_a_tpu_topology(tmp_path):
    """attention=auto on TPU with rows of a multiple of 128 tokens is splash: its Pallas kernels (forward, and the
    fused backward in the train step) are in the executables; attention=naive has none; 576-token rows fall back."""
    from paft_jax.launch import main
    out = tmp_path / "t.json"
    kernels = {}
    for extra in (["attention=auto"], ["attention=naive"], ["attention=auto", "data.seq_len=576",
                                                            "eval_data.seq_len=576"]):
        assert main(["compile", "--config", "configs/tiny_sft.yaml", "--topology", "v4-8", "--no-progress",
                     "--json", str(out), *extra]) == 0
        kernels[" ".join(extra)] = {r["program"]: r["kernels"] for r in json.loads(out.read_text())["programs"]}
    assert kernels["attention=auto"] == {"train_step": 2, "eval_step": 1}
    assert kernels["attention=naive"] == {"train_step": 0, "eval_step": 0}
    assert kernels["attention=auto data.seq_len=576 eval_data.seq_len=576"] == {"train_step": 0, "eval_step": 0}


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_compile_for_a_topology_prints_no_libtpu_start_up_errors(tmp_path):
    """Without TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES (and no metadata server) libtpu's start-up printed
    "Failed to find host bounds for accelerator type" and "unexpected worker hostname 'WARNING: could not
    determine TPU worker hostnames...'" on every `compile --topology`; topology.py sets them first."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    # a fresh process, as a user runs it: none of the variables an earlier compile in this process set
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
                                                            "TPU_WORKER_ID", "TPU_SKIP_MDS_QUERY")}
    proc = subprocess.run([sys.executable, "-m", "paft_jax.launch", "compile", "--config", "configs/tiny_sft.yaml",
                           "--topology", "v4-16", "--no-progress", "--programs", "train_step"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_step" in proc.stdout
    for line in ("unexpected worker hostname", "could not determine", "Failed to find host bounds",
                 "Source Location Trace"):
        assert line not in proc.stderr, proc.stderr[-3000:]


def test_compile_of_a_program_no_branch_runs_is_refused():
    """--programs reference_logps with ref_cache: false compiled nothing and exited 0 with an empty table."""
    from paft_jax.launch import main
    with pytest.raises(ValueError, match=r"--programs reference_logps: no branch of configs/tiny_dpo.yaml runs that "
                                         r"program \(the reference pass runs only with ref_cache: true\)"):
        main(["compile", "--config", "configs/tiny_dpo.yaml", "--no-progress", "--programs", "reference_logps",
              "ref_cache=false"])
