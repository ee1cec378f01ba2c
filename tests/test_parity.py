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
    report = compare(hf_logits(d, ids, mask), flax_logits(lm.params, lm.cfg, ids, mask), mask, 1e-4)
    assert report.max_abs_diff <= 1e-4, report
    assert report.tokens == int(mask.sum())


def test_variants_are_really_different(hf_dir):
    """Guards the parity tests: sliding window and llama3 rope scaling change the logits here."""
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


def test_bf16_checkpoint_parity(hf_dir):
    d = hf_dir("qwen2", dtype="bfloat16")
    lm = load_model(d, with_tokenizer=False)
    assert lm.cfg.param_dtype == "bfloat16"
    ids, mask = padded_batch(lm.cfg.vocab_size)
    report = compare(hf_logits(d, ids, mask), flax_logits(lm.params, lm.cfg, ids, mask), mask, 1e-4)
    assert report.max_abs_diff <= 1e-4, report
