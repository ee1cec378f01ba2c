"""The decoder's hyperparameters: one dataclass for every family.

The families differ in flags (q/k/v bias, q/k norms, activation, rope scaling, tied embeddings), in
where a block puts its norms (`BLOCKS`), and in per-layer properties: a layer attends globally or
through a sliding window, and uses the global RoPE, the sliding layers' own RoPE, or none (NoPE).
`layer_kinds()` reduces those to a few distinct kinds and a kind index per layer, so one scanned layer
stack serves every pattern.  Mapping to and from HF `config.json` lives in `paft_jax.hf.config`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from paft_jax.models import loops

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "olmo2", "olmo3", "smollm3")
# where a block's norms sit: "pre" norms each sub-block's input (Llama); "post" norms its output before the
# residual add (OLMo 2/3); "sandwich" does both (Gemma 3: four norms per layer)
BLOCKS = {"llama": "pre", "mistral": "pre", "qwen2": "pre", "qwen3": "pre", "smollm3": "pre",
          "olmo2": "post", "olmo3": "post", "gemma3": "sandwich"}
QK_NORMS = (None, "head", "projection")  # per head over head_dim (Qwen3, Gemma 3) | over all heads (OLMo)
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_KEYS = {"linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "naive", "chunked", "splash", "cudnn")

_DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16,
}


@dataclass(frozen=True)
class LayerKinds:
    """The distinct attention windows and RoPE settings of a model's layers and, per layer, the index of
    its own: the scanned layer stack takes the indices as scanned inputs and picks its mask and rotation."""
    windows: tuple[int | None, ...]
    ropes: tuple[tuple[float, tuple | None] | None, ...]  # (theta, scaling) or None for NoPE
    window_of: tuple[int, ...]
    rope_of: tuple[int, ...]

    @property
    def uniform(self) -> bool:
        return len(self.windows) == 1 and len(self.ropes) == 1


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
    # attend to at most this many previous tokens (the query's own included): every layer when layer_types
    # is None (Mistral), else the "sliding_attention" layers
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES; None: all alike
    # RoPE of the sliding layers when it differs from the global one (Gemma 3: base 10k locally, 1M globally)
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: tuple[tuple[str, Any], ...] | None = None
    no_rope_layers: tuple[int, ...] = ()  # layers without RoPE (SmolLM3's NoPE layers)
    qk_norm: str | None = None  # one of QK_NORMS
    hidden_act: str = "silu"  # the gated MLP's activation, one of ACTIVATIONS
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (Gemma 3); None: head_dim
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 3's CausalLM)
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
        for name in ("layer_types", "no_rope_layers"):  # lists from YAML / JSON: frozen fields hold tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("rope_scaling", "sliding_rope_scaling"):  # a dict, or JSON's lists of pairs: sorted pairs
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, tuple(sorted(value.items())))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(tuple(kv) for kv in value))
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
        for name in ("rope_scaling", "sliding_rope_scaling"):
            rs = dict(getattr(self, name) or {})
            if rs and rs.get("rope_type", "default") not in ROPE_TYPES:
                errors.append(f"{name} type {rs.get('rope_type')!r} is not supported (supported: {ROPE_TYPES})")
            missing = [k for k in _ROPE_KEYS.get(rs.get("rope_type"), ()) if rs.get(k) is None]
            if missing:
                errors.append(f"{name} of type {rs['rope_type']!r} needs {missing}")
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
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                errors.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                errors.append(f"layer_types {bad} are not among {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                errors.append("layer_types has sliding_attention layers but sliding_window is None")
        bad_layers = [i for i in self.no_rope_layers if not 0 <= i < self.num_layers]
        if bad_layers:
            errors.append(f"no_rope_layers {bad_layers} are outside layers 0..{self.num_layers - 1}")
        if self.qk_norm not in QK_NORMS:
            errors.append(f"qk_norm={self.qk_norm!r} is not one of {QK_NORMS}")
        if self.hidden_act not in ACTIVATIONS:
            errors.append(f"hidden_act={self.hidden_act!r} is not one of {ACTIVATIONS}")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            errors.append(f"final_logit_softcapping must be positive, got {self.final_logit_softcapping}")
        if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar <= 0:
            errors.append(f"query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar}")
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
    def block(self) -> str:
        return BLOCKS[self.family]

    @property
    def norm_offset(self) -> float:
        """Gemma stores RMSNorm weights as w and scales by (1 + w)."""
        return 1.0 if self.family == "gemma3" else 0.0

    @property
    def norm_scale_in_fp32(self) -> bool:
        """Whether a norm multiplies by its weight before casting back to the compute dtype (Gemma, OLMo)
        rather than after (Llama-style)."""
        return self.family in ("gemma3", "olmo2", "olmo3")

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies the embeddings by sqrt(hidden_size)."""
        return self.hidden_size ** 0.5 if self.family == "gemma3" else None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.resolved_head_dim) ** -0.5

    def layer_window(self, i: int) -> int | None:
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    def layer_rope(self, i: int) -> tuple[float, tuple | None] | None:
        """(theta, scaling) of layer i's RoPE; None for a NoPE layer."""
        if i in self.no_rope_layers:
            return None
        if self.sliding_rope_theta is not None and self.layer_window(i) is not None:
            return (float(self.sliding_rope_theta), self.sliding_rope_scaling)
        return (float(self.rope_theta), self.rope_scaling)

    def layer_kinds(self) -> "LayerKinds":
        windows, ropes, w_of, r_of = [], [], [], []
        for i in range(self.num_layers):
            w, r = self.layer_window(i), self.layer_rope(i)
            if w not in windows:
                windows.append(w)
            if r not in ropes:
                ropes.append(r)
            w_of.append(windows.index(w))
            r_of.append(ropes.index(r))
        return LayerKinds(tuple(windows), tuple(ropes), tuple(w_of), tuple(r_of))

    @property
    def jnp_param_dtype(self):
        return to_dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return to_dtype(self.dtype)

    def replace(self, **kw) -> "ModelConfig":
        for name in ("rope_scaling", "sliding_rope_scaling"):
            if isinstance(kw.get(name), dict):
                kw[name] = tuple(sorted(kw[name].items()))
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        e, m, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        hd, h, kv = self.resolved_head_dim, self.num_heads, self.num_kv_heads
        attn = e * hd * (h + 2 * kv) + h * hd * e + (hd * (h + 2 * kv) if self.attention_bias else 0)
        attn += {None: 0, "head": 2 * hd, "projection": hd * (h + kv)}[self.qk_norm]
        per_layer = attn + 3 * e * m + {"pre": 2, "post": 2, "sandwich": 4}[self.block] * e
        return v * e * (1 if self.tie_word_embeddings else 2) + l * per_layer + e
