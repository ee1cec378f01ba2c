"""The delta applied inside each layer (dense: W + dW, LoRA: x A B) equals the model run on merged weights
(base + the materialized delta, the naive path), forward and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import init_params
from paft_jax.train.delta import DeltaConfig, delta_abstract, materialize
from paft_jax.train.step_fn import make_logp_fn, model_variables

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


def random_delta(cfg, dcfg, seed=1):
    shapes, _ = delta_abstract(cfg, dcfg)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.02 * jax.random.normal(k, s.shape, s.dtype)
                                               for k, s in zip(keys, leaves)])


def batch(cfg, b=2, t=12):
    rng = np.random.default_rng(0)
    seg = np.ones((b, t), np.int32)
    seg[1, 7:] = 2  # two packed segments in row 1
    seg[0, 10:] = 0  # padding
    pos = np.concatenate([np.arange(t)[None], np.concatenate([np.arange(7), np.arange(t - 7)])[None]])
    return {"input_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos, jnp.int32)}


@pytest.mark.parametrize("kind, dtype, param_dtype, tie", [
    ("dense", "float32", "float32", True), ("dense", "bfloat16", "bfloat16", False), ("lora", "float32", "float32", True)])
def test_in_layer_delta_equals_merged_weights(kind, dtype, param_dtype, tie):
    cfg = CFG.replace(dtype=dtype, param_dtype=param_dtype, tie_word_embeddings=tie)
    dcfg = DeltaConfig(kind=kind, lora_rank=4, lora_alpha=8.0)
    base = init_params(cfg, jax.random.key(0))
    delta = random_delta(cfg, dcfg)
    b = batch(cfg)
    logp = make_logp_fn(cfg, None, (), chunk=0)

    def in_layer(d):
        return logp(model_variables(base, d, dcfg), b)[0]

    def merged(d):  # the naive path: a full fp32 merged copy of the model
        params = jax.tree_util.tree_map(lambda w, x: w.astype(jnp.float32) + x, base, materialize(d, dcfg, base))
        return logp({"params": params}, b)[0]

    got, want = jax.jit(in_layer)(delta), jax.jit(merged)(delta)
    # dense: the same fp32 sum cast to the compute dtype, so equal to rounding; LoRA: x(AB) vs (xA)B
    tol = {("dense", "float32"): 1e-6, ("dense", "bfloat16"): 2e-2, ("lora", "float32"): 1e-5,
           ("lora", "bfloat16"): 1e-1}[(kind, dtype)]
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0, atol=tol)
    g_in = jax.jit(jax.grad(lambda d: in_layer(d).sum()))(delta)
    g_mg = jax.jit(jax.grad(lambda d: merged(d).sum()))(delta)
    for path, a in jax.tree_util.tree_flatten_with_path(g_in)[0]:
        m = dict(jax.tree_util.tree_flatten_with_path(g_mg)[0])[path]
        scale = float(jnp.max(jnp.abs(m))) + 1e-12
        assert float(jnp.max(jnp.abs(a - m))) / scale < (1e-5 if dtype == "float32" else 5e-2), path


def test_no_delta_reads_the_base_as_stored():
    """The DPO reference: the base's variables as they are (no fp32 copy) give the policy's values at delta 0."""
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    dcfg = DeltaConfig(kind="dense")
    base = init_params(cfg, jax.random.key(0))
    zero = jax.tree_util.tree_map(jnp.zeros_like, random_delta(cfg, dcfg))
    logp = make_logp_fn(cfg, None, (), chunk=16)
    b = batch(cfg)
    np.testing.assert_array_equal(np.asarray(logp(model_variables(base), b)[0]),
                                  np.asarray(logp(model_variables(base, zero, dcfg), b)[0]))


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_attention_equals_naive(window):
    """Query blocks (recomputed in the backward pass) against the naive scores: packed segments, padding,
    GQA, a sliding window; forward and gradient, fp32."""
    cfg = CFG.replace(sliding_window=window)
    base = init_params(cfg, jax.random.key(0))
    b = batch(cfg)
    outs = {}
    for impl, block in (("naive", 512), ("chunked", 4), ("chunked", 5)):  # 5: the largest divisor of 12 is 4
        logp = make_logp_fn(cfg.replace(attention=impl, attention_block=block), None, (), chunk=0)
        f = jax.jit(lambda p: logp({"params": p}, b)[0])
        outs[(impl, block)] = (f(base), jax.jit(jax.grad(lambda p: f(p).sum()))(base))
    ref_lp, ref_g = outs[("naive", 512)]
    for key in (("chunked", 4), ("chunked", 5)):
        lp, g = outs[key]
        np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), rtol=1e-5, atol=1e-5)
        for a, r in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)
