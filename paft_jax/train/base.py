"""The frozen base a run trains on (`Base`, loaded once and shared by every branch of a run) and what a
training config's model keys resolve to: `load_base` (imported or random weights, in their shardings, with
the run's compute dtype, remat and layer-scan unroll), `resolve_tokenizer` (`tokenizer:`) and
`resolve_compute_dtype` (`compute_dtype: auto`).  Commands that need only the base or its tokenizer
(restore, data-stats, compile, the pipeline's shared base) import this, not the training loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh

from paft_jax.hf.load import LoadedModel, load_model, load_tokenizer, resolve_model_path
from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import init_params

if TYPE_CHECKING:
    from paft_jax.train.config import TrainConfig

# The frozen base every branch of a run shares (loaded once): the imported model itself.
Base = LoadedModel


def resolve_compute_dtype(name: str) -> str:
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_tokenizer(spec: str | None, fallback: Any):
    if spec is None:
        if fallback is None:
            raise ValueError("the model has no tokenizer; set `tokenizer:` (a directory, 'smollm2' or 'llama3-test')")
        return fallback
    if spec == "llama3-test":
        from paft_jax.data.testing import llama3_style_tokenizer
        return llama3_style_tokenizer()
    named = ("llama3-test", "smollm2")
    if spec not in named and "://" not in spec and not Path(spec).expanduser().exists():
        import difflib
        close = difflib.get_close_matches(spec.lower().replace("_", "-"), named, n=1)
        if close:
            raise ValueError(f"tokenizer {spec!r}: no such directory or file; did you mean {close[0]!r}?")
    directory, gguf = resolve_model_path(spec)
    tok = load_tokenizer(directory, gguf)
    if tok is None:
        raise ValueError(f"tokenizer {spec!r}: nothing loadable there")
    return tok


def load_base(cfg: TrainConfig, mesh: Mesh, rules: tuple) -> Base:
    """The base params in their shardings, with the run's compute dtype, remat policy and layer-scan unroll."""
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    if cfg.model == "random":
        mc = dict(cfg.model_config)
        tok = resolve_tokenizer(cfg.tokenizer, None)
        mc.setdefault("vocab_size", len(tok))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # what an export's configs name
            if getattr(tok, key, None) is not None:
                mc.setdefault(key, getattr(tok, key))
        mcfg = ModelConfig(**mc).replace(dtype=dtype, remat=cfg.remat, scan_unroll=cfg.scan_unroll)
        if cfg.param_dtype != "auto":
            mcfg = mcfg.replace(param_dtype=cfg.param_dtype)
        params = init_params(mcfg, jax.random.key(cfg.seed), mesh, rules)
        return Base(mcfg, params, tok, hf_config=None, source=f"random({mc})")
    lm = load_model(cfg.model, mesh=mesh, rules=rules, param_dtype=cfg.param_dtype, dtype=dtype,
                    with_tokenizer=cfg.tokenizer is None)
    tok = resolve_tokenizer(cfg.tokenizer, lm.tokenizer)
    lm.cfg, lm.tokenizer = lm.cfg.replace(remat=cfg.remat, scan_unroll=cfg.scan_unroll), tok
    return lm
