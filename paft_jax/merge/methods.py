"""Merge methods as pure, jittable functions of one tensor.

Every method is "sparsify each model's delta, weight it, optionally elect a sign, sum, optionally
normalize, scale by lambda, add to the base" (mergekit's generalized task arithmetic), plus `linear`
and `slerp`, which interpolate whole tensors.  One function, `merge_tensor`, runs them all; the
method and a few flags are static, every number that may vary per tensor or per layer (weights,
rank windows, densities, lambda, t, the seed) is traced, so a model compiles once per tensor size.

Tensors are handled flat, in HF layout (row-major [out, in]): magnitude ties are broken by flat
index and random masks are drawn in flat order, so the streamed (safetensors) and in-memory (our
layout, sharded) paths see the same element order and give the same tensors.  Arithmetic is fp32.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

SPARSIFIERS = (None, "magnitude", "random", "outliers", "della")
RESCALES = ("none", "inverse", "l1")


@dataclass(frozen=True)
class Method:
    name: str
    sparsify: str | None  # one of SPARSIFIERS
    consensus: bool  # TIES sign election (mergekit's consensus_method: sum)
    normalize: bool  # default of the `normalize` parameter
    rescale: str  # default rescaling of kept values (RESCALES)
    kind: str = "delta"  # "delta" (task arithmetic family), "linear", "slerp"


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", None, False, True, "none", kind="linear"),
    Method("task_arithmetic", None, False, False, "none"),
    Method("ties", "magnitude", True, True, "none"),
    Method("magnitude_prune", "magnitude", False, False, "none"),
    Method("dare_linear", "random", False, False, "inverse"),
    Method("dare_ties", "random", True, False, "inverse"),
    Method("breadcrumbs", "outliers", False, False, "none"),
    Method("breadcrumbs_ties", "outliers", True, False, "none"),
    Method("della", "della", True, True, "inverse"),
    Method("della_linear", "della", False, False, "inverse"),
    Method("slerp", None, False, False, "none", kind="slerp"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; supported: {', '.join(METHODS)}")
    return METHODS[name]


def name_hash(name: str) -> int:
    """Stable 31-bit hash of a tensor name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _key(seed, nhash, model_index):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), nhash), model_index)


def tensor_key(seed: int, name: str, model_index: int) -> jax.Array:
    """The PRNG key of model `model_index`'s random mask for tensor `name` (seed, name -> same mask)."""
    return _key(np.uint32(seed), np.uint32(name_hash(name)), np.uint32(model_index))


def _rank_ge(bits: jax.Array, m: jax.Array) -> jax.Array:
    """Mask of the elements whose ascending rank by (magnitude, flat index) is >= m.

    `bits` are the int32 bit patterns of non-negative floats, which order like the floats.  A
    two-pass radix select (histograms of the high 15 and the low 16 bits) finds the magnitude v at
    rank m without sorting the tensor (a sort is ~40x slower on CPU); only when several elements
    equal v and some of them must go are those ranked by flat index (a cumsum, rarely needed).
    """
    n = bits.shape[0]
    mc = jnp.clip(m, 0, n - 1)
    hi_part = bits >> 16
    c1 = jnp.cumsum(jnp.bincount(hi_part, length=1 << 15))
    b1 = jnp.searchsorted(c1, mc, side="right")  # first high bin whose cumulative count exceeds m
    below1 = jnp.where(b1 > 0, c1[b1 - 1], 0)
    low = jnp.where(hi_part == b1, bits & 0xFFFF, 1 << 16)  # elements outside bin b1 -> overflow bin
    h2 = jnp.bincount(low, length=(1 << 16) + 1)[: 1 << 16]
    c2 = below1 + jnp.cumsum(h2)
    b2 = jnp.searchsorted(c2, mc, side="right")
    v = (b1 << 16) | b2
    below = jnp.where(b2 > 0, c2[b2 - 1], below1)  # elements strictly smaller than v
    eq = bits == v

    def ranked_ties(_):
        return (bits > v) | (eq & (below + jnp.cumsum(eq, dtype=jnp.int32) - 1 >= mc))

    inside = jax.lax.cond(below == mc, lambda _: bits >= v, ranked_ties, None)
    return jnp.where(m <= 0, True, jnp.where(m >= n, False, inside))


def _rescale(x, kept, mode, inv_p):
    """Kept values, rescaled: by 1/p (DARE / DELLA papers), or to the tensor's L1 norm (mergekit)."""
    masked = jnp.where(kept, x, 0.0)
    if mode == "inverse":
        return masked * inv_p
    if mode == "l1":  # mergekit's rescaled_masked_tensor: no rescale when either norm is below 1e-7
        before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(masked))
        ok = (before >= 1e-7) & (after >= 1e-7)
        return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)
    return masked


def _sparsify(d, how, rescale, p, k):
    """One model's flat delta `d` -> sparsified delta.  p: traced per-model parameters."""
    if how == "magnitude" or how == "outliers":
        bits = jax.lax.bitcast_convert_type(jnp.abs(d), jnp.int32)
        kept = _rank_ge(bits, p["lo"])
        if how == "outliers":
            kept = kept & ~_rank_ge(bits, p["hi"])
        out = _rescale(d, kept, rescale, 1.0 / p["density"])
    elif how == "random":
        u = jax.random.uniform(k, d.shape, jnp.float32)
        out = _rescale(d, u < p["density"], rescale, 1.0 / p["density"])
    elif how == "della":
        rows = d.reshape(p["rows"].shape[0], -1)
        cols = rows.shape[1]
        # rank 0..cols-1 within each row by (magnitude, index); stable sorts make ties deterministic
        order = jnp.argsort(jnp.abs(rows), axis=1, stable=True)
        rank = jnp.argsort(order, axis=1, stable=True).astype(jnp.float32)
        rank_norm = rank / (cols - 1) if cols > 1 else jnp.full_like(rank, 0.5)
        prob = (p["density"] - p["epsilon"]) + rank_norm * (2.0 * p["epsilon"])
        u = jax.random.uniform(k, rows.shape, jnp.float32)
        out = _rescale(rows, u < prob, rescale, 1.0 / prob).reshape(d.shape)
    else:
        return d
    return jnp.where(p["density"] >= 1.0, d, out)  # density 1 leaves the delta untouched


@partial(jax.jit, static_argnames=("method", "rescale", "normalize", "from_models"))
def merge_tensor(base: jax.Array, inputs: tuple, params: dict, *, method: str, rescale: str,
                 normalize: bool, from_models: bool) -> jax.Array:
    """Merge one tensor.

    base: [n] flat base tensor.  inputs: m flat [n] deltas (or full models with from_models), as a
    tuple rather than one stacked array so the host never builds an [m, n] copy.
    params (traced): weight [m], density [m], lo [m] / hi [m] (kept rank window for magnitude /
    outliers, computed on the host from density and gamma), epsilon [m], rows [r] (della's row count
    as a shape), lambda, t, seed, nhash.  Returns the merged tensor in fp32.
    """
    meth = METHODS[method]
    base = base.astype(jnp.float32)
    deltas = [x.astype(jnp.float32) - base if from_models else x.astype(jnp.float32) for x in inputs]
    w = params["weight"].astype(jnp.float32)
    if meth.kind == "linear":
        out = _sum([(base + deltas[i]) * w[i] for i in range(len(deltas))])
        return out / jnp.sum(w) if normalize else out
    if meth.kind == "slerp":
        return _slerp(params["t"], base, base + deltas[0])
    # models are few and static: unrolled sums (XLA CPU runs a reduce over a leading [m] axis
    # of stacked tensors ~100x slower than m-1 elementwise adds)
    weighted = []
    for i in range(len(deltas)):
        p = {k: (v[i] if k in ("weight", "density", "lo", "hi", "epsilon") else v) for k, v in params.items()}
        s = _sparsify(deltas[i], meth.sparsify, rescale, p, _key(params["seed"], params["nhash"], i))
        weighted.append(s * w[i])
    total = _sum(weighted)
    if meth.consensus:
        elected = jnp.where(total >= 0, 1.0, -1.0)
        agree = [jnp.sign(x) == elected for x in weighted]  # zeros never agree: they do not dilute the mean
        mixed = _sum([jnp.where(a, x, 0.0) for a, x in zip(agree, weighted)])
        divisor = _sum([jnp.where(a, w[i], 0.0) for i, a in enumerate(agree)])
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = total
        divisor = jnp.sum(w)  # a zero sum with normalize is refused on the host
    if normalize:
        mixed = mixed / divisor
    return base + mixed * params["lambda"]


def _sum(xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _slerp(t, v0, v1, threshold=0.9995, eps=1e-8):
    """mergekit 0.1.5's slerp of two whole tensors: lerp when (nearly) collinear or antipodal."""
    n0, n1 = jnp.linalg.norm(v0), jnp.linalg.norm(v1)
    n0, n1 = jnp.where(n0 > eps, n0, 1.0), jnp.where(n1 > eps, n1, 1.0)
    dot = jnp.clip(jnp.sum((v0 / n0) * (v1 / n1)), -1.0, 1.0)
    linear = jnp.abs(dot) > threshold
    theta = jnp.arccos(jnp.where(linear, 0.0, dot))
    sin_theta = jnp.where(linear, 1.0, jnp.sin(theta))
    ca = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    cb = jnp.where(linear, t, jnp.sin(t * theta) / sin_theta)
    return ca * v0 + cb * v1
