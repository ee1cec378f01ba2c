"""Attention kernels against the naive einsum: splash (Pallas interpret mode on CPU) and the cuDNN call's
plumbing (jax.nn.dot_product_attention with implementation="xla"; cuDNN itself needs an NVIDIA GPU), on packed
rows with several segments, padding, a sliding window and GQA, forward and gradients; the model with splash
on a mesh of 8 simulated devices; the platform choice and its refusals; splash compiled for a TPU topology."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paft_jax.config import DEFAULT_LOGICAL_RULES, MeshConfig
from paft_jax.mesh import build_mesh
from paft_jax.models import attention
from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import init_params
from paft_jax.train.step_fn import make_logp_fn

B, T, N, K, D = 2, 256, 4, 2, 32


def _segments():
    seg = np.ones((B, T), np.int32)
    seg[0, 90:] = 2
    seg[0, 170:] = 3
    seg[0, 230:] = 0  # padding
    seg[1, 140:] = 2
    return jnp.asarray(seg)


def _qkv(dtype):
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=s), dtype) for s in ((B, T, N, D), (B, T, K, D), (B, T, K, D)))
    return q, k, v


def _reference(q, k, v, seg, window):
    slot = jnp.broadcast_to(jnp.arange(T), (B, T))
    return attention.naive(q, k, v, attention.mask(seg, seg, slot, slot, window))


def _kernel(impl, window):
    if impl == "splash":
        return lambda q, k, v, seg: attention.splash(q, k, v, seg, window=window, block=128, interpret=True)
    return lambda q, k, v, seg: attention.cudnn(q, k, v, seg, window=window, implementation="xla")


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
@pytest.mark.parametrize("window", [None, 48])
def test_kernel_matches_naive_fp32(impl, window):
    """Outputs and gradients at every real (non-padding) query, rtol 1e-5 against the largest value."""
    q, k, v = _qkv(jnp.float32)
    seg = _segments()
    real = (seg != 0)[:, :, None, None].astype(jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, D)), jnp.float32) * real
    kernel = _kernel(impl, window)
    outs = []
    for f in (lambda q, k, v: _reference(q, k, v, seg, window), lambda q, k, v: kernel(q, k, v, seg)):
        loss = jax.jit(lambda q, k, v, f=f: (f(q, k, v) * w).sum())
        outs.append((jax.jit(f)(q, k, v) * real, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
    (ref, ref_g), (out, g) = outs
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))
    for name, a, r in zip("qkv", g, ref_g):
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=0, atol=1e-5 * scale, err_msg=f"d{name}")


def test_splash_bf16_within_tolerance():
    """bf16 inputs (fp32 accumulation inside the kernel) against the fp32 reference: within 2% of the
    largest output, as bf16's 8-bit mantissa allows after a softmax-weighted sum."""
    q, k, v = _qkv(jnp.float32)
    seg = _segments()
    real = (seg != 0)[:, :, None, None]
    ref = _reference(q, k, v, seg, None)
    out = _kernel("splash", None)(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
    assert out.dtype == jnp.bfloat16
    err = jnp.abs(jnp.where(real, out.astype(jnp.float32) - ref, 0)).max()
    assert float(err) < 0.02 * float(jnp.abs(ref).max())


CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  sliding_window=100)


def _batch():
    r = np.random.default_rng(0)
    seg = np.asarray(_segments())
    pos = np.zeros_like(seg)
    for b in range(B):
        for s in np.unique(seg[b]):
            idx = np.nonzero(seg[b] == s)[0]
            pos[b, idx] = np.arange(len(idx))
    return {"input_ids": jnp.asarray(r.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "targets": jnp.asarray(r.integers(0, CFG.vocab_size, (B, T)), jnp.int32),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos, jnp.int32)}


# Gemma 3-like layer kinds: sliding layers (window 48, their own RoPE base) between global ones (linear RoPE)
MIXED = CFG.replace(family="gemma3", num_layers=4, sliding_window=48, qk_norm="head", hidden_act="gelu_tanh",
                    layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
                    rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 2.0}, sliding_rope_theta=1e4,
                    query_pre_attn_scalar=24.0)


@pytest.mark.parametrize("cfg,impls", [(CFG, ("splash",)), (MIXED, ("splash", "chunked"))], ids=["uniform", "mixed"])
def test_model_with_splash_on_a_mesh_equals_naive(cfg, impls):
    """The decoder with attention=splash (per device under shard_map: batch over data, heads over tensor) on
    8 simulated devices against the naive decoder on one: token log-probs and parameter gradients.  With
    mixed layer kinds, each layer's splash kernel has its own mask (one lax.switch branch per window), and
    the chunked path matches too."""
    base = init_params(cfg, jax.random.key(0))
    b = _batch()
    real = np.asarray(b["segment_ids"]) != 0
    mesh = build_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    results = {}
    for impl in ("naive",) + impls:
        m = mesh if impl == "splash" else None
        logp = make_logp_fn(cfg.replace(attention=impl, attention_block=128 if impl == "splash" else 64), m,
                            DEFAULT_LOGICAL_RULES if m else (), chunk=0)
        f = jax.jit(lambda p, logp=logp: (logp({"params": p}, b)[0] * real).sum())
        lp = jax.jit(lambda p, logp=logp: logp({"params": p}, b)[0])(base)
        results[impl] = (np.asarray(lp)[real], jax.grad(f)(base))
    for impl in impls:
        np.testing.assert_allclose(results[impl][0], results["naive"][0], rtol=1e-5, atol=1e-5)
        for a, r in zip(jax.tree_util.tree_leaves(results[impl][1]), jax.tree_util.tree_leaves(results["naive"][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))
    if cfg is MIXED:  # the kinds matter at this length: all layers global gives other log-probs
        alike = make_logp_fn(cfg.replace(layer_types=None, sliding_window=None, sliding_rope_theta=None), None, (),
                             chunk=0)
        lp = np.asarray(jax.jit(lambda p: alike({"params": p}, b)[0])(base))[real]
        assert np.abs(lp - results["naive"][0]).max() > 1e-3


def test_resolve_picks_by_platform_and_refuses_what_a_kernel_cannot_do():
    r = attention.resolve
    assert r("auto", "tpu", seq_len=4096, dtype=jnp.bfloat16, decoding=False) == "splash"
    assert r("auto", "tpu", seq_len=100, dtype=jnp.bfloat16, decoding=False) == "naive"
    assert r("auto", "gpu", seq_len=100, dtype=jnp.bfloat16, decoding=False) == "cudnn"
    assert r("auto", "gpu", seq_len=100, dtype=jnp.float32, decoding=False) == "naive"
    assert r("auto", "cpu", seq_len=4096, dtype=jnp.bfloat16, decoding=False) == "naive"
    assert r("splash", "tpu", seq_len=4096, dtype=jnp.bfloat16, decoding=True) == "naive"  # the KV-cache path
    with pytest.raises(ValueError, match="splash needs rows of a multiple of 128 tokens, got 100"):
        r("splash", "tpu", seq_len=100, dtype=jnp.bfloat16, decoding=False)
    with pytest.raises(ValueError, match="splash is a TPU kernel; on GPU use attention=cudnn"):
        r("splash", "gpu", seq_len=128, dtype=jnp.bfloat16, decoding=False)
    with pytest.raises(ValueError, match="cudnn is cuDNN flash attention .* this runs on tpu"):
        r("cudnn", "tpu", seq_len=128, dtype=jnp.bfloat16, decoding=False)
    with pytest.raises(ValueError, match="cudnn computes in bf16 or fp16, not float32"):
        r("cudnn", "gpu", seq_len=128, dtype=jnp.float32, decoding=False)


def test_generation_with_splash_uses_the_cache_path():
    """attention=splash still generates: the KV-cache steps run the masked einsum."""
    from paft_jax.models.decoder import Decoder, init_cache
    cfg = CFG.replace(attention="splash", attention_block=128)
    base = init_params(cfg, jax.random.key(0))
    ids = jnp.ones((1, 3), jnp.int32)
    cache = init_cache(cfg, 1, 8)
    logits, _ = Decoder(cfg).apply({"params": base}, ids, cache=cache, cache_index=0)
    ref, _ = Decoder(CFG).apply({"params": base}, ids, cache=cache, cache_index=0)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))
