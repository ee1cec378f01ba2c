"""data-stats (registered on a parser the way launch.py builds its commands), the bundled data sets and
their metrics, and two real JAX processes loading disjoint rows."""
import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from paft_jax.data.bundled import (arith_correct, arith_reference, bundled_path, follows_tips_rule,
                                   load_bundled)
from paft_jax.data.cli import load_data_config, register

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    assert args.fn is args.func
    rc = args.fn(args)
    return rc, capsys.readouterr().out


def test_data_stats_on_the_bundled_sft_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out = run_cli(["data-stats", "--config", "configs/data/arith_sft.yaml", "--json"], capsys)
    s = json.loads(out)
    assert rc == 0 and s["examples"] == 500 and s["sources"][0]["rows"] == 500
    e = s["efficiency"]
    assert e["packed"] >= 0.90 and e["padded_buckets"] < e["packed"] and e["padded_to_seq_len"] < 0.2
    assert s["sources"][0]["trained_tokens"] < s["sources"][0]["tokens"]


def test_data_stats_reports_skips_and_truncation(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    good = {"prompt": "Hi", "chosen": "Hello " * 40, "rejected": "Bye."}
    path.write_text(json.dumps(good) + "\n{broken\n" + json.dumps({"prompt": "x", "chosen": "a", "rejected": "a"}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  kind: preference\n  sources: [{{path: {path}}}]\n  seq_len: 64\n")
    from paft_jax.data.testing import llama3_style_tokenizer
    llama3_style_tokenizer().save_pretrained(tmp_path / "tok")  # an HF directory with only a tokenizer
    tok = ["--tokenizer", str(tmp_path / "tok")]
    for extra in ([], ["--set", "skip_invalid=true"]):  # invalid rows are listed either way (bug 4 of issue 14)
        rc, out = run_cli(["data-stats", "--config", str(cfg)] + extra + tok, capsys)
        assert rc == 0
        assert 'invalid 2 {"malformed JSON": 1, "chosen equals rejected": 1}' in out and "truncated 1" in out
        assert f"invalid: {path}:2: malformed JSON" in out and f"invalid: {path}:3" in out and "efficiency" in out
        assert ("training refuses this data" in out) == (not extra)


def test_data_stats_lists_every_invalid_row(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 2
    rows += [{"messages": [{"role": "user", "content": "q"}]}] * 8   # no assistant turn: invalid
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"kind: sft\nsources: [{{path: {path}}}]\nseq_len: 64\n")
    rc, out = run_cli(["data-stats", "--config", str(cfg), "--tokenizer", "llama3-test"], capsys)
    assert rc == 0 and "valid 2, invalid 8" in out
    assert all(f"invalid: {path}:{i}:" in out for i in range(3, 11)), out


def test_data_stats_uses_the_training_configs_tokenizer(capsys, monkeypatch):
    """configs/tiny_sft.yaml says tokenizer: llama3-test; data-stats used SmolLM2's (bug 4 of issue 14)."""
    monkeypatch.chdir(ROOT)
    rc, out = run_cli(["data-stats", "--config", "configs/tiny_sft.yaml", "--json"], capsys)
    own = json.loads(out)
    assert rc == 0 and own["tokenizer"] == "llama3-test"
    rc, out = run_cli(["data-stats", "--config", "configs/tiny_sft.yaml", "--json", "--tokenizer", "llama3-test"],
                      capsys)
    assert json.loads(out)["sources"] == own["sources"]
    rc, out = run_cli(["data-stats", "--config", "configs/tiny_sft.yaml", "--json", "--tokenizer", "smollm2"], capsys)
    assert json.loads(out)["sources"][0]["tokens"] != own["sources"][0]["tokens"]


def test_config_loader_refuses_unknown_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kind: sft\nsequence_len: 5\n")
    with pytest.raises(ValueError, match=r"data\.sequence_len"):
        load_data_config(str(cfg), [])


def test_bundled_sets_are_what_the_generator_makes(tmp_path):
    """Regenerating with the default seed reproduces the committed files byte for byte."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_datasets.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name, split in (("arith", "train"), ("arith", "test"), ("tips", "train"), ("tips", "test"),
                        ("general", "test")):
        assert (tmp_path / name / f"{split}.jsonl").read_bytes() == bundled_path(name, split).read_bytes()


def test_bundled_metrics_separate_good_from_bad():
    arith = load_bundled("arith", "test")
    assert len(arith) == 100 and len(load_bundled("arith", "train")) == 500
    assert all(arith_correct(r["messages"][-1]["content"], r) for r in arith)
    r = arith[0]
    n = arith_reference(r)
    assert not arith_correct(f"The answer is {n + 1}.", r) and not arith_correct(str(n), r)
    train_prompts = {r["messages"][0]["content"] for r in load_bundled("arith", "train")}
    assert not train_prompts & {r["messages"][0]["content"] for r in arith}
    tips = load_bundled("tips", "test")
    assert len(tips) == 100 and len(load_bundled("tips", "train")) == 300
    for row in tips + load_bundled("tips", "train"):
        assert follows_tips_rule(row["chosen"][-1]["content"]) and not follows_tips_rule(row["rejected"][-1]["content"])
    assert not follows_tips_rule("- one\nHope this helps!") and follows_tips_rule("- a\n- b\nHope this helps!")
    from paft_jax.data.bundled import prompts
    assert prompts("arith")[0] == arith[0]["messages"][:1] and prompts("tips")[0] == tips[0]["prompt"]
    general = load_bundled("general", "test")
    assert len(general) == 300 and len({g["text"] for g in general}) == 300


WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from paft_jax.config import DistributedConfig, MeshConfig
    from paft_jax.mesh import build_mesh, init_distributed
    pid, port, data = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    init_distributed(DistributedConfig(enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                       process_id=pid, cpu_collectives="gloo"))
    from paft_jax.data import DataConfig, global_steps_per_epoch, make_loader, to_global
    from paft_jax.data.testing import llama3_style_tokenizer
    cfg = DataConfig(kind="preference", seq_len=256, batch_size=4, num_epochs=1, sources=[{"path": data}])
    it = make_loader(cfg, llama3_style_tokenizer())   # process index/count from jax
    mine = sorted(int(i) for b in it for i in b["example_index"].ravel() if i >= 0)
    it2 = make_loader(cfg, llama3_style_tokenizer())
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    g = to_global(next(it2), mesh)
    from jax.experimental import multihost_utils
    everything = multihost_utils.process_allgather(g["example_index"], tiled=True)
    steps = [it2.steps_per_epoch(), global_steps_per_epoch(it2)]
    print("RESULT " + json.dumps({"mine": mine, "global_shape": list(g["input_ids"].shape), "steps": steps,
                                  "global_index": np.asarray(everything).tolist()}), flush=True)
""")


@pytest.mark.slow
def test_two_processes_load_disjoint_rows_covering_the_data(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."}) + "\n"
                            for i in range(23)))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port, str(data)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    found = [[line[7:] for line in out.splitlines() if line.startswith("RESULT ")] for out, _ in outs]
    assert all(found), [(out[-1000:], err[-2000:]) for out, err in outs]
    res = [json.loads(f[0]) for f in found]
    a, b = set(res[0]["mine"]), set(res[1]["mine"])
    assert len(res[0]["mine"]) == len(a) and not a & b and a | b == set(range(23))
    assert all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)
    assert res[0]["global_shape"] == [4, 256]  # 2 local rows per process -> global batch of 4
    assert res[0]["global_index"] == res[1]["global_index"]
    assert res[0]["steps"][1] == res[1]["steps"][1] == max(res[0]["steps"][0], res[1]["steps"][0])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "data").glob("*.yaml")))
def test_every_data_config_parses_and_points_at_bundled_files(name):
    cfg = load_data_config(str(ROOT / "configs" / "data" / name), [])
    assert cfg.sources and all((ROOT / s.path).exists() for s in cfg.sources)
