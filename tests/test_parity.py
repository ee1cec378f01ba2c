"""The Flax decoder is numerically the transformers model, for every family and variant."""
import numpy as np
import pytest

from conftest import VARIANTS, padded_batch
from paft_jax.hf.load import load_model
from paft_jax.hf.verify import compare, flax_logits, hf_logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(hf_dir, variant):
    d = hf_dir(variant)
    lm = load_model(d, with_tokenizer=False)
    ids, mask = padded_batch(lm.cfg.vocab_size)
    report = compare(hf_logits(d, ids, mask), flax_logits(lm.params, lm.cfg, ids, mask), mask, 1e-5)
    assert report.max_abs_diff <= 1e-5, report
    assert report.tokens == int(mask.sum())


def test_variants_are_really_different(hf_dir):
    """Guards the parity tests: sliding window, llama3 and yarn rope scaling change the logits here."""
    ids, mask = padded_batch(128, length=20)
    sw = load_model(hf_dir("mistral_sliding"), with_tokenizer=False)
    full = flax_logits(sw.params, sw.cfg.replace(sliding_window=None), ids, mask)
    assert np.abs(flax_logits(sw.params, sw.cfg, ids, mask) - full).max() > 1e-3
    l3 = load_model(hf_dir("llama3_rope"), with_tokenizer=False)
    assert l3.cfg.rope_scaling_dict["rope_type"] == "llama3"
    plain = flax_logits(l3.params, l3.cfg.replace(rope_scaling=None, rope_theta=500000.0), ids, mask)
    assert np.abs(flax_logits(l3.params, l3.cfg, ids, mask) - plain).max() > 1e-4
    q = load_model(hf_dir("qwen2"), with_tokenizer=False)
    assert q.cfg.attention_bias and "bias" in q.params["layers"]["self_attn"]["q_proj"]
    for variant in ("qwen3_yarn", "olmo3_yarn"):  # YaRN's ramp and attention factor (OLMo 3: full layers only)
        y = load_model(hf_dir(variant), with_tokenizer=False)
        assert y.cfg.rope_scaling_dict["rope_type"] == "yarn"
        plain = flax_logits(y.params, y.cfg.replace(rope_scaling=None), ids, mask)
        assert np.abs(flax_logits(y.params, y.cfg, ids, mask) - plain).max() > 1e-2, variant


@pytest.mark.parametrize("variant", ["qwen2_mixed", "qwen3", "gemma3", "olmo3", "smollm3"])
def test_layer_kinds_are_really_used(hf_dir, variant):
    """Guards the parity tests of the mixed-layer families: the test rows are longer than the window, and
    treating every layer alike (no window, the global RoPE everywhere) changes the logits."""
    lm = load_model(hf_dir(variant), with_tokenizer=False)
    kinds = lm.cfg.layer_kinds()
    assert len(kinds.windows) > 1 or len(kinds.ropes) > 1, kinds
    assert min(w for w in kinds.windows if w) < 20
    ids, mask = padded_batch(lm.cfg.vocab_size, length=20)
    alike = lm.cfg.replace(layer_types=None, sliding_window=None, no_rope_layers=(), sliding_rope_theta=None,
                           sliding_rope_scaling=None)
    assert np.abs(flax_logits(lm.params, lm.cfg, ids, mask) - flax_logits(lm.params, alike, ids, mask)).max() > 1e-2


def test_bf16_checkpoint_parity(hf_dir):
    d = hf_dir("qwen2", dtype="bfloat16")
    lm = load_model(d, with_tokenizer=False)
    assert lm.cfg.param_dtype == "bfloat16"
    ids, mask = padded_batch(lm.cfg.vocab_size)
    report = compare(hf_logits(d, ids, mask), flax_logits(lm.params, lm.cfg, ids, mask), mask, 1e-4)
    assert report.max_abs_diff <= 1e-4, report
