"""The decoder's hyperparameters: one dataclass for Llama, Mistral and Qwen2.

The families differ only in flags (q/k/v bias, sliding window, rope scaling, tied embeddings),
so one model class serves all three.  Mapping to and from HF `config.json` lives in `paft_jax.hf.config`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from paft_jax.models import loops

FAMILIES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "naive", "chunked", "splash", "cudnn")

_DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16,
}


def to_dtype(name: str | Any) -> Any:
    """'bf16' / 'bfloat16' / jnp.bfloat16 -> jnp dtype; unknown names are refused."""
    if not isinstance(name, str):
        return jnp.dtype(name).type
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(set(_DTYPES))}") from None


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}; None = plain RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k and v
    sliding_window: int | None = None  # Mistral / Qwen2: attend to at most this many previous tokens
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # numerics and memory
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay fp32
    remat: str = "none"
    # layers per trip of the layer scan (nn.scan unroll); auto: by platform (paft_jax.models.loops)
    scan_unroll: int | str = "auto"
    # paft_jax.models.attention: auto | naive (the reference) | chunked | splash (TPU) | cudnn (GPU)
    attention: str = "naive"
    attention_block: int = 512

    def __post_init__(self):
        errors = []
        if self.family not in FAMILIES:
            errors.append(f"family={self.family!r} is not one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads > 0 and self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            errors.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.num_heads > 0 and self.hidden_size % self.num_heads:
            errors.append(f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}; set head_dim")
        if self.resolved_head_dim % 2:
            errors.append(f"head_dim={self.resolved_head_dim} must be even for RoPE")
        rs = self.rope_scaling_dict
        if rs is not None and rs.get("rope_type", "default") not in ROPE_TYPES:
            errors.append(f"rope_scaling type {rs.get('rope_type')!r} is not supported (supported: {ROPE_TYPES})")
        if self.remat not in REMAT_POLICIES:
            errors.append(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        bad_unroll = loops.check("scan_unroll", self.scan_unroll, 1)
        if bad_unroll:
            errors.append(bad_unroll)
        if self.attention not in ATTENTION:
            errors.append(f"attention={self.attention!r} is not one of {ATTENTION}")
        if self.attention_block < 1:
            errors.append(f"attention_block must be >= 1, got {self.attention_block}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            errors.append(f"sliding_window must be positive or None, got {self.sliding_window}")
        for name in ("param_dtype", "dtype"):
            try:
                to_dtype(getattr(self, name))
            except ValueError as e:
                errors.append(f"{name}: {e}")
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // max(self.num_heads, 1)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def jnp_param_dtype(self):
        return to_dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return to_dtype(self.dtype)

    def replace(self, **kw) -> "ModelConfig":
        if isinstance(kw.get("rope_scaling"), dict):
            kw["rope_scaling"] = tuple(sorted(kw["rope_scaling"].items()))
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        e, m, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        hd, h, kv = self.resolved_head_dim, self.num_heads, self.num_kv_heads
        attn = e * hd * (h + 2 * kv) + h * hd * e + (hd * (h + 2 * kv) if self.attention_bias else 0)
        per_layer = attn + 3 * e * m + 2 * e
        return v * e * (1 if self.tie_word_embeddings else 2) + l * per_layer + e
