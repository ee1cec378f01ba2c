"""paft_jax: parallel SFT + preference alignment with sparse-delta merging, in JAX."""
__version__ = "0.1.0"
