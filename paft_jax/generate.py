"""Greedy and sampled generation with a KV cache (smoke checks, the demo, evaluation).

Prompts are left-padded into one batch; the whole decode loop is one jitted `lax.while_loop` that
stops when every row has produced an end-of-sequence token or `max_new_tokens` is reached.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from paft_jax.models.config import ModelConfig
from paft_jax.models.decoder import Decoder, init_cache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be within (0, 1] (1: off)")


def _pick(logits: jax.Array, rng: jax.Array, s: SamplingConfig) -> jax.Array:
    if s.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, -1)) > s.top_p  # keep the token that crosses top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _ends_with(out: jax.Array, i: jax.Array, seqs: tuple[tuple[int, ...], ...]) -> jax.Array:
    """[B] bool: the tokens out[:, :i+1] end with one of `seqs`."""
    hit = jnp.zeros(out.shape[:1], bool)
    for seq in seqs:
        k = len(seq)
        tail = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(i - k + 1, 0), k, axis=1)
        hit |= (i + 1 >= k) & jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1)
    return hit


@partial(jax.jit, static_argnames=("cfg", "sampling", "eos_ids", "stop_ids"))
def _generate(params, prompt_ids, prompt_mask, *, cfg: ModelConfig, sampling: SamplingConfig,
              eos_ids: tuple[int, ...], stop_ids: tuple[tuple[int, ...], ...] = ()):
    b, p = prompt_ids.shape
    n = sampling.max_new_tokens
    model = Decoder(cfg)
    cache = init_cache(cfg, b, p + n)
    positions = jnp.clip(jnp.cumsum(prompt_mask, axis=1) - 1, 0, None)
    logits, cache = model.apply({"params": params}, prompt_ids, positions=positions, segment_ids=prompt_mask,
                                cache=cache, cache_index=0)
    rng = jax.random.key(sampling.seed)
    rng, sub = jax.random.split(rng)
    tok = _pick(logits[:, -1], sub, sampling)
    out = jnp.full((b, n), -1, jnp.int32).at[:, 0].set(tok)  # -1: never generated (the loop ended first)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    done = jnp.isin(tok, eos) | _ends_with(out, jnp.int32(0), stop_ids)
    next_pos = positions[:, -1] + 1

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, out, cache, done, pos, rng = state
        tok = out[:, i - 1]
        logits, cache = model.apply({"params": params}, tok[:, None], positions=pos[:, None],
                                    segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache, cache_index=p + i - 1)
        rng, sub = jax.random.split(rng)
        new = _pick(logits[:, -1], sub, sampling)
        new = jnp.where(done, eos[0], new)
        out = out.at[:, i].set(new)
        return i + 1, out, cache, done | jnp.isin(new, eos) | _ends_with(out, i, stop_ids), pos + 1, rng

    _, out, _, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, done, next_pos, rng))
    return out


def generate_ids(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
                 eos_ids: Sequence[int] = (), pad_to: int = 64,
                 stop_ids: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """Token ids in, new token ids out (each row cut at its first end-of-sequence token).  A row also ends
    once its new tokens end with one of `stop_ids` (kept in the output; the caller cuts the text)."""
    longest = max(len(x) for x in prompts)
    context = cfg.max_position_embeddings
    if longest + sampling.max_new_tokens > context:
        raise ValueError(f"max_new_tokens={sampling.max_new_tokens}: the longest prompt ({longest} tokens) plus the "
                         f"new tokens exceed the model's context of {context} positions; at most "
                         f"{max(0, context - longest)} new tokens fit")
    width = -(-longest // pad_to) * pad_to  # few compiled shapes
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for r, x in enumerate(prompts):
        ids[r, width - len(x):] = x
        mask[r, width - len(x):] = 1
    out = np.asarray(_generate(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg, sampling=sampling,
                               eos_ids=tuple(int(e) for e in eos_ids),
                               stop_ids=tuple(tuple(int(t) for t in s) for s in stop_ids
                                              if 0 < len(s) <= sampling.max_new_tokens)))
    results = []
    for row in out.tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_ids or t < 0), len(row))  # -1: ended without an eos id
        results.append(row[:cut])
    return results


def eos_token_ids(cfg: ModelConfig, tokenizer: Any = None) -> tuple[int, ...]:
    ids = set()
    if isinstance(cfg.eos_token_id, tuple):
        ids.update(cfg.eos_token_id)
    elif cfg.eos_token_id is not None:
        ids.add(cfg.eos_token_id)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def chat(params: Any, cfg: ModelConfig, tokenizer: Any, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig(),
         system: str | None = None) -> list[str]:
    """Apply the tokenizer's chat template, generate, decode the answers."""
    conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
                     for text in prompts]
    return chat_messages(params, cfg, tokenizer, conversations, sampling)


def chat_messages(params: Any, cfg: ModelConfig, tokenizer: Any, conversations: Sequence[Sequence[dict]],
                  sampling: SamplingConfig = SamplingConfig()) -> list[str]:
    """Answer each conversation (a list of {role, content} messages ending with the user's turn)."""
    encoded = []
    for messages in conversations:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        encoded.append(list(ids))
    outs = generate_ids(params, cfg, encoded, sampling, eos_token_ids(cfg, tokenizer))
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
