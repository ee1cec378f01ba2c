"""A branch checkpoint back to weights: its saved config -> base, its delta (LoRA folded in) -> base + delta.

Used by `launch export --checkpoint` and by merges that take branch checkpoints as inputs.  Needs no
data: the abstract train state is rebuilt from the saved config alone.
"""
from __future__ import annotations

import dataclasses
import logging
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
    from paft_jax.train.loop import load_base
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
    (LoRA is folded with the base's shapes only)."""
    from paft_jax.mesh import build_mesh, mesh_processes
    from paft_jax.models.decoder import abstract_params
    from paft_jax.config import MeshConfig
    directory, asked = locate(path)
    step, meta = read_meta(directory, asked)
    cfg = from_dict(TrainConfig, meta["config"])
    mcfg = model_config_from_meta(meta).replace(remat="none")
    mesh = mesh or build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.local_devices()[:1])
    shapes, _ = abstract_params(mcfg)
    d_abs, _ = delta_lib.delta_abstract(mcfg, cfg.delta)
    d_sh = delta_lib.delta_shardings(mcfg, cfg.delta, mesh, rules)
    ckpt = BranchCheckpointer(dataclasses.replace(cfg.checkpoint, fallback=False), directory,
                              processes=mesh_processes(mesh))
    try:
        delta = ckpt.restore_delta(step, abstract_like(d_abs, d_sh))  # the delta alone: no moments
        if delta is None:  # a checkpoint a process wrote alone holds the whole state in one item
            opt = make_optimizer(cfg.optim, cfg.steps, delta_lib.freeze_mask(shapes, cfg.delta))
            abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), delta=d_abs,
                                  opt_state=jax.eval_shape(opt.init, d_abs))
            delta = ckpt.restore(abstract_like(abstract, state_shardings(opt, d_abs, d_sh, mesh)), step)[1].delta
    except CheckpointError as e:
        older = [s for s in ckpt.steps() if s < step] if asked is None else []
        if not older:
            raise
        raise CheckpointError(f"{e}; the previous checkpoint, {directory}/{older[-1]}, may be readable: name that "
                              "step directory to use it") from None
    finally:
        ckpt.close()
    return cfg, mcfg, step, delta_lib.materialize(delta, cfg.delta, shapes)


class CheckpointSource:
    """A branch checkpoint as a merge input: its delta under HF tensor names (`is_delta`).

    The whole delta is restored to host memory once (float32); the merge then reads it tensor by
    tensor like any other source."""

    is_delta = True

    def __init__(self, path: str | Path):
        from paft_jax.hf.config import hf_config_dict
        from paft_jax.hf.layout import get_path, iter_hf_tensors, to_hf
        self.label = str(path)
        cfg, mcfg, self.step, delta = restore_delta(path)
        delta = jax.device_get(delta)
        self.config = hf_config_dict(mcfg)
        self._get = {}
        for entry, layer, name in iter_hf_tensors(mcfg):
            self._get[name] = (entry, layer)
        self._delta, self._to_hf, self._path = delta, to_hf, get_path
        self._shapes = {n: self._tensor(n).shape for n in self._get}

    def _tensor(self, name: str):
        import numpy as np
        entry, layer = self._get[name]
        x = np.asarray(self._path(self._delta, entry.path))
        return self._to_hf(entry, x if layer is None else x[layer])

    def names(self) -> list[str]:
        return list(self._get)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])

    def dtype(self, name: str):
        import numpy as np
        return np.dtype(np.float32)

    def get(self, name: str):
        if name not in self._get:
            raise KeyError(f"{self.label}: no tensor {name!r} in this checkpoint's delta")
        return self._tensor(name)


def merged_params(base_params: Any, delta: Any) -> Any:
    """base + delta, in the base's dtype, leaf by leaf (jitted, shardings kept)."""
    return jax.jit(lambda b, d: jax.tree_util.tree_map(
        lambda w, x: (w.astype(jnp.float32) + x).astype(w.dtype), b, d))(base_params, delta)
