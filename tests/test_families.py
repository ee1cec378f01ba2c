"""The families beyond Llama / Mistral / Qwen2: mixed layer kinds, Gemma 3's multimodal checkpoints,
generation past the window, config round trips, refusals, and a PAFT run of each tiny model.

Logits parity and the export round trip of every variant are in test_parity.py / test_roundtrip.py."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import VARIANTS, make_hf_model, padded_batch
from paft_jax.hf.config import hf_config_dict, model_config_from_hf
from paft_jax.hf.load import load_model
from paft_jax.hf.verify import compare, flax_logits

NEW = ["qwen2_mixed", "qwen3", "gemma3", "olmo2", "olmo3", "smollm3"]
FAMILIES = ["qwen3", "gemma3", "olmo2", "olmo3", "smollm3"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_config_round_trip(hf_dir, variant):
    """config.json -> ModelConfig -> config.json -> the same ModelConfig (what an export writes is what
    an import reads)."""
    d = hf_dir(variant)
    cfg = model_config_from_hf(json.loads((d / "config.json").read_text()))
    again = model_config_from_hf(hf_config_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize("variant", NEW)
def test_greedy_generation_past_the_window_equals_transformers(variant):
    import torch
    from paft_jax.generate import SamplingConfig, generate_ids
    model = make_hf_model(variant, attn_implementation="eager")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with __import__("tempfile").TemporaryDirectory() as d:
        model.save_pretrained(d)
        lm = load_model(d, with_tokenizer=False)
    window = lm.cfg.sliding_window
    prompts = [[5, 17, 33, 9, 41, 12], [7, 3, 88, 21]]
    new = 14  # the prompt plus the new tokens run well past the window of 4
    ours = generate_ids(lm.params, lm.cfg, prompts, SamplingConfig(max_new_tokens=new), eos_ids=())
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0, len(prompt):]
        assert got == ref.tolist(), (variant, window)


def _tiny_gemma3_multimodal():
    import torch
    import transformers
    text = dict(VARIANTS["gemma3"][1], vocab_size=128, hidden_size=64, intermediate_size=96,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    cfg = transformers.Gemma3Config(
        text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_gemma3_multimodal_checkpoint_loads_its_language_model_and_exports_a_text_model(tmp_path):
    import torch
    from paft_jax.hf.export import export_hf
    from paft_jax.hf.verify import hf_logits
    model = _tiny_gemma3_multimodal()
    src = tmp_path / "gemma3-mm"
    model.save_pretrained(src)
    lm = load_model(src, with_tokenizer=False)
    assert lm.cfg.family == "gemma3" and lm.cfg.num_layers == 4
    assert any("text-only" in n for n in lm.notes)
    ids, mask = padded_batch(120)  # below the image / boi / eoi token ids
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    model.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(pos.astype(np.int64))).logits.float().numpy()
    ours = flax_logits(lm.params, lm.cfg, ids, mask)
    assert compare(ref, ours, mask, 1e-5).max_abs_diff <= 1e-5
    out = tmp_path / "text"
    export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config)
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "gemma3_text" and exported["architectures"] == ["Gemma3ForCausalLM"]
    assert compare(hf_logits(out, ids, mask), ours, mask, 1e-5).max_abs_diff <= 1e-5


@pytest.mark.parametrize("model_type,expect", [
    ("qwen4", "closest: 'qwen3'"), ("gemma2", "closest: 'gemma3'"), ("olmo", "closest: 'olmo"),
    ("llava", "LLaVA (a vision-language model), with no text model"),
])
def test_unsupported_model_types_name_the_closest_family(model_type, expect):
    with pytest.raises(ValueError, match="is not supported|with no text model") as e:
        model_config_from_hf({"model_type": model_type}, "x/config.json")
    assert expect in str(e.value) and "x/config.json" in str(e.value)
    assert "\n" not in str(e.value)


def test_gemma3_multimodal_config_without_a_text_model_is_refused():
    with pytest.raises(ValueError, match="without a text_config"):
        model_config_from_hf({"model_type": "gemma3", "vision_config": {}}, "mm/config.json")


def test_unsupported_model_type_is_one_line_at_the_cli(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen4"}))
    run = subprocess.run([sys.executable, "-m", "paft_jax.launch", "generate", "--model", str(d), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "qwen4" in lines[0] and "qwen3" in lines[0], run.stderr


# per family, what else its PAFT run exercises: a LoRA preference branch, the merge on the mesh
PAFT_VARIATIONS = {"qwen3": ["preference.delta.kind=lora"], "gemma3": ["merge.on_mesh=true"], "olmo2": [],
                   "olmo3": ["merge.on_mesh=true"], "smollm3": ["preference.delta.kind=lora", "merge.on_mesh=true"]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", FAMILIES)
def test_paft_runs_each_family(tmp_path, variant):
    """The whole pipeline (both branches, L1 on the SFT delta, TIES merge streamed or on the mesh, a dense or
    LoRA preference delta, verified export, answers, ARC-Challenge scored for the base, branches and merge)
    on a tiny random model of the family, the mixed layer kinds included."""
    model = make_hf_model(variant, vocab_size=400, max_position_embeddings=576)
    base = tmp_path / "base"
    model.save_pretrained(base)
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "paft_jax.launch", "paft", "--config", "configs/paft_tiny.yaml",
                          f"model={base}", f"output_dir={out}", "sft.steps=2", "preference.steps=2",
                          "sft.checkpoint.save_every=2", "preference.checkpoint.save_every=2", "max_new_tokens=4",
                          "eval_tasks=[arc_challenge]", "eval_limit=2", *PAFT_VARIATIONS[variant]],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    exported = json.loads((out / "merged" / "config.json").read_text())
    assert exported["model_type"] == json.loads((base / "config.json").read_text())["model_type"]
    report = json.loads((out / "report.json").read_text())
    assert report["answers"] and report["answers"][0]["answer"] is not None
    board = report["leaderboard"]
    assert board["documents"] == {"arc_challenge": 2}
    assert {"base", "sft", "preference", "paft"} <= set(board["models"])
    assert all(0 <= m["task/arc_challenge/acc"] <= 1 for m in board["models"].values())


def test_gguf_of_a_newer_family_is_refused_naming_why(tmp_path):
    """transformers' GGUF reader (through which the config is read) loses Qwen3's head_dim and Gemma 3's RoPE
    scaling: a GGUF of those families is refused rather than imported with a wrong config."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "qwen3.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(128)
    w.add_value_length(128)
    w.add_rope_freq_base(1e6)
    w.add_vocab_size(64)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF import of qwen3 is not implemented.*use the safetensors checkpoint"):
        load_model(path, with_tokenizer=False)


@pytest.mark.parametrize("name", ["paft_qwen3_8b", "paft_gemma3_12b"])
def test_the_new_bases_paft_configs_load_and_their_branches_validate(name):
    """The shipped configs parse; each branch config validates (the TPU compile of them is in
    benchmarks/results/compile/, far too slow for a test)."""
    from paft_jax.pipeline.config import branch_configs, load_paft_config
    cfg = load_paft_config(f"configs/{name}.yaml")
    tcs = branch_configs(cfg)
    assert set(tcs) == {"sft", "preference"}
    for tc in tcs.values():
        assert tc.mesh.fsdp == 4 and tc.attention == "splash"


def test_a_multimodal_gemma3_base_merges_as_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration directory as the merge's base: its language model's tensors under the
    text names, the text config, and an output that transformers loads as Gemma3ForCausalLM."""
    import jax
    from paft_jax.hf.export import export_hf
    from paft_jax.merge.engine import merge_to_hf
    from paft_jax.merge.recipe import MergeSpec
    from paft_jax.merge.sources import HFDirSource
    mm = tmp_path / "mm"
    _tiny_gemma3_multimodal().save_pretrained(mm)
    lm = load_model(mm, with_tokenizer=False)
    tuned = tmp_path / "tuned"  # a fine-tuned text model of the same base
    export_hf(jax.tree_util.tree_map(lambda x: x * 1.01, lm.params), lm.cfg, tuned, hf_config=lm.hf_config)
    base = HFDirSource(mm)
    assert "model.layers.0.self_attn.q_norm.weight" in base.names() and base.config["model_type"] == "gemma3_text"
    assert not any("vision" in n for n in base.names())
    out = tmp_path / "merged"
    merge_to_hf(MergeSpec("task_arithmetic", 1, {}, [{"weight": 0.5}]), base, [tuned], out, verify=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    merged = load_model(out, with_tokenizer=False)
    want = jax.tree_util.tree_map(lambda x: x * 1.005, lm.params)
    for a, b in zip(jax.tree_util.tree_leaves(merged.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
