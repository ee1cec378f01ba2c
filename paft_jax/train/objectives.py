"""What each branch optimizes, written as additive sums over a micro-batch.

An objective returns (loss contribution, sums): the contribution is already divided by the *whole*
batch's count (tokens or pairs), so adding the contributions of k micro-batches gives exactly the loss
of the full batch, and so do the gradients.  `sums` are additive statistics; `finalize` turns them into
metrics named as TRL names them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from paft_jax import losses
from paft_jax.models import loops

OBJECTIVES = ("sft", "dpo", "orpo", "simpo")
L1_MODES = ("proximal", "proximal_adam", "penalty")
PREFERENCE = ("dpo", "orpo", "simpo")


@dataclass
class ObjectiveConfig:
    kind: str = "sft"                 # sft | dpo | orpo | simpo
    beta: float = 0.1                 # dpo: KL strength; orpo: lambda of the odds-ratio term; simpo: reward scale
    loss_type: str = "sigmoid"        # dpo: sigmoid | hinge | ipo | robust
    label_smoothing: float = 0.0      # dpo sigmoid (cDPO) / robust; simpo
    simpo_gamma: float = 0.5          # simpo target margin (gamma; TRL's simpo_gamma)
    nll_weight: float = 0.0           # simpo: weight of the chosen NLL (CPO's alpha); orpo always has weight 1
    l1_lambda: float = 0.0            # L1 on the delta (0 = off)
    l1_mode: str = "proximal"         # proximal | proximal_adam (exact zeros) | penalty (docs/training.md)
    # vocab chunk of the log-softmax (0: full logits, no recompute); auto: 0 on CPU, 8192 on TPU/GPU
    logits_chunk: int | str = "auto"

    def validate(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective.kind={self.kind!r}: expected one of {OBJECTIVES}")
        if self.kind == "dpo" and self.loss_type not in losses.DPO_LOSS_TYPES:
            raise ValueError(f"objective.loss_type={self.loss_type!r}: expected one of {losses.DPO_LOSS_TYPES}")
        if not self.beta > 0:
            raise ValueError(f"objective.beta={self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"objective.label_smoothing={self.label_smoothing} must be within [0, 0.5)")
        if self.l1_lambda < 0 or self.l1_mode not in L1_MODES:
            raise ValueError(f"objective.l1_lambda={self.l1_lambda} / l1_mode={self.l1_mode!r}: "
                             f"need lambda >= 0 and a mode in {L1_MODES}")
        bad_chunk = loops.check("objective.logits_chunk", self.logits_chunk, 0)
        if bad_chunk:
            raise ValueError(bad_chunk + " (0: no chunking)")

    def check_delta(self, delta_kind: str) -> None:
        """proximal_adam is for dense deltas.  On LoRA factors it would wipe A's random init at step 1 (A has
        no gradient while B = 0, so Adam's metric gives it the threshold lr * lambda / eps), and sparse
        factors do not make a sparse delta anyway."""
        if self.l1_lambda and self.l1_mode == "proximal_adam" and delta_kind != "dense":
            raise ValueError(f"objective.l1_mode=proximal_adam needs delta.kind=dense (got {delta_kind!r}): on "
                             "LoRA factors it zeroes A at step 1, where A has no gradient yet")

    @property
    def preference(self) -> bool:
        return self.kind in PREFERENCE

    @property
    def needs_reference(self) -> bool:
        return self.kind == "dpo"


# a function (model variables, micro_batch) -> (token log-probs [b, T], argmax hits [b, T])
LogpFn = Callable[[Any, dict], tuple[jax.Array, jax.Array]]


def batch_totals(ocfg: ObjectiveConfig, batch: dict) -> dict[str, jax.Array]:
    """Counts over the whole (global) batch that normalize every micro-batch's contribution."""
    mask = batch["loss_mask"].astype(jnp.float32)
    out = {"tokens": jnp.maximum(mask.sum(), 1.0)}
    if ocfg.preference:
        out["pairs"] = jnp.maximum(batch["pair_valid"].astype(jnp.float32).sum(), 1.0)
        chosen = (batch["segment_ids"] % 2 == 1) & (batch["segment_ids"] > 0)
        out["chosen_tokens"] = jnp.maximum((mask * chosen).sum(), 1.0)
    return out


def reference_params(base: Any) -> dict:
    """The DPO reference is the base itself (delta = 0): the model's variables of the base as it is stored
    (no copy; the model casts weights to the compute dtype, as it does for the policy)."""
    return {"params": base}


def reference_pair_logps(logp_fn: LogpFn, ref_params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """The reference's summed chosen / rejected completion log-probs, [B, P] each (no gradient)."""
    lp, _ = logp_fn(ref_params, batch)
    out = losses.pair_logps(jax.lax.stop_gradient(lp), batch["loss_mask"].astype(jnp.float32),
                            batch["segment_ids"], batch["pair_valid"].shape[1])
    return out["chosen"], out["rejected"]


def micro_loss(ocfg: ObjectiveConfig, logp_fn: LogpFn, params: Any, ref_params: Any, batch: dict,
               totals: dict) -> tuple[jax.Array, dict]:
    lp, hits = logp_fn(params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    if not ocfg.preference:
        nll = -(lp * mask).sum()
        return nll / totals["tokens"], {"nll": nll, "tokens": mask.sum(), "hits": (hits * mask).sum()}

    pairs_per_row = batch["pair_valid"].shape[1]
    valid = batch["pair_valid"].astype(jnp.float32)
    pol = losses.pair_logps(lp, mask, batch["segment_ids"], pairs_per_row)
    # empty pair slots get a harmless stand-in (avg log-prob 0 would make ORPO's log(1 - p) infinite,
    # and inf * 0 poisons the gradient even when masked afterwards)
    c_avg = jnp.where(valid > 0, pol["chosen"] / jnp.maximum(pol["chosen_tokens"], 1.0), -1.0)
    r_avg = jnp.where(valid > 0, pol["rejected"] / jnp.maximum(pol["rejected_tokens"], 1.0), -1.0)
    chosen_mask = mask * (batch["segment_ids"] % 2 == 1)
    nll = -(lp * chosen_mask).sum()
    sums = {"pairs": valid.sum(), "logps_chosen": (pol["chosen"] * valid).sum(),
            "logps_rejected": (pol["rejected"] * valid).sum(), "nll": nll, "chosen_tokens": chosen_mask.sum()}

    if ocfg.kind == "dpo":
        if "ref_chosen" in batch:  # precomputed reference log-probs (sums over completion tokens)
            ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
        else:
            ref_c, ref_r = reference_pair_logps(logp_fn, ref_params, batch)
        pc, pr = pol["chosen"], pol["rejected"]
        if ocfg.loss_type == "ipo":  # IPO regresses length-averaged log-ratios
            pc, pr = c_avg, r_avg
            ref_c = ref_c / jnp.maximum(pol["chosen_tokens"], 1.0)
            ref_r = ref_r / jnp.maximum(pol["rejected_tokens"], 1.0)
        per_pair, cr, rr = losses.dpo_loss(pc, pr, ref_c, ref_r, beta=ocfg.beta, loss_type=ocfg.loss_type,
                                           label_smoothing=ocfg.label_smoothing)
        loss = (per_pair * valid).sum() / totals["pairs"]
    elif ocfg.kind == "orpo":
        per_pair, cr, rr, log_odds = losses.orpo_odds_ratio(c_avg, r_avg, beta=ocfg.beta)
        loss = nll / totals["chosen_tokens"] + (per_pair * valid).sum() / totals["pairs"]
        sums["log_odds_ratio"] = (jax.nn.log_sigmoid(log_odds) * valid).sum()
        sums["log_odds_chosen"] = (log_odds * valid).sum()
    else:  # simpo
        per_pair, cr, rr = losses.simpo_loss(c_avg, r_avg, beta=ocfg.beta, gamma=ocfg.simpo_gamma,
                                             label_smoothing=ocfg.label_smoothing)
        loss = (per_pair * valid).sum() / totals["pairs"]
        if ocfg.nll_weight:
            loss = loss + ocfg.nll_weight * nll / totals["chosen_tokens"]
    sums.update({"loss_pairs": (per_pair * valid).sum(), "rewards_chosen": (cr * valid).sum(),
                 "rewards_rejected": (rr * valid).sum(), "accuracies": ((cr > rr) * valid).sum(),
                 "margins": ((cr - rr) * valid).sum()})
    return loss, sums


def finalize(ocfg: ObjectiveConfig, sums: dict) -> dict[str, jax.Array]:
    """Additive sums -> metrics under TRL's names."""
    if not ocfg.preference:
        return {"loss": sums["nll"] / jnp.maximum(sums["tokens"], 1.0),
                "mean_token_accuracy": sums["hits"] / jnp.maximum(sums["tokens"], 1.0),
                "num_tokens": sums["tokens"]}
    n = jnp.maximum(sums["pairs"], 1.0)
    out = {"rewards/chosen": sums["rewards_chosen"] / n, "rewards/rejected": sums["rewards_rejected"] / n,
           "rewards/accuracies": sums["accuracies"] / n, "rewards/margins": sums["margins"] / n,
           "logps/chosen": sums["logps_chosen"] / n, "logps/rejected": sums["logps_rejected"] / n}
    nll = sums["nll"] / jnp.maximum(sums["chosen_tokens"], 1.0)
    if ocfg.kind == "orpo":
        out["loss"] = nll + sums["loss_pairs"] / n
        out["nll_loss"] = nll
        out["log_odds_ratio"] = sums["log_odds_ratio"] / n
        out["log_odds_chosen"] = sums["log_odds_chosen"] / n
    else:
        out["loss"] = sums["loss_pairs"] / n + (ocfg.nll_weight * nll if ocfg.kind == "simpo" else 0.0)
        if ocfg.kind == "simpo" and ocfg.nll_weight:
            out["nll_loss"] = nll
    return out
