"""Export params to a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Sharded safetensors (+ index), config.json, generation_config.json, tokenizer files and a model card.
Tensors are pulled from the devices one at a time and streamed into their shard file, so host memory
holds one tensor beyond the params themselves.  Everything is written under a temporary sibling
directory and renamed into place only when complete: a failed export leaves nothing at `out`.
`out` may be a gs:// (or other fsspec) URL: the directory is built locally, then published with
`paft_jax.storage.publish_dir` (uploaded under a temporary prefix, then copied in behind a marker).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from paft_jax.hf.config import hf_config_dict
from paft_jax.hf.layout import get_path, hf_shape, iter_hf_tensors, to_hf
from paft_jax.hf.st_io import write_streaming
from paft_jax.models.config import ModelConfig, dtype_name, to_dtype


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. 2GB, 500MB, 1073741824)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def _host_slice(arr: Any, i: int | None) -> np.ndarray:
    """One tensor (layer i of a stacked leaf) on the host; gathers across processes when needed."""
    x = arr if i is None else arr[i]
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def plan_shards(specs: list[tuple[str, tuple, np.dtype]], max_bytes: int) -> list[list[tuple[str, tuple, np.dtype]]]:
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = np.dtype(spec[2]).itemsize * int(np.prod(spec[1], dtype=np.int64))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def model_card(cfg: ModelConfig, base_model: str | None, how: str, dtype: str) -> str:
    return (f"---\nlibrary_name: transformers\ntags: [paft_jax]\n"
            + (f"base_model: {base_model}\n" if base_model else "") + "---\n\n"
            f"# {cfg.family} model exported by paft_jax\n\n"
            f"- Base model: {base_model or 'unknown'}\n- How it was made: {how}\n"
            f"- Architecture: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} embeddings\n"
            f"- Weights: {dtype}, {cfg.num_params():,} parameters\n"
            f"- Exported: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")


def export_hf(params: Any, cfg: ModelConfig, out: str | Path, *, tokenizer: Any = None,
              hf_config: dict | None = None, generation_config: dict | None = None, dtype: str | None = None,
              max_shard_size: int | str = "2GB", base_model: str | None = None,
              how: str = "imported and re-exported by paft_jax", overwrite: bool = False,
              check: Callable[[Path], Any] | None = None) -> Path | str:
    """Write an HF directory at `out` (a local path or a gs:// URL, returned as given).

    `check(dir)`, if given, runs on the complete directory before it is published (e.g. a verification
    with transformers, which cannot read gs://); if it raises, nothing is published."""
    from paft_jax import storage
    remote = storage.is_url(out)
    if remote:
        storage.check_destination(str(out), overwrite)  # before the work; again when publishing
        parent, name = Path(tempfile.mkdtemp(prefix="paft_export_")), storage.split_url(out)[1]
    else:
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
        parent, name = (out.parent if str(out.parent) else Path(".")), out.name
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"{parent}: output directory is not writable")
    target = to_dtype(dtype) if dtype else cfg.jnp_param_dtype
    dname = dtype_name(target)
    tmp = parent / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _write(params, cfg, tmp, np.dtype(target), parse_size(max_shard_size))
        _write_side_files(tmp, cfg, hf_config, generation_config, tokenizer, base_model, how, dname)
        is_writer = jax.process_index() == 0
        if check is not None and is_writer:
            check(tmp)
        if remote:
            if is_writer:
                storage.publish_dir(tmp, str(out), overwrite=overwrite)
        elif out.exists():  # only reached with overwrite: swap, then drop the old copy
            old = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if remote:
            shutil.rmtree(parent, ignore_errors=True)
    return out


def _write_side_files(tmp: Path, cfg: ModelConfig, hf_config: dict | None, generation_config: dict | None,
                      tokenizer: Any, base_model: str | None, how: str, dname: str) -> None:
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, hf_config, dname), indent=2) + "\n")
    gen = dict(generation_config or {})
    if not gen:
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
    gen = {k: (list(v) if isinstance(v, tuple) else v) for k, v in gen.items() if not k.startswith("_")}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "README.md").write_text(model_card(cfg, base_model, how, dname))


def _write(params: Any, cfg: ModelConfig, tmp: Path, target: np.dtype, max_bytes: int) -> None:
    items = list(iter_hf_tensors(cfg))
    by_name = {}
    specs = []
    for e, i, name in items:
        leaf = get_path(params, e.path)
        per = tuple(leaf.shape[1:]) if e.layered else tuple(leaf.shape)
        specs.append((name, hf_shape(e, per), target))
        by_name[name] = (e, i, leaf)

    def produce(name):
        e, i, leaf = by_name[name]
        return to_hf(e, _host_slice(leaf, i)).astype(target, copy=False)

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
