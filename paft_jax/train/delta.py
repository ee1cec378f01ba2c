"""The trainable state of a branch: a delta on top of the frozen, shared base.

dense: a pytree with the base's structure, zero at the start (the branch *is* the base at step 0,
       which makes the DPO reference the base itself).
lora:  for each targeted kernel W of shape [layers, *in, *out], factors A [layers, *in, r] (random)
       and B [layers, r, *out] (zero), delta = alpha / r * A @ B.

Deltas are kept in float32 whatever the base's dtype: small updates to bf16 weights would round away.
The optimizer only ever sees this pytree, so no optimizer state exists for the base.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from paft_jax.mesh import tree_shardings
from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import abstract_params

# kernels LoRA can target, and how many leading (after `layers`) dimensions are inputs
LORA_MODULES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


@dataclass
class DeltaConfig:
    """What a branch trains.  kind: dense | lora."""
    kind: str = "dense"
    # dense: parameters (regex on paths like 'layers/mlp/up_proj/kernel') kept frozen at the base value
    freeze: list[str] = field(default_factory=list)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        if self.kind not in ("dense", "lora"):
            raise ValueError(f"delta.kind={self.kind!r}: expected 'dense' or 'lora'")
        if self.kind == "lora":
            if self.lora_rank < 1:
                raise ValueError(f"delta.lora_rank={self.lora_rank} must be >= 1")
            bad = [t for t in self.lora_targets if t not in LORA_MODULES]
            if bad or not self.lora_targets:
                raise ValueError(f"delta.lora_targets {bad or self.lora_targets} match no module; "
                                 f"LoRA can target {sorted(LORA_MODULES)}")
        for pat in self.freeze:
            re.compile(pat)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _flat(tree) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))[0]}


def _set(tree: dict, path: str, value) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def lora_paths(cfg: ModelConfig, targets: list[str]) -> list[str]:
    shapes, _ = abstract_params(cfg)
    return [p for p in _flat(shapes) if p.endswith("/kernel") and p.split("/")[-2] in targets]


def delta_abstract(cfg: ModelConfig, dcfg: DeltaConfig) -> tuple[Any, Any]:
    """(ShapeDtypeStruct tree, logical-axes tree) of the delta, float32."""
    shapes, axes = abstract_params(cfg)
    if dcfg.kind == "dense":
        f32 = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
        return f32, axes
    flat_s, flat_a = _flat(shapes), _flat(axes)
    out_s: dict = {}
    out_a: dict = {}
    r = dcfg.lora_rank
    for p in lora_paths(cfg, dcfg.lora_targets):
        n_in = LORA_MODULES[p.split("/")[-2]]
        shp, ax = flat_s[p].shape, flat_a[p]
        _set(out_s, p[: -len("/kernel")] + "/lora_a", jax.ShapeDtypeStruct(shp[: 1 + n_in] + (r,), jnp.float32))
        _set(out_s, p[: -len("/kernel")] + "/lora_b", jax.ShapeDtypeStruct((shp[0], r) + shp[1 + n_in:], jnp.float32))
        _set(out_a, p[: -len("/kernel")] + "/lora_a", tuple(ax[: 1 + n_in]) + (None,))
        _set(out_a, p[: -len("/kernel")] + "/lora_b", (ax[0], None) + tuple(ax[1 + n_in:]))
    return out_s, out_a


def delta_shardings(cfg: ModelConfig, dcfg: DeltaConfig, mesh: Mesh, rules: tuple) -> Any:
    shapes, axes = delta_abstract(cfg, dcfg)
    return tree_shardings(axes, shapes, mesh, rules)


def init_delta(cfg: ModelConfig, dcfg: DeltaConfig, rng: jax.Array, mesh: Mesh | None = None,
               rules: tuple = ()) -> Any:
    """Zero dense delta, or LoRA factors (A ~ U(+-1/sqrt(fan_in)) as PEFT's default, B = 0)."""
    dcfg.validate()
    shapes, _ = delta_abstract(cfg, dcfg)

    def make():
        if dcfg.kind == "dense":
            return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        flat = _flat(shapes)
        out: dict = {}
        for i, (p, s) in enumerate(sorted(flat.items())):
            if p.endswith("lora_a"):
                fan_in = int(np.prod(s.shape[1:-1]))
                bound = 1.0 / np.sqrt(fan_in)
                v = jax.random.uniform(jax.random.fold_in(rng, i), s.shape, s.dtype, -bound, bound)
            else:
                v = jnp.zeros(s.shape, s.dtype)
            _set(out, p, v)
        return out

    if mesh is None:
        return jax.jit(make)()
    return jax.jit(make, out_shardings=delta_shardings(cfg, dcfg, mesh, rules))()


def _lora_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """A [L, *in, r] @ B [L, r, *out] -> [L, *in, *out]."""
    letters = "abcdefgh"
    n_in, n_out = a.ndim - 2, b.ndim - 2
    ins, outs = letters[:n_in], letters[n_in:n_in + n_out]
    return jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b)


def materialize(delta: Any, dcfg: DeltaConfig, base: Any) -> Any:
    """The dense delta (base's structure) a delta state stands for; zeros where LoRA trains nothing."""
    if dcfg.kind == "dense":
        return delta
    scale = dcfg.lora_alpha / dcfg.lora_rank
    flat_d = _flat(delta)
    out: dict = {}
    for p, w in _flat(base).items():
        prefix = p[: -len("/kernel")] if p.endswith("/kernel") else None
        if prefix is not None and prefix + "/lora_a" in flat_d:
            d = scale * _lora_product(flat_d[prefix + "/lora_a"], flat_d[prefix + "/lora_b"])
        else:
            d = jnp.zeros(w.shape, jnp.float32)
        _set(out, p, d)
    return out


def freeze_mask(base: Any, dcfg: DeltaConfig) -> Any | None:
    """Pytree of bools (True = trainable) for a dense delta with `freeze` patterns, else None."""
    if dcfg.kind != "dense" or not dcfg.freeze:
        return None
    pats = [re.compile(p) for p in dcfg.freeze]
    matched = {p: False for p in dcfg.freeze}

    def keep(path, _):
        s = path_str(path)
        hit = [p.pattern for p in pats if p.search(s)]
        for h in hit:
            matched[h] = True
        return not hit

    mask = jax.tree_util.tree_map_with_path(keep, base)
    unused = [p for p, m in matched.items() if not m]
    if unused:
        raise ValueError(f"delta.freeze patterns {unused} match no parameter (paths look like "
                         f"'layers/self_attn/q_proj/kernel', 'embed_tokens/embedding')")
    return mask


def lora_variables(delta: Any, dcfg: DeltaConfig) -> Any:
    """The "lora" collection the decoder reads: the factors with alpha / r folded into B (a small tensor;
    the model then adds (x A) B' to each targeted projection)."""
    scale = dcfg.lora_alpha / dcfg.lora_rank
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * scale if str(getattr(p[-1], "key", p[-1])) == "lora_b" else x, delta)


@dataclass(frozen=True)
class LowRank:
    """A stacked kernel delta [L, *in, *out] as rank-r factors A [L, *in, r] @ B [L, r, *out] (the best rank-r
    approximation of each layer's matrix, Eckart-Young), with what the truncation leaves out: the squared
    Frobenius norms of the residual and of the delta, per layer."""
    lora_a: np.ndarray
    lora_b: np.ndarray
    residual_sq: np.ndarray
    total_sq: np.ndarray

    @property
    def relative_error(self) -> float:
        """||delta - A @ B||_F / ||delta||_F over all layers (0 for a zero delta)."""
        total = float(self.total_sq.sum())
        return float(np.sqrt(self.residual_sq.sum() / total)) if total > 0 else 0.0


def low_rank(kernel: Any, n_in: int, rank: int) -> LowRank:
    """Truncated SVD, layer by layer, of a dense kernel delta [L, *in, *out] (`n_in` input dimensions after
    the layer axis): singular values split as sqrt(s) into both factors, so A @ B has scale 1 (lora_alpha = r).
    Runs where `kernel` lives (the device for a restored leaf), one layer's matrix at a time."""
    shape = tuple(kernel.shape)
    ins, outs = shape[1:1 + n_in], shape[1 + n_in:]
    m, n = int(np.prod(ins)), int(np.prod(outs))
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"--lora-rank {rank} is outside 1..{min(m, n)} for a [{m} x {n}] projection")
    svd = jax.jit(lambda w: jnp.linalg.svd(w, full_matrices=False))
    a, b, res, tot = [], [], [], []
    for i in range(shape[0]):
        u, s, vt = svd(jnp.asarray(kernel[i], jnp.float32).reshape(m, n))
        u, s, vt = np.asarray(u), np.asarray(s, np.float64), np.asarray(vt)
        root = np.sqrt(s[:rank]).astype(np.float32)
        a.append((u[:, :rank] * root).reshape(*ins, rank))
        b.append((root[:, None] * vt[:rank]).reshape(rank, *outs))
        res.append(float((s[rank:] ** 2).sum()))
        tot.append(float((s ** 2).sum()))
    return LowRank(np.stack(a), np.stack(b), np.asarray(res), np.asarray(tot))
