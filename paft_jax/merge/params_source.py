"""Model weights already in memory (a loaded base, possibly sharded on a mesh) as a merge input.

The PAFT pipeline holds the base it trained from; merging against it avoids writing an HF copy of the
base first (a GGUF base has none).  Tensors are fetched to the host one at a time, under HF names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from paft_jax.models.config import ModelConfig


class ParamsSource:
    def __init__(self, params: Any, cfg: ModelConfig, label: str, *, hf_config: dict | None = None,
                 side_dir: str | Path | None = None, is_delta: bool = False):
        """`side_dir`: a directory holding the tokenizer / generation config to copy into the output.
        `is_delta`: the params are a delta from the base (a branch's, restored on the mesh)."""
        from paft_jax.hf.config import hf_config_dict
        from paft_jax.hf.layout import iter_hf_tensors
        self.label, self.cfg, self._params, self.is_delta = label, cfg, params, is_delta
        self.config = hf_config_dict(cfg, hf_config)
        self.dir = Path(side_dir) if side_dir is not None else None
        self._where = {name: (entry, layer) for entry, layer, name in iter_hf_tensors(cfg)}

    def _leaf(self, name: str):
        from paft_jax.hf.layout import get_path
        if name not in self._where:
            raise KeyError(f"{self.label}: no tensor {name!r}")
        entry, layer = self._where[name]
        return entry, layer, get_path(self._params, entry.path)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        from paft_jax.hf.layout import hf_shape
        entry, layer, leaf = self._leaf(name)
        return tuple(hf_shape(entry, tuple(leaf.shape[1:] if layer is not None else leaf.shape)))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._leaf(name)[2].dtype)

    def get(self, name: str) -> np.ndarray:
        from paft_jax.hf.layout import to_hf
        entry, layer, leaf = self._leaf(name)
        x = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
        return to_hf(entry, x)
