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


def _permute_qk(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows for its interleaved RoPE (Llama-style archs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, path, arch, *, head_dim=None, window=0, pattern=None, swa_base=None, quant=None):
    """A GGUF of a transformers model as llama.cpp's convert_hf_to_gguf.py writes one: tensors under llama.cpp's
    names, Gemma's norm weights stored as 1 + w, q/k permuted for smollm3, the metadata keys llama.cpp reads.

    With `quant` (a GGMLQuantizationType name), matrices are stored quantized and the model's own weights are set
    to what the file dequantizes to, so the model stays the reference for the file."""
    import gguf
    import torch
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if swa_base is not None:
        w.add_rope_freq_base_swa(swa_base)
    if rope.get("rope_type", "default") != "default":
        assert rope["rope_type"] == "linear"
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if window:
        w.add_sliding_window(window)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    if getattr(c, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([1] * c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    params = dict(model.named_parameters())
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = v.float().numpy()
        n_head = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(k.split(".")[-2])
        if arch == "smollm3" and n_head:
            a = _permute_qk(a, n_head)
        if arch == "gemma3" and k.endswith("norm.weight"):
            a = a + np.float32(1.0)
        name = names.get_name(k.rsplit(".", 1)[0]) + ".weight"
        if qtype is not None and a.ndim == 2:  # llama.cpp keeps 1-D tensors (norms) in F32
            stored = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, stored, raw_shape=stored.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(stored, qtype).reshape(a.shape)
            if arch == "smollm3" and n_head:  # the inverse of _permute_qk
                back = back.reshape(n_head, back.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
            with torch.no_grad():
                params[k].copy_(torch.from_numpy(np.ascontiguousarray(back)))
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _torch_logits(model, ids, mask):
    import torch
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(
            mask.astype(np.int64)), position_ids=torch.from_numpy(pos.astype(np.int64))).logits.float().numpy()


# (variant, llama.cpp arch, make_hf_model overrides, _write_gguf kwargs, whether transformers' GGUF loader reads it)
GGUF_CASES = {
    # head_dim 32 != hidden 64 / 4 heads: transformers' reader would take head_dim 128
    "qwen3_head_dim": ("qwen3", "qwen3", dict(head_dim=32, use_sliding_window=False, tie_word_embeddings=False),
                       dict(head_dim=32), False),
    # head_dim 128, the one transformers' reader gets right: read by both
    "qwen3_128": ("qwen3", "qwen3", dict(head_dim=128, use_sliding_window=False), dict(head_dim=128), True),
    # linear RoPE x8 on the global layers, window 4 < the rows, sliding/global alternating (pattern 2)
    "gemma3_scaled": ("gemma3", "gemma3", dict(query_pre_attn_scalar=16, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        dict(head_dim=16, window=4, pattern=2), False),
    # llama.cpp's default pattern of 6 (layer 5 global), no scaling, no softcap, head_dim = query_pre_attn_scalar =
    # 256 (transformers' reader keeps its default 256): transformers reads it too
    "gemma3_6": ("gemma3", "gemma3", dict(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256,
                                          final_logit_softcapping=None,
                                          layer_types=None, sliding_window_pattern=6,
                                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                           "sliding_attention": {"rope_type": "default",
                                                                                 "rope_theta": 10000.0}}),
                 dict(head_dim=256, window=4), True),
    "olmo2": ("olmo2", "olmo2", dict(tie_word_embeddings=False), {}, False),
    # llama.cpp stores OLMo 3 as arch olmo2 with a sliding window: its default pattern of 4 (layers 3 and 7 full),
    # linear RoPE x2 on the full layers only, the sliding layers' own base (rope.freq_base_swa)
    "olmo3": ("olmo3", "olmo2", dict(num_hidden_layers=8, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), dict(window=4, swa_base=1e4), False),
    # q/k permuted as for Llama; NoPE on layers 3 and 7 (llama.cpp's every 4th, which the file does not record)
    "smollm3": ("smollm3", "smollm3", dict(num_hidden_layers=8, use_sliding_window=False,
                                           no_rope_layers=[1, 1, 1, 0, 1, 1, 1, 0]), {}, False),
    # quantized files (block quants along the rows; norms stay F32, as llama.cpp writes them)
    "qwen3_q8_0": ("qwen3", "qwen3", dict(head_dim=32, use_sliding_window=False), dict(head_dim=32, quant="Q8_0"),
                   False),
    "gemma3_q4_0": ("gemma3", "gemma3", dict(query_pre_attn_scalar=16), dict(head_dim=16, window=4, pattern=2, quant="Q4_0"), False),
    "smollm3_q5_1": ("smollm3", "smollm3", dict(use_sliding_window=False, no_rope_layers=[1, 1, 1, 0]),
                     dict(quant="Q5_1"), False),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_of_a_newer_family_equals_the_transformers_model(tmp_path, case):
    """A GGUF written as llama.cpp writes one imports with its config read from the GGUF metadata (head_dim,
    Gemma 3's RoPE scaling, sliding pattern and window): logits equal the source transformers model's, and
    transformers' own GGUF loader's where it can read the file."""
    pytest.importorskip("gguf")
    import torch
    import transformers
    variant, arch, over, kw, by_transformers = GGUF_CASES[case]
    model = make_hf_model(variant, attn_implementation="eager", **over)
    path = _write_gguf(model, tmp_path / f"{case}.gguf", arch, **kw)
    lm = load_model(path, with_tokenizer=False)
    assert lm.cfg.family == variant
    assert lm.cfg.resolved_head_dim == getattr(model.config, "head_dim", 16)
    if variant == "gemma3":
        assert [t == "sliding_attention" for t in (lm.cfg.layer_types or [])] == [
            t == "sliding_attention" for t in model.config.layer_types]
        assert lm.cfg.query_pre_attn_scalar == model.config.query_pre_attn_scalar
        assert lm.cfg.sliding_rope_theta == 10000.0
    if case == "gemma3_scaled":  # the scaling transformers' GGUF reader drops
        assert dict(lm.cfg.rope_scaling) == {"rope_type": "linear", "factor": 8.0} and lm.cfg.sliding_window == 4
    if variant == "olmo3":
        assert lm.cfg.layer_types == tuple(model.config.layer_types) and lm.cfg.sliding_window == 4
        assert dict(lm.cfg.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
        assert (lm.cfg.rope_theta, lm.cfg.sliding_rope_theta, lm.cfg.sliding_rope_scaling) == (5e5, 1e4, None)
    if variant == "smollm3":
        assert [i not in lm.cfg.no_rope_layers for i in range(lm.cfg.num_layers)] == model.config.no_rope_layers
        assert any("NoPE on every 4th layer" in n for n in lm.notes)
    ids, mask = padded_batch(model.config.vocab_size)
    ours = flax_logits(lm.params, lm.cfg, ids, mask)
    diff = compare(_torch_logits(model, ids, mask), ours, mask, 1e-5).max_abs_diff
    print(f"{case}: max |ours - transformers source| = {diff:.3g}")
    assert diff <= 1e-5
    if by_transformers:
        g = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        diff_g = compare(_torch_logits(g, ids, mask), ours, mask, 1e-5).max_abs_diff
        print(f"{case}: max |ours - transformers GGUF load| = {diff_g:.3g}")
        assert diff_g <= 1e-5


def test_gguf_whose_metadata_contradicts_the_family_is_refused_naming_the_key(tmp_path):
    """An OLMo 2/3 or SmolLM3 GGUF whose key_length is not hidden/heads (their configs cannot say head_dim), and a
    sliding pattern of the wrong length: one-line errors naming the key, nothing loaded."""
    pytest.importorskip("gguf")
    odd = _write_gguf(make_hf_model("olmo2"), tmp_path / "olmo2.gguf", "olmo2", head_dim=32)
    with pytest.raises(ValueError, match="olmo2 has head_dim = hidden_size // num_heads .16., but the GGUF's "
                                         "attention.key_length is 32"):
        load_model(odd, with_tokenizer=False)
    bad = _write_gguf(make_hf_model("olmo3"), tmp_path / "olmo3.gguf", "olmo2", window=4, pattern=[True, False])
    with pytest.raises(ValueError, match="sliding_window_pattern has 2 entries for 4 layers"):
        load_model(bad, with_tokenizer=False)


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


def test_model_config_survives_the_checkpoint_metadata_json():
    """A branch checkpoint stores its ModelConfig as JSON (tuples become lists): read back, it is equal and
    hashable (jit takes it as a static argument), the per-layer kinds included."""
    import dataclasses
    from paft_jax.models.shapes import named_shape
    from paft_jax.train.restore import model_config_from_meta
    cfg = named_shape("gemma3-4b").replace(sliding_rope_scaling={"rope_type": "linear", "factor": 2.0})
    back = model_config_from_meta({"model_config": json.loads(json.dumps(dataclasses.asdict(cfg)))})
    assert back == cfg and hash(back) == hash(cfg) and back.layer_kinds() == cfg.layer_kinds()


@pytest.mark.parametrize("chunk", [0, 48])
def test_training_log_probs_apply_the_final_logit_softcap(chunk):
    """The train step and the evaluations compute log-probs from the final hidden states (vocab in chunks or
    whole), not from the decoder's logits: Gemma's final_logit_softcapping must apply there too."""
    import jax
    import jax.numpy as jnp
    from paft_jax.losses import token_logps
    from paft_jax.models.config import ModelConfig
    from paft_jax.models.decoder import Decoder, init_params
    from paft_jax.train.step_fn import make_logp_fn
    cfg = ModelConfig(family="gemma3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, tie_word_embeddings=True, qk_norm="head", hidden_act="gelu_tanh",
                      final_logit_softcapping=2.0)
    params = jax.tree_util.tree_map(lambda x: x * 8, init_params(cfg, jax.random.key(0)))  # logits past the cap
    ids, mask = padded_batch(cfg.vocab_size)
    batch = {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(np.roll(ids, -1, 1)),
             "segment_ids": jnp.asarray(mask), "positions": jnp.asarray(np.clip(np.cumsum(mask, 1) - 1, 0, None))}
    logits, _ = Decoder(cfg).apply({"params": params}, batch["input_ids"], positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
    assert float(jnp.abs(logits).max()) <= 2.0
    want = np.asarray(token_logps(logits, batch["targets"]))
    got = np.asarray(make_logp_fn(cfg, None, (), chunk)({"params": params}, batch)[0])
    np.testing.assert_allclose(got[mask.astype(bool)], want[mask.astype(bool)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-14b", "gemma3-4b", "gemma3-12b", "olmo2-7b", "olmo3-7b",
                                  "smollm3-3b", "llama3-8b", "mistral-7b", "qwen2-7b"])
def test_named_shapes_are_the_architecture_transformers_builds_from_their_config(name):
    """A named shape (what `compile --model-shape` compiles) exported as an HF config builds, in transformers
    (on the meta device: no memory), a model with exactly the parameter count of ours; the config round trip
    keeps every per-layer kind (windows, RoPE kinds incl. YaRN, NoPE)."""
    import jax
    import torch
    import transformers
    from paft_jax.hf.config import hf_config_class
    from paft_jax.models.decoder import init_params
    from paft_jax.models.shapes import named_shape
    cfg = named_shape(name)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))))
    d = hf_config_dict(cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config_class(d["model_type"]).from_dict(d))
    theirs = sum(p.numel() for p in model.parameters())
    print(f"{name}: {ours / 1e9:.3f}B parameters")
    assert ours == theirs
    assert model_config_from_hf(d).layer_kinds() == cfg.layer_kinds()
