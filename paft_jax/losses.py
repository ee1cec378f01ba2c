"""Training objectives as pure functions over arrays (no model, no state): testable on 4x4 inputs.

Conventions (the data contract in docs/data.md): the model emits logits at every position and the
batch carries `targets[b, t]` (the next token inside the same segment) and `loss_mask[b, t]` (1 where
that target is trained).  Nothing here shifts, so packed rows cannot leak across segments.

Preference losses follow TRL's definitions and names: log-probs are summed over completion tokens
(IPO, ORPO and SimPO take length-averaged ones), rewards are beta * (policy - reference) log-ratios.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


# ---------------------------------------------------------------------------------------------
# token and sequence log-probabilities
# ---------------------------------------------------------------------------------------------

def token_logps(logits: Array, targets: Array) -> Array:
    """log p(targets[b, t]) from full logits [B, T, V] -> [B, T] (fp32)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def softcap(logits: Array, cap: float | None) -> Array:
    """cap * tanh(logits / cap) (Gemma's final logit soft-capping); the logits unchanged when cap is None."""
    if cap is None:
        return logits
    cap = jnp.asarray(cap, logits.dtype)
    return jnp.tanh(logits / cap) * cap


def token_logps_chunked(hidden: Array, kernel: Array, targets: Array, chunk_size: int = 8192,
                        with_hits: bool = False, vocab_major: bool = False,
                        unroll: bool = False, cap: float | None = None) -> Array | tuple[Array, Array]:
    """log p(targets) from final hidden states [B, T, E] and the output kernel [E, V], vocab in chunks.

    A running (max, sum-exp) over vocab chunks replaces one [B, T, V] fp32 log-softmax: peak memory is
    [B, T, chunk].  The chunk body is rematerialized, so the backward pass recomputes each chunk's
    logits instead of storing all of them (which would bring the full [B, T, V] back).
    `with_hits` also returns whether each target is the argmax (token accuracy, ties count as hits).
    `vocab_major`: the kernel is [V, E] (a tied embedding), sliced into chunks without a transpose.
    `unroll`: the loop over chunks unrolled (same values; paft_jax.models.loops says when).
    `cap`: the model's final logit soft-capping (`softcap`), applied to each chunk's logits.
    """
    v, e = kernel.shape if vocab_major else kernel.shape[::-1]
    n = -(-v // chunk_size)
    pad = n * chunk_size - v
    if vocab_major:
        w = jnp.pad(kernel, ((0, pad), (0, 0))) if pad else kernel
        w = w.reshape(n, chunk_size, e)                             # [n, C, E]: rows are contiguous
        spec = "...e,ce->...c"
    else:
        w = jnp.pad(kernel, ((0, 0), (0, pad))) if pad else kernel
        w = w.reshape(e, n, chunk_size).transpose(1, 0, 2)          # [n, E, C]
        spec = "...e,ec->...c"
    targets = targets.astype(jnp.int32)
    lead = hidden.shape[:-1]
    acc = jnp.promote_types(hidden.dtype, jnp.float32)

    @jax.checkpoint
    def body(carry, xs):
        m, s, picked = carry
        wc, start = xs
        logits = softcap(jnp.einsum(spec, hidden, wc.astype(hidden.dtype), preferred_element_type=acc), cap)
        valid = (start + jnp.arange(chunk_size)) < v               # padded vocab columns never count
        logits = jnp.where(valid, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        local = targets - start
        inside = (local >= 0) & (local < chunk_size)
        got = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk_size - 1)[..., None], axis=-1)[..., 0]
        picked = jnp.where(inside, got, picked)
        return (m_new, s, picked), None

    init = (jnp.full(lead, -jnp.inf, acc), jnp.zeros(lead, acc), jnp.zeros(lead, acc))
    starts = jnp.arange(n, dtype=jnp.int32) * chunk_size
    (m, s, picked), _ = jax.lax.scan(body, init, (w, starts), unroll=n if unroll else 1)
    logps = picked - (m + jnp.log(s))
    return (logps, jax.lax.stop_gradient(picked >= m)) if with_hits else logps


def sequence_logps(logits: Array, labels: Array, loss_mask: Array, average: bool = False) -> Array:
    """Per-row log-prob of the masked tokens: [B, T, V], [B, T], [B, T] -> [B] (mean if `average`)."""
    lp = token_logps(logits, labels)
    return masked_sum(lp, loss_mask, average)


def masked_sum(values: Array, mask: Array, average: bool = False) -> Array:
    mask = mask.astype(jnp.float32)
    total = (values * mask).sum(-1)
    return total / jnp.maximum(mask.sum(-1), 1.0) if average else total


def segment_sums(values: Array, mask: Array, segment_ids: Array, num_segments: int) -> tuple[Array, Array]:
    """Sum of masked values per segment 1..num_segments of each row: -> ([B, S] sums, [B, S] counts)."""
    onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)  # [B, T, S]
    m = mask.astype(jnp.float32)
    return jnp.einsum("bt,bts->bs", values * m, onehot), jnp.einsum("bt,bts->bs", m, onehot)


def pair_logps(tok_logps: Array, loss_mask: Array, segment_ids: Array, pairs_per_row: int) -> dict[str, Array]:
    """Chosen/rejected log-prob sums and token counts, [B, P] each, from a packed preference batch.

    Pair k of a row is segment 2k+1 (prompt + chosen) and segment 2k+2 (prompt + rejected).
    """
    sums, counts = segment_sums(tok_logps, loss_mask, segment_ids, 2 * pairs_per_row)
    return {"chosen": sums[:, 0::2], "rejected": sums[:, 1::2],
            "chosen_tokens": counts[:, 0::2], "rejected_tokens": counts[:, 1::2]}


# ---------------------------------------------------------------------------------------------
# SFT and the L1 term on the delta
# ---------------------------------------------------------------------------------------------

def sft_loss(tok_logps: Array, loss_mask: Array) -> Array:
    """Masked cross-entropy, mean over trained tokens."""
    m = loss_mask.astype(jnp.float32)
    return -(tok_logps * m).sum() / jnp.maximum(m.sum(), 1.0)


def tree_size(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def l1_penalty(delta: Any, lam: float) -> Array:
    """lam * sum |delta| / number of delta entries (normalized so lam does not scale with model size)."""
    total = sum(jnp.abs(x.astype(jnp.float32)).sum() for x in jax.tree_util.tree_leaves(delta))
    return lam * total / tree_size(delta)


def soft_threshold(delta: Any, threshold: Array | float) -> Any:
    """Proximal step of the L1 term: shrink every entry towards 0 by `threshold`, giving exact zeros."""
    return jax.tree_util.tree_map(
        lambda x: (jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)).astype(x.dtype), delta)


def adam_l1_threshold(nu: Any, count: Array, scale: Array | float, *, b2: float, eps: float) -> Any:
    """Per-entry thresholds of the proximal step of `scale * |x|` in Adam's metric (eps > 0).

    Adam's update is a gradient step in the norm ||x||_D^2 with D = sqrt(v_hat) + eps (v_hat = nu / (1 - b2^t),
    the bias correction AdamW applies, t = the state's count); the L1 proximal operator in that norm
    soft-thresholds entry i by scale / D_i.  With scale = lr_t * lambda, an entry at 0 stays there exactly
    when |m_hat_i| <= lambda: the optimality condition of loss + lambda * sum|x|.
    """
    correction = 1 - b2 ** jnp.asarray(count)  # in float32 as optax computes it: D is AdamW's own, bit for bit
    return jax.tree_util.tree_map(lambda v: scale / (jnp.sqrt(v / correction.astype(v.dtype)) + eps), nu)


def soft_threshold_tree(delta: Any, thresholds: Any) -> Any:
    """soft_threshold with one threshold per entry (a tree shaped like `delta`)."""
    return jax.tree_util.tree_map(
        lambda x, t: (jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0)).astype(x.dtype), delta, thresholds)


# ---------------------------------------------------------------------------------------------
# preference objectives
# ---------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, ref_chosen_logps: Array,
             ref_rejected_logps: Array, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
    """DPO family -> (losses, chosen_rewards, rejected_rewards), each shaped like the inputs.

    sigmoid: -log s(b h) (label_smoothing > 0: conservative DPO);  robust: unbiased robust DPO;
    hinge: relu(1 - b h);  ipo: (h - 1/(2b))^2 with length-averaged log-probs.  h is the difference of
    the policy's and the reference's chosen-vs-rejected log-ratios.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type {loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * h) * (1 - ls) - jax.nn.log_sigmoid(-beta * h) * ls
    elif loss_type == "robust":
        losses = (-jax.nn.log_sigmoid(beta * h) * (1 - ls) + jax.nn.log_sigmoid(-beta * h) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * jax.lax.stop_gradient(policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * jax.lax.stop_gradient(policy_rejected_logps - ref_rejected_logps)
    return losses, chosen_rewards, rejected_rewards


def orpo_odds_ratio(chosen_avg_logps: Array, rejected_avg_logps: Array, *, beta: float) -> tuple[Array, Array, Array, Array]:
    """ORPO's odds-ratio term (the model's own length-averaged log-probs, no reference).

    Returns (losses = -beta * log s(log odds ratio), chosen_rewards, rejected_rewards, log_odds); the
    total ORPO loss is the chosen NLL plus the mean of `losses`.
    """
    # log(1 - p) as log(-expm1(log p)): exact near p -> 1 where log1p(-exp) loses digits
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        jnp.log(-jnp.expm1(chosen_avg_logps)) - jnp.log(-jnp.expm1(rejected_avg_logps)))
    losses = -beta * jax.nn.log_sigmoid(log_odds)
    return (losses, beta * jax.lax.stop_gradient(chosen_avg_logps),
            beta * jax.lax.stop_gradient(rejected_avg_logps), jax.lax.stop_gradient(log_odds))


def simpo_loss(chosen_avg_logps: Array, rejected_avg_logps: Array, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
    """SimPO: -log s(beta * (avg_c - avg_r) - gamma), no reference -> (losses, chosen_rewards, rejected_rewards)."""
    h = (chosen_avg_logps - rejected_avg_logps) - gamma / beta
    ls = label_smoothing
    losses = -jax.nn.log_sigmoid(beta * h) * (1 - ls) - jax.nn.log_sigmoid(-beta * h) * ls
    return (losses, beta * jax.lax.stop_gradient(chosen_avg_logps),
            beta * jax.lax.stop_gradient(rejected_avg_logps))
