"""paft_jax: parallel SFT + preference alignment with sparse-delta merging, in JAX."""
from paft_jax import xla_cpu as _xla_cpu

_xla_cpu.configure()  # before JAX creates its CPU backend (simulated devices only; see xla_cpu.py)

__version__ = "0.1.0"
