"""HF `config.json` <-> ModelConfig, with loud refusals for settings the decoder does not implement."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paft_jax.models.config import ModelConfig, dtype_name


def hf_config_class(model_type: str):
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


# family -> the model_type and CausalLM class of its export (Gemma 3 leaves as its text model)
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
               "olmo2": "olmo2", "olmo3": "olmo3", "smollm3": "smollm3"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                 "olmo3": "Olmo3ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
FAMILY_OF = {mt: fam for fam, mt in MODEL_TYPES.items()}
# multimodal checkpoints whose language model is one of the families: its config is the "text_config"
TEXT_MODEL_OF = {"gemma3": "gemma3_text"}
# multimodal model types with no text model paft_jax implements, and what they are
_MULTIMODAL = {"gemma3n": "Gemma 3n (audio/vision/text, per-layer embeddings)",
               "llava": "LLaVA (a vision-language model)", "qwen2_vl": "Qwen2-VL (a vision-language model)",
               "qwen2_5_vl": "Qwen2.5-VL (a vision-language model)", "paligemma": "PaliGemma (a vision-language model)",
               "mllama": "Llama 3.2 Vision (a vision-language model)", "idefics3": "Idefics3 (a vision-language model)",
               "smolvlm": "SmolVLM (a vision-language model)"}
_QK_NORM = {"qwen3": "head", "gemma3": "head", "olmo2": "projection", "olmo3": "projection"}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_NO_HEAD_DIM = ("olmo2", "olmo3", "smollm3")  # families whose config has no head_dim key
_LAYER_TYPED = ("qwen2", "qwen3", "gemma3", "olmo3", "smollm3")  # families whose config lists layer_types


def unsupported_model_type(mt: Any, where: str) -> str:
    """The message for a model_type paft_jax does not implement, naming the closest supported one."""
    import difflib
    if mt in _MULTIMODAL:
        return (f"{where}: model_type={mt!r} is {_MULTIMODAL[mt]}, with no text model paft_jax implements; "
                f"supported: {sorted(MODEL_TYPES.values()) + sorted(TEXT_MODEL_OF)}")
    known = sorted(set(MODEL_TYPES.values()) | set(TEXT_MODEL_OF))
    close = difflib.get_close_matches(str(mt), known, n=1, cutoff=0.5)
    hint = f" (closest: {close[0]!r})" if close else ""
    return f"{where}: model_type={mt!r} is not supported{hint}; paft_jax implements {known}"


def _rope(params: dict, refuse) -> tuple[float, dict | None]:
    """(theta, scaling) from one transformers v5 rope_parameters dict."""
    rope = dict(params)
    theta = float(rope.pop("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor != 1 is not implemented")
    if rope_type == "llama3":
        return theta, {"rope_type": "llama3", **{k: rope[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": rope["factor"]}
    if rope_type == "yarn":
        if rope.get("mscale") or rope.get("mscale_all_dim"):
            refuse("yarn RoPE with mscale / mscale_all_dim (DeepSeek's variant) is not implemented")
        if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
            refuse("yarn RoPE needs factor and original_max_position_embeddings")
        return theta, {"rope_type": "yarn", **{k: rope[k] for k in (
            "factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "truncate")
            if rope.get(k) is not None}}
    if rope_type != "default":
        refuse(f"rope type {rope_type!r} is not implemented (supported: default, linear, llama3, yarn)")
    return theta, None


def _scaling(d: dict | None):
    return tuple(sorted(d.items())) if d else None


def model_config_from_hf(data: dict, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """Map an HF config dict (transformers v4 or v5 layout) to ModelConfig.

    The dict is normalized by transformers' own config class (never by code shipped with a model),
    which reconciles `rope_theta`/`rope_scaling` (v4) and `rope_parameters` (v5), and derives each
    family's default `layer_types`.  A multimodal checkpoint whose language model is a supported family
    (Gemma 3 4B-27B) is read as that text model.
    """
    mt = data.get("model_type")
    text_only = mt in TEXT_MODEL_OF
    if text_only:
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{where}: model_type={mt!r} without a text_config; cannot find its language model")
        data, where = {**text, "model_type": TEXT_MODEL_OF[mt]}, f"{where} (text_config; loaded text-only)"
        mt = TEXT_MODEL_OF[mt]
    if mt not in FAMILY_OF:
        raise ValueError(unsupported_model_type(mt, where))
    family = FAMILY_OF[mt]
    try:
        hf = hf_config_class(mt).from_dict(dict(data))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise ValueError(f"{where}: transformers could not parse this {mt} config: {e}") from e

    def refuse(msg):
        raise ValueError(f"{where}: {msg}")

    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
    if act not in _ACTIVATIONS or (family != "gemma3" and act != "silu"):
        refuse(f"hidden_act={act!r} is not implemented for {mt} (gated MLP with "
               f"{'gelu_pytorch_tanh' if family == 'gemma3' else 'silu'})")
    if getattr(hf, "mlp_bias", False):
        refuse("mlp_bias=true is not implemented")
    # Gemma 3 stores attn_logit_softcapping but never applies it; final_logit_softcapping only in its CausalLM
    softcap = getattr(hf, "final_logit_softcapping", None) if family == "gemma3" and not text_only else None
    if getattr(hf, "use_bidirectional_attention", False):
        refuse("use_bidirectional_attention=true is not implemented (paft_jax trains causal decoders)")
    if family not in ("llama", "qwen2") and getattr(hf, "attention_bias", False):
        refuse(f"attention_bias=true is not implemented for {mt}")

    rope_params = dict(getattr(hf, "rope_parameters", None) or {})
    sliding_rope = None
    if "full_attention" in rope_params:  # per layer type (Gemma 3, OLMo 3)
        sliding_rope = _rope(rope_params.get("sliding_attention") or {}, refuse)
        rope_params = rope_params["full_attention"] or {}
    rope_params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_theta, scaling = _rope(rope_params, refuse)
    if sliding_rope == (rope_theta, scaling):
        sliding_rope = None

    layer_types = list(getattr(hf, "layer_types", None) or []) if family in _LAYER_TYPED else []
    sliding = getattr(hf, "sliding_window", None) if family != "llama" else None
    if family == "mistral":
        layer_types = []
    elif layer_types and set(layer_types) == {"full_attention"}:
        layer_types, sliding = [], None
    elif layer_types and set(layer_types) == {"sliding_attention"}:
        layer_types = []
    elif not layer_types:
        sliding = None if family != "mistral" else sliding
    if len(layer_types) not in (0, hf.num_hidden_layers):
        refuse(f"layer_types has {len(layer_types)} entries for {hf.num_hidden_layers} layers")
    no_rope = ()
    if family == "smollm3":
        no_rope = tuple(i for i, use in enumerate(hf.no_rope_layers) if not use)
    head_dim = getattr(hf, "head_dim", None)
    eos = hf.eos_token_id
    kw = dict(
        family=family, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim if head_dim and head_dim != hf.hidden_size // hf.num_attention_heads else None,
        rms_norm_eps=float(hf.rms_norm_eps), rope_theta=rope_theta, rope_scaling=_scaling(scaling),
        sliding_rope_theta=sliding_rope[0] if sliding_rope else None,
        sliding_rope_scaling=_scaling(sliding_rope[1]) if sliding_rope else None,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=True if family == "qwen2" else bool(getattr(hf, "attention_bias", False)),
        sliding_window=sliding, layer_types=tuple(layer_types) or None, no_rope_layers=no_rope,
        qk_norm=_QK_NORM.get(family), hidden_act=_ACTIVATIONS[act],
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar) if family == "gemma3" else None,
        final_logit_softcapping=float(softcap) if softcap is not None else None,
        bos_token_id=hf.bos_token_id, eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.pad_token_id,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def _rope_dict(theta: float, scaling: tuple | None) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **dict(scaling or {})}


def hf_config_dict(cfg: ModelConfig, source: dict | None = None, dtype: str | None = None) -> dict:
    """The config.json for an export: the source's keys kept, the architecture fields from `cfg`."""
    fam, mt = cfg.family, MODEL_TYPES[cfg.family]
    rope = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
    layer_types = list(cfg.layer_types) if cfg.layer_types else [
        "sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if fam in _NO_HEAD_DIM:  # head_dim is always hidden_size // num_heads there
        if cfg.head_dim is not None:
            raise ValueError(f"a {mt} config cannot carry head_dim={cfg.head_dim} (always hidden_size // num_heads)")
        kw.pop("head_dim")
    if cfg.final_logit_softcapping is not None and fam != "gemma3":
        raise ValueError(f"a {mt} config cannot carry final_logit_softcapping")
    if fam == "gemma3":
        kw["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        kw["hidden_act"] = "silu"
    if fam in ("gemma3", "olmo3"):
        sliding = (_rope_dict(cfg.sliding_rope_theta, cfg.sliding_rope_scaling) if cfg.sliding_rope_theta is not None
                   else dict(rope))
        kw["rope_parameters"] = {"full_attention": rope, "sliding_attention": sliding}
    elif cfg.sliding_rope_theta is not None:
        raise ValueError(f"a {mt} config cannot carry a separate RoPE for sliding layers")
    if cfg.no_rope_layers and fam != "smollm3":
        raise ValueError(f"a {mt} config cannot carry NoPE layers (no_rope_layers={list(cfg.no_rope_layers)})")
    if fam in ("llama", "mistral", "olmo2") and cfg.layer_types and len(set(cfg.layer_types)) > 1:
        raise ValueError(f"a {mt} config cannot carry mixed layer_types")
    if fam == "llama":
        if cfg.sliding_window is not None:
            raise ValueError("a llama config cannot carry a sliding window; use family=mistral")
        kw.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    elif fam == "mistral":
        if cfg.attention_bias:
            raise ValueError("Mistral export cannot carry q/k/v biases; use family=qwen2 or llama")
        kw.update(sliding_window=cfg.sliding_window)
    elif fam == "qwen2":
        if not cfg.attention_bias:
            raise ValueError("Qwen2 always has q/k/v biases; this model has none")
    elif cfg.attention_bias:
        raise ValueError(f"a {mt} config cannot carry q/k/v biases")
    if fam == "olmo2" and cfg.sliding_window is not None:
        raise ValueError("an olmo2 config cannot carry a sliding window")
    if fam in ("qwen2", "qwen3", "smollm3"):
        kw.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                  layer_types=layer_types)
        if fam != "smollm3":
            kw["max_window_layers"] = layer_types.index("sliding_attention") if cfg.sliding_window else cfg.num_layers
    if fam in ("gemma3", "olmo3"):
        kw.update(sliding_window=cfg.sliding_window or 4096, layer_types=layer_types)
    if fam == "gemma3":
        kw["final_logit_softcapping"] = cfg.final_logit_softcapping
        scalar = cfg.query_pre_attn_scalar or cfg.resolved_head_dim
        kw["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar  # an int in transformers
    if fam == "smollm3":
        kw["no_rope_layers"] = [int(i not in cfg.no_rope_layers) for i in range(cfg.num_layers)]
    src = {k: v for k, v in (source or {}).items() if not k.startswith("_")}
    if src.get("model_type") in TEXT_MODEL_OF and isinstance(src.get("text_config"), dict):
        src = {k: v for k, v in src["text_config"].items() if not k.startswith("_")}  # exported text-only
    # keys that our fields replace or that describe a different file layout
    for k in ("rope_theta", "rope_scaling", "rope_parameters", "layer_types", "torch_dtype", "dtype",
              "quantization_config", "auto_map", "transformers_version", "architectures", "model_type",
              "rope_local_base_freq", "sliding_window_pattern", "no_rope_layer_interval", "text_config",
              "vision_config"):
        src.pop(k, None)
    src.update(kw)
    hf = hf_config_class(mt)(**src)
    hf.architectures = [ARCHITECTURES[fam]]
    hf.dtype = dtype or dtype_name(cfg.jnp_param_dtype)
    out = hf.to_dict()
    out.pop("_name_or_path", None)
    return out
