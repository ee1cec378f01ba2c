"""Optimizer of a branch: global-norm clipping + AdamW on the delta, warmup then cosine/linear decay."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
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

    def validate(self, steps: int) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate} must be > 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if not 0 <= self.warmup_steps <= steps:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be within [0, steps={steps}]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be within [0, 1]")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.weight_decay and optim.max_grad_norm must be >= 0")


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    lr, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay = max(steps - cfg.warmup_steps, 1)
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


def make_optimizer(cfg: OptimConfig, steps: int, trainable_mask: Any | None = None) -> optax.GradientTransformation:
    parts = []
    if trainable_mask is not None:
        # frozen leaves: gradients zeroed before clipping, so their moments and updates stay exactly 0
        # (optax.multi_transform would drop their moments, but its masked state breaks sharding by path)
        parts.append(_zero_frozen(trainable_mask))
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


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
