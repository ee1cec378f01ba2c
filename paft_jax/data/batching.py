"""Batch planning (which examples share a row and a batch) and batch filling.  Pure functions.

An *example* is a tuple of sequences placed as consecutive segments of one row: one sequence for SFT,
two (prompt+chosen, prompt+rejected) for a preference pair, so a pair is never split across rows.

Batch layout (numpy, fixed shape [B, T] per bucket):
  input_ids  int32  token ids, pad id on padding
  segment_ids int32 0 = padding, 1..S = the sequences of the row in order
  positions  int32  0-based position inside the segment, 0 on padding
  targets    int32  targets[b,t] = input_ids[b,t+1] when t+1 is in the same segment, else 0
  loss_mask  float32 1.0 where targets[b,t] is a trained token (and t+1 is in the same segment)
Preference batches add, for P pair slots per row (pair k = segments 2k+1 chosen, 2k+2 rejected):
  pair_valid float32 [B,P]   1.0 for a filled slot
  example_index int64 [B,P]  dataset row index of the pair, -1 for an empty slot
"""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np


def best_fit(lengths: Sequence[int], capacity: int, max_items: int | None = None) -> list[list[int]]:
    """Best-fit decreasing bin packing: items (by position in `lengths`) into bins of `capacity`, each
    bin holding at most `max_items`.  Deterministic (ties broken by position)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id) of bins that can take more
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} of length {n} does not fit capacity {capacity}")
        k = bisect.bisect_left(open_bins, (n, -1))
        if k < len(open_bins):
            rem, b = open_bins.pop(k)
        else:
            rem, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        rem -= n
        if rem > 0 and (max_items is None or len(bins[b]) < max_items):
            bisect.insort(open_bins, (rem, b))
    return bins


def plan_packed(order: Sequence[int], lengths: Sequence[int], row_len: int, *, max_items: int | None,
                window: int, rng: np.random.Generator | None) -> list[list[int]]:
    """Examples (ids in `order`) -> rows, each a list of example ids whose lengths sum to <= row_len.
    Best fit runs over windows of `window` examples (0 = all); rows are shuffled when `rng` is given
    so that batches do not come sorted by length."""
    order = list(order)
    window = window or max(1, len(order))
    rows: list[list[int]] = []
    for s in range(0, len(order), window):
        chunk = order[s:s + window]
        bins = best_fit([lengths[e] for e in chunk], row_len, max_items)
        win_rows = [[chunk[j] for j in sorted(b)] for b in bins]  # keep the shuffled order inside a row
        if rng is not None:
            win_rows = [win_rows[j] for j in rng.permutation(len(win_rows))]
        rows.extend(win_rows)
    return rows


def plan_padded(order: Sequence[int], lengths: Sequence[int], buckets: Sequence[int], batch_rows: int, *,
                drop_remainder: bool) -> list[tuple[int, list[list[int]]]]:
    """One example per row, padded to the smallest bucket that holds it; a batch is emitted when a
    bucket has `batch_rows` examples (in `order`), partial buckets at the end of the epoch."""
    buckets = sorted(buckets)
    queues: dict[int, list[int]] = {b: [] for b in buckets}
    out = []
    for e in order:
        k = bisect.bisect_left(buckets, lengths[e])
        if k == len(buckets):
            raise ValueError(f"example {e} of length {lengths[e]} exceeds the largest bucket {buckets[-1]}")
        q = queues[buckets[k]]
        q.append(e)
        if len(q) == batch_rows:
            out.append((buckets[k], [[x] for x in q]))
            queues[buckets[k]] = []
    for b in buckets:
        if queues[b] and not drop_remainder:
            out.append((b, [[x] for x in queues[b]]))
    return out


def batch_shapes(batch_rows: int, row_len: int, pairs_per_row: int | None = None,
                 reference: bool = False) -> dict[str, tuple[tuple[int, ...], type]]:
    """{name: (shape, dtype)} of a batch as the device sees it (what `fill_sft` / `fill_pairs` make, after
    `to_global`): the five [B, T] arrays, plus for preference batches the pair slots [B, P] (and the cached
    reference log-probs when `reference`).  For compiling a step from shapes alone."""
    bt = (batch_rows, row_len)
    out = {"input_ids": (bt, np.int32), "segment_ids": (bt, np.int32), "positions": (bt, np.int32),
           "targets": (bt, np.int32), "loss_mask": (bt, np.float32)}
    if pairs_per_row is not None:
        bp = (batch_rows, pairs_per_row)
        out.update(pair_valid=(bp, np.float32), example_index=(bp, np.int32))  # int64 on the host, int32 on device
        if reference:
            out.update(ref_chosen=(bp, np.float32), ref_rejected=(bp, np.float32))
    return out


def fill(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], batch_rows: int, row_len: int,
         pad_id: int) -> dict[str, np.ndarray]:
    """Rows of sequences (ids, trained mask) -> the five [B, T] arrays; missing rows are all padding."""
    ids = np.full((batch_rows, row_len), pad_id, np.int32)
    seg = np.zeros((batch_rows, row_len), np.int32)
    pos = np.zeros((batch_rows, row_len), np.int32)
    tgt = np.zeros((batch_rows, row_len), np.int32)
    lm = np.zeros((batch_rows, row_len), np.float32)
    for b, row in enumerate(rows):
        t = 0
        for s, (x, m) in enumerate(row, start=1):
            n = len(x)
            if t + n > row_len:
                raise ValueError(f"row {b}: sequences of {t + n} tokens exceed the row length {row_len}")
            ids[b, t:t + n] = x
            seg[b, t:t + n] = s
            pos[b, t:t + n] = np.arange(n)
            # the token at t+j is predicted at t+j-1, inside the segment only
            tgt[b, t:t + n - 1] = x[1:]
            lm[b, t:t + n - 1] = m[1:]
            t += n
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "targets": tgt, "loss_mask": lm}


def fill_sft(examples, rows: Sequence[Sequence[int]], batch_rows: int, row_len: int, pad_id: int):
    return fill([[examples[e].seqs[0] for e in r] for r in rows], batch_rows, row_len, pad_id)


def fill_pairs(examples, rows: Sequence[Sequence[int]], batch_rows: int, row_len: int, pad_id: int,
               pairs_per_row: int):
    seqs, valid, index = [], np.zeros((batch_rows, pairs_per_row), np.float32), \
        np.full((batch_rows, pairs_per_row), -1, np.int64)
    for b, r in enumerate(rows):
        if len(r) > pairs_per_row:
            raise ValueError(f"row {b} holds {len(r)} pairs, more than pairs_per_row={pairs_per_row}")
        seqs.append([s for e in r for s in examples[e].seqs])
        for k, e in enumerate(r):
            valid[b, k], index[b, k] = 1.0, examples[e].index
    out = fill(seqs, batch_rows, row_len, pad_id)
    out["pair_valid"], out["example_index"] = valid, index
    return out
