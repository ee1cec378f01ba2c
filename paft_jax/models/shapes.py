"""Named model shapes (the published configs of common bases), for compiling without a model directory.

Only architecture: what `compile` needs to build abstract parameters.  A real run reads the same values
from the model directory's config.json.
"""
from __future__ import annotations

from paft_jax.models.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192),
    "llama3.1-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=tuple(sorted(_LLAMA3_ROPE.items())), max_position_embeddings=131072),
    "llama3.2-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=tuple(sorted({**_LLAMA3_ROPE, "factor": 32.0}.items())),
                        max_position_embeddings=131072, tie_word_embeddings=True),
    "mistral-7b": dict(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       max_position_embeddings=32768),
    "qwen2-7b": dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=True,
                     max_position_embeddings=32768),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


def named_shape(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named shape; an unknown name is refused with the known ones."""
    if name not in SHAPES:
        import difflib
        close = difflib.get_close_matches(name, SHAPES, n=1)
        raise ValueError(f"unknown model shape {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; known: {', '.join(SHAPES)}")
    return ModelConfig(**{**SHAPES[name], **overrides})
