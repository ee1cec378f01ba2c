"""The base a PAFT run shares: its shapes without the weights, its copy on another sub-mesh, and the merge's
view of it; `say`, the pipeline's progress line on stderr (process 0)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax

from paft_jax.mesh import build_mesh, tree_shardings
from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import abstract_params
from paft_jax.train.config import TrainConfig
from paft_jax.train.base import Base, load_base, resolve_compute_dtype, resolve_tokenizer


def say(msg: str) -> None:
    if jax.process_index() == 0:
        from tqdm.auto import tqdm
        tqdm.write(f"[paft] {msg}", file=sys.stderr)  # stdout carries only the final JSON line


def base_model_config(tc: TrainConfig) -> ModelConfig:
    """The base's ModelConfig without loading its weights (for the work estimate)."""
    if tc.model == "random":
        mc = dict(tc.model_config)
        if "vocab_size" not in mc:
            mc["vocab_size"] = len(resolve_tokenizer(tc.tokenizer, None))
        return ModelConfig(**mc)
    from paft_jax.hf.load import read_model_config
    return read_model_config(tc.model, dtype=resolve_compute_dtype(tc.compute_dtype))[1]


def place(base: Base, mesh, rules) -> Base:
    """The same base on another (sub-)mesh: a copy of the weights onto that mesh's devices."""
    shapes, axes = abstract_params(base.cfg)
    return dataclasses.replace(base, params=jax.device_put(base.params, tree_shardings(axes, shapes, mesh, rules)))


class StackedSource:
    """base + a branch's delta, rounded to the base's dtype tensor by tensor (as train/restore.merged_params
    rounds it on the devices): in sequential mode, the model the preference branch was trained on."""
    is_delta = False

    def __init__(self, base, delta):
        self.base, self.delta = base, delta
        self.label = f"{base.label} + delta of {delta.label}"
        self._names = set(delta.names())

    def __getattr__(self, name):  # names, shape, dtype, config, dir: the base's
        return getattr(self.base, name)

    def group(self, name: str):  # read in the delta's order (merge.sources.read_order)
        return self.delta.group(name) if hasattr(self.delta, "group") else name

    def get(self, name: str):
        import numpy as np
        from paft_jax.merge.engine import is_float
        w = self.base.get(name)
        if name not in self._names or not is_float(w.dtype):
            return w
        return (np.asarray(w, np.float32) + self.delta.get(name)).astype(w.dtype)


def _write_side_files(side: Path, tokenizer, generation: dict | Path | None) -> None:
    """The tokenizer and generation config for an export, written once into `side` (atomically)."""
    if side.exists():
        return
    tmp = side.parent / f".{side.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if isinstance(generation, Path):
        if generation.exists():
            shutil.copy2(generation, tmp / generation.name)
    elif generation:
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    os.replace(tmp, side)


def base_source(tc: TrainConfig, bases: dict[str, Base], out: Path):
    """The merge's base: an HF directory is streamed from disk; anything else (GGUF, random) is the loaded
    base (loaded now on one device if this process trained nothing, e.g. on a rerun).  `out`: a local
    directory (the run's, or its mirror) for the base's tokenizer files."""
    from paft_jax.merge.params_source import ParamsSource
    from paft_jax.merge.sources import HFDirSource
    side = out / "base_files"  # tokenizer + generation config, copied into the export
    if tc.model != "random" and Path(tc.model).is_dir() and any(Path(tc.model).glob("*.safetensors")):
        if tc.tokenizer is None:  # the directory's own tokenizer files
            return HFDirSource(tc.model)
        # the run's tokenizer is not the directory's: the export carries the one the branches trained with
        _write_side_files(side, resolve_tokenizer(tc.tokenizer, None), Path(tc.model) / "generation_config.json")
        return HFDirSource(tc.model, files_dir=side)
    base = next((b for b in bases.values() if all(
        leaf.is_fully_addressable for leaf in jax.tree_util.tree_leaves(b.params))), None)
    if base is None:  # nothing loaded here, or only a base spread over other processes too
        from paft_jax.config import MeshConfig
        one = MeshConfig(data=1, fsdp=1, tensor=1)
        base = load_base(tc, build_mesh(one, jax.local_devices()[:1]), one.logical_rules())
    from paft_jax.hf.export import generation_config_for
    _write_side_files(side, base.tokenizer, generation_config_for(base.cfg, base.generation_config))
    return ParamsSource(base.params, base.cfg, base.source, hf_config=base.hf_config, side_dir=side)
