from paft_jax.models.config import ModelConfig

__all__ = ["ModelConfig", "Decoder", "abstract_params", "init_cache", "init_params"]


def __getattr__(name: str):
    # the decoder (flax) on first use: `paft_jax.models.config` alone (dtypes, shapes) stays light, so the
    # merge CLI does not import flax
    if name in __all__:
        from paft_jax.models import decoder
        return getattr(decoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
