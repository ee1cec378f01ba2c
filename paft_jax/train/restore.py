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
    """A run directory, its checkpoints/ directory, or one step directory -> (checkpoints dir, step|None)."""
    p = Path(path)
    if p.name.isdigit() and p.is_dir():
        return str(p.parent), int(p.name)
    if (p / "checkpoints").is_dir():
        return str(p / "checkpoints"), None
    if p.is_dir():
        return str(p), None
    raise FileNotFoundError(f"{path}: no such checkpoint directory")


def read_meta(directory: str, step: int | None) -> tuple[int, dict]:
    import orbax.checkpoint as ocp
    mgr = ocp.CheckpointManager(directory)
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
    directory, step = locate(path)
    step, meta = read_meta(directory, step)
    cfg = from_dict(TrainConfig, meta["config"])
    base = base or load_base(dataclasses.replace(cfg, remat="none"), mesh, rules)
    mask = delta_lib.freeze_mask(base.params, cfg.delta)
    opt = make_optimizer(cfg.optim, cfg.steps, mask)
    d_abs, _ = delta_lib.delta_abstract(base.cfg, cfg.delta)
    sh = state_shardings(opt, d_abs, delta_lib.delta_shardings(base.cfg, cfg.delta, mesh, rules), mesh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), delta=d_abs,
                          opt_state=jax.eval_shape(opt.init, d_abs))
    ckpt = BranchCheckpointer(dataclasses.replace(cfg.checkpoint, fallback=False), directory)
    try:
        got = ckpt.restore(abstract_like(abstract, sh), step)
    finally:
        ckpt.close()
    _, state, _, _ = got
    delta = delta_lib.materialize(state.delta, cfg.delta, base.params)
    log.info("restored %s step %d (%s delta of a %s branch)", directory, step, cfg.delta.kind, cfg.objective.kind)
    return cfg, base, step, delta


def merged_params(base_params: Any, delta: Any) -> Any:
    """base + delta, in the base's dtype, leaf by leaf (jitted, shardings kept)."""
    return jax.jit(lambda b, d: jax.tree_util.tree_map(
        lambda w, x: (w.astype(jnp.float32) + x).astype(w.dtype), b, d))(base_params, delta)
