"""Named model shapes (the published configs of common bases), for compiling without a model directory.

Only architecture: what `compile` needs to build abstract parameters.  A real run reads the same values
from the model directory's config.json.
"""
from __future__ import annotations

from paft_jax.models.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}



def _gemma3_layers(n: int) -> tuple[str, ...]:
    """Five sliding-window layers, then one global, repeated (Gemma 3's sliding_window_pattern 6)."""
    return tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n))


# Gemma 3 4B-27B's language model (text_config of the published checkpoints)
_GEMMA3 = dict(family="gemma3", vocab_size=262208, head_dim=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
               rope_scaling=(("factor", 8.0), ("rope_type", "linear")), sliding_rope_theta=10000.0,
               sliding_window=1024, qk_norm="head", hidden_act="gelu_tanh", query_pre_attn_scalar=256.0,
               max_position_embeddings=131072, tie_word_embeddings=True)

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
    "qwen3-8b": dict(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     qk_norm="head", max_position_embeddings=40960),
    "qwen3-14b": dict(family="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_layers=40,
                      num_heads=40, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      qk_norm="head", max_position_embeddings=40960),
    "gemma3-4b": dict(_GEMMA3, hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4,
                      layer_types=_gemma3_layers(34)),
    "gemma3-12b": dict(_GEMMA3, hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16,
                       num_kv_heads=8, layer_types=_gemma3_layers(48)),
    "olmo2-7b": dict(family="olmo2", vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_layers=32,
                     num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6, rope_theta=500000.0, qk_norm="projection",
                     max_position_embeddings=4096),
    # OLMo 3 7B: 3 sliding layers (window 4096) then 1 full, YaRN x8 on the full layers only (65k context)
    "olmo3-7b": dict(family="olmo3", vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_layers=32,
                     num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6, rope_theta=500000.0, qk_norm="projection",
                     rope_scaling=(("attention_factor", 1.2079441541679836), ("beta_fast", 32.0), ("beta_slow", 1.0),
                                   ("factor", 8.0), ("original_max_position_embeddings", 8192), ("rope_type", "yarn")),
                     sliding_rope_theta=500000.0, sliding_window=4096,
                     layer_types=tuple("full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(32)),
                     max_position_embeddings=65536),
    "smollm3-3b": dict(family="smollm3", vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_layers=36,
                       num_heads=16, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=5000000.0,
                       no_rope_layers=tuple(range(3, 36, 4)), max_position_embeddings=65536, tie_word_embeddings=True),
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
