"""In-memory merge of pytrees on the mesh: what the PAFT launcher calls right after training.

`merge_deltas(base, [delta_sft, delta_dpo], spec, cfg=cfg)` returns merged params with each leaf in
the base leaf's sharding.  With `cfg` (a decoder params tree) every leaf is merged per layer under
its HF tensor name, in HF element order, through the same per-tensor function as the streamed merge:
per-layer gradients, name filters, overrides and DARE masks then match a merge of the exported HF
directories.  Without `cfg` any pytree works; each leaf is one tensor named by its path.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from paft_jax.hf.layout import entries, get_path, hf_shape
from paft_jax.merge.engine import merge_array
from paft_jax.merge.recipe import MergeSpec
from paft_jax.models.config import ModelConfig, to_dtype


@partial(jax.jit, static_argnames=("n_in",))
def to_hf_flat(x, n_in: int):
    """One layer's tensor in our layout -> HF [out, in] order, flattened (Linear kernels are transposed)."""
    if n_in:
        return x.reshape(_prod(x.shape[:n_in]), -1).T.reshape(-1)
    return x.reshape(-1)


@partial(jax.jit, static_argnames=("n_in", "sharding"))
def to_hf_rows(x, n_in: int, sharding):
    """to_hf_flat for a tensor sharded on a mesh: the HF [out, in] matrix is first spread by rows over
    `sharding` (a 1-D NamedSharding over all the mesh's devices), so that flattening it moves nothing and each
    device holds a contiguous piece of the flat tensor.  (Flattening a tensor sharded along a later axis
    made XLA:CPU gather a full copy on every device.)"""
    hf = x.reshape(_prod(x.shape[:n_in]), -1).T if n_in else x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)
    rows = jax.lax.with_sharding_constraint(hf, sharding)
    return rows.reshape(-1)


@partial(jax.jit, static_argnames=("shape", "n_in"))
def _from_hf_flat(flat, shape: tuple, n_in: int):
    if n_in:
        return flat.reshape(_prod(shape[n_in:]), _prod(shape[:n_in])).T.reshape(shape)
    return flat.reshape(shape)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def merge_deltas(base: Any, deltas: Sequence[Any], spec: MergeSpec, *, cfg: ModelConfig | None = None) -> Any:
    """base + merge(deltas): each delta a pytree with the base's structure (finetuned - base)."""
    return _merge(base, deltas, spec, cfg, from_models=False)


def merge_models(base: Any, models: Sequence[Any], spec: MergeSpec, *, cfg: ModelConfig | None = None) -> Any:
    """Merge full fine-tuned models into the base (their deltas are taken inside the jitted merge)."""
    return _merge(base, models, spec, cfg, from_models=True)


def _merge(base, inputs, spec: MergeSpec, cfg, *, from_models: bool):
    if len(inputs) != spec.num_models:
        raise ValueError(f"the spec is for {spec.num_models} models, {len(inputs)} pytrees given")
    base_def = jax.tree_util.tree_structure(base)
    for i, t in enumerate(inputs):
        if jax.tree_util.tree_structure(t) != base_def:
            raise ValueError(f"{'models' if from_models else 'deltas'}[{i}]: pytree structure differs from the "
                             f"base's:\n  {jax.tree_util.tree_structure(t)}\n  vs {base_def}")
        for (path, b), x in zip(jax.tree_util.tree_flatten_with_path(base)[0], jax.tree_util.tree_leaves(t)):
            if tuple(b.shape) != tuple(x.shape):
                raise ValueError(f"{'models' if from_models else 'deltas'}[{i}]: leaf {jax.tree_util.keystr(path)} "
                                 f"has shape {tuple(x.shape)}, the base has {tuple(b.shape)}")
    out_dtype = to_dtype(spec.dtype) if spec.dtype else None
    if cfg is None:
        def one(path, b, *xs):
            name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            merged = merge_array(spec, name, tuple(b.shape), b.reshape(-1), [x.reshape(-1) for x in xs],
                                 from_models=from_models, layers=None)
            res = b if merged is None else merged.reshape(b.shape)
            return _place(res.astype(out_dtype or b.dtype), b)
        return jax.tree_util.tree_map_with_path(one, base, *inputs)

    out: dict = {}
    for e in entries(cfg):
        b = get_path(base, e.path)
        xs = [get_path(t, e.path) for t in inputs]
        per = tuple(b.shape[1:]) if e.layered else tuple(b.shape)
        shape = hf_shape(e, per)
        layers = range(cfg.num_layers) if e.layered else [None]
        results = []
        for i in layers:
            bi = b if i is None else b[i]
            xi = [x if i is None else x[i] for x in xs]
            merged = merge_array(spec, e.hf_name(i), shape, to_hf_flat(bi, e.n_in),
                                 [to_hf_flat(x, e.n_in) for x in xi], from_models=from_models, layers=cfg.num_layers)
            results.append(bi if merged is None else _from_hf_flat(merged, per, e.n_in))
        leaf = results[0] if not e.layered else jnp.stack(results)
        node = out
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = _place(leaf.astype(out_dtype or b.dtype), b)
    if jax.tree_util.tree_structure(out) != base_def:
        raise ValueError(f"base params do not match a {cfg.family} model with this config "
                         f"(expected {jax.tree_util.tree_structure(out)}, got {base_def})")
    return out


def _place(x, like):
    """Give a result the base leaf's sharding (a no-op on one device)."""
    sharding = getattr(like, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else x
