"""Sources -> validated, tokenized, truncated examples of this process, with per-source statistics.

Rows are numbered globally over the concatenated sources (in config order); process p of n owns the
rows with `index % n == p`, and only those are parsed and tokenized.  `Example.index` is that global
row number: stable across epochs, processes and skipped rows, so it can key cached reference log-probs.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from paft_jax.data.config import DataConfig
from paft_jax.data.records import DataError, normalize_preference, normalize_sft
from paft_jax.data.sources import Source, open_source
from paft_jax.data.tokenize import ChatTokenizer, truncate

log = logging.getLogger(__name__)


@dataclass
class Example:
    index: int                 # global row number (0-based, over all sources in config order)
    source: int                # which source (position in DataConfig.sources)
    seqs: tuple                # ((ids int32, trained mask bool), ...): 1 for SFT, 2 for a pair

    @property
    def length(self) -> int:
        return sum(len(s[0]) for s in self.seqs)


@dataclass
class SourceStats:
    label: str
    rows: int = 0              # rows of this source read by this process
    valid: int = 0             # became examples
    tokens: int = 0            # real tokens of the examples (pairs: chosen + rejected sequences)
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    invalid: Counter = field(default_factory=Counter)  # reason -> count
    invalid_examples: list = field(default_factory=list)  # first few messages

    def as_dict(self) -> dict:
        return {"label": self.label, "rows": self.rows, "valid": self.valid, "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "truncated": self.truncated,
                "dropped_too_long": self.dropped_too_long, "invalid": dict(self.invalid),
                "invalid_examples": list(self.invalid_examples)}


@dataclass
class TokenizedDataset:
    kind: str
    examples: list[Example]
    stats: list[SourceStats]
    total_rows: int            # rows over all processes (the global numbering's size)
    pad_id: int
    process_index: int = 0
    process_count: int = 1

    def by_source(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.stats]
        for k, e in enumerate(self.examples):
            out[e.source].append(k)
        return out


def encode_row(row, where: str, cfg: DataConfig, chat: ChatTokenizer, st: SourceStats):
    """Validate + tokenize + truncate one row; returns the sequences or None (dropped as too long).
    Raises DataError for invalid rows."""
    limit = cfg.sequence_limit()
    if cfg.kind == "sft":
        enc = chat.encode_sft(normalize_sft(row, where, string_format=cfg.string_format), where)
        ids, mask = enc.ids, enc.mask
        if len(ids) > limit:
            if cfg.too_long == "drop":
                st.dropped_too_long += 1
                return None
            ids, mask, _ = truncate(ids, mask, limit, cfg.truncation_keep)
            st.truncated += 1
            if not mask[1:].any():
                raise DataError(where, None, "empty loss mask after truncation",
                                f"{len(enc.ids)} tokens cut to {limit} (truncation_keep={cfg.truncation_keep})")
        if not mask[1:].any():  # token 0 is never a target
            raise DataError(where, None, "empty loss mask")
        return ((ids, mask),)
    prompt, c, r = chat.encode_pair(normalize_preference(row, where, string_format=cfg.string_format), where)
    cut = False
    if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
        prompt = prompt[len(prompt) - cfg.max_prompt_length:]  # keep the latest turns
        cut = True
    room = limit - len(prompt)
    if len(c.ids) > room or len(r.ids) > room:
        if cfg.too_long == "drop":
            st.dropped_too_long += 1
            return None
        if room < 1:
            raise DataError(where, "prompt", "prompt too long",
                            f"{len(prompt)} prompt tokens leave no room under max_length={limit}; "
                            "set max_prompt_length")
        cut = True
    seqs = []
    for name, part in (("chosen", c), ("rejected", r)):
        ids, mask, _ = truncate(part.ids, part.mask, room, cfg.truncation_keep)
        if not mask.any():
            raise DataError(where, name, "empty loss mask after truncation")
        seqs.append((np.concatenate([prompt, ids]).astype(np.int32),
                     np.concatenate([np.zeros(len(prompt), bool), mask])))
    if len(prompt) == 0:
        raise DataError(where, "prompt", "empty", "the prompt renders to no tokens")
    st.truncated += int(cut)
    return tuple(seqs)


def build_dataset(cfg: DataConfig, tokenizer, *, process_index: int | None = None,
                  process_count: int | None = None, sources: list[Source] | None = None,
                  max_invalid_examples: int = 5) -> TokenizedDataset:
    """Open the configured sources (or use `sources`), then validate and tokenize this process's rows.

    With skip_invalid, the messages of the first `max_invalid_examples` invalid rows of each source are kept
    (data-stats keeps every one)."""
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if sources is None:
        if not cfg.sources:
            raise ValueError("data.sources is empty: configure at least one source")
        sources = [open_source(s) for s in cfg.sources]
    chat = tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)
    examples, stats, offset = [], [], 0
    for k, src in enumerate(sources):
        st = SourceStats(src.label)
        n = len(src)
        first = (process_index - offset) % process_count  # first local row owned by this process
        for i in range(first, n, process_count):
            st.rows += 1
            where = src.label
            try:
                where, row = src.get(i)
                seqs = encode_row(row, where, cfg, chat, st)
            except DataError as e:
                if not cfg.skip_invalid:
                    raise
                st.invalid[e.reason] += 1
                if len(st.invalid_examples) < max_invalid_examples:
                    st.invalid_examples.append(str(e))
                continue
            if seqs is None:
                continue
            st.valid += 1
            st.tokens += sum(len(s[0]) for s in seqs)
            st.trained_tokens += sum(int(s[1][1:].sum()) for s in seqs)
            examples.append(Example(offset + i, k, seqs))
        if st.invalid:
            log.warning("%s: skipped %d invalid rows: %s", src.label, sum(st.invalid.values()), dict(st.invalid))
        stats.append(st)
        offset += n
    return TokenizedDataset(cfg.kind, examples, stats, offset, chat.pad_id, process_index, process_count)
