"""GGUF files (llama.cpp) as model sources: their config as an HF config dict, their tensors under HF names.

The Llama-style families' configs are read by transformers' GGUF reader.  For Qwen3, Gemma 3, OLMo 2/3 and
SmolLM3 that reader loses settings (Qwen3's head_dim, Gemma 3's RoPE scaling and query_pre_attn_scalar) or lacks
the family, so their config is read here from the metadata, with llama.cpp's conventions: what llama.cpp itself
runs the file with.  Where llama.cpp assumes what the file does not record (SmolLM3's NoPE layers), the
assumption is stated in the load notes (`GGUF_ASSUMED`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from paft_jax.hf.config import hf_config_class
from paft_jax.hf.layout import iter_hf_tensors, unpermute_gguf_rope
from paft_jax.models.config import ModelConfig

# GGUF import: the Llama-style families (config through transformers' GGUF reader) and the newer ones whose
# config paft_jax reads from the GGUF metadata itself.  llama.cpp stores OLMo 3 as arch olmo2 with a sliding
# window, so an olmo2 file becomes model_type olmo3 when its metadata has one.
GGUF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "olmo2", "olmo3", "smollm3")
GGUF_OWN_CONFIG = {"qwen3": "qwen3", "gemma3": "gemma3_text", "olmo2": "olmo2",
                   "smollm3": "smollm3"}  # llama.cpp arch -> model_type
# what a family's GGUF does not record and llama.cpp assumes; said in the load notes
GGUF_ASSUMED = {
    "smollm3": "NoPE on every 4th layer (3, 7, 11, ...), as llama.cpp runs a smollm3 GGUF: the file does not "
               "record which layers skip RoPE (SmolLM3-3B's published config has exactly this pattern)",
}
# llama.cpp permutes q/k rows of the families it runs with interleaved ("NORM") RoPE
_PERMUTED_QK = ("llama", "mistral", "smollm3")


class GGUFSource:
    """A GGUF file, exposed under HF tensor names; quantized tensors are dequantized to fp32."""

    def __init__(self, path: Path, cfg: ModelConfig, arch: str):
        import gguf
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable GGUF file: {e}") from None
        self._gguf = {t.name: t for t in self.reader.tensors}
        self.cfg, self.arch = cfg, arch
        self.to_gguf = {name: e.gguf_name(i) for e, i, name in iter_hf_tensors(cfg) if e.gguf_name(i) in self._gguf}
        mapped = set(self.to_gguf.values())
        self.unmapped = [n for n in self._gguf if n not in mapped and not n.startswith("rope_freqs")]

    def names(self):
        return set(self.to_gguf) | set(self.unmapped)

    def file_of(self, name):
        return str(self.path)

    def shape(self, name):
        t = self._gguf[self.to_gguf.get(name, name)]
        return tuple(int(x) for x in reversed(t.shape.tolist()))

    def get(self, name):
        import gguf
        t = self._gguf[self.to_gguf[name]]
        shape = self.shape(name)
        data = t.data
        if data.ndim >= 2:  # dequantize in row blocks: the dequantizer's temporaries stay small
            w = np.empty(shape, np.float32)
            flat = w.reshape(-1, shape[-1])
            rows = data.reshape(-1, data.shape[-1])
            step = max(1, (8 << 20) // max(1, 4 * shape[-1]))
            for r in range(0, rows.shape[0], step):
                flat[r:r + step] = gguf.quants.dequantize(rows[r:r + step], t.tensor_type)
        else:
            w = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if self.cfg.family == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weights as 1 + w (every norm, q/k included)
        if self.arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                               "k_proj.bias")):
            n = self.cfg.num_heads if ".q_proj." in name else self.cfg.num_kv_heads
            w = unpermute_gguf_rope(w, n)
        return w

    def native_dtype(self):
        return np.dtype(np.float32)


_MISSING = object()


def gguf_config_dict(path: Path, reader: Any = None) -> dict:
    """An HF-style config dict (transformers v5 rope_parameters) of a qwen3 / gemma3 / olmo2 / olmo3 / smollm3
    GGUF, read from its metadata with llama.cpp's conventions (what llama.cpp itself runs the file with)."""
    import gguf
    if reader is None:
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable GGUF file: {e}") from None
    arch = gguf_arch(path, reader)

    def get(key: str, default: Any = _MISSING) -> Any:
        f = reader.get_field(key.format(arch=arch))
        if f is None:
            if default is _MISSING:
                raise ValueError(f"{path}: GGUF metadata lacks {key.format(arch=arch)}")
            return default
        return f.contents()

    def one(key: str, default: Any = _MISSING) -> Any:  # a per-layer array must be uniform
        v = get(key, default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise ValueError(f"{path}: {key.format(arch=arch)} varies per layer ({v[:8]}); not implemented")
            v = v[0]
        return v

    hidden, heads, layers = int(get("{arch}.embedding_length")), int(one("{arch}.attention.head_count")), \
        int(get("{arch}.block_count"))
    head_dim = int(get("{arch}.attention.key_length", hidden // heads))
    if int(get("{arch}.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path}: attention.value_length != key_length is not implemented")
    if int(get("{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: rope.dimension_count={get('{arch}.rope.dimension_count')} != head_dim={head_dim} "
                         "(partial rotary) is not implemented")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    else:
        vocab = get("{arch}.vocab_size", None)
        if vocab is None:
            embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
            if not embd:
                raise ValueError(f"{path}: no tokenizer.ggml.tokens, {arch}.vocab_size or token_embd.weight")
            vocab = int(embd[0].shape[-1])
    rope: dict = {"rope_type": "default", "rope_theta": float(get("{arch}.rope.freq_base", 10000.0))}
    scaling = get("{arch}.rope.scaling.type", "none")
    if scaling == "yarn":  # llama.cpp's yarn keys (attn_factor, ext_factor) are not transformers' parameters
        raise ValueError(f"{path}: yarn RoPE in a GGUF is not implemented (llama.cpp's yarn settings are not mapped "
                         "to transformers'); use the safetensors checkpoint, whose yarn RoPE is")
    if scaling not in ("none", ""):
        rope.update(rope_type=scaling, factor=float(get("{arch}.rope.scaling.factor")))
    names = {t.name for t in reader.tensors}
    d: dict = dict(
        model_type=GGUF_OWN_CONFIG[arch], vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(one("{arch}.feed_forward_length")), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=int(one("{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim, rms_norm_eps=float(get("{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("{arch}.context_length")), rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=get("tokenizer.ggml.bos_token_id", None), eos_token_id=get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=get("tokenizer.ggml.padding_token_id", None),
    )
    window = int(get("{arch}.attention.sliding_window", 0) or 0)
    if arch == "qwen3":
        d["hidden_act"] = "silu"
        if window:
            raise ValueError(f"{path}: a qwen3 GGUF with a sliding window is not implemented (llama.cpp runs Qwen3 "
                             "with full attention)")
    elif arch == "smollm3":  # llama.cpp: no window, NoPE where (layer + 1) % 4 == 0 (GGUF_ASSUMED)
        _require_plain_head_dim(path, arch, head_dim, hidden, heads)
        del d["head_dim"]
        d.update(hidden_act="silu", use_sliding_window=False, sliding_window=None,
                 no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers)])
    elif arch == "olmo2":
        _require_plain_head_dim(path, arch, head_dim, hidden, heads)
        del d["head_dim"]
        d["hidden_act"] = "silu"
        if window:  # OLMo 3, as llama.cpp's olmo2 loader runs it: pattern (default 4), unscaled RoPE when sliding
            swa = _sliding_layers(path, get("{arch}.attention.sliding_window_pattern", 4), layers)
            sliding_rope = {"rope_type": "default",
                            "rope_theta": float(get("{arch}.rope.freq_base_swa", rope["rope_theta"]))}
            d.update(model_type="olmo3", sliding_window=window,
                     layer_types=["sliding_attention" if s else "full_attention" for s in swa],
                     rope_parameters={"full_attention": rope, "sliding_attention": sliding_rope})
    else:  # gemma3, as llama.cpp's llama-model.cpp runs it
        d["hidden_activation"] = "gelu_pytorch_tanh"
        swa = _sliding_layers(path, get("{arch}.attention.sliding_window_pattern", 6), layers)  # llama.cpp: 6
        swa = [s and window > 0 for s in swa]
        d.update(sliding_window=window or 4096,
                 layer_types=["sliding_attention" if s else "full_attention" for s in swa],
                 rope_parameters={"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                 # llama.cpp: 1/sqrt(hidden/heads) for the 27B (62 layers), else 1/sqrt(head_dim)
                 query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
                 final_logit_softcapping=get("{arch}.final_logit_softcapping", None))
    return d


def _sliding_layers(path: Path, pattern: Any, layers: int) -> list[bool]:
    """Which layers slide, from llama.cpp's sliding_window_pattern: per layer (true = sliding), or a period n
    (its set_swa_pattern(n): layer i slides iff i % n < n - 1; 0 means every layer)."""
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ValueError(f"{path}: sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        return [bool(x) for x in pattern]
    n = int(pattern)
    return [n == 0 or i % n < n - 1 for i in range(layers)]


def _require_plain_head_dim(path: Path, arch: str, head_dim: int, hidden: int, heads: int) -> None:
    if head_dim != hidden // heads:  # these families' HF configs have no head_dim key
        raise ValueError(f"{path}: {arch} has head_dim = hidden_size // num_heads ({hidden // heads}), but the "
                         f"GGUF's attention.key_length is {head_dim}")


def gguf_arch(path: Path, reader: Any) -> str:
    f = reader.get_field("general.architecture")
    if f is None:
        raise ValueError(f"{path}: GGUF metadata lacks general.architecture")
    return str(f.contents())


def gguf_hf_config(gguf_file: Path) -> dict:
    """The HF config dict of a GGUF file."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(gguf_file))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{gguf_file}: not a readable GGUF file: {e}") from None
    arch = gguf_arch(gguf_file, reader)
    if arch in GGUF_OWN_CONFIG:
        raw = gguf_config_dict(gguf_file, reader)
        return hf_config_class(raw["model_type"]).from_dict(raw).to_dict()
    del reader
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                          local_files_only=True).to_dict()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{gguf_file}: cannot read its model config: {e}") from None
