"""Running requests on the sharded model: log-likelihoods of continuations, and greedy generation.

Log-likelihood requests are tokenized as lm-eval's HF backend does (trailing whitespace of the context moves
to the continuation; context + continuation encoded together, the continuation being the tokens after the
separately encoded context; left-truncated to the model's context), then packed first-fit, longest first,
into fixed [batch, width] rows with segment ids, so a few compiled shapes serve a whole task and no row is
mostly padding.  One forward gives every request's summed log-probability and whether each continuation
token is the argmax (lm-eval's is_greedy).  Log-probabilities are fp32 whatever the compute dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from paft_jax import losses
from paft_jax.data.loader import to_global
from paft_jax.models.decoder import Decoder
from paft_jax.train.step_fn import batch_spec, head_kernel

_WIDTH_STEP = 256  # row widths are multiples of this (few compiled shapes)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: request indices per row, each row's lengths summing to <= width."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


class Scorer:
    """Log-likelihoods of (context, continuation) pairs with one model on one mesh.

    Requests with the same model input (lm-eval's logits cache: MMLU's four one-token answers " A" .. " D"
    after one context) share one segment: their targets differ only at the last position, where the
    alternatives are scored from the same hidden state."""

    def __init__(self, params: Any, cfg, tokenizer, mesh, rules, batch_size: int, progress: Callable | None = None):
        self.params, self.cfg, self.tok, self.mesh = params, cfg, tokenizer, mesh
        dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
        self.batch_size = -(-batch_size // dp) * dp  # a whole number of rows per data-parallel shard
        self.sharding = jax.sharding.NamedSharding(mesh, batch_spec(rules))
        self._fn = jax.jit(_score_fn(cfg, mesh, rules))
        self.progress = progress

    def tokens(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
        """Per pair: (context + continuation)[-(L+1):] (the model input and the last target) and the
        continuation's length in tokens."""
        limit = self.cfg.max_position_embeddings
        out = []
        for ctx, cont in pairs:
            c, k = encode_pair(self.tok, ctx, cont)
            if not k:
                raise ValueError(f"the continuation {cont!r} encodes to no tokens after its context")
            seq = (c + k)[-(limit + 1):]
            out.append((seq, min(len(k), len(seq) - 1)))
        return out

    def loglikelihoods(self, toks: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) per request of `tokens()`."""
        groups: dict[tuple, list[int]] = {}
        for i, (seq, _) in enumerate(toks):
            groups.setdefault(tuple(seq[:-1]), []).append(i)
        keys = list(groups)
        lengths = [len(k) for k in keys]
        width = min(-(-max(lengths) // _WIDTH_STEP) * _WIDTH_STEP, self.cfg.max_position_embeddings)
        rows = pack(lengths, width)
        segs = 1 << max(len(r) for r in rows).bit_length()  # segment slots per row: few compiled shapes
        alts = max(len({toks[i][0][-1] for i in g}) for g in groups.values())
        results: list[tuple[float, bool]] = [(0.0, False)] * len(toks)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            batch, spans = self._batch(chunk, keys, groups, toks, width, segs, alts)
            lp, hit, alt_lp, alt_hit = jax.device_get(self._fn(self.params, to_global(batch, self.mesh,
                                                                                      self.sharding)))
            for r, s, g, i, lo, hi in spans:  # the continuation's targets but the last, then the last
                results[i] = (float(np.sum(lp[r, lo:hi - 1], dtype=np.float64) + alt_lp[r, s, g]),
                              bool(np.all(hit[r, lo:hi - 1]) and alt_hit[r, s, g]))
            if self.progress:
                self.progress(sum(len(groups[keys[j]]) for c in chunk for j in c))
        return results

    def _batch(self, rows, keys, groups, toks, width: int, segs: int, alts: int):
        b = self.batch_size
        ids, tgt, seg, pos = (np.zeros((b, width), np.int32) for _ in range(4))
        last = np.zeros((b, segs), np.int32)
        alt = np.zeros((b, segs, alts), np.int32)
        spans = []
        for r, members in enumerate(rows):
            at = 0
            for s, j in enumerate(members):
                inp, reqs = keys[j], groups[keys[j]]
                n = len(inp)
                ids[r, at:at + n] = inp
                tgt[r, at:at + n - 1] = inp[1:]
                seg[r, at:at + n], pos[r, at:at + n] = s + 1, np.arange(n)
                last[r, s] = at + n - 1
                finals = list(dict.fromkeys(toks[i][0][-1] for i in reqs))
                alt[r, s, :len(finals)] = finals
                for i in reqs:
                    spans.append((r, s, finals.index(toks[i][0][-1]), i, at + n - toks[i][1], at + n))
                at += n
        return {"input_ids": ids, "targets": tgt, "segment_ids": seg, "positions": pos, "last_pos": last,
                "alt_targets": alt}, spans


def _score_fn(cfg, mesh, rules, chunk: int = 8192):
    """(params, batch) -> token log-probs and argmax hits [B, T], and at each segment's last position the
    log-probs and hits of its alternative final targets [B, S, G] (vocab in chunks: never [B, T, V])."""
    model = Decoder(cfg, mesh=mesh, rules=rules)

    def f(params, b):
        variables = {"params": params}
        hidden, _ = model.apply(variables, b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"],
                                return_hidden=True)
        kernel, tied = head_kernel(cfg, variables)
        c = min(chunk, cfg.vocab_size)
        cap = cfg.final_logit_softcapping
        lp, hit = losses.token_logps_chunked(hidden, kernel, b["targets"], c, with_hits=True, vocab_major=tied,
                                             cap=cap)
        last = jnp.take_along_axis(hidden, b["last_pos"][..., None], axis=1)        # [B, S, E]
        g = b["alt_targets"].shape[-1]
        last = jnp.broadcast_to(last[:, :, None], (*last.shape[:2], g, last.shape[-1]))
        alp, ahit = losses.token_logps_chunked(last, kernel, b["alt_targets"], c, with_hits=True, vocab_major=tied,
                                               cap=cap)
        return lp, hit, alp, ahit
    return f


def generate_until(params: Any, cfg, tokenizer, contexts: Sequence[str], stops: tuple[str, ...], max_new_tokens: int,
                   batch_size: int, progress: Callable | None = None) -> list[str]:
    """Greedy continuations cut at the first stop string (lm-eval's generate_until); the model's end of
    sequence token and each stop string's own tokens end a row early."""
    from paft_jax.generate import SamplingConfig, eos_token_ids, generate_ids
    eos = eos_token_ids(cfg, tokenizer)
    stop_ids = tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in stops)
    until = tuple(stops) + tuple(tokenizer.decode([e]) for e in eos if tokenizer.decode([e]) not in stops)
    limit = cfg.max_position_embeddings - max_new_tokens
    prompts = [tokenizer.encode(c)[-limit:] for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    texts: list[str] = [""] * len(prompts)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        outs = generate_ids(params, cfg, [prompts[i] for i in idx], sampling, eos_ids=eos, stop_ids=stop_ids)
        for i, out in zip(idx, outs):
            text = tokenizer.decode(out, skip_special_tokens=True)
            for s in until:
                text = text.split(s)[0]
            texts[i] = text
        if progress:
            progress(len(idx))
    return texts
