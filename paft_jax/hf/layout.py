"""Where each parameter lives in HF checkpoints and how its layout differs from ours.

HF stores a Linear as weight [out, in]; we store kernels [in..., out...] with heads split out
(q: [embed, heads, head_dim], o: [heads, head_dim, embed]).  Layers are stacked along a leading axis.
Every conversion is a transpose plus reshape, so a round trip is bit-exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from paft_jax.models.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # path in our params tree
    hf: str  # HF tensor name; "{i}" is the layer index for stacked entries
    gguf: str  # llama.cpp tensor name
    layered: bool
    n_in: int  # leading dims (after the layer axis) forming the Linear input; 0 = not a Linear kernel
    flat: bool = False  # a vector in HF that we keep split by head (biases, OLMo's q/k norms)

    def hf_name(self, i: int | None = None) -> str:
        return self.hf.format(i=i)

    def gguf_name(self, i: int | None = None) -> str:
        return self.gguf.format(i=i)


# per family, the block's norms in HF order: (our module = HF module name, llama.cpp name)
_BLOCK_NORMS = {
    "pre": [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")],
    "post": [("post_attention_layernorm", "post_attention_norm"), ("post_feedforward_layernorm", "post_ffw_norm")],
    "sandwich": [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                 ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm")],
}


def entries(cfg: ModelConfig) -> list[Entry]:
    L = "model.layers.{i}."
    G = "blk.{i}."
    out = [Entry(("embed_tokens", "embedding"), "model.embed_tokens.weight", "token_embd.weight", False, 0)]
    attn = [("q_proj", "attn_q", 1), ("k_proj", "attn_k", 1), ("v_proj", "attn_v", 1), ("o_proj", "attn_output", 2)]
    for name, g, n_in in attn:
        out.append(Entry(("layers", "self_attn", name, "kernel"), f"{L}self_attn.{name}.weight", f"{G}{g}.weight", True, n_in))
        if cfg.attention_bias and name != "o_proj":
            out.append(Entry(("layers", "self_attn", name, "bias"), f"{L}self_attn.{name}.bias", f"{G}{g}.bias", True, 0,
                             flat=True))
    if cfg.qk_norm is not None:
        for name, g in [("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")]:
            out.append(Entry(("layers", "self_attn", name, "weight"), f"{L}self_attn.{name}.weight", f"{G}{g}.weight",
                             True, 0, flat=cfg.qk_norm == "projection"))
    for name, g in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")]:
        out.append(Entry(("layers", "mlp", name, "kernel"), f"{L}mlp.{name}.weight", f"{G}{g}.weight", True, 1))
    for name, g in _BLOCK_NORMS[cfg.block]:
        out.append(Entry(("layers", name, "weight"), f"{L}{name}.weight", f"{G}{g}.weight", True, 0))
    out.append(Entry(("norm", "weight"), "model.norm.weight", "output_norm.weight", False, 0))
    if not cfg.tie_word_embeddings:
        out.append(Entry(("lm_head", "kernel"), "lm_head.weight", "output.weight", False, 1))
    return out


def hf_shape(entry: Entry, ours: tuple[int, ...]) -> tuple[int, ...]:
    """HF shape of one (per-layer) tensor whose shape in our layout is `ours`."""
    if entry.n_in:
        return (math.prod(ours[entry.n_in:]), math.prod(ours[:entry.n_in]))
    if entry.flat:
        return (math.prod(ours),)
    return tuple(ours)


def to_ours(entry: Entry, array: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    if entry.n_in:
        return array.T.reshape(ours)
    return array.reshape(ours)


def to_hf(entry: Entry, array: np.ndarray) -> np.ndarray:
    if entry.n_in:
        return np.ascontiguousarray(array.reshape(hf_shape(entry, array.shape)[::-1]).T)
    return np.ascontiguousarray(array.reshape(hf_shape(entry, array.shape)))


def iter_hf_tensors(cfg: ModelConfig) -> Iterator[tuple[Entry, int | None, str]]:
    """(entry, layer index or None, HF name) in the order HF checkpoints list them."""
    per_layer = [e for e in entries(cfg) if e.layered]
    top = [e for e in entries(cfg) if not e.layered]
    yield top[0], None, top[0].hf_name()
    for i in range(cfg.num_layers):
        for e in per_layer:
            yield e, i, e.hf_name(i)
    for e in top[1:]:
        yield e, None, e.hf_name()


def get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def unpermute_gguf_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp permutes q/k rows of Llama-style archs for its interleaved RoPE; undo it (rows = heads*dim)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
