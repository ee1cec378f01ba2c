"""A branch checkpoint back to weights: its saved config -> base, its delta (LoRA folded in) -> base + delta.

Used by `launch export --checkpoint` and by merges that take branch checkpoints as inputs.  Needs no
data: the abstract train state is rebuilt from the saved config alone.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from paft_jax.checkpoint import BranchCheckpointer, CheckpointError, abstract_like
from paft_jax.config import from_dict
from paft_jax.train import delta as delta_lib
from paft_jax.train.config import TrainConfig
from paft_jax.train.optim import make_optimizer
from paft_jax.train.step_fn import TrainState, state_shardings

log = logging.getLogger("paft_jax")


def locate(path: str | Path) -> tuple[str, int | None]:
    """A run directory, its checkpoints/ directory, or one step directory -> (checkpoints dir, step|None).
    Local paths and gs:// (through etils.epath, as Orbax itself)."""
    import os
    from etils import epath
    # Orbax refuses relative checkpoint paths (a run's output_dir is often relative: runs/x)
    p = epath.Path(path if "://" in str(path) else os.path.abspath(path))
    if p.name.isdigit() and p.is_dir():
        return str(p.parent), int(p.name)
    if (p / "checkpoints").is_dir():
        return str(p / "checkpoints"), None
    if p.is_dir():
        return str(p), None
    if p.name.isdigit() and p.parent.is_dir():  # a step that is not there: say which are
        steps = sorted(int(c.name) for c in p.parent.iterdir() if c.name.isdigit() and c.is_dir())
        raise FileNotFoundError(f"{path}: no such checkpoint step; {p.parent} holds "
                                + (f"steps {', '.join(map(str, steps))}" if steps else "no complete step"))
    raise FileNotFoundError(f"{path}: no such checkpoint directory")


def read_meta(directory: str, step: int | None) -> tuple[int, dict]:
    import orbax.checkpoint as ocp
    me = jax.process_index()  # a read by this process alone (e.g. the merge on process 0): no barriers
    mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"read-{me}"))
        if jax.process_count() > 1 else None)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no complete checkpoint")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mgr.close()
    return step, dict(meta)


def restore_branch(path: str | Path, mesh: Mesh, rules: tuple, *, base=None):
    """-> (TrainConfig, Base, step, dense delta pytree), the delta in the base's shardings."""
    from paft_jax.train.base import load_base
    cfg, _, step, delta = restore_delta(path, mesh, rules)
    base = base or load_base(dataclasses.replace(cfg, remat="none"), mesh, rules)
    log.info("restored %s step %d (%s delta of a %s branch)", path, step, cfg.delta.kind, cfg.objective.kind)
    return cfg, base, step, delta


def model_config_from_meta(meta: dict):
    from paft_jax.models.config import ModelConfig
    d = dict(meta["model_config"])
    if d.get("rope_scaling") is not None:  # JSON turned the tuple of pairs into lists
        d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


def restore_delta(path: str | Path, mesh: Mesh | None = None, rules: tuple = ()):
    """-> (TrainConfig, ModelConfig, step, dense delta pytree) without loading the base's weights
    (LoRA is folded with the base's shapes only).  The delta alone, in one restore: never the moments."""
    reader = DeltaReader(path, mesh, rules)
    try:
        return reader.cfg, reader.mcfg, reader.step, reader.all()
    finally:
        reader.close()


class DeltaReader:
    """A branch checkpoint's dense delta, one parameter leaf at a time (an Orbax partial restore per leaf)
    into `mesh`'s shardings: a merge that walks the model leaf by leaf holds one leaf of each branch, never
    the whole delta, and never the optimizer's moments.  A LoRA delta (small) is restored whole once and
    each leaf materialized on demand.  `mesh` defaults to one local device."""

    def __init__(self, path: str | Path, mesh: Mesh | None = None, rules: tuple = ()):
        from paft_jax.mesh import build_mesh, mesh_processes
        from paft_jax.models.decoder import abstract_params
        from paft_jax.config import MeshConfig
        self.label = str(path)
        self.directory, self._asked = locate(path)
        self.step, meta = read_meta(self.directory, self._asked)
        self.cfg = from_dict(TrainConfig, meta["config"])
        self.mcfg = model_config_from_meta(meta).replace(remat="none")
        self.mesh = mesh or build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.local_devices()[:1])
        self.shapes, _ = abstract_params(self.mcfg)
        self._abs, _ = delta_lib.delta_abstract(self.mcfg, self.cfg.delta)
        self._sh = delta_lib.delta_shardings(self.mcfg, self.cfg.delta, self.mesh, rules)
        self._ckpt = BranchCheckpointer(dataclasses.replace(self.cfg.checkpoint, fallback=False), self.directory,
                                        processes=mesh_processes(self.mesh))
        self._whole = None  # the restored delta state, when it is read whole (LoRA; a host_state checkpoint)

    def leaf(self, path: tuple[str, ...]) -> jax.Array:
        """The dense float32 delta of the parameter at `path` (e.g. ("layers", "mlp", "up_proj", "kernel"))."""
        if self._whole is None and self.cfg.delta.kind == "dense":
            sub = _subtree(abstract_like(self._abs, self._sh), path)
            got = self._read(lambda: self._ckpt.restore_delta(self.step, sub))
            if got is not None:
                return _at(got, path)
        if self._whole is None:  # LoRA factors, or a checkpoint a process wrote alone (whole state in one item)
            self._whole = self._read(lambda: _restore_whole(self._ckpt, self.cfg, self.step, self.shapes,
                                                            self._abs, self._sh, self.mesh))
        dense = delta_lib.materialize(_with_leaf(self._whole, path, self.cfg.delta), self.cfg.delta,
                                      _subtree(self.shapes, path))
        return _at(dense, path)

    def all(self) -> Any:
        """The whole dense delta, in one restore."""
        return delta_lib.materialize(self.state(), self.cfg.delta, self.shapes)

    def state(self) -> Any:
        """The delta as trained, in one restore: the dense delta, or the LoRA factors (unscaled)."""
        def whole():
            got = self._ckpt.restore_delta(self.step, abstract_like(self._abs, self._sh))
            return got if got is not None else _restore_whole(self._ckpt, self.cfg, self.step, self.shapes,
                                                              self._abs, self._sh, self.mesh)
        return self._read(whole)

    def _read(self, fn):
        try:
            return fn()
        except CheckpointError as e:
            older = [s for s in self._ckpt.steps() if s < self.step] if self._asked is None else []
            if not older:
                raise
            raise CheckpointError(f"{e}; the previous checkpoint, {self.directory}/{older[-1]}, may be readable: "
                                  "name that step directory to use it") from None

    def close(self) -> None:
        self._whole = None
        self._ckpt.close()


def _restore_whole(ckpt, cfg, step, shapes, d_abs, d_sh, mesh):
    """The delta out of the whole train state (what a checkpoint a process wrote alone, or a multi-process
    job, needs: see BranchCheckpointer.restore_delta)."""
    opt = make_optimizer(cfg.optim, cfg.steps, delta_lib.freeze_mask(shapes, cfg.delta))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), delta=d_abs,
                          opt_state=jax.eval_shape(opt.init, d_abs))
    return ckpt.restore(abstract_like(abstract, state_shardings(opt, d_abs, d_sh, mesh)), step)[1].delta


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _find(tree, path):
    """The node at `path`, or {} where the tree has no such path."""
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return {}
        tree = tree[k]
    return tree


def _subtree(tree, path):
    """The nested dicts of `tree` that lead to `path` alone."""
    return {path[0]: _subtree(tree[path[0]], path[1:])} if path else tree


def _with_leaf(delta, path, dcfg):
    """The part of a (LoRA) delta state that `path`'s dense delta is built from."""
    if dcfg.kind == "dense":
        return _subtree(delta, path)
    parent = _find(delta, path[:-1]) if path[-1] == "kernel" else {}  # a module LoRA does not target: none
    lora = {k: v for k, v in (parent.items() if isinstance(parent, dict) else ()) if k in ("lora_a", "lora_b")}
    if not lora:
        return {}
    node = lora
    for k in reversed(path[:-1]):
        node = {k: node}
    return node


class CheckpointSource:
    """A branch checkpoint as a merge input: its delta under HF tensor names (`is_delta`).

    Read leaf by leaf (`DeltaReader`, on one local device) and kept one leaf at a time: host memory holds
    one leaf of the delta.  `group(name)` tells the merge which tensors share a leaf, so it reads them
    together (merge.sources.read_order) and restores each leaf once."""

    is_delta = True

    def __init__(self, path: str | Path):
        from paft_jax.hf.config import hf_config_dict
        from paft_jax.hf.layout import hf_shape, iter_hf_tensors
        self.label = str(path)
        self._reader = DeltaReader(path)
        self.step, mcfg = self._reader.step, self._reader.mcfg
        self.delta = self._reader.cfg.delta  # what the branch trained (merge.sparsity.describe)
        self.config = hf_config_dict(mcfg)
        self._get, self._shapes = {}, {}
        for entry, layer, name in iter_hf_tensors(mcfg):
            self._get[name] = (entry, layer)
            leaf = _at(self._reader.shapes, entry.path)
            self._shapes[name] = hf_shape(entry, tuple(leaf.shape[1:] if layer is not None else leaf.shape))
        self._held: tuple | None = None  # (leaf path, its host copy)
        weakref.finalize(self, self._reader.close)

    def names(self) -> list[str]:
        return list(self._get)

    def group(self, name: str) -> tuple[str, ...]:
        return self._get[name][0].path

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])

    def dtype(self, name: str):
        import numpy as np
        return np.dtype(np.float32)

    def get(self, name: str):
        import numpy as np
        from paft_jax.hf.layout import to_hf
        if name not in self._get:
            raise KeyError(f"{self.label}: no tensor {name!r} in this checkpoint's delta")
        entry, layer = self._get[name]
        if self._held is None or self._held[0] != entry.path:
            self._held = None  # the previous leaf goes before the next one comes
            self._held = (entry.path, np.asarray(jax.device_get(self._reader.leaf(entry.path))))
        x = self._held[1]
        return to_hf(entry, x if layer is None else x[layer])


def merged_params(base_params: Any, delta: Any) -> Any:
    """base + delta, in the base's dtype, leaf by leaf (jitted, shardings kept)."""
    return jax.jit(lambda b, d: jax.tree_util.tree_map(
        lambda w, x: (w.astype(jnp.float32) + x).astype(w.dtype), b, d))(base_params, delta)
