"""Tokenization through the tokenizer's chat template, with a per-token "trained" mask.

`mask[j] = True` means token j is a training target (the batcher turns that into
loss_mask[t] = mask[t+1]).  Assistant tokens come from the template itself:

* templates with `{% generation %}` blocks: transformers' `return_assistant_tokens_mask`;
* otherwise: render the conversation up to each assistant turn (with the generation prompt) and up to
  its end, and take the tokens in between.  That is only sound if each rendered prefix tokenizes to a
  prefix of the full token sequence; when it does not, we refuse rather than guess.

In both cases the trained span of a turn is its content plus the end-of-turn token (`<|im_end|>`,
`<|eot_id|>`, EOS...), and stops there: the template's separator after the end-of-turn token
(e.g. SmolLM2's "\\n") is not trained, since generation stops at the end-of-turn token anyway.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from paft_jax.data.records import ChatPair, ChatSFT, DataError, RawPair, RawSFT, TextSFT

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# end-of-turn markers of common templates, besides the tokenizer's EOS
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


@dataclass
class Encoded:
    """One tokenized sequence: ids and the per-token trained mask (both 1-D, same length)."""
    ids: np.ndarray   # int32
    mask: np.ndarray  # bool


class ChatTokenizer:
    """Wraps a transformers tokenizer; turns normalized records into ids + trained masks."""

    def __init__(self, tokenizer, *, use_generation_tags: bool | None = None):
        if tokenizer is None:
            raise ValueError("a tokenizer is required to tokenize data")
        self.tok = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.template = template if isinstance(template, str) else None
        has_tags = bool(self.template and _GENERATION_TAG.search(self.template))
        self.use_generation_tags = has_tags if use_generation_tags is None else use_generation_tags
        if self.use_generation_tags and not has_tags:
            raise ValueError("use_generation_tags=True but the chat template has no {% generation %} block")
        ids = set()
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        for t in _END_OF_TURN:
            if t in vocab:
                ids.add(int(vocab[t]))
        self.end_of_turn_ids = frozenset(ids)
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))

    # -- primitives -------------------------------------------------------------------------------------
    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _render(self, messages, *, gen: bool = False, where: str = "") -> str:
        if self.template is None:
            raise ValueError("the tokenizer has no chat_template; use string_format='raw' or `text` rows")
        try:
            return self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - templates raise (e.g. on roles they do not support); name the row
            raise DataError(where, None, "chat template error", f"{type(e).__name__}: {e}") from None

    def _trim_span(self, ids: list[int], start: int, end: int) -> int:
        """End of the trained span [start, end): just after its last end-of-turn token, if it has one."""
        for j in range(end - 1, start - 1, -1):
            if ids[j] in self.end_of_turn_ids:
                return j + 1
        return end

    def _check_prefix(self, full: list[int], part: list[int], n: int, gen: bool, where: str) -> int:
        if full[:len(part)] != part:
            raise DataError(where, None, "chat template not prefix-stable",
                            f"rendering the first {n} message(s){' + generation prompt' if gen else ''} "
                            "does not tokenize to a prefix of the whole conversation, so assistant masks cannot be "
                            "derived; use a template with {% generation %} blocks")
        return len(part)

    # -- records ----------------------------------------------------------------------------------------
    def encode_chat(self, messages, train_from: int, where: str) -> Encoded:
        """Ids of the rendered conversation; trained = assistant turns at index >= train_from."""
        # every render this row needs: the whole conversation, then (prefix length, with generation prompt)
        prefixes: list[tuple[int, bool]] = []
        if self.use_generation_tags:
            if train_from > 0:
                prefixes.append((train_from, False))
        else:
            for i, m in enumerate(messages):
                if m["role"] == "assistant" and i >= train_from:
                    prefixes += [(i, True), (i + 1, False)]
        texts = [self._render(messages, where=where)] + [self._render(messages[:n], gen=g, where=where)
                                                         for n, g in prefixes if n > 0]
        encoded = iter(self.tok(texts, add_special_tokens=False)["input_ids"])  # one batched call
        full = list(next(encoded))
        lens = [self._check_prefix(full, list(next(encoded)), n, g, where) if n > 0 else 0 for n, g in prefixes]
        mask = np.zeros(len(full), bool)
        if self.use_generation_tags:
            out = self.tok.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
            if list(out["input_ids"]) != full:
                raise DataError(where, None, "chat template tokenization mismatch")
            mask[:] = np.asarray(out["assistant_masks"], bool)
            if lens:
                mask[:lens[0]] = False
        else:
            for start, end in zip(lens[0::2], lens[1::2]):
                mask[start:self._trim_span(full, start, end)] = True
        if not mask.any():
            raise DataError(where, None, "empty loss mask",
                            "the chat template marks no assistant tokens in this row")
        return Encoded(np.asarray(full, np.int32), mask)

    def encode_sft(self, rec, where: str) -> Encoded:
        if isinstance(rec, ChatSFT):
            return self.encode_chat(rec.messages, rec.train_from, where)
        eos = [self.eos_id] if self.eos_id is not None else []
        if isinstance(rec, TextSFT):
            ids = self._ids(rec.text, special=True) + eos
            return Encoded(np.asarray(ids, np.int32), np.ones(len(ids), bool))
        if isinstance(rec, RawSFT):
            p, c = self._ids(rec.prompt, special=True), self._ids(rec.completion) + eos
            return Encoded(np.asarray(p + c, np.int32), np.r_[np.zeros(len(p), bool), np.ones(len(c), bool)])
        raise TypeError(f"not an SFT record: {rec!r}")

    def encode_pair(self, rec, where: str) -> tuple[np.ndarray, Encoded, Encoded]:
        """-> (prompt ids, chosen completion, rejected completion); the prompt includes the template's
        generation prompt (e.g. the assistant header), the completions only what follows."""
        if isinstance(rec, RawPair):
            p = self._ids(rec.prompt, special=True)
            eos = [self.eos_id] if self.eos_id is not None else []
            outs = []
            for text in (rec.chosen, rec.rejected):
                c = self._ids(text) + eos
                outs.append(Encoded(np.asarray(c, np.int32), np.ones(len(c), bool)))
            return np.asarray(p, np.int32), outs[0], outs[1]
        if not isinstance(rec, ChatPair):
            raise TypeError(f"not a preference record: {rec!r}")
        n = len(rec.prompt)
        outs = []
        for name, part in (("chosen", rec.chosen), ("rejected", rec.rejected)):
            try:
                outs.append(self.encode_chat(rec.prompt + part, n, where))
            except DataError as e:
                raise DataError(e.where, e.field or name, e.reason, e.detail) from None
        c, r = outs
        # the prompt is everything before the first trained token; it must be identical in both
        pc, pr = int(np.argmax(c.mask)), int(np.argmax(r.mask))
        if pc != pr or not np.array_equal(c.ids[:pc], r.ids[:pr]):
            raise DataError(where, "prompt", "chat template renders the prompt differently for chosen and rejected")
        return c.ids[:pc], Encoded(c.ids[pc:], c.mask[pc:]), Encoded(r.ids[pr:], r.mask[pr:])


def truncate(ids: np.ndarray, mask: np.ndarray, max_len: int, keep: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Cut to max_len tokens keeping the 'start' or the 'end'; returns (ids, mask, truncated?)."""
    if len(ids) <= max_len:
        return ids, mask, False
    if keep == "start":
        return ids[:max_len], mask[:max_len], True
    return ids[len(ids) - max_len:], mask[len(mask) - max_len:], True
