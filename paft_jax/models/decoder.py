"""One Flax decoder for the Llama, Mistral and Qwen2 families.

Numerics follow Hugging Face transformers (RMSNorm in fp32, RoPE with the rotate-half convention and
fp32 frequencies, softmax in fp32).  Every parameter and major activation carries logical axis names;
`paft_jax.mesh` maps them to mesh axes.  Layers are stacked with `nn.scan` (parameters with a
leading "layers" axis; how many layers one trip of the scan runs is chosen by platform in
`paft_jax.models.loops`).

Attention is masked by segment ids (0 = padding) and slot order, so packed sequences never attend
across segments, and the same code serves training (no cache) and generation (a KV cache).  The
implementation (the naive reference, query blocks, splash on TPU, cuDNN on GPU) is `cfg.attention`,
resolved per platform in `paft_jax.models.attention`.
"""
from __future__ import annotations

import math

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from paft_jax.losses import softcap
from paft_jax.mesh import fit_spec, logical_to_spec
from paft_jax.models import attention, loops
from paft_jax.models.config import ModelConfig

Array = jax.Array


def rope_inv_freq(head_dim: int, theta: float | None, scaling: tuple | dict | None = None) -> np.ndarray:
    """Inverse RoPE frequencies in fp32, computed the way transformers computes them; theta None (a NoPE
    layer): zeros, so the rotation is the identity (x * 1 + rotated * 0 == x exactly)."""
    dim = head_dim
    if theta is None:
        return np.zeros(dim // 2, np.float32)
    inv = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))
    rs = dict(scaling or {})
    kind = rs.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(rs["factor"])
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = (2 * np.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > lo_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv = _yarn_inv_freq(dim, float(theta), rs)
    return inv.astype(np.float32)


def _yarn_inv_freq(dim: int, base: float, rs: dict) -> np.ndarray:
    """YaRN (arXiv 2309.00071): per frequency, a ramp between the original (extrapolated) frequency and the one
    interpolated by `factor`, over the dimensions between beta_fast and beta_slow rotations in the original
    context; transformers' computation, in fp32."""
    factor, old = float(rs["factor"]), float(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (np.float32(1) - ramp).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    return ((np.float32(1) / (np.float32(factor) * pos_freqs)) * (np.float32(1) - extrapolation)
            + (np.float32(1) / pos_freqs) * extrapolation).astype(np.float32)


def rope_attention_scale(scaling: tuple | dict | None) -> float:
    """The factor YaRN applies to cos and sin (its `attention_factor`, by default 0.1 ln(factor) + 1); 1 for
    every other RoPE."""
    rs = dict(scaling or {})
    if rs.get("rope_type") != "yarn":
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor = float(rs["factor"])
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rope_cos_sin(positions: Array, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[Array, Array]:
    """cos / sin [B, T, D] of the rotation at `positions` (all-zero frequencies: the identity, NoPE), times
    `scale` (YaRN's attention factor)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if scale == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * jnp.float32(scale), jnp.sin(emb) * jnp.float32(scale)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, N, D]; cos/sin: [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def segment_positions(segment_ids: Array) -> Array:
    """Position of each token inside its segment (packed rows restart at 0 for each segment)."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class _Sharder:
    """Applies logical-axis sharding constraints to activations when a mesh is given."""

    def __init__(self, mesh: Mesh | None, rules: tuple):
        self.mesh, self.rules = mesh, rules

    def spec(self, names: tuple, shape: tuple):
        return fit_spec(logical_to_spec(names, self.rules), shape, self.mesh)

    def __call__(self, x: Array, names: tuple) -> Array:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(names, x.shape)))

    @property
    def platform(self) -> str:
        return loops.platform_of(self.mesh)


def _with_delta(module: nn.Module, name: str, w: Array) -> Array:
    """A parameter plus its trained delta (the "delta" collection, same path and shape) when one is given:
    added here, one layer at a time inside the scan, in fp32 (the delta's dtype) so small updates to a
    bf16 weight survive; the caller casts the sum to the compute dtype."""
    if module.has_variable("delta", name):
        return w.astype(jnp.float32) + module.get_variable("delta", name)
    return w


class Linear(nn.Module):
    """y = x W (+ b) over the last `n_in` axes of x, W of shape [*in, *features].

    Reads the frozen weight from "params" and, when given, its dense delta ("delta" collection: W + dW) or
    its LoRA factors ("lora" collection: lora_a [*in, r], lora_b [r, *features], the scale folded into
    lora_b): then y = x W + (x A) B, never the dense product A B."""
    features: tuple[int, ...]
    n_in: int
    names: tuple
    cfg: ModelConfig
    use_bias: bool = False
    bias_names: tuple | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.names),
                            tuple(x.shape[x.ndim - self.n_in:]) + tuple(self.features), cfg.jnp_param_dtype)
        xs = tuple(range(x.ndim - self.n_in, x.ndim))
        x = x.astype(dt)
        y = jax.lax.dot_general(x, _with_delta(self, "kernel", kernel).astype(dt), ((xs, tuple(range(self.n_in))),
                                                                                 ((), ())))
        if self.has_variable("lora", "lora_a"):
            a, b = self.get_variable("lora", "lora_a"), self.get_variable("lora", "lora_b")
            xa = jax.lax.dot_general(x, a.astype(dt), ((xs, tuple(range(self.n_in))), ((), ())))
            y = y + jax.lax.dot_general(xa, b.astype(dt), (((xa.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.bias_names or self.names[-1:]),
                              tuple(self.features), cfg.jnp_param_dtype)
            y = y + _with_delta(self, "bias", bias).astype(dt)
        return y


def _dense(features, axis, names, cfg: ModelConfig, name: str, use_bias=False, bias_names=None):
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    n_in = len(axis) if isinstance(axis, (tuple, list)) else 1
    return Linear(features, n_in, names, cfg, use_bias, bias_names, name=name)


class RMSNorm(nn.Module):
    """RMSNorm over the last `len(names)` axes, statistics in fp32.  Llama-style norms cast back to the
    compute dtype and then scale by the weight; Gemma and OLMo scale in fp32 first, and Gemma's weight is
    an offset from one (zeros at init, scale 1 + w)."""
    cfg: ModelConfig
    names: tuple = ("norm",)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, axes = self.cfg, tuple(range(-len(self.names), 0))
        init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
        w = self.param("weight", nn.with_logical_partitioning(init, self.names), x.shape[x.ndim - len(self.names):],
                       cfg.jnp_param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axes, keepdims=True) + cfg.rms_norm_eps)
        dt, w = cfg.jnp_dtype, _with_delta(self, "weight", w)
        if cfg.norm_scale_in_fp32:
            return (y * (w.astype(jnp.float32) + cfg.norm_offset)).astype(dt)
        return w.astype(dt) * y.astype(dt)


class Embed(nn.Module):
    """The token embedding (its table plus a dense delta when given); `attend` is the tied output head."""
    cfg: ModelConfig

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                              ("vocab", "embed")),
                                    (self.cfg.vocab_size, self.cfg.hidden_size), self.cfg.jnp_param_dtype)

    def table(self) -> Array:
        return _with_delta(self, "embedding", self.embedding).astype(self.cfg.jnp_dtype)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.table(), ids, axis=0)

    def attend(self, x: Array) -> Array:
        return jnp.dot(x.astype(self.cfg.jnp_dtype), self.table().T)


def _implementation(cfg: ModelConfig, sh: _Sharder, seq_len: int, decoding: bool) -> str:
    return attention.resolve(cfg.attention, sh.platform, seq_len=seq_len, dtype=cfg.jnp_dtype, decoding=decoding)


def _pick(table: Array, index: Array) -> Array:
    """This layer's entry of a per-kind table (a table of one kind needs no gather)."""
    return table[0] if table.shape[0] == 1 else table[index]


class Attention(nn.Module):
    cfg: ModelConfig
    shard: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, attn, kind, layer_cache, cache_index):
        """cos / sin: [R, B, T, D] per RoPE kind; attn: (masks [W, B, T, S] per window kind or None, segment
        ids); kind: this layer's {"window", "rope"} indices into them."""
        cfg, sh = self.cfg, self.shard
        n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        bias = cfg.attention_bias
        q = _dense((n, d), -1, ("embed", "heads", "head_dim"), cfg, "q_proj", bias, ("heads", "head_dim"))(x)
        kk = _dense((k, d), -1, ("embed", "kv_heads", "head_dim"), cfg, "k_proj", bias, ("kv_heads", "head_dim"))(x)
        v = _dense((k, d), -1, ("embed", "kv_heads", "head_dim"), cfg, "v_proj", bias, ("kv_heads", "head_dim"))(x)
        if cfg.qk_norm == "head":
            q = RMSNorm(cfg, ("norm",), name="q_norm")(q)
            kk = RMSNorm(cfg, ("norm",), name="k_norm")(kk)
        elif cfg.qk_norm == "projection":
            q = RMSNorm(cfg, ("heads", "head_dim"), name="q_norm")(q)
            kk = RMSNorm(cfg, ("kv_heads", "head_dim"), name="k_norm")(kk)
        cos, sin = _pick(cos, kind["rope"]), _pick(sin, kind["rope"])
        q = sh(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", "head_dim"))
        kk = sh(apply_rope(kk, cos, sin), ("act_batch", "act_length", "act_kv_heads", "head_dim"))
        v = sh(v, ("act_batch", "act_length", "act_kv_heads", "head_dim"))
        new_cache = None
        if layer_cache is not None:
            kc = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], kk.astype(layer_cache["k"].dtype), cache_index, 1)
            vc = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), cache_index, 1)
            new_cache = {"k": kc, "v": vc}
            kk, v = kc.astype(q.dtype), vc.astype(q.dtype)
        masks, seg = attn
        windows, scale = cfg.layer_kinds().windows, cfg.attention_scale
        impl = _implementation(cfg, sh, q.shape[1], layer_cache is not None)
        if impl in ("splash", "cudnn"):
            if impl == "splash":
                batch_axes = head_axes = None
                if sh.mesh is not None:  # per device over batch and heads (when q and kv heads split alike)
                    qs = sh.spec(("act_batch", "act_length", "act_heads", "head_dim"), q.shape)
                    ks = sh.spec(("act_batch", "act_length", "act_kv_heads", "head_dim"), kk.shape)
                    batch_axes, head_axes = qs[0], (qs[2] if qs[2] == ks[2] else None)

                def kernel(window, q, kk, v, seg):
                    return attention.splash(q, kk, v, seg, window=window, scale=scale, block=cfg.attention_block,
                                            interpret=sh.platform == "cpu", mesh=sh.mesh, batch_axes=batch_axes,
                                            head_axes=head_axes)
            else:
                def kernel(window, q, kk, v, seg):
                    return attention.cudnn(q, kk, v, seg, window=window, scale=scale)
            # a kernel's mask is static: one branch per window kind, the layer's kind picks one
            branches = [lambda *a, w=w: kernel(w, *a) for w in windows]
            out = branches[0](q, kk, v, seg) if len(branches) == 1 else jax.lax.switch(kind["window"], branches,
                                                                                      q, kk, v, seg)
        else:
            out = attention.naive(q, kk, v, _pick(masks, kind["window"]), cfg.attention_block if impl == "chunked"
                                  else None, scale=scale)
        out = sh(out, ("act_batch", "act_length", "act_heads", "head_dim"))
        out = _dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"), cfg, "o_proj")(out)
        return out, new_cache


_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nn.Module):
    cfg: ModelConfig
    shard: Any = None

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, -1, ("embed", "mlp"), cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, -1, ("embed", "mlp"), cfg, "up_proj")(x)
        h = self.shard(_ACTIVATIONS[cfg.hidden_act](gate) * up, ("act_batch", "act_length", "act_mlp"))
        return _dense(cfg.hidden_size, -1, ("mlp", "embed"), cfg, "down_proj")(h)


class DecoderLayer(nn.Module):
    """One block; where its norms sit is the family's `cfg.block` (module names are transformers')."""
    cfg: ModelConfig
    shard: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, attn, kind, layer_cache, cache_index):
        cfg = self.cfg

        def norm(name):
            return RMSNorm(cfg, name=name)

        def attend(h):
            return Attention(cfg, self.shard, name="self_attn")(h, cos, sin, attn, kind, layer_cache, cache_index)

        mlp = MLP(cfg, self.shard, name="mlp")
        if cfg.block == "pre":
            h, new_cache = attend(norm("input_layernorm")(x))
            x = x + h
            x = x + mlp(norm("post_attention_layernorm")(x))
        elif cfg.block == "post":
            h, new_cache = attend(x)
            x = x + norm("post_attention_layernorm")(h)
            x = x + norm("post_feedforward_layernorm")(mlp(x))
        else:  # sandwich
            h, new_cache = attend(norm("input_layernorm")(x))
            x = x + norm("post_attention_layernorm")(h)
            x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x)))
        x = self.shard(x, ("act_batch", "act_length", "act_embed"))
        return x, new_cache


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nn.Module):
    """input ids [B, T] -> fp32 logits [B, T, V] (or final hidden states), plus the updated KV cache.

    Variables: "params" (the weights, as stored); optionally "delta" (a dense delta with the params' paths,
    added layer by layer) or "lora" (LoRA factors of some kernels), so a trained branch never needs a
    merged copy of the model.

    segment_ids: [B, T] ints, 0 = padding; tokens attend only within their own segment.  Defaults to ones.
    positions:   [B, T] RoPE positions; defaults to the position inside each segment (+ cache_index).
    cache:       {"layers": {"k", "v": [L, B, S, K, D]}, "seg": [B, S]} from `init_cache`; the new tokens
                 are written at slot `cache_index`.
    """
    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: tuple = ()

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, cache=None, cache_index=0, return_hidden=False):
        cfg = self.cfg
        sh = _Sharder(self.mesh, self.rules)
        b, t = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids) + cache_index
        q_slot = jnp.broadcast_to(jnp.arange(t) + cache_index, (b, t))
        if cache is None:
            kv_seg, kv_slot, layer_caches = segment_ids, q_slot, None
        else:
            kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids.astype(cache["seg"].dtype),
                                                         cache_index, 1)
            kv_slot = jnp.broadcast_to(jnp.arange(kv_seg.shape[1]), kv_seg.shape)
            layer_caches = cache["layers"]
        kinds = cfg.layer_kinds()
        kernel = _implementation(cfg, sh, t, cache is not None) in ("splash", "cudnn")
        masks = None if kernel else jnp.stack([attention.mask(segment_ids, kv_seg, q_slot, kv_slot, w)
                                               for w in kinds.windows])
        tables = [rope_cos_sin(positions, rope_inv_freq(cfg.resolved_head_dim, *(r or (None, None))),
                               rope_attention_scale(r[1] if r else None)) for r in kinds.ropes]
        cos, sin = jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])
        layer_kind = {"window": jnp.asarray(kinds.window_of, jnp.int32), "rope": jnp.asarray(kinds.rope_of, jnp.int32)}

        embed = Embed(cfg, name="embed_tokens")
        x = embed(input_ids.astype(jnp.int32))
        if cfg.embed_scale is not None:  # Gemma: the scale rounded to the weights' dtype, as transformers does
            x = x * jnp.asarray(cfg.embed_scale, cfg.jnp_param_dtype).astype(x.dtype)
        x = sh(x, ("act_batch", "act_length", "act_embed"))

        layer = DecoderLayer
        unroll = loops.layer_unroll(cfg.scan_unroll, cfg.num_layers, self.mesh, remat=cfg.remat != "none")
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=_REMAT[cfg.remat], prevent_cse=unroll > 1)
        # the delta / LoRA collections are stacked like the params: each layer of the scan sees its own slice
        stack = nn.scan(layer, variable_axes={"params": 0, "delta": 0, "lora": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                        length=cfg.num_layers, unroll=unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, new_layer_caches = stack(cfg, sh, name="layers")(x, cos, sin, (masks, segment_ids), layer_kind,
                                                             layer_caches, cache_index)
        x = RMSNorm(cfg, name="norm")(x)
        new_cache = None if cache is None else {"layers": new_layer_caches, "seg": kv_seg}
        if return_hidden:
            return x, new_cache
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg.vocab_size, -1, ("embed", "vocab"), cfg, "lm_head")(x)
        logits = sh(softcap(logits.astype(jnp.float32), cfg.final_logit_softcapping),
                    ("act_batch", "act_length", "act_vocab"))
        return logits, new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    dtype = dtype or cfg.jnp_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
    return {"layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
            "seg": jnp.zeros((batch, max_len), jnp.int32)}


def _init(cfg: ModelConfig, rng: Array) -> dict:
    # the parameters do not depend on the attention implementation; a 1-token row suits only the naive one
    return Decoder(cfg.replace(attention="naive")).init(rng, jnp.zeros((1, 1), jnp.int32))


def abstract_params(cfg: ModelConfig) -> tuple[Any, Any]:
    """(shape/dtype tree, logical-axis-names tree) of the parameters, without allocating anything."""
    boxed = jax.eval_shape(lambda: _init(cfg, jax.random.key(0)))["params"]
    axes = nn.get_partition_spec(boxed)
    axes = jax.tree_util.tree_map(lambda s: tuple(s), axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    shapes = nn.meta.unbox(boxed)
    return shapes, axes


def init_params(cfg: ModelConfig, rng: Array, mesh: Mesh | None = None, rules: tuple = ()) -> Any:
    """Random parameters (tests, from-scratch runs), created directly in their shardings."""
    from paft_jax.mesh import tree_shardings

    def init():
        return nn.meta.unbox(_init(cfg, rng)["params"])

    if mesh is None:
        return jax.jit(init)()
    shapes, axes = abstract_params(cfg)
    return jax.jit(init, out_shardings=tree_shardings(axes, shapes, mesh, rules))()
