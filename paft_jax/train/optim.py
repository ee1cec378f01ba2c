"""Optimizer of a branch: global-norm clipping + AdamW on the delta, warmup then cosine/linear decay.

The schedule's horizon (where the decay ends) is `optim.schedule_steps`, by default the run's `steps`; past
it the lr stays at its final value.  A rerun that raises `steps` resumes mid-schedule, so an unset
`schedule_steps` may not change the horizon a run was trained with (`horizon_change`): that would stretch
the decay and make the lr jump.

The step may need to see the optimizer the way AdamW sees the gradient (the proximal L1 step in Adam's
metric): `clip_factor` and `adam_state` read that from the optimizer `make_optimizer` built and its state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    schedule: str = "cosine"          # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0          # final lr = learning_rate * min_lr_ratio (cosine, linear)
    weight_decay: float = 0.0          # decoupled; on a delta it pulls the branch back towards the base
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0         # 0 disables clipping
    mu_dtype: str | None = None        # Adam's first moment: null = the delta's (float32); bfloat16 halves it
    # where the decay ends (null: at `steps`); steps past it train at the final lr.  Set it to keep a run's
    # schedule when a rerun raises `steps` (MaxText's learning_rate_schedule_steps)
    schedule_steps: int | None = None

    def horizon(self, steps: int) -> int:
        """The step at which warmup + decay end, for a run of `steps` steps."""
        return self.schedule_steps if self.schedule_steps is not None else steps

    def final_lr(self) -> float:
        return self.learning_rate * (1.0 if self.schedule == "constant" else self.min_lr_ratio)

    def validate(self, steps: int) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate} must be > 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"optim.schedule_steps={self.schedule_steps} must be >= 1 (or null: steps)")
        horizon = self.horizon(steps)
        if not 0 <= self.warmup_steps <= horizon:
            where = f"optim.schedule_steps={horizon}" if self.schedule_steps is not None else f"steps={steps}"
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be within [0, {where}]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be within [0, 1]")
        if horizon < steps and self.final_lr() == 0:
            # every step past the horizon would have lr 0: AdamW's update and weight decay both scale with it
            raise ValueError(f"optim.schedule_steps={horizon} < steps={steps} with a final lr of 0 "
                             f"(optim.min_lr_ratio=0): steps {horizon + 1}..{steps} would not change the delta; "
                             f"set optim.schedule_steps >= steps")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.weight_decay and optim.max_grad_norm must be >= 0")
        if self.mu_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"optim.mu_dtype={self.mu_dtype!r}: expected null, float32 or bfloat16")
        if not self.eps > 0:
            # an entry whose gradients have all been 0 (a frozen leaf, an unused embedding row) would get 0/0
            raise ValueError(f"optim.eps={self.eps} must be > 0")


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """The lr at each step count of a run of `steps` steps: warmup, then decay until `cfg.horizon(steps)`,
    then the final lr."""
    lr, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay = max(cfg.horizon(steps) - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay)
    else:
        after = optax.constant_schedule(lr)
    if cfg.warmup_steps == 0:
        return after
    # warmup from lr/warmup (not 0) so step 0 already moves: a zero-lr first step is wasted compute
    warm = optax.linear_schedule(lr / cfg.warmup_steps, lr, cfg.warmup_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def horizon_change(saved: dict, cfg: OptimConfig, steps: int, prefix: str = "") -> str | None:
    """Why continuing a run saved with config `saved` (its config.json / checkpoint config, a dict) under
    (`cfg`, `steps`) would silently change its lr schedule, or None.  Only an unset `optim.schedule_steps`
    is checked: its horizon follows `steps`, so raising `steps` on a rerun would stretch the decay from the
    resumed step on (the lr jumps up).  A set `schedule_steps` is the user's deliberate choice.  `prefix`:
    what the keys are named under (a PAFT config's `sft.`)."""
    optim = saved.get("optim") or {}
    old_steps = saved.get("steps")
    if cfg.schedule_steps is not None or cfg.schedule == "constant" or not isinstance(old_steps, int):
        return None
    old = optim.get("schedule_steps") or old_steps
    new = cfg.horizon(steps)
    if old == new:
        return None
    key, final = f"{prefix}optim.schedule_steps", cfg.final_lr()
    change = (f"{key}={new} to {'stretch' if new > old else 'shorten'} it from the resumed step on (the lr "
              "changes at once)")
    if steps > old and final == 0:
        how = f"{change}; keeping it would train steps {old + 1}..{steps} at its final lr, 0"
    else:
        past = f" (steps past {old} at its final lr, {final:g})" if steps > old else ""
        how = f"{key}={old} to keep it{past}, or {change}"
    return (f"{prefix}steps={steps} would change the lr schedule this run was trained with ({cfg.schedule} "
            f"decay ending at step {old}, now {new}); to go on, set {how}")


class BranchOptimizer(optax.GradientTransformationExtraArgs):
    """optax's (init, update) pair as `make_optimizer` builds it, carrying the `OptimConfig` and trainable
    mask it was built from (attributes `config`, `trainable_mask`), so the step can reproduce what the chain
    does to a gradient.  A subclass of the NamedTuple: whatever takes a GradientTransformation takes it."""


def make_optimizer(cfg: OptimConfig, steps: int, trainable_mask: Any | None = None) -> BranchOptimizer:
    parts = []
    if trainable_mask is not None:
        # frozen leaves: gradients zeroed before clipping, so their moments and updates stay exactly 0
        # (optax.multi_transform would drop their moments, but its masked state breaks sharding by path)
        parts.append(_zero_frozen(trainable_mask))
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             mu_dtype=jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None,
                             weight_decay=cfg.weight_decay))
    opt = BranchOptimizer(*optax.chain(*parts))
    opt.config, opt.trainable_mask = cfg, trainable_mask
    return opt


def branch_config(opt: optax.GradientTransformation) -> OptimConfig:
    if not isinstance(opt, BranchOptimizer):
        raise ValueError("l1_mode proximal_adam reads Adam's state as make_optimizer builds it; got another "
                         f"optimizer ({type(opt).__name__})")
    return opt.config


def clip_factor(opt: BranchOptimizer, grads: Any) -> jax.Array:
    """The factor global-norm clipping multiplies these (raw) gradients by in `opt`: 1 when off or under the
    limit.  Frozen leaves are left out of the norm, as the chain zeroes them before clipping."""
    cfg = branch_config(opt)
    if cfg.max_grad_norm <= 0:
        return jnp.ones((), jnp.float32)
    if opt.trainable_mask is not None:
        grads = jax.tree_util.tree_map(lambda g, keep: g if keep else jnp.zeros_like(g), grads, opt.trainable_mask)
    norm = optax.tree.norm(grads)
    return jnp.where(norm < cfg.max_grad_norm, 1.0, cfg.max_grad_norm / norm).astype(jnp.float32)


def adam_state(opt_state: Any) -> optax.ScaleByAdamState:
    """The one ScaleByAdamState (count, mu, nu) inside a chain's state."""
    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
    return found[0]


def _zero_frozen(trainable_mask: Any) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        return jax.tree_util.tree_map(lambda g, keep: g if keep else jax.numpy.zeros_like(g),
                                      updates, trainable_mask), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def opt_state_shardings(opt: optax.GradientTransformation, abstract_delta: Any, delta_shardings: Any,
                        mesh: Mesh) -> Any:
    """Moments are sharded like the delta leaf they track; counters and the like are replicated."""
    abstract_state = jax.eval_shape(opt.init, abstract_delta)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(opt, lambda _, sh: sh, abstract_state, delta_shardings,
                                 transform_non_params=lambda _: replicated)
