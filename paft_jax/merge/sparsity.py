"""How sparse are the deltas (model - base), and how much do two of them disagree in sign?

Per tensor and per module type (q_proj, ..., mlp projections, embed, lm_head, norm): the exact-zero
fraction of the delta; the fraction "near zero" under each tolerance, relative by default
(|delta| <= tol * |base|, elementwise: "this weight moved by less than tol of itself") or absolute
(|delta| <= tol); L1 and L2 norms (and L2 relative to the base's); and, for the first two models,
the fraction of elements where both deltas are non-zero and, among those, where their signs agree:
the interference TIES' sign election resolves; and the fraction "visible in bf16": entries where
bf16(base + delta) != bf16(base), i.e. the weight a bf16 checkpoint (what 7B models ship in) would change.
A delta entry too small to move its weight's bf16 value is, for the shipped model, a zero.  Tensors are
read one at a time (memory-mapped).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
from ml_dtypes import bfloat16  # JAX's own dtype package (a dependency of jax)

from paft_jax.merge.engine import is_float
from paft_jax.merge.sources import TensorSource, check_compatible, open_source, read_order

DEFAULT_TOLERANCES = (1e-6, 1e-4, 1e-3)
MODULES = [("embed", r"embed_tokens"), ("lm_head", r"lm_head"), ("q_proj", r"q_proj"), ("k_proj", r"k_proj"),
           ("v_proj", r"v_proj"), ("o_proj", r"o_proj"), ("gate_proj", r"gate_proj"), ("up_proj", r"up_proj"),
           ("down_proj", r"down_proj"), ("norm", r"norm")]


def module_type(name: str) -> str:
    for kind, pat in MODULES:
        if re.search(pat, name):
            return kind + ("_bias" if name.endswith(".bias") else "")
    return "other"


def bf16_visible(base, delta, xp=np):
    """Where adding `delta` changes the weight once both are cast to bfloat16 (round to nearest even)."""
    b = xp.asarray(base, xp.float32)
    return (b + xp.asarray(delta, xp.float32)).astype(bfloat16) != b.astype(bfloat16)


def _raw_stats(b, ds, tols: Sequence[float], relative: bool, xp=np) -> dict:
    """One tensor's counts and sums, in NumPy (float64 sums) or traced by jax.numpy (float32: on the devices)."""
    wide = np.float64 if xp is np else xp.float32
    out = {"models": []}
    ab = xp.abs(b)
    for d in ds:
        ad = xp.abs(d)
        out["models"].append({
            "zero": xp.count_nonzero(d == 0),
            "under": [xp.count_nonzero(ad <= (t * ab if relative else t)) for t in tols],
            "bf16_visible": xp.count_nonzero(bf16_visible(b, d, xp)),
            "l1": ad.sum(dtype=wide),
            "l2_sq": xp.square(d.astype(wide)).sum(),
        })
    out["base_l2_sq"] = xp.square(b.astype(wide)).sum()
    if len(ds) >= 2:
        both = (ds[0] != 0) & (ds[1] != 0)
        out["both_nonzero"] = xp.count_nonzero(both)
        out["sign_agree"] = xp.count_nonzero(both & (xp.sign(ds[0]) == xp.sign(ds[1])))
    return out


def _python(raw: dict, numel: int) -> dict:
    """Counts -> int, sums -> float (host values)."""
    out = {"numel": int(numel), "base_l2_sq": float(raw["base_l2_sq"]), "models": []}
    for m in raw["models"]:
        out["models"].append({"zero": int(m["zero"]), "under": [int(u) for u in m["under"]],
                              "bf16_visible": int(m["bf16_visible"]), "l1": float(m["l1"]),
                              "l2_sq": float(m["l2_sq"])})
    for k in ("both_nonzero", "sign_agree"):
        if k in raw:
            out[k] = int(raw[k])
    return out


def _tensor_stats(b: np.ndarray, ds: list[np.ndarray], tols: Sequence[float], relative: bool) -> dict:
    return _python(_raw_stats(b, ds, tols, relative), b.size)


def _finish(s: dict, tols: Sequence[float]) -> dict:
    """Counts -> fractions and norms."""
    n = max(1, s["numel"])
    res = {"numel": s["numel"], "models": []}
    for m in s["models"]:
        res["models"].append({"zero_frac": m["zero"] / n,
                              "under_frac": {f"{t:g}": u / n for t, u in zip(tols, m["under"])},
                              "bf16_visible_frac": m["bf16_visible"] / n,
                              "l1": m["l1"], "l2": float(np.sqrt(m["l2_sq"])),
                              "rel_l2": float(np.sqrt(m["l2_sq"] / s["base_l2_sq"])) if s["base_l2_sq"] else None})
    if "both_nonzero" in s:
        res["both_nonzero_frac"] = s["both_nonzero"] / n
        res["sign_agreement"] = s["sign_agree"] / s["both_nonzero"] if s["both_nonzero"] else None
    return res


def _add(acc: dict | None, s: dict) -> dict:
    if acc is None:
        return {"numel": s["numel"], "base_l2_sq": s["base_l2_sq"],
                "models": [dict(m, under=list(m["under"])) for m in s["models"]],
                **{k: s[k] for k in ("both_nonzero", "sign_agree") if k in s}}
    acc["numel"] += s["numel"]
    acc["base_l2_sq"] += s["base_l2_sq"]
    for a, m in zip(acc["models"], s["models"]):
        a["zero"] += m["zero"]
        a["bf16_visible"] += m["bf16_visible"]
        a["under"] = [x + y for x, y in zip(a["under"], m["under"])]
        a["l1"] += m["l1"]
        a["l2_sq"] += m["l2_sq"]
    for k in ("both_nonzero", "sign_agree"):
        if k in s:
            acc[k] += s[k]
    return acc


class SparsityStats:
    """The report built tensor by tensor: `add(name, base, deltas)` with float32 arrays (the streamed merge
    calls it as it goes, `analyze` in a pass of its own); `report(base_label, model_labels)` at the end."""

    def __init__(self, tolerances: Sequence[float] | None = None, relative: bool = True):
        self.tols = tuple(DEFAULT_TOLERANCES if tolerances is None else tolerances)
        if any(t < 0 for t in self.tols):
            raise ValueError(f"tolerances must be >= 0, got {list(self.tols)}")
        self.relative = relative
        self.tensors: dict = {}
        self._modules: dict = {}
        self._total: dict | None = None
        self._jitted = None

    def add(self, name: str, base: np.ndarray, deltas: Sequence[np.ndarray]) -> None:
        self._add(name, _tensor_stats(base, list(deltas), self.tols, self.relative))

    def add_device(self, name: str, base, deltas: Sequence) -> None:
        """`add` for jax arrays (sharded on a mesh): the counts are computed where the arrays are (sums in
        float32), and only they come to the host."""
        import jax
        import jax.numpy as jnp
        if self._jitted is None:
            self._jitted = jax.jit(lambda b, ds: _raw_stats(b.astype(jnp.float32), [d.astype(jnp.float32) for d in ds],
                                                            self.tols, self.relative, jnp))
        from paft_jax.merge.methods import to_host
        self._add(name, _python(jax.tree_util.tree_map(to_host, self._jitted(base, list(deltas))), base.size))

    def _add(self, name: str, s: dict) -> None:
        self.tensors[name] = _finish(s, self.tols)
        kind = module_type(name)
        self._modules[kind] = _add(self._modules.get(kind), s)
        self._total = _add(self._total, s)

    def report(self, base: str, models: Sequence[str], inputs: Sequence[dict] | None = None) -> dict:
        """`inputs`: per model, what its delta is (`describe`), so a LoRA branch or adapter states its rank."""
        if self._total is None:
            raise ValueError(f"sparsity: no floating-point tensors in {base}")
        return {"base": base, "models": list(models), "inputs": list(inputs or [{} for _ in models]),
                "tolerances": list(self.tols),
                "tolerance_kind": "relative" if self.relative else "absolute",
                "tensors": self.tensors, "modules": {k: _finish(v, self.tols) for k, v in self._modules.items()},
                "total": _finish(self._total, self.tols)}


def describe(src) -> dict:
    """What a merge input's delta is: {"delta": "lora", "rank", "targets"} for a PEFT adapter or a LoRA branch
    (its materialized delta is what the statistics measure), {"delta": "dense"} for a dense branch, {} for a
    whole model."""
    rank = getattr(src, "rank", None)
    if rank is not None:  # BASE+ADAPTER
        return {"delta": "lora", "rank": int(rank), "targets": list(src.targets)}
    dcfg = getattr(src, "delta", None)  # a branch checkpoint (merge input) or its TrainConfig
    if dcfg is not None:  # a branch checkpoint
        if dcfg.kind == "lora":
            return {"delta": "lora", "rank": dcfg.lora_rank, "targets": list(dcfg.lora_targets)}
        return {"delta": "dense"}
    return {}


def analyze(base: str | Path | TensorSource, models: Sequence[str | Path | TensorSource],
            tolerances: Sequence[float] | None = None, relative: bool = True) -> dict:
    """The sparsity report of each model's delta from `base` (dict, JSON-ready)."""
    stats = SparsityStats(tolerances, relative)
    bsrc = base if hasattr(base, "get") else open_source(base)
    msrc = [m if hasattr(m, "get") else open_source(m) for m in models]
    if not msrc:
        raise ValueError("sparsity: give at least one model")
    check_compatible(bsrc, msrc)
    for name in read_order(bsrc.names(), [bsrc, *msrc]):
        if not is_float(bsrc.dtype(name)):
            continue
        b = np.asarray(bsrc.get(name)).astype(np.float32)
        stats.add(name, b, [np.asarray(m.get(name)).astype(np.float32) if m.is_delta
                            else np.asarray(m.get(name)).astype(np.float32) - b for m in msrc])
    stats.tensors = {n: stats.tensors[n] for n in bsrc.names() if n in stats.tensors}  # the base's order
    return stats.report(bsrc.label, [m.label for m in msrc], [describe(m) for m in msrc])


def format_table(rep: dict, per_tensor: bool = False) -> str:
    tols = rep["tolerances"]
    rel = "x|base|" if rep["tolerance_kind"] == "relative" else "abs"
    head = f"{'':<44} {'numel':>11} {'model':>5} {'zero':>7} " + " ".join(
        f"{'<=' + format(t, 'g'):>8}" for t in tols) + f" {'bf16vis':>8} {'L1':>10} {'L2':>9} {'L2/base':>8}"
    if len(rep["models"]) >= 2:
        head += f" {'both!=0':>8} {'sign=':>6}"
    lines = [f"deltas from {rep['base']} (tolerances {rel}):"]
    for i, (m, d) in enumerate(zip(rep["models"], rep.get("inputs") or [{}] * len(rep["models"]))):
        what = (f" (LoRA rank {d['rank']} on {', '.join(d['targets'])}: its materialized delta)"
                if d.get("delta") == "lora" else " (dense delta)" if d.get("delta") == "dense" else "")
        lines.append(f"  model {i}: {m}{what}")
    lines.append(head)

    def rows(label, r):
        for i, m in enumerate(r["models"]):
            line = (f"{label if i == 0 else '':<44} {r['numel'] if i == 0 else '':>11} {i:>5} "
                    f"{m['zero_frac']:>7.2%} " + " ".join(f"{m['under_frac'][format(t, 'g')]:>8.2%}" for t in tols)
                    + f" {m['bf16_visible_frac']:>8.2%} {m['l1']:>10.4g} {m['l2']:>9.4g} {m['rel_l2'] if m['rel_l2'] is not None else float('nan'):>8.2g}")
            if i == 0 and "both_nonzero_frac" in r:
                agree = r["sign_agreement"]
                line += f" {r['both_nonzero_frac']:>8.2%} {agree if agree is not None else float('nan'):>6.1%}"
            lines.append(line)

    for k in sorted(rep["modules"]):
        rows(k, rep["modules"][k])
    rows("TOTAL", rep["total"])
    if per_tensor:
        lines.append("")
        for k, r in rep["tensors"].items():
            rows(k[-44:], r)
    return "\n".join(lines)


def figure(rep: dict, names: list[str] | None = None):
    """The sparsity figure of a report (`analyze`): per module type, each model's exact-zero, near-zero and
    bf16-unchanged fractions, and (two models or more) the first two's sign agreement.  Every axis says what
    it measures and in which unit; the legend sits below the axes (outside: it never covers a bar).  `names`:
    what to call the models (default: their paths' last parts)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted(rep["modules"])
    tols = rep["tolerances"]
    n_models = len(rep["models"])
    names = list(names or [str(m).rstrip("/").rsplit("/", 1)[-1] or f"model {i}" for i, m in enumerate(rep["models"])])
    two = n_models >= 2
    # constrained layout: room for the rotated module names, the axis labels and the legend outside
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(13 if two else 8, 5), squeeze=False, layout="constrained")
    ax = axes[0][0]
    x = np.arange(len(kinds))
    near = "|d| <= {:g} |w|" if rep["tolerance_kind"] == "relative" else "|d| <= {:g}"
    series = [("exact zero", lambda m: m["zero_frac"])]
    series += [(near.format(t), lambda m, key=format(t, "g"): m["under_frac"][key]) for t in tols]
    series += [("bf16 weight unchanged", lambda m: 1 - m["bf16_visible_frac"])]
    width = 0.8 / (n_models * len(series))
    bars = {}
    for i in range(n_models):
        for j, (label, value) in enumerate(series):
            vals = [value(rep["modules"][k]["models"][i]) for k in kinds]
            bars[i, j] = ax.bar(x + (i * len(series) + j) * width - 0.4, vals, width, label=f"{names[i]}: {label}")
    ax.set_xticks(x, kinds, rotation=45, ha="right")
    ax.set_xlabel("module type (tensors grouped by name)")
    ax.set_ylabel("fraction of the delta's entries (0-1)")
    ax.set_title(f"delta sparsity (d = model - base, w = base weight; tolerances {rep['tolerance_kind']})")
    ax.set_ylim(0, 1)
    # one column per kind of count, one row per model (a legend fills column by column)
    order = [(i, j) for j in range(len(series)) for i in range(n_models)]
    fig.legend([bars[o] for o in order], [bars[o].get_label() for o in order], loc="outside lower center",
               ncol=len(series), fontsize=7, frameon=False)
    if two:
        ax = axes[0][1]
        ax.bar(x, [rep["modules"][k].get("sign_agreement") or 0 for k in kinds], 0.6)
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xticks(x, kinds, rotation=45, ha="right")
        ax.set_xlabel("module type (tensors grouped by name)")
        ax.set_ylim(0, 1)
        ax.set_ylabel("same sign, where both deltas != 0 (fraction, 0-1)")
        ax.set_title(f"sign agreement of {names[0]} and {names[1]} (dashed: chance)")
    return fig


def plot(rep: dict, path: str | Path, names: list[str] | None = None) -> Path:
    """`figure` as a PNG at `path`."""
    import matplotlib.pyplot as plt
    fig = figure(rep, names)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
