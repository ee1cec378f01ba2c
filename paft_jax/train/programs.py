"""The jitted programs of a branch, built from its config, the model's shape and a mesh alone (no weights,
no data): what the training loop runs, and what `launch compile` compiles ahead of time for a topology.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from paft_jax.data.batching import batch_shapes
from paft_jax.mesh import tree_shardings
from paft_jax.models import loops
from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import abstract_params
from paft_jax.train import delta as delta_lib
from paft_jax.train.config import TrainConfig, eval_view
from paft_jax.train.objectives import reference_pair_logps, reference_params
from paft_jax.train.optim import make_optimizer, schedule
from paft_jax.train.step_fn import (TrainState, batch_spec, build_steps, init_state, jit_steps, join_micro,
                                    make_logp_fn, micro_count, rows_constraint, split_micro, state_shardings)


def branch_model(cfg: TrainConfig, mcfg: ModelConfig) -> ModelConfig:
    """The base's model config as this branch computes with it (its attention implementation: the branches
    of one run share the weights, not necessarily how they attend)."""
    return mcfg.replace(attention=cfg.attention, attention_block=cfg.attention_block)


@dataclass
class BranchPrograms:
    opt: Any
    lr: Any
    train_step: Any          # jitted (state, base, batch) -> (state, metrics); the state is donated
    eval_sums: Any           # jitted (delta, base, batch) -> additive sums
    base_sh: Any
    state_sh: TrainState
    data_sharding: NamedSharding


def branch_programs(cfg: TrainConfig, mcfg: ModelConfig, mesh: Mesh, rules: tuple,
                    donate: bool = True) -> BranchPrograms:
    mcfg = branch_model(cfg, mcfg)
    shapes, axes = abstract_params(mcfg)
    opt = make_optimizer(cfg.optim, cfg.steps, delta_lib.freeze_mask(shapes, cfg.delta))
    lr = schedule(cfg.optim, cfg.steps)
    train, evals = build_steps(mcfg, cfg.delta, cfg.objective, opt, lr, grad_accum=cfg.grad_accum,
                               eval_micro_rows=cfg.forward_micro_rows(), mesh=mesh, rules=rules)
    base_sh = tree_shardings(axes, shapes, mesh, rules)
    d_abs, _ = delta_lib.delta_abstract(mcfg, cfg.delta)
    state_sh = state_shardings(opt, d_abs, delta_lib.delta_shardings(mcfg, cfg.delta, mesh, rules), mesh)
    train_j, evals_j = jit_steps(train, evals, state_sh, base_sh, mesh, rules, donate=donate)
    return BranchPrograms(opt, lr, train_j, evals_j, base_sh, state_sh, NamedSharding(mesh, batch_spec(rules)))


def reference_program(mcfg, logits_chunk: int, mesh, rules, base_sh, data_sharding, micro_rows: int = 0):
    """The jitted pass (base params, batch) -> (chosen, rejected, example_index): exactly what the step
    computes for the reference when nothing is cached, `micro_rows` rows per forward (0: the whole batch)."""
    logp_fn = make_logp_fn(mcfg, mesh, rules, logits_chunk)
    constrain, unroll = rows_constraint(mesh, rules), loops.unroll_loops(mesh)

    def ref(base_params, batch):
        params = reference_params(base_params)
        k = micro_count(batch["input_ids"].shape[0], micro_rows)
        if k == 1:
            return (*reference_pair_logps(logp_fn, params, batch), batch["example_index"])
        micro = jax.tree_util.tree_map(lambda x: split_micro(x, k), batch)
        _, (chosen, rejected) = jax.lax.scan(lambda c, mb: (c, reference_pair_logps(logp_fn, params, constrain(mb))),
                                             None, micro, unroll=k if unroll else 1)
        return join_micro(chosen), join_micro(rejected), batch["example_index"]

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(ref, in_shardings=(base_sh, data_sharding), out_shardings=replicated)


def abstract_batch(data, *, preference: bool, reference: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The device batch of a data config as shapes (`data.batching.batch_shapes`)."""
    shapes = batch_shapes(data.batch_size, data.seq_len, data.pairs_per_row() if preference else None,
                          reference=reference)
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def abstract_programs(cfg: TrainConfig, mcfg: ModelConfig, mesh: Mesh) -> list[tuple[str, Any, tuple]]:
    """[(name, jitted function, abstract arguments)] of every device program a branch runs: the train step,
    the eval step (when there is eval data) and, for DPO with `ref_cache`, the reference log-prob pass."""
    rules = cfg.mesh.logical_rules()
    p = branch_programs(cfg, mcfg, mesh, rules)
    mcfg = branch_model(cfg, mcfg)
    shapes, _ = abstract_params(mcfg)
    d_abs, _ = delta_lib.delta_abstract(mcfg, cfg.delta)
    state = jax.eval_shape(lambda d: init_state(d, p.opt), d_abs)
    pref, cached = cfg.objective.preference, cfg.objective.needs_reference and cfg.ref_cache
    out = [("train_step", p.train_step, (state, shapes, abstract_batch(cfg.data, preference=pref, reference=cached)))]
    if cfg.eval_data is not None:
        ev = eval_view(cfg.eval_data)
        out.append(("eval_step", p.eval_sums, (state.delta, shapes, abstract_batch(ev, preference=pref,
                                                                                   reference=cached))))
    if cached:
        ref = reference_program(mcfg, cfg.objective.logits_chunk, mesh, rules, p.base_sh, p.data_sharding,
                                cfg.forward_micro_rows())
        datas = [("train", cfg.data)] + ([("eval", eval_view(cfg.eval_data))] if cfg.eval_data is not None else [])
        seen = set()
        for split, data in datas:
            key = (data.batch_size, data.seq_len, data.pairs_per_row())
            if key not in seen:
                seen.add(key)
                out.append((f"reference_logps ({split})", ref,
                            (shapes, abstract_batch(data, preference=True, reference=False))))
    return out
