"""The jitted train and eval steps: pure functions of (state, base, batch), built once per branch.

One step serves every objective: the objective contributes `micro_loss` (objectives.py).  Gradient
accumulation is a `lax.scan` over micro-batches inside the step (unrolled on a CPU mesh of several devices,
paft_jax/models/loops.py); the state is donated; base, delta and optimizer state keep the shardings the
logical-axis rules give them.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from paft_jax import losses
from paft_jax.mesh import logical_to_spec
from paft_jax.models import loops
from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import Decoder
from paft_jax.train import objectives, optim
from paft_jax.train.delta import DeltaConfig, lora_variables
from paft_jax.train.objectives import ObjectiveConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    delta: Any
    opt_state: Any


def batch_spec(rules: tuple) -> P:
    return logical_to_spec(("act_batch",), rules)


def model_variables(base: Any, delta: Any = None, dcfg: DeltaConfig | None = None) -> dict:
    """What the decoder reads: the frozen base as it is stored, plus a branch's trained state, which the
    model applies inside each layer (a dense delta as W + dW, LoRA as x A B): no merged copy of the model."""
    if delta is None:
        return {"params": base}
    if dcfg.kind == "dense":
        return {"params": base, "delta": delta}
    return {"params": base, "lora": lora_variables(delta, dcfg)}


def head_kernel(cfg: ModelConfig, variables: dict) -> tuple[jax.Array, bool]:
    """The output projection (with its delta, when the variables carry one) and whether it is the tied
    embedding ([V, E]; else [E, V])."""
    tied = cfg.tie_word_embeddings
    path = ("embed_tokens", "embedding") if tied else ("lm_head", "kernel")
    kernel = variables["params"][path[0]][path[1]]
    if "delta" in variables:  # the head's delta: one tensor, added here as the layers add theirs
        kernel = kernel.astype(jnp.float32) + variables["delta"][path[0]][path[1]]
    return kernel, tied


def make_logp_fn(cfg: ModelConfig, mesh: Mesh | None, rules: tuple, chunk: int | str):
    """(model variables, batch) -> (token log-probs, argmax hits); `chunk`: objective.logits_chunk."""
    model = Decoder(cfg, mesh=mesh, rules=rules)
    chunk, unroll = loops.logits_chunk(chunk, mesh), loops.unroll_loops(mesh)

    def logp_fn(variables, batch):
        hidden, _ = model.apply(variables, batch["input_ids"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"], return_hidden=True)
        kernel, tied = head_kernel(cfg, variables)
        if chunk <= 0:  # full [B, T, V] fp32 logits: no recompute in the backward pass, more memory
            logits = losses.softcap(jnp.einsum("bte,ve->btv" if tied else "bte,ev->btv", hidden,
                                               kernel.astype(hidden.dtype), preferred_element_type=jnp.float32),
                                    cfg.final_logit_softcapping)
            lp = losses.token_logps(logits, batch["targets"])
            hits = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] >= logits.max(-1)
            return lp, jax.lax.stop_gradient(hits)
        return losses.token_logps_chunked(hidden, kernel, batch["targets"], min(chunk, cfg.vocab_size),
                                          with_hits=True, vocab_major=tied, unroll=unroll,
                                          cap=cfg.final_logit_softcapping)
    return logp_fn


def split_micro(x: jax.Array, k: int) -> jax.Array:
    # micro-batch j takes rows j, j+k, j+2k, ...: every data shard keeps its own rows (no resharding)
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def join_micro(x: jax.Array) -> jax.Array:
    """split_micro's inverse: [k, rows / k, ...] per-micro-batch outputs -> [rows, ...] in the batch's order."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def micro_count(rows: int, micro_rows: int) -> int:
    """Micro-batches of a forward-only pass over `rows` rows, `micro_rows` at a time (0: all at once)."""
    return max(1, rows // micro_rows) if micro_rows else 1


def rows_constraint(mesh: Mesh | None, rules: tuple):
    """batch tree -> the same tree pinned to the batch's data sharding (inside a loop over micro-batches
    XLA would otherwise be free to gather them); the identity without a mesh."""
    if mesh is None:
        return lambda tree: tree
    sharding = NamedSharding(mesh, batch_spec(rules))
    return lambda tree: jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def sum_over_micro(fn, batch: dict, k: int, constrain, unroll: bool = False):
    """The sum of `fn(micro_batch)` (a pytree) over the k micro-batches of `batch`, in a lax.scan: one
    micro-batch's activations are live at a time (`unroll`: the scan unrolled, the same sums in order)."""
    micro = jax.tree_util.tree_map(lambda x: split_micro(x, k), batch)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
    return jax.lax.scan(lambda acc, mb: (_tree_add(acc, fn(constrain(mb))), None), zero, micro,
                        unroll=k if unroll else 1)[0]


def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def l1_prox(ocfg: ObjectiveConfig, opt: optax.GradientTransformation, delta: Any, opt_state: Any, grads: Any,
            lr: jax.Array) -> Any:
    """The L1 proximal step after an optimizer update (`delta` and `opt_state` already updated, `grads` the
    raw gradients of that update, `lr` its learning rate); the identity for penalty mode or lambda 0."""
    if not ocfg.l1_lambda or ocfg.l1_mode == "penalty":
        return delta
    if ocfg.l1_mode == "proximal":
        # Euclidean prox: shrink by lr * lambda (exact zeros, unlike a penalty's gradient)
        return losses.soft_threshold(delta, lr * ocfg.l1_lambda)
    # proximal_adam: the prox in the metric Adam stepped in.  Clipping scaled the loss by c this step, so the
    # L1 term is scaled alike (c * lambda): lambda stays in the loss's units whatever max_grad_norm is.
    cfg = optim.branch_config(opt)
    adam = optim.adam_state(opt_state)
    scale = lr * ocfg.l1_lambda * optim.clip_factor(opt, grads)
    return losses.soft_threshold_tree(delta, losses.adam_l1_threshold(adam.nu, adam.count, scale, b2=cfg.b2,
                                                                      eps=cfg.eps))


DELTA_TOL = 1e-6  # |delta| at or below this counts as "near zero" in the per-step metrics


def delta_stats(delta: Any, tols: tuple[float, ...] = ()) -> dict[str, jax.Array]:
    """Sparsity of the trained state after the update (over every trained array: the dense delta, or the
    LoRA factors): exact zeros, entries with |x| <= DELTA_TOL (and each of `tols`: `delta/abs_le_<t>`), and
    the mean |x| (the L1 norm per entry)."""
    leaves = jax.tree_util.tree_leaves(delta)
    n = float(sum(x.size for x in leaves))  # a float: above 2**31 entries a Python int does not fit int32

    def frac(pred) -> jax.Array:
        return sum(jnp.sum(pred(x), dtype=jnp.float32) for x in leaves) / n
    out = {"delta/zero_frac": frac(lambda x: x == 0), "delta/near_zero_frac": frac(lambda x: jnp.abs(x) <= DELTA_TOL),
           "delta/mean_abs": sum(jnp.sum(jnp.abs(x), dtype=jnp.float32) for x in leaves) / n}
    for t in tols:
        out[f"delta/abs_le_{t:g}"] = frac(lambda x, t=t: jnp.abs(x) <= t)
    return out


def build_steps(cfg: ModelConfig, dcfg: DeltaConfig, ocfg: ObjectiveConfig, opt: optax.GradientTransformation,
                lr_schedule: optax.Schedule, *, grad_accum: int = 1, eval_micro_rows: int = 0,
                mesh: Mesh | None = None, rules: tuple = ()):
    """-> (train_step(state, base, batch) -> (state, metrics), eval_sums(delta, base, batch) -> sums).
    eval_sums runs `eval_micro_rows` rows at a time (a lax.scan; 0: the whole batch in one forward)."""
    ocfg.check_delta(dcfg.kind)
    if ocfg.l1_lambda and ocfg.l1_mode == "proximal_adam":
        optim.branch_config(opt)  # refused now rather than at the first step
    logp_fn = make_logp_fn(cfg, mesh, rules, ocfg.logits_chunk)
    constrain, unroll = rows_constraint(mesh, rules), loops.unroll_loops(mesh)

    def loss_of(delta, base, ref_params, mb, totals):
        return objectives.micro_loss(ocfg, logp_fn, model_variables(base, delta, dcfg), ref_params, mb, totals)

    def reference(base):
        return objectives.reference_params(base) if ocfg.needs_reference else None

    def train_step(state: TrainState, base: Any, batch: dict):
        totals = objectives.batch_totals(ocfg, batch)
        ref_params = reference(base)
        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def grads_and_sums(mb):
            (_, sums), grads = grad_fn(state.delta, base, ref_params, mb, totals)
            return grads, sums

        grads, sums = (grads_and_sums(batch) if grad_accum == 1 else
                       sum_over_micro(grads_and_sums, batch, grad_accum, constrain, unroll))
        metrics = objectives.finalize(ocfg, sums)
        if ocfg.l1_lambda and ocfg.l1_mode == "penalty":
            l1, l1_grads = jax.value_and_grad(losses.l1_penalty)(state.delta, ocfg.l1_lambda)
            grads = _tree_add(grads, l1_grads)
            metrics["l1_penalty"] = l1
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = lr_schedule(state.step)
        updates, opt_state = opt.update(grads, state.opt_state, state.delta)
        delta = optax.apply_updates(state.delta, updates)
        delta = l1_prox(ocfg, opt, delta, opt_state, grads, lr_schedule(state.step))
        metrics.update(delta_stats(delta))
        return TrainState(step=state.step + 1, delta=delta, opt_state=opt_state), metrics

    def eval_sums(delta: Any, base: Any, batch: dict):
        totals = objectives.batch_totals(ocfg, batch)
        ref_params = reference(base)

        def sums_of(mb):
            return loss_of(delta, base, ref_params, mb, totals)[1]

        k = micro_count(batch["input_ids"].shape[0], eval_micro_rows)
        return sums_of(batch) if k == 1 else sum_over_micro(sums_of, batch, k, constrain, unroll)

    return train_step, eval_sums


def jit_steps(train_step, eval_sums, state_shardings: TrainState, base_shardings: Any, mesh: Mesh, rules: tuple,
              donate: bool = True):
    """jit with explicit shardings; the state is donated (updated in place on accelerators)."""
    data = NamedSharding(mesh, batch_spec(rules))
    replicated = NamedSharding(mesh, P())
    train = jax.jit(train_step, in_shardings=(state_shardings, base_shardings, data),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,) if donate else ())
    evals = jax.jit(eval_sums, in_shardings=(state_shardings.delta, base_shardings, data), out_shardings=replicated)
    return train, evals


def init_state(delta: Any, opt: optax.GradientTransformation, shardings: TrainState | None = None) -> TrainState:
    def make(d):
        return TrainState(step=jnp.zeros((), jnp.int32), delta=d, opt_state=opt.init(d))
    if shardings is None:
        return jax.jit(make)(delta)
    return jax.jit(make, in_shardings=(shardings.delta,), out_shardings=shardings)(delta)


def state_shardings(opt: optax.GradientTransformation, abstract_delta: Any, delta_sh: Any, mesh: Mesh) -> TrainState:
    from paft_jax.train.optim import opt_state_shardings
    return TrainState(step=NamedSharding(mesh, P()), delta=delta_sh,
                      opt_state=opt_state_shardings(opt, abstract_delta, delta_sh, mesh))
