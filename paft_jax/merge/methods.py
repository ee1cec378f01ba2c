"""Merge methods as pure, jittable functions of one tensor.

Every method is "sparsify each model's delta, weight it, optionally elect a sign, sum, optionally
normalize, scale by lambda, add to the base" (mergekit's generalized task arithmetic), plus `linear`
and `slerp`, which interpolate whole tensors.  `merge_flat` runs them all over a tensor's chunks
with three jitted kernels (`_hist_hi`, `_hist_lo`, `_apply`); the method and a few flags are
static, every number that may vary per tensor or per layer (weights, rank cuts, densities, lambda,
t, the seed) is traced, so a whole model compiles each kernel once (DELLA: once per row length).

Tensors are handled flat, in HF layout (row-major [out, in]): magnitude ties are broken by flat
index and random masks are drawn in flat order, so the streamed (safetensors) and in-memory (our
layout, sharded) paths see the same element order and give the same tensors.  Arithmetic is fp32.
"""
from __future__ import annotations

import zlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from paft_jax.merge.catalog import METHODS


def name_hash(name: str) -> int:
    """Stable 31-bit hash of a tensor name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _key(seed, nhash, model_index):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), nhash), model_index)


# Tensors are merged in chunks of CHUNK elements (the last one zero-padded, its padding masked
# out): one compiled shape serves every tensor of every size, so a model compiles each kernel once,
# and device memory holds a few chunks, never a whole embedding.  Whole-tensor quantities (the
# magnitude rank cut, L1 norms, slerp's angle) are gathered in a first pass over the chunks.
# Random masks are drawn per chunk (key folded with the chunk index), so they depend on CHUNK.
CHUNK = 1 << 17
CACHE_ELEMENTS = 1 << 23  # chunks of tensors up to this many input elements (32 MB fp32) stay on the device
_HI, _LO = 1 << 15, 1 << 16  # radix-select bins: high 15 and low 16 bits of |delta|'s float bits


def tensor_key(seed: int, name: str, model_index: int, chunk: int = 0) -> jax.Array:
    """The PRNG key of model `model_index`'s random mask for chunk `chunk` of tensor `name`."""
    return jax.random.fold_in(_key(np.uint32(seed), np.uint32(name_hash(name)), np.uint32(model_index)),
                              np.uint32(chunk))


def _deltas(base, xs, from_models):
    base = base.astype(jnp.float32)
    return base, [x.astype(jnp.float32) - base if from_models else x.astype(jnp.float32) for x in xs]


def _bits(d):
    return jax.lax.bitcast_convert_type(jnp.abs(d), jnp.int32)  # non-negative floats order like their bits


@partial(jax.jit, static_argnames=("from_models",), donate_argnums=(0,))
def _hist_hi(acc, base, xs, valid, *, from_models):
    """acc[i] += histogram of the high bits of |delta_i| over the valid part of one chunk."""
    _, ds = _deltas(base, xs, from_models)
    ok = _in_tensor(base, valid)
    return jnp.stack([a + jnp.bincount(jnp.where(ok, _bits(d) >> 16, _HI).reshape(-1), length=_HI + 1)
                      for a, d in zip(acc, ds)])


@partial(jax.jit, static_argnames=("from_models",), donate_argnums=(0,))
def _hist_lo(acc, base, xs, valid, b1, *, from_models):
    """acc[i, t] += histogram of the low bits of the |delta_i| whose high bits are b1[i, t]."""
    _, ds = _deltas(base, xs, from_models)
    ok = _in_tensor(base, valid)
    out = []
    for i, d in enumerate(ds):
        bits = _bits(d)
        out.append(jnp.stack([acc[i, t] + jnp.bincount(jnp.where(ok & ((bits >> 16) == b1[i, t]), bits & 0xFFFF,
                                                                 _LO).reshape(-1), length=_LO + 1)
                              for t in range(b1.shape[1])]))
    return jnp.stack(out)


def _in_tensor(x, valid):
    """Which elements of a chunk (1-D) or of a tensor laid out as [rows, step] are among its first `valid`."""
    if x.ndim == 1:
        return jnp.arange(x.shape[0]) < valid
    return (jnp.arange(x.shape[0])[:, None] * x.shape[1] + jnp.arange(x.shape[1])[None, :]) < valid


def rank_cut(chunks, targets: np.ndarray, n: int, from_models: bool):
    """For each model i and target rank m = targets[i, t] (ascending by (|delta|, flat index)):
    v (the magnitude bits at rank m), below (how many are smaller) and skip (how many equal to v rank
    below m: see tie_start).  Two histogram passes (radix select), no sort; exact."""
    m_models, t_count = targets.shape
    acc = np.zeros((m_models, _HI + 1), np.int32)
    for b, xs, valid, _ in chunks():
        acc = _hist_hi(acc, b, xs, valid, from_models=from_models)
    c1 = np.cumsum(to_host(acc)[:, :_HI], axis=1)
    mc = np.clip(targets, 0, n - 1)
    b1 = np.stack([np.searchsorted(c1[i], mc[i], side="right") for i in range(m_models)]).astype(np.int32)
    below1 = np.where(b1 > 0, np.take_along_axis(c1, np.maximum(b1 - 1, 0), axis=1), 0)
    acc2 = np.zeros((m_models, t_count, _LO + 1), np.int32)
    for b, xs, valid, _ in chunks():
        acc2 = _hist_lo(acc2, b, xs, valid, b1, from_models=from_models)
    h2 = to_host(acc2)[:, :, :_LO]
    v = np.zeros_like(b1)
    below = np.zeros_like(b1)
    for i in range(m_models):
        for t in range(t_count):
            c2 = below1[i, t] + np.cumsum(h2[i, t])
            b2 = int(np.searchsorted(c2, mc[i, t], side="right"))
            v[i, t] = (int(b1[i, t]) << 16) | b2
            below[i, t] = c2[b2 - 1] if b2 > 0 else below1[i, t]
    return _cut(targets, n, v, below)


def _cut(targets: np.ndarray, n: int, v: np.ndarray, below: np.ndarray) -> dict:
    """rank_cut's result from the magnitude bits v at each target rank and the count below them; `skip`:
    how many of the magnitudes equal to v rank below the target (by flat index), 0 where none does."""
    v = np.where(targets <= 0, 0, v)  # rank >= 0: everything (every |delta| has bits >= 0)
    below = np.where(targets <= 0, 0, below)
    need = (below != np.clip(targets, 0, None)) & (targets > 0) & (targets < n)
    return {"v": v.astype(np.int32), "below": below.astype(np.int32), "m": targets.astype(np.int32),
            "skip": np.where(need, targets - below, 0).astype(np.int64), "none": targets >= n}


def _host_magnitudes(b, xs, valid, from_models, every: int = 1):
    """Each model's |delta| bits over the valid part of a chunk (every `every`-th element), in NumPy (chunks
    kept on a CPU device are read in place: np.asarray does not copy)."""
    b = np.asarray(b)[:valid:every].astype(np.float32, copy=False)
    for x in xs:
        d = np.asarray(x)[:valid:every].astype(np.float32, copy=False)
        yield np.abs(d - b if from_models else d).view(np.int32)


SAMPLE_EVERY = 32  # rank_cut_host: one magnitude in 32 estimates the cut


def rank_cut_host(chunks, targets: np.ndarray, n: int, from_models: bool) -> dict | None:
    """rank_cut for inputs on the host, in NumPy, without histograms (XLA:CPU scatters them ~5 ns an
    element): a strided sample brackets each cut with a margin of 4 binomial standard deviations, a second
    pass counts the magnitudes below the bracket and keeps those inside it (a few percent), and the cut is
    selected among them.  The same exact (v, below) as rank_cut; None where a bracket missed its rank or the
    cut is a subnormal (which XLA may flush to zero), and the caller falls back to rank_cut."""
    m_models, t_count = targets.shape
    mc = np.clip(targets, 0, n - 1)
    samples = [[] for _ in range(m_models)]
    for b, xs, valid, _ in chunks():
        for i, bits in enumerate(_host_magnitudes(b, xs, valid, from_models, SAMPLE_EVERY)):
            samples[i].append(bits)
    lo = np.zeros((m_models, t_count), np.int64)
    hi = np.zeros((m_models, t_count), np.int64)
    for i in range(m_models):
        s = np.concatenate(samples[i])
        q = mc[i] / n
        r = q * len(s)
        margin = 4 * np.sqrt(len(s) * q * (1 - q)) + 4
        at_lo = np.clip((r - margin).astype(np.int64), 0, len(s) - 1)
        at_hi = np.clip((r + margin).astype(np.int64), 0, len(s) - 1)
        s = np.partition(s, np.unique(np.concatenate([at_lo, at_hi])))  # those order statistics, no sort
        lo[i] = np.where(r - margin > 0, s[at_lo], 0)
        hi[i] = np.where(r + margin < len(s) - 1, s[at_hi], np.iinfo(np.int32).max)
    under = np.zeros_like(lo)  # magnitudes below lo
    at = np.zeros_like(lo)  # equal to lo (a run of zeros is kept as a count, not as values)
    inside = [[[] for _ in range(t_count)] for _ in range(m_models)]  # in (lo, hi]
    for b, xs, valid, _ in chunks():
        for i, bits in enumerate(_host_magnitudes(b, xs, valid, from_models)):
            for t in range(t_count):  # bits - lo wraps past 2^31 below lo (bits are < 2^31): one subtraction
                off = bits.view(np.uint32) - np.uint32(lo[i, t])  # serves both tests
                near = bits[off <= np.uint32(hi[i, t] - lo[i, t])]
                under[i, t] += np.count_nonzero(off > np.uint32(0x7FFFFFFF))
                at[i, t] += np.count_nonzero(near == lo[i, t])
                inside[i][t].append(near[near > lo[i, t]])
    v = np.zeros_like(lo)
    below = np.zeros_like(lo)
    for i in range(m_models):
        for t in range(t_count):
            cand = np.concatenate(inside[i][t])
            k = mc[i, t] - under[i, t] - at[i, t]  # the cut's rank among the bracket's inside
            if mc[i, t] < under[i, t] or k >= len(cand):
                return None
            if k < 0:
                v[i, t], below[i, t] = lo[i, t], under[i, t]
            else:
                v[i, t] = np.partition(cand, k)[k]
                below[i, t] = under[i, t] + at[i, t] + np.count_nonzero(cand < v[i, t])
            if 0 < v[i, t] < 0x00800000:
                return None
    return _cut(targets, n, v, below)


@partial(jax.jit, static_argnames=("from_models",))
def _ties(base, xs, valid, v, *, from_models):
    """[m, t] counts of the magnitudes equal to v[i, t] in one chunk, and where they are (a mask [m, t, chunk])."""
    _, ds = _deltas(base, xs, from_models)
    ok = jnp.arange(base.shape[0]) < valid
    eq = jnp.stack([jnp.stack([(_bits(d) == v[i, t]) & ok for t in range(v.shape[1])]) for i, d in enumerate(ds)])
    return jnp.sum(eq, axis=-1, dtype=jnp.int32), eq


def tie_start(chunks, sel: dict, from_models: bool) -> dict:
    """Where a cut falls inside a run of equal magnitudes, ties rank by flat index: the first `skip` of
    them (in element order) are cut, the rest kept.  Adds to `sel` the (chunk, offset) of the first one
    kept, so the merge kernel's mask stays elementwise, (|d| > v) | (|d| == v & at or after it), with no
    scan or carry across chunks.  One pass over the chunks, only for tensors that have such a cut."""
    shape = sel["v"].shape
    sel["tie_chunk"], sel["tie_at"] = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    todo = sel["skip"] > 0
    if not todo.any():
        return sel
    seen = np.zeros(shape, np.int64)
    for b, xs, valid, c in chunks():
        if isinstance(b, jax.Array):
            counts, eq = _ties(b, xs, valid, sel["v"], from_models=from_models)
            counts = np.asarray(counts)
        else:
            eq = np.stack([[bits == sel["v"][i, t] for t in range(shape[1])]
                           for i, bits in enumerate(_host_magnitudes(b, xs, valid, from_models))])
            counts = eq.sum(axis=-1)
        for i, t in zip(*np.nonzero(todo & (seen + counts > sel["skip"]))):
            sel["tie_chunk"][i, t] = c
            sel["tie_at"][i, t] = np.flatnonzero(np.asarray(eq[i, t]))[sel["skip"][i, t] - seen[i, t]]
            todo[i, t] = False
        seen += counts
        if not todo.any():
            break
    return sel


def _rank_ge(bits, i, t, sel, chunk):
    """Elements of this chunk whose whole-tensor rank is at or above the cut (i, t): magnitudes above it,
    and those equal to it from the first kept one on (see tie_start)."""
    v = sel["v"][i, t]
    after = (chunk > sel["tie_chunk"][i, t]) | ((chunk == sel["tie_chunk"][i, t]) &
                                                 (jnp.arange(bits.shape[0]) >= sel["tie_at"][i, t]))
    return jnp.where(sel["none"][i, t], False, (bits > v) | ((bits == v) & after))


def _kept(d, i, how, p, sel, chunk, ok, key, cols):
    """(mask of kept elements, per-element 1/p for 'inverse' rescaling) of model i's delta."""
    if how in ("magnitude", "outliers"):
        bits = _bits(d)
        kept = _rank_ge(bits, i, 0, sel, chunk)
        if how == "outliers":  # drop the largest too: keep ranks in [lo, hi)
            kept = kept & ~_rank_ge(bits, i, 1, sel, chunk)
        inv = 1.0 / p["density"][i]
    elif how == "random":
        kept = jax.random.uniform(key, d.shape, jnp.float32) < p["density"][i]
        inv = 1.0 / p["density"][i]
    else:  # della: keep probability grows with the magnitude rank inside each row of the HF matrix
        rows = d.reshape(-1, cols)
        order = jnp.argsort(jnp.abs(rows), axis=1, stable=True)
        rank = jnp.argsort(order, axis=1, stable=True).astype(jnp.float32)
        rank_norm = rank / (cols - 1) if cols > 1 else jnp.full_like(rank, 0.5)
        prob = (p["density"][i] - p["epsilon"][i]) + rank_norm * (2.0 * p["epsilon"][i])
        kept = (jax.random.uniform(key, rows.shape, jnp.float32) < prob).reshape(d.shape)
        inv = (1.0 / prob).reshape(d.shape)
    return kept & ok, inv


@partial(jax.jit, static_argnames=("method", "rescale", "normalize", "from_models", "cols", "stats"))
def _apply(base, xs, valid, chunk, p, sel, *, method, rescale, normalize, from_models, cols, stats):
    """One chunk of the merge.  stats=True returns the per-chunk sums the whole-tensor scalars need
    (sum |delta_i|, sum |kept delta_i| for L1 rescaling; |base|^2, |model|^2, base.model for slerp)."""
    meth = METHODS[method]
    base, ds = _deltas(base, xs, from_models)
    ok = jnp.arange(base.shape[0]) < valid
    w = p["weight"].astype(jnp.float32)
    if meth.kind == "linear":
        out = _sum([(base + d) * w[i] for i, d in enumerate(ds)])
        return out / jnp.sum(w) if normalize else out
    if meth.kind == "slerp":
        v1 = base + ds[0]
        if stats:
            return jnp.stack([jnp.sum(base * base), jnp.sum(v1 * v1), jnp.sum(base * v1)])
        return p["coef"][0] * base + p["coef"][1] * v1
    weighted, sums = [], []
    for i, d in enumerate(ds):
        if meth.sparsify is None:
            s = d
        else:
            key = jax.random.fold_in(_key(p["seed"], p["nhash"], i), chunk)
            kept, inv = _kept(d, i, meth.sparsify, p, sel, chunk, ok, key, cols)
            masked = jnp.where(kept, d, 0.0)
            if stats:
                sums.append(jnp.stack([jnp.sum(jnp.abs(jnp.where(ok, d, 0.0))), jnp.sum(jnp.abs(masked))]))
                continue
            scale = {"inverse": inv, "l1": p["l1"][i], "none": 1.0}[rescale]
            s = jnp.where(p["density"][i] >= 1.0, d, masked * scale)  # density 1 leaves the delta untouched
        weighted.append(s * w[i])
    if stats:
        return jnp.stack(sums)
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
    return base + mixed * p["lambda"]


def _sum(xs):
    # models are few and static: unrolled adds (XLA CPU reduces a leading [m] axis of stacked
    # tensors ~100x slower than m-1 elementwise adds)
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def merge_flat(base, inputs, params: dict, *, method: str, rescale: str, normalize: bool, from_models: bool,
               shape: tuple[int, ...], out: np.ndarray | None = None):
    """Merge one tensor given flat (HF element order): host or device arrays; chunked.

    params: weight, density, epsilon [m], lo, hi [m] (kept ascending-rank window from the host),
    lambda, t, seed, nhash.  Returns fp32: written into `out` (a host array) when given, else a
    device array.
    """
    meth = METHODS[method]
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return out if out is not None else jnp.zeros((0,), jnp.float32)
    cols = int(np.prod(shape[1:], dtype=np.int64)) if meth.sparsify == "della" and len(shape) >= 2 else (
        n if meth.sparsify == "della" else 0)
    step = max(1, CHUNK // cols) * cols if cols else CHUNK  # della: whole rows per chunk
    m_models = len(inputs)
    if isinstance(base, jax.Array) and out is None:
        return _merge_on_device(base, tuple(inputs), params, meth, n, step, cols, method=method, rescale=rescale,
                                normalize=normalize, from_models=from_models)

    def read():
        for c, start in enumerate(range(0, n, step)):
            stop = min(n, start + step)
            pad = step - (stop - start)
            b = _pad(base[start:stop], pad)
            xs = tuple(_pad(x[start:stop], pad) for x in inputs)
            yield b, xs, np.int32(stop - start), c

    # several passes read the chunks: keep them on the device between passes unless the tensor is
    # big (an embedding is re-read from disk / the page cache instead, to keep memory to a few chunks)
    cached = ([(jax.device_put(b), jax.device_put(xs), v, c) for b, xs, v, c in read()]
              if n * (m_models + 1) <= CACHE_ELEMENTS else None)

    def chunks():
        return iter(cached) if cached is not None else read()

    p = {k: v for k, v in params.items() if k not in ("lo", "hi")}  # numpy: no eager device ops per tensor
    t_count = 2 if meth.sparsify == "outliers" else 1
    if meth.sparsify in ("magnitude", "outliers"):
        targets = np.stack([params["lo"], params["hi"]], axis=1)[:, :t_count]
        sel = rank_cut_host(chunks, targets, n, from_models) if not isinstance(base, jax.Array) else None
        sel = tie_start(chunks, sel or rank_cut(chunks, targets, n, from_models), from_models)
        sel = {k: sel[k] for k in ("v", "tie_chunk", "tie_at", "none")}  # what the kernel reads
    else:
        sel = {k: np.zeros((m_models, t_count), bool if k == "none" else np.int32)
               for k in ("v", "tie_chunk", "tie_at", "none")}
    static = dict(method=method, rescale=rescale, normalize=normalize, from_models=from_models, cols=cols)
    p["l1"] = np.ones((m_models,), np.float32)
    p["coef"] = np.ones((2,), np.float32)
    if (rescale == "l1" and meth.sparsify is not None) or meth.kind == "slerp":
        acc = 0.0  # per-chunk fp32 sums, combined in float64
        for b, xs, valid, c in chunks():
            acc = acc + np.asarray(_apply(b, xs, valid, np.uint32(c), p, sel, stats=True, **static), np.float64)
        if meth.kind == "slerp":
            p["coef"] = np.asarray(_slerp_coefs(float(params["t"]), *acc), np.float32)
        else:  # mergekit: match the L1 norm unless either norm is below 1e-7
            ok = (acc[:, 0] >= 1e-7) & (acc[:, 1] >= 1e-7)
            p["l1"] = np.where(ok, acc[:, 0] / np.where(ok, acc[:, 1], 1.0), 1.0).astype(np.float32)
    pieces = []
    for b, xs, valid, c in chunks():
        res = _apply(b, xs, valid, np.uint32(c), p, sel, stats=False, **static)
        pieces.append((c * step, int(valid), res))
        if out is not None and len(pieces) > 1:  # copy chunk c-1 out while chunk c computes
            _drain(out, pieces.pop(0))
    if out is None:
        return jnp.concatenate([res[:valid] for _, valid, res in pieces])
    for piece in pieces:
        _drain(out, piece)
    return out


def _merge_on_device(base, inputs, params, meth, n, step, cols, **static):
    """merge_flat for arrays already on the devices (sharded on a mesh): no chunk slicing on the host.
    The histogram and tie passes see the whole tensor as one chunk; the kernel runs over its [chunks, step]
    rows at once (vmapped), each row with its own chunk index, so random masks, tie positions and per-chunk
    sums are exactly the streamed path's."""
    m_models = len(inputs)
    mesh = getattr(base.sharding, "mesh", None)
    spread = mesh.size if isinstance(base.sharding, NamedSharding) else 1
    rows = -(-n // (step * spread)) * spread  # a whole number of rows on each device: the reshape moves nothing
    where = NamedSharding(mesh, P(tuple(mesh.axis_names), None)) if spread > 1 else None
    b2 = _as_rows(base, rows=rows, step=step, sharding=where)
    xs2 = tuple(_as_rows(x, rows=rows, step=step, sharding=where) for x in inputs)
    whole = lambda: iter([(b2, xs2, np.int32(n), 0)])  # noqa: E731
    p = {k: v for k, v in params.items() if k not in ("lo", "hi")}
    t_count = 2 if meth.sparsify == "outliers" else 1
    if meth.sparsify in ("magnitude", "outliers"):
        targets = np.stack([params["lo"], params["hi"]], axis=1)[:, :t_count]
        sel = _tie_rows(b2, xs2, n, rank_cut(whole, targets, n, static["from_models"]), static["from_models"])
    else:
        sel = {k: np.zeros((m_models, t_count), bool if k == "none" else np.int32)
               for k in ("v", "tie_chunk", "tie_at", "none")}
    p["l1"] = np.ones((m_models,), np.float32)
    p["coef"] = np.ones((2,), np.float32)
    valid = np.clip(n - step * np.arange(rows), 0, step).astype(np.int32)
    chunk = np.arange(rows, dtype=np.uint32)
    if (static["rescale"] == "l1" and meth.sparsify is not None) or meth.kind == "slerp":
        acc = 0.0
        for row in to_host(_apply_rows(b2, xs2, valid, chunk, p, sel, stats=True, cols=cols, **static)).astype(np.float64):
            acc = acc + row  # in chunk order, as the streamed path adds them
        if meth.kind == "slerp":
            p["coef"] = np.asarray(_slerp_coefs(float(params["t"]), *acc), np.float32)
        else:
            ok = (acc[:, 0] >= 1e-7) & (acc[:, 1] >= 1e-7)
            p["l1"] = np.where(ok, acc[:, 0] / np.where(ok, acc[:, 1], 1.0), 1.0).astype(np.float32)
    res = _apply_rows(b2, xs2, valid, chunk, p, sel, stats=False, cols=cols, **static)
    return res.reshape(-1)[:n] if rows * step > n else res.reshape(-1)


@partial(jax.jit, static_argnames=("rows", "step", "sharding"))
def _as_rows(x, *, rows, step, sharding):
    """A flat tensor zero-padded to [rows, step], its rows spread over `sharding`'s devices."""
    y = jnp.pad(x, (0, rows * step - x.shape[0])).reshape(rows, step)
    return y if sharding is None else jax.lax.with_sharding_constraint(y, sharding)


def _tie_rows(b2, xs2, n: int, sel: dict, from_models: bool) -> dict:
    """tie_start for a tensor on the devices as [rows, step]: the per-row counts of the magnitudes equal to
    each cut locate the row of the first kept tie, and only that row's mask comes to the host."""
    out = {k: sel[k] for k in ("v", "none")}
    out["tie_chunk"], out["tie_at"] = np.zeros(sel["v"].shape, np.int32), np.zeros(sel["v"].shape, np.int32)
    todo = sel["skip"] > 0
    if not todo.any():
        return out
    counts = to_host(_tie_counts(b2, xs2, np.int32(n), sel["v"], from_models=from_models))
    for i, t in zip(*np.nonzero(todo)):
        cum = np.cumsum(counts[i, t], dtype=np.int64)
        r = int(np.searchsorted(cum, sel["skip"][i, t], side="right"))  # the first row passing `skip` ties
        within = int(sel["skip"][i, t] - (cum[r - 1] if r else 0))
        row = to_host(_tie_row(b2, xs2, np.int32(n), np.int32(r), sel["v"][i, t], model=int(i), from_models=from_models))
        out["tie_chunk"][i, t], out["tie_at"][i, t] = r, np.flatnonzero(row)[within]
    return out


def _equal_rows(b2, xs2, n, v, i, from_models):
    _, ds = _deltas(b2, xs2, from_models)
    return (_bits(ds[i]) == v) & _in_tensor(b2, n)


@partial(jax.jit, static_argnames=("from_models",))
def _tie_counts(b2, xs2, n, v, *, from_models):
    """[m, t, rows]: how many magnitudes of each row equal v[i, t]."""
    return jnp.stack([jnp.stack([jnp.sum(_equal_rows(b2, xs2, n, v[i, t], i, from_models), axis=1, dtype=jnp.int32)
                                 for t in range(v.shape[1])]) for i in range(len(xs2))])


@partial(jax.jit, static_argnames=("model", "from_models"))
def _tie_row(b2, xs2, n, r, v, *, model, from_models):
    """Row r's mask of the magnitudes of model `model` equal to v."""
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, r, 1, axis=0)  # noqa: E731
    shift = r * b2.shape[-1]  # the row's global offset, for the padding test
    return _equal_rows(rows(b2), tuple(rows(x) for x in xs2), n - shift, v, model, from_models)[0]


def to_host(x) -> np.ndarray:
    """A jax array as NumPy, also when it spans other processes' devices (replicated: the local copy;
    sharded: gathered from every process, which must all call this)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@partial(jax.jit, static_argnames=("method", "rescale", "normalize", "from_models", "cols", "stats"))
def _apply_rows(base, xs, valid, chunk, p, sel, **static):
    one = lambda row: _apply(*row, p, sel, **static)  # noqa: E731
    if static["stats"]:  # row by row (a loop): each sum reduces one chunk as the streamed kernel does, bit for bit
        return jax.lax.map(one, (base, xs, valid, chunk))
    return jax.vmap(lambda *row: one(row))(base, xs, valid, chunk)


def _drain(out, piece):
    start, valid, res = piece
    out[start:start + valid] = np.asarray(res)[:valid]


def _pad(x, pad):
    if not pad:
        return x
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.zeros(pad, x.dtype)])
    return jnp.pad(x, (0, pad))


def _slerp_coefs(t, aa, bb, ab, threshold=0.9995, eps=1e-8):
    """mergekit 0.1.5's slerp coefficients from the whole tensors' norms and dot product."""
    na, nb = np.sqrt(aa), np.sqrt(bb)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = float(np.clip(ab / (na * nb), -1.0, 1.0))
    if abs(dot) > threshold:  # (nearly) collinear or antipodal: lerp
        return [1 - t, t]
    theta = np.arccos(dot)
    return [np.sin((1 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)]
