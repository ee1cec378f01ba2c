"""LoRA branches leave as PEFT adapters: `launch export --format peft`, loaded by peft itself onto the base."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_hf_model, padded_batch

pytest.importorskip("peft")


def _launch(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "paft_jax.launch", *argv], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny Qwen3 (q/k norms, mixed layer kinds) as an HF directory, and a 3-step LoRA SFT branch on it."""
    root = tmp_path_factory.mktemp("peft")
    base = root / "base"
    make_hf_model("qwen3", vocab_size=400, max_position_embeddings=576).save_pretrained(base)
    run = root / "run"
    p = _launch("sft", "--config", "configs/tiny_sft.yaml", f"model={base}", f"output_dir={run}",
                "steps=3", "eval_data=null", "delta.kind=lora", "delta.lora_rank=4", "delta.lora_alpha=16",
                "optim.learning_rate=3e-2", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    return base, run


def test_lora_branch_exports_as_a_peft_adapter_that_peft_loads(lora_run, tmp_path):
    from safetensors.numpy import load_file
    from paft_jax.hf.load import load_model
    from paft_jax.hf.peft import adapter_logits
    from paft_jax.hf.verify import compare, hf_logits
    base, run = lora_run
    out = tmp_path / "adapter"
    p = _launch("export", "--checkpoint", str(run), "--out", str(out), "--format", "peft")
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["verify_max_abs_diff"] <= 1e-4
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["bias"], cfg["r"], cfg["lora_alpha"]) == (
        "LORA", "CAUSAL_LM", "none", 4, 16.0)
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    assert cfg["base_model_name_or_path"] == str(base)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (4 * 16, 4)  # [r, in], [out, r]; qwen3 q: 4 heads x head_dim 16
    assert len(tensors) == 2 * 7 * 4 and np.abs(b).max() > 0  # B trained away from its zero init
    # peft's model, and peft's merge_and_unload(), against the merged export of the same checkpoint
    merged = tmp_path / "merged"
    p = _launch("export", "--checkpoint", str(run), "--out", str(merged))
    assert p.returncode == 0, p.stderr[-3000:]
    ids, mask = padded_batch(400)
    ref = hf_logits(merged, ids, mask)
    for merge in (False, True):
        assert compare(ref, adapter_logits(base, out, ids, mask, merge=merge), mask, 1e-4).max_abs_diff <= 1e-4
    lm = load_model(base, with_tokenizer=False)  # and the adapter really changes the base's logits
    assert np.abs(hf_logits(base, ids, mask) - ref)[mask.astype(bool)].max() > 1e-3
    del lm


def test_peft_format_refusals_are_one_line(lora_run, tmp_path):
    base, run = lora_run
    dense = tmp_path / "dense"
    p = _launch("sft", "--config", "configs/tiny_sft.yaml", f"output_dir={dense}", "steps=2", "eval_data=null",
                "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    for argv, message in [
        (["--checkpoint", str(dense)], "trained a dense delta (delta.kind=dense), not LoRA factors"),
        (["--model", str(base)], "give --checkpoint RUN"),
        (["--checkpoint", str(run), "--dtype", "bfloat16"], "adapter's factors are written in float32"),
    ]:
        p = _launch("export", *argv, "--out", str(tmp_path / "x"), "--format", "peft")
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "x").exists()


def _peft_adapter(base_dir, out, variant, r=8, seed=0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"), **lora):
    """An adapter made by peft itself, its B factors random (peft starts them at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "olmo2", "olmo3", "smollm3"])
def test_peft_adapter_merged_by_task_arithmetic_equals_merge_and_unload(tmp_path, variant):
    """`launch merge --method task_arithmetic --base B --model B+ADAPTER --weight 1`: the base plus the
    adapter's delta, formed tensor by tensor, equals peft's own merge_and_unload()."""
    from paft_jax.hf.peft import adapter_logits
    from paft_jax.hf.verify import compare, hf_logits
    base = tmp_path / "base"
    make_hf_model(variant).save_pretrained(base)
    adapter = _peft_adapter(base, tmp_path / "adapter", variant)
    out = tmp_path / "merged"
    p = _launch("merge", "--method", "task_arithmetic", "--base", str(base), "--model", f"{base}+{adapter}",
                "--weight", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    ids, mask = padded_batch(128)
    want = adapter_logits(base, adapter, ids, mask, merge=True)
    assert compare(want, hf_logits(out, ids, mask), mask, 1e-4).max_abs_diff <= 1e-4
    assert np.abs(hf_logits(base, ids, mask) - want)[mask.astype(bool)].max() > 1e-3  # the adapter matters


def test_peft_adapter_ties_with_a_dense_model(tmp_path):
    """TIES of an adapter's delta (materialized per tensor for the masks) with a dense fine-tune."""
    import torch
    base = tmp_path / "base"
    make_hf_model("qwen3").save_pretrained(base)
    tuned = tmp_path / "tuned"
    model = make_hf_model("qwen3")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tuned)
    adapter = _peft_adapter(base, tmp_path / "adapter", "qwen3", targets=("q_proj", "v_proj"))
    out = tmp_path / "ties"
    p = _launch("merge", "--method", "ties", "--base", str(base), "--model", f"{base}+{adapter}", "--model",
                str(tuned), "--weight", "1", "--density", "0.5", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "config.json").exists()


def test_adapter_inputs_that_do_not_fit_are_refused_in_one_line(tmp_path):
    base = tmp_path / "base"
    make_hf_model("qwen3").save_pretrained(base)
    other = tmp_path / "other"  # another shape: hidden 96
    make_hf_model("qwen3", hidden_size=96).save_pretrained(other)
    wrong_base = _peft_adapter(other, tmp_path / "wrong_base", "qwen3")
    dora = _peft_adapter(base, tmp_path / "dora", "qwen3", use_dora=True)
    named = _peft_adapter(base, tmp_path / "named", "qwen3")
    cfg = json.loads((named / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (named / "adapter_config.json").write_text(json.dumps(cfg))
    for adapter, message in [(wrong_base, "is not the base"), (dora, "use_dora=true"),
                             (named, "an adapter for 'someone/another-model', but the base here is")]:
        p = _launch("merge", "--method", "task_arithmetic", "--base", str(base), "--model", f"{base}+{adapter}",
                    "--weight", "1", "--out", str(tmp_path / "x"))
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]


def test_sparsity_states_an_adapters_rank(tmp_path):
    """`launch sparsity --model BASE+ADAPTER` measures the adapter's materialized delta and says its rank."""
    base = tmp_path / "base"
    make_hf_model("llama").save_pretrained(base)
    adapter = _peft_adapter(base, tmp_path / "adapter", "llama", r=4, targets=("q_proj", "v_proj"))
    p = _launch("sparsity", "--base", str(base), "--model", f"{base}+{adapter}", "--json", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "LoRA rank 4 on q_proj, v_proj" in p.stdout
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["inputs"] == [{"delta": "lora", "rank": 4, "targets": ["q_proj", "v_proj"]}]
    assert rep["modules"]["up_proj"]["models"][0]["zero_frac"] == 1.0  # untouched: a zero delta
    assert rep["modules"]["q_proj"]["models"][0]["zero_frac"] < 0.01


def test_dense_branch_exports_a_rank_r_adapter_by_truncated_svd(tmp_path):
    """`--lora-rank R` on a dense branch: peft loads the adapter and reproduces base + the rank-R SVD of each
    targeted kernel's delta; the reported relative errors are those of the SVD (checked here against numpy on
    the exported factors), shrink as R grows and vanish at full rank (k/v: 32 = 2 heads x 16), and the delta an
    adapter cannot hold (embeddings, norms) is reported as dropped."""
    from safetensors.numpy import load_file
    base = tmp_path / "base"
    make_hf_model("llama", vocab_size=400, max_position_embeddings=576).save_pretrained(base)
    run = tmp_path / "run"
    p = _launch("sft", "--config", "configs/tiny_sft.yaml", f"model={base}", f"output_dir={run}", "steps=3",
                "eval_data=null", "optim.learning_rate=1e-2", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    infos = {}
    for r in (2, 8, 32):
        out = tmp_path / f"r{r}"
        p = _launch("export", "--checkpoint", str(run), "--out", str(out), "--format", "peft", "--lora-rank", str(r))
        assert p.returncode == 0, p.stderr[-3000:]
        infos[r] = info = json.loads(p.stdout.strip().splitlines()[-1])
        assert info["verify_max_abs_diff"] <= 1e-4 and (info["r"], info["lora_alpha"]) == (r, float(r))
        print(r, info["relative_error"], info["logits_vs_dense_branch_max_abs_diff"])
    err = {r: infos[r]["relative_error"] for r in infos}
    assert set(err[2]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(err[2][m] > err[8][m] > 0 for m in err[2]) and err[32]["k_proj"] < 1e-5 and err[32]["v_proj"] < 1e-5
    assert all(err[32][m] < err[8][m] for m in err[2])
    assert infos[32]["logits_vs_dense_branch_max_abs_diff"] < infos[2]["logits_vs_dense_branch_max_abs_diff"]
    assert {"embed_tokens/embedding", "norm/weight"} <= set(infos[2]["dropped"])
    # the reported error is the factors' own: ||delta - B A||_F / ||delta||_F, with delta from the merged export
    merged = tmp_path / "merged"
    assert _launch("export", "--checkpoint", str(run), "--out", str(merged)).returncode == 0
    tuned, orig = load_file(str(merged / "model.safetensors")), load_file(str(base / "model.safetensors"))
    ab = load_file(str(tmp_path / "r2" / "adapter_model.safetensors"))
    res = tot = 0.0
    for i in range(2):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        delta = tuned[name].astype(np.float64) - orig[name]
        stem = f"base_model.model.model.layers.{i}.mlp.up_proj"
        approx = ab[f"{stem}.lora_B.weight"].astype(np.float64) @ ab[f"{stem}.lora_A.weight"]
        res, tot = res + ((delta - approx) ** 2).sum(), tot + (delta ** 2).sum()
    assert np.sqrt(res / tot) == pytest.approx(err[2]["up_proj"], rel=1e-3)


def test_lora_rank_refusals_are_one_line(lora_run, tmp_path):
    base, run = lora_run
    for argv, message in [
        (["--checkpoint", str(run), "--lora-rank", "2"], "a LoRA branch (rank 4) exports its trained factors"),
        (["--checkpoint", str(run), "--format", "hf", "--lora-rank", "2"], "use it with --format peft"),
    ]:
        fmt = [] if "--format" in argv else ["--format", "peft"]
        p = _launch("export", *argv, *fmt, "--out", str(tmp_path / "x"))
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("on_mesh", ["false", "true"])
def test_paft_run_whose_sft_branch_is_an_outside_adapter(tmp_path, on_mesh):
    """`sft.from_adapter: DIR`: a peft-made adapter is the SFT branch (imported, not trained), the preference
    branch trains on every device, TIES merges both, the leaderboard scores all four rows.  The imported branch
    is the adapter exactly (its `export --checkpoint` equals peft's merge_and_unload()), and a rerun imports
    and merges nothing again.  The adapter targets 3 of the 7 projections: the others read as zero deltas in
    both merges (streamed and on the mesh)."""
    from paft_jax.hf.peft import adapter_logits
    from paft_jax.hf.verify import compare, hf_logits
    base = tmp_path / "base"
    make_hf_model("qwen3", vocab_size=400, max_position_embeddings=576).save_pretrained(base)
    adapter = _peft_adapter(base, tmp_path / "adapter", "qwen3", r=4, targets=("q_proj", "v_proj", "down_proj"))
    out = tmp_path / "run"
    argv = ("paft", "--config", "configs/paft_tiny.yaml", f"model={base}", f"output_dir={out}",
            f"sft.from_adapter={adapter}", "preference.steps=2", "preference.checkpoint.save_every=2",
            "max_new_tokens=4", "eval_tasks=[arc_challenge]", "eval_limit=2", f"merge.on_mesh={on_mesh}")
    p = _launch(*argv, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sft: imported the LoRA adapter" in p.stderr and "rank 4, down_proj, q_proj, v_proj" in p.stderr
    done = json.loads((out / "sft" / "done.json").read_text())
    assert done["from_adapter"] == str(adapter) and done["steps"] == 0 and done["r"] == 4
    assert not (out / "sft" / "metrics.jsonl").exists()  # nothing trained
    report = json.loads((out / "report.json").read_text())
    assert report["branches"]["sft"]["from_adapter"] == str(adapter) and report["branches"]["preference"]["steps"] == 2
    assert {"base", "sft", "preference", "paft"} <= set(report["leaderboard"]["models"])
    assert "imported, not trained here" in (out / "report.md").read_text()
    exported = tmp_path / "sft_model"
    p2 = _launch("export", "--checkpoint", str(out / "sft"), "--out", str(exported))
    assert p2.returncode == 0, p2.stderr[-3000:]
    ids, mask = padded_batch(400)
    want = adapter_logits(base, adapter, ids, mask, merge=True)
    assert compare(want, hf_logits(exported, ids, mask), mask, 1e-4).max_abs_diff <= 1e-4
    p3 = _launch(*argv, timeout=900)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "is already this run's sft branch" in p3.stderr and "merge: already done" in p3.stderr


def test_from_adapter_refusals_are_one_line(tmp_path):
    """Before anything trains: an adapter for another base, and a preference adapter in sequential mode."""
    base = tmp_path / "base"
    make_hf_model("qwen3", vocab_size=400, max_position_embeddings=576).save_pretrained(base)
    adapter = _peft_adapter(base, tmp_path / "adapter", "qwen3", r=4)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    (other / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    for extra, message in [
        ([f"sft.from_adapter={other}"], "sft.from_adapter: " + str(other) + ": an adapter for 'someone/another-model'"),
        ([f"preference.from_adapter={adapter}", "mode=sequential"], "preference.from_adapter: sequential mode"),
        ([f"sft.from_adapter={tmp_path / 'missing'}"], "not a local adapter directory"),
    ]:
        p = _launch("paft", "--config", "configs/paft_tiny.yaml", f"model={base}", f"output_dir={tmp_path / 'run'}",
                    *extra)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smollm2_lora_branch_exports_as_a_peft_adapter(tmp_path):
    """The real SmolLM2-135M from an HF directory (its GGUF exported first): a 2-step LoRA SFT branch leaves as
    a PEFT adapter; peft's model and its merge_and_unload() equal the branch's merged export within 1e-4."""
    from paft_jax.hf.peft import adapter_logits
    from paft_jax.hf.verify import compare, hf_logits
    base = tmp_path / "smollm2"
    p = _launch("export", "--model", "smollm2", "--out", str(base), "--no-verify")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    p = _launch("sft", "--config", "configs/smollm2_sft.yaml", f"model={base}", f"output_dir={run}", "steps=2",
                "eval_data=null", "eval_at_start=false", "data.seq_len=128", "data.batch_size=8",
                "optim.warmup_steps=0", "optim.learning_rate=1e-3", "delta.kind=lora", "delta.lora_rank=8",
                "delta.lora_alpha=16", "--no-progress", timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    p = _launch("export", "--checkpoint", str(run), "--out", str(adapter), "--format", "peft")
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert (info["r"], info["lora_alpha"], info["base"]) == (8, 16.0, str(base))
    p = _launch("export", "--checkpoint", str(run), "--out", str(merged))
    assert p.returncode == 0, p.stderr[-3000:]
    ids, mask = padded_batch(49152, length=24)
    ref = hf_logits(merged, ids, mask)
    peft = {merge: adapter_logits(base, adapter, ids, mask, merge=merge) for merge in (False, True)}
    diffs = {merge: compare(ref, peft[merge], mask, 1e-3).max_abs_diff for merge in (False, True)}
    own = compare(peft[True], peft[False], mask, 1e-3).max_abs_diff  # peft's two forms of the same model
    scale = float(np.abs(ref)[mask.astype(bool)].max())
    print(f"SmolLM2 LoRA adapter vs merged export: peft {diffs[False]:.3g}, merge_and_unload {diffs[True]:.3g}; "
          f"peft unmerged vs its merge_and_unload {own:.3g}; max |logit| {scale:.3g}; "
          f"peft verify in export {info['verify_max_abs_diff']:.3g}")
    # the unmerged forward, x W + s (x A) B, rounds differently from x (W + s B A) over 30 layers: it is held to
    # the fp32 bound of the SmolLM2 parity tests (1e-5 of the largest logit) and to peft's own two forms' gap
    assert diffs[True] <= 1e-4 and diffs[False] <= max(1e-5 * scale, 1.5 * own)
    assert np.abs(hf_logits(base, ids, mask) - ref)[mask.astype(bool)].max() > 1e-3  # the branch moved the model
