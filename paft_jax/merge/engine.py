"""Merge one tensor from host-resolved parameters; the streamed merge of HF directories to an HF directory.

`merge_array` is shared by the streamed and the in-memory (pytree) paths, so both apply exactly the
same resolved parameters and the same jitted function to the same flat HF-layout tensor.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from paft_jax import publish
from paft_jax.hf.st_io import parse_size, plan_shards, write_streaming
from paft_jax.hf.verifier import start_verifier
from paft_jax.merge.methods import merge_flat, name_hash
from paft_jax.merge.recipe import MergeSpec, TensorParams, rank_window
from paft_jax.merge.sources import TensorSource, check_compatible, num_layers, open_source, read_order

log = logging.getLogger(__name__)

# files copied from the base next to the merged weights (tokenizer_source: base)
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
             "chat_template.json")


def tensor_args(spec: MergeSpec, tp: TensorParams, name: str, shape: tuple[int, ...]) -> dict:
    """The traced arguments of `merge_tensor` for one tensor (rank windows computed here, in float64)."""
    n = math.prod(shape)
    windows = [rank_window(spec.method, n, float(d), float(g)) for d, g in zip(tp.density, tp.gamma)]
    return {"weight": tp.weight.astype(np.float32), "density": tp.density.astype(np.float32),
            "lo": np.asarray([w[0] for w in windows], np.int32), "hi": np.asarray([w[1] for w in windows], np.int32),
            "epsilon": tp.epsilon.astype(np.float32),
            "lambda": np.float32(tp.lam), "t": np.float32(tp.t), "seed": np.uint32(spec.seed),
            "nhash": np.uint32(name_hash(name))}


def is_float(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))  # numpy's issubdtype says no for bfloat16


class MinusBase:
    """A model's flat tensor minus the base's, both sliced on demand (fp32): a delta read chunk by chunk."""

    dtype = np.dtype(np.float32)

    def __init__(self, x, base):
        self.x, self.base, self.shape = x, base, tuple(x.shape)

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.x[sl], np.float32) - np.asarray(self.base[sl], np.float32)


def merge_array(spec: MergeSpec, name: str, shape: tuple[int, ...], base, inputs: Sequence, *,
                from_models: bool, layers: int | None, tp: TensorParams | None = None, out: np.ndarray | None = None):
    """Merge one tensor given as flat arrays (host or device) in HF element order; returns fp32 flat,
    or None when the tensor is to be kept as the base's (an override's skip, or not floating point)."""
    if not is_float(base.dtype):
        return None
    tp = tp or spec.resolve(name, layers)
    if tp.skip:
        return None
    return merge_flat(base, tuple(inputs), tensor_args(spec, tp, name, shape), method=spec.method,
                      rescale=tp.rescale, normalize=tp.normalize, from_models=from_models, shape=tuple(shape), out=out)


@dataclass
class MergeResult:
    out: Path | str  # a gs:// output stays a URL
    seconds: float
    tensors: int
    bytes_written: int
    verify: object | None = None


def merge_to_hf(spec: MergeSpec, base: str | Path | TensorSource, models: Sequence[str | Path | TensorSource],
                out: str | Path, *, recipe_text: str | None = None, max_shard_size: int | str = "2GB",
                overwrite: bool = False, verify: bool = True, atol: float = 1e-3, stats=None,
                verifier=None) -> MergeResult:
    """Stream a merge: tensor by tensor from the inputs (memory-mapped) into sharded safetensors.

    Host memory holds the base's and the models' copies of one tensor and its result, never a model.
    The directory (weights, config, tokenizer files, model card with the recipe) is written under a
    temporary name; unless verify=False or torch is missing, it is loaded with transformers and its
    logits compared with paft_jax's import of the same files; only then is it published
    (`paft_jax.publish.staged`: an older output stays readable until then, and `overwrite` replaces only
    a previous paft_jax export).  Inputs and `out` may be gs:// URLs: inputs are fetched whole to a local
    temporary directory.

    Tensors are written in `sources.read_order` (a checkpoint input restores each leaf once).  `stats`
    (e.g. `merge.sparsity.SparsityStats`): its `add(name, base, deltas)` sees every float tensor's base and
    input deltas (float32) in the same pass, so a report needs no second read of the inputs.
    `verifier`: a started `hf.verifier.Verifier` to check with (the CLI starts one before its own imports);
    by default one is started here when `verify`.  It is closed on return either way.
    """
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if verify and verifier is None:
            verifier = start_verifier(atol, base.config if hasattr(base, "get") else base)
        if verifier is not None:
            stack.callback(verifier.close)
        return _merge_to_hf(spec, base, models, out, recipe_text=recipe_text, max_shard_size=max_shard_size,
                            overwrite=overwrite, verifier=verifier if verify else None, stats=stats, t0=t0)


def _merge_to_hf(spec, base, models, out, *, recipe_text, max_shard_size, overwrite, verifier, stats, t0):
    if len(models) != spec.num_models:
        raise ValueError(f"the spec is for {spec.num_models} models, {len(models)} given")
    paths = [getattr(s, "label", s) for s in [base, *models]]
    out = publish.check_destination(out, paths, overwrite=overwrite)
    base_src = base if hasattr(base, "get") else open_source(base)
    srcs = [m if hasattr(m, "get") else open_source(m) for m in models]
    check_compatible(base_src, srcs, spec.accept_config)
    layers = num_layers(base_src)
    target = _out_dtype(spec, base_src)
    names = read_order(base_src.names(), [base_src, *srcs])
    specs = [(n, base_src.shape(n), target if is_float(base_src.dtype(n)) else base_src.dtype(n))
             for n in names]
    for n in names:  # resolve every tensor's parameters up front: a bad value fails before any write
        if is_float(base_src.dtype(n)):
            spec.resolve(n, layers)

    def flat(src, name):  # sources that can slice from disk are read chunk by chunk, others mapped
        return src.flat(name) if hasattr(src, "flat") else src.get(name).reshape(-1)

    def produce(name: str) -> np.ndarray:
        shape = base_src.shape(name)
        floating = is_float(base_src.dtype(name))
        if floating and stats is not None:
            bf = np.asarray(base_src.get(name), np.float32).reshape(-1)
            ds = [np.asarray(s.get(name), np.float32).reshape(-1) - (0 if s.is_delta else bf) for s in srcs]
            stats.add(name, bf, ds)
        if not floating or spec.resolve(name, layers).skip:
            b = base_src.get(name)
            return np.array(b, dtype=target if floating else b.dtype)
        b = flat(base_src, name)
        inputs = [flat(s, name) for s in srcs]
        from_models = not any(s.is_delta for s in srcs)
        if stats is not None:  # the deltas are in hand already
            b, inputs, from_models = bf, ds, False
        elif any(s.is_delta for s in srcs) and not all(s.is_delta for s in srcs):  # models as deltas, chunk by chunk
            inputs = [x if s.is_delta else MinusBase(x, b) for s, x in zip(srcs, inputs)]
        buf = np.empty(math.prod(shape), np.float32)
        merge_array(spec, name, shape, b, inputs, from_models=from_models, layers=layers, out=buf)
        return buf.reshape(shape).astype(target, copy=False)

    written, report = 0, None
    with publish.staged(out, paths, overwrite=overwrite) as tmp:
        shards = plan_shards(specs, parse_size(max_shard_size))
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            written += write_streaming(tmp / fname, shard, produce, {"format": "pt"})
            weight_map.update({n: fname for n, _, _ in shard})
            gc.collect()
        if len(shards) > 1:
            import json
            total = sum(np.dtype(d).itemsize * math.prod(s) for _, s, d in specs)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        _write_side_files(tmp, spec, base_src, srcs, target, recipe_text)
        seconds = time.perf_counter() - t0
        if verifier is not None:  # on the built copy: a merge that fails it is never published
            report = verifier.check(tmp)
    log.info("merged %d tensors (%s, %d models) into %s in %.1fs", len(names), spec.method, len(srcs), out, seconds)
    return MergeResult(out, seconds, len(names), written, report)


def _out_dtype(spec: MergeSpec, base: TensorSource) -> np.dtype:
    from paft_jax.models.config import to_dtype
    if spec.dtype:
        return np.dtype(to_dtype(spec.dtype))
    floats = [base.dtype(n) for n in base.names() if is_float(base.dtype(n))]
    return max(set(floats), key=floats.count) if floats else np.dtype(np.float32)


def _write_side_files(tmp: Path, spec: MergeSpec, base: TensorSource, models: list, target: np.dtype,
                      recipe_text: str | None) -> None:
    import json
    from paft_jax.models.config import dtype_name
    bdir = getattr(base, "files_dir", None) or getattr(base, "dir", None)
    cfg = dict(base.config or {})
    if cfg:
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = dtype_name(target)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if bdir is not None:
        for f in AUX_FILES:
            if (Path(bdir) / f).exists():
                shutil.copy2(Path(bdir) / f, tmp / f)
    (tmp / "README.md").write_text(model_card(spec, base.label, [m.label for m in models], dtype_name(target),
                                              cfg, recipe_text))


def model_card(spec: MergeSpec, base: str, models: list[str], dtype: str, cfg: dict, recipe_text: str | None) -> str:
    """The merge's model card: base, architecture, inputs and the recipe.

    Built from config.json directly rather than through the export's card (which needs a
    ModelConfig, hence transformers' config classes: ~2 s of imports in a merge that takes ~5)."""
    how = f"paft_jax merge ({spec.method}) of {len(models)} model(s) into the base"
    arch = ", ".join(f"{k.replace('num_', '').replace('_', ' ')} {cfg[k]}" for k in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size") if k in cfg)
    recipe = recipe_text or _spec_yaml(spec, base, models)
    return (f"---\nlibrary_name: transformers\ntags: [paft_jax, merge]\nbase_model: {base}\n---\n\n"
            f"# {cfg.get('model_type', 'model')} merged by paft_jax\n\n- Base model: {base}\n- How it was made: {how}\n"
            f"- Architecture: {', '.join(cfg.get('architectures') or [cfg.get('model_type', '?')])}"
            f"{', ' + arch if arch else ''}\n- Weights: {dtype}\n"
            f"- Merged: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n## Inputs\n\n"
            + "".join(f"- model: {m}\n" for m in models) + f"\n## Recipe\n\n```yaml\n{recipe.rstrip()}\n```\n")


def _spec_yaml(spec: MergeSpec, base: str, models: list[str]) -> str:
    import yaml
    data = {"merge_method": spec.method, "base_model": base,
            "models": [{"model": m, "parameters": p} for m, p in zip(models, spec.model_parameters)],
            "parameters": spec.parameters}
    if spec.overrides:
        data["overrides"] = [{"pattern": o.pattern, "parameters": o.parameters, "skip": o.skip} for o in spec.overrides]
    if spec.dtype:
        data["dtype"] = spec.dtype
    return yaml.safe_dump(data, sort_keys=False)


def verify_merged(out: Path, atol: float = 1e-3):
    """Load the merged directory with paft_jax and with transformers; their logits must agree."""
    from paft_jax.hf.verify import torch_available, verify_dir
    if not torch_available():
        log.warning("torch is not installed: skipping verification of %s (pip install 'paft_jax[verify]')", out)
        return None
    return verify_dir(out, atol)
