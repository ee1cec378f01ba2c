"""HF `config.json` <-> ModelConfig, with loud refusals for settings the decoder does not implement."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paft_jax.models.config import FAMILIES, ModelConfig, dtype_name


def _hf_config_class(model_type: str):
    import transformers
    return transformers.CONFIG_MAPPING[model_type]


def read_config_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; an HF model directory needs config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def model_config_from_hf(data: dict, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """Map an HF config dict (transformers v4 or v5 layout) to ModelConfig.

    The dict is normalized by transformers' own config class (never by code shipped with a model),
    which reconciles `rope_theta`/`rope_scaling` (v4) and `rope_parameters` (v5).
    """
    mt = data.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"{where}: model_type={mt!r} is not supported; paft_jax implements {list(FAMILIES)}")
    try:
        hf = _hf_config_class(mt).from_dict(dict(data))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise ValueError(f"{where}: transformers could not parse this {mt} config: {e}") from e

    def refuse(msg):
        raise ValueError(f"{where}: {msg}")

    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        refuse(f"hidden_act={act!r}; only SwiGLU with silu is implemented")
    if getattr(hf, "mlp_bias", False):
        refuse("mlp_bias=true is not implemented")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_theta = float(rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    elif rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": rope["factor"]}
    elif rope_type != "default":
        refuse(f"rope type {rope_type!r} is not implemented (supported: default, linear, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor != 1 is not implemented")

    sliding = None
    if mt == "mistral":
        sliding = getattr(hf, "sliding_window", None)
    elif mt == "qwen2":
        kinds = set(getattr(hf, "layer_types", None) or ["full_attention"])
        if kinds == {"sliding_attention"}:
            sliding = hf.sliding_window
        elif len(kinds) > 1:
            refuse("Qwen2 with sliding window on only some layers (max_window_layers) is not implemented")
    head_dim = getattr(hf, "head_dim", None)
    eos = hf.eos_token_id
    kw = dict(
        family=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim if head_dim and head_dim != hf.hidden_size // hf.num_attention_heads else None,
        rms_norm_eps=float(hf.rms_norm_eps), rope_theta=rope_theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=True if mt == "qwen2" else bool(getattr(hf, "attention_bias", False)),
        sliding_window=sliding, bos_token_id=hf.bos_token_id,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=hf.pad_token_id,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_config_dict(cfg: ModelConfig, source: dict | None = None, dtype: str | None = None) -> dict:
    """The config.json for an export: the source's keys kept, the architecture fields from `cfg`."""
    mt = cfg.family
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(cfg.rope_scaling_dict)
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu", bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if mt == "llama":
        kw.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    elif mt == "mistral":
        if cfg.attention_bias:
            raise ValueError("Mistral export cannot carry q/k/v biases; use family=qwen2 or llama")
        kw.update(sliding_window=cfg.sliding_window)
    elif mt == "qwen2":
        if not cfg.attention_bias:
            raise ValueError("Qwen2 always has q/k/v biases; this model has none")
        kw.update(use_sliding_window=cfg.sliding_window is not None,
                  sliding_window=cfg.sliding_window or 4096, max_window_layers=0 if cfg.sliding_window else cfg.num_layers)
    src = {k: v for k, v in (source or {}).items() if not k.startswith("_")}
    # keys that our fields replace or that describe a different file layout
    for k in ("rope_theta", "rope_scaling", "rope_parameters", "layer_types", "torch_dtype", "dtype",
              "quantization_config", "auto_map", "transformers_version", "architectures", "model_type"):
        src.pop(k, None)
    src.update(kw)
    hf = _hf_config_class(mt)(**src)
    hf.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}[mt]]
    hf.dtype = dtype or dtype_name(cfg.jnp_param_dtype)
    out = hf.to_dict()
    out.pop("_name_or_path", None)
    return out
