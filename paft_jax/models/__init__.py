from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import Decoder, abstract_params, init_cache, init_params

__all__ = ["ModelConfig", "Decoder", "abstract_params", "init_cache", "init_params"]
