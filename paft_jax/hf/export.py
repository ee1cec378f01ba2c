"""Export params to a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Sharded safetensors (+ index), config.json, generation_config.json, tokenizer files and a model card.
Tensors are pulled from the devices one at a time and streamed into their shard file, so host memory
holds one tensor beyond the params themselves.  Everything is written under a temporary sibling
directory and published by `paft_jax.publish` only when complete: a failed export leaves nothing at
`out`, and an overwritten one stays readable until the new one is whole.  `out` may be a gs:// (or
other fsspec) URL: the directory is built locally, then uploaded (`paft_jax.storage.publish_dir`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from paft_jax import publish
from paft_jax.hf.config import hf_config_dict
from paft_jax.hf.layout import get_path, hf_shape, iter_hf_tensors, to_hf
from paft_jax.hf.st_io import parse_size, plan_shards, write_streaming
from paft_jax.models.config import ModelConfig, dtype_name, to_dtype


def _host_slice(arr: Any, i: int | None) -> np.ndarray:
    """One tensor (layer i of a stacked leaf) on the host; gathers across processes when needed."""
    x = arr if i is None else arr[i]
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclass
class Tensors:
    """An export's weights produced one tensor at a time instead of held as params (the merge on the mesh):
    `specs` [(HF name, shape, dtype)] in write order, `produce(name)` -> that host array, called in that
    order by every process (only process 0 writes)."""
    specs: list
    produce: Callable[[str], np.ndarray]


def model_card(cfg: ModelConfig, base_model: str | None, how: str, dtype: str) -> str:
    return ("---\nlibrary_name: transformers\ntags: [paft_jax]\n"
            + (f"base_model: {base_model}\n" if base_model else "") + "---\n\n"
            f"# {cfg.family} model exported by paft_jax\n\n"
            f"- Base model: {base_model or 'unknown'}\n- How it was made: {how}\n"
            f"- Architecture: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} embeddings\n"
            f"- Weights: {dtype}, {cfg.num_params():,} parameters\n"
            f"- Exported: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")


def export_hf(params: Any | Tensors, cfg: ModelConfig, out: str | Path, *, tokenizer: Any = None,
              hf_config: dict | None = None, generation_config: dict | None = None, dtype: str | None = None,
              max_shard_size: int | str = "2GB", base_model: str | None = None,
              how: str = "imported and re-exported by paft_jax", overwrite: bool = False,
              check: Callable[[Path], Any] | None = None) -> Path | str:
    """Write an HF directory at `out` (a local path, returned absolute, or a gs:// URL).

    Built under a temporary name, then published by `paft_jax.publish.staged` (the old output stays
    readable until the new one is complete; `overwrite` replaces only a previous paft_jax export).
    `check(dir)`, if given, runs on the complete directory before it is published (e.g. a verification
    with transformers); if it raises, nothing is published."""
    with publish.staged(out, overwrite=overwrite, writer=jax.process_index() == 0) as tmp:
        write_hf_dir(params, cfg, tmp, tokenizer=tokenizer, hf_config=hf_config, generation_config=generation_config,
                     dtype=dtype, max_shard_size=max_shard_size, base_model=base_model, how=how)
        if check is not None and jax.process_index() == 0:
            check(tmp)
    return publish.normalised(out)


def write_hf_dir(params: Any | Tensors, cfg: ModelConfig, into: Path, *, tokenizer: Any = None, hf_config: dict | None = None,
                 generation_config: dict | None = None, dtype: str | None = None, max_shard_size: int | str = "2GB",
                 base_model: str | None = None, how: str = "imported and re-exported by paft_jax") -> None:
    """The files of an HF directory written into the existing folder `into` (every process takes part
    in the gathers; only process 0 writes the weights)."""
    target = np.dtype(to_dtype(dtype) if dtype else cfg.jnp_param_dtype)
    tensors = params if isinstance(params, Tensors) else _from_params(params, cfg, target)
    if isinstance(params, Tensors) and {np.dtype(d) for _, _, d in params.specs} != {target}:
        raise ValueError(f"export: tensors of dtypes {sorted({str(np.dtype(d)) for _, _, d in params.specs})}, "
                         f"the export is {target}")
    _write(tensors, into, parse_size(max_shard_size))
    _write_side_files(into, cfg, hf_config, generation_config, tokenizer, base_model, how, dtype_name(target))


def generation_config_for(cfg: ModelConfig, generation_config: dict | None) -> dict:
    """The model's generation_config.json: the source's own, else its special tokens (a random or GGUF base)."""
    gen = dict(generation_config or {})
    if not gen:
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in gen.items() if not k.startswith("_")}


def _write_side_files(tmp: Path, cfg: ModelConfig, hf_config: dict | None, generation_config: dict | None,
                      tokenizer: Any, base_model: str | None, how: str, dname: str) -> None:
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, hf_config, dname), indent=2) + "\n")
    gen = generation_config_for(cfg, generation_config)
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(cfg, base_model, how, dname))


def _from_params(params: Any, cfg: ModelConfig, target: np.dtype) -> Tensors:
    by_name = {}
    specs = []
    for e, i, name in iter_hf_tensors(cfg):
        leaf = get_path(params, e.path)
        per = tuple(leaf.shape[1:]) if e.layered else tuple(leaf.shape)
        specs.append((name, hf_shape(e, per), target))
        by_name[name] = (e, i, leaf)

    def produce(name):
        e, i, leaf = by_name[name]
        return to_hf(e, _host_slice(leaf, i)).astype(target, copy=False)
    return Tensors(specs, produce)


def _write(tensors: Tensors, tmp: Path, max_bytes: int) -> None:
    specs, produce = tensors.specs, tensors.produce
    shards = plan_shards(specs, max_bytes)
    is_writer = jax.process_index() == 0
    if len(shards) == 1:
        if is_writer:
            write_streaming(tmp / "model.safetensors", shards[0], produce, {"format": "pt"})
        else:  # still take part in cross-process gathers
            for name, _, _ in shards[0]:
                produce(name)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        if is_writer:
            write_streaming(tmp / fname, shard, produce, {"format": "pt"})
        else:
            for name, _, _ in shard:
                produce(name)
        for name, shape, dt in shard:
            weight_map[name] = fname
            total += np.dtype(dt).itemsize * int(np.prod(shape, dtype=np.int64))
    if is_writer:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
