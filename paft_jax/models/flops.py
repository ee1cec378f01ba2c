"""Model FLOPs of the decoder, counted from its config: for MFU, and for splitting devices between
PAFT branches in proportion to their work.

Conventions (as in the PaLM paper's appendix B): a matmul of an [n, k] input with a [k, m] weight is
2*n*k*m FLOPs; the backward pass costs twice the forward; attention scores and the weighted sum are
counted over the full sequence length (no discount for the causal mask); norms, RoPE, softmax and the
embedding lookup are left out.  The output projection to the vocabulary is counted, tied or not.
"""
from __future__ import annotations

import jax

from paft_jax.models.config import ModelConfig

# dense bf16 peak per chip (vendor figures); MFU is reported only where the chip is known
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,       # v5p
    "TPU v6 lite": 918e12,  # Trillium
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: attention and MLP projections, and the LM head."""
    e, hd = cfg.hidden_size, cfg.head_dim or cfg.hidden_size // cfg.num_heads
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = e * q + 2 * e * kv + q * e + 3 * e * cfg.intermediate_size
    return cfg.num_layers * per_layer + e * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    keys = sum(min(seq_len, cfg.layer_window(i) or seq_len) for i in range(cfg.num_layers))  # per layer's window
    attention = 4 * cfg.num_heads * hd * keys  # q.k^T and p.v
    return 2.0 * matmul_params(cfg) + attention


def step_flops(cfg: ModelConfig, rows: int, seq_len: int, *, reference_forward: bool = False) -> float:
    """One train step over `rows` rows of `seq_len` tokens: forward + backward (3x forward), plus one
    more forward when the step also runs the frozen reference (DPO without the cached reference)."""
    passes = 3 + (1 if reference_forward else 0)
    return passes * forward_flops_per_token(cfg, seq_len) * rows * seq_len


def peak_flops(devices=None) -> float | None:
    """Sum of the known peak FLOP/s of `devices` (default: all), None where any chip is unknown (CPU)."""
    total = 0.0
    for d in devices if devices is not None else jax.devices():
        kind = getattr(d, "device_kind", "")
        peak = next((v for k, v in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])) if kind.startswith(k)), None)
        if peak is None:
            return None
        total += peak
    return total
