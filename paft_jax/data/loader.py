"""Deterministic, resumable batch iterator over a TokenizedDataset, and global-array assembly.

Each epoch's plan (which examples, in which rows and batches) is a pure function of (seed, epoch,
process, data): mixture sampling and shuffling use `np.random.default_rng([seed, epoch, process])`.
The iterator's only moving part is `step`, the number of batches yielded so far; state() records it
(plus epoch/position for people), restore() recomputes the plans.  So a resumed run yields exactly the
batches the uninterrupted run would have, and `step` is the same number on every process.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from paft_jax.data.batching import fill_pairs, fill_sft, plan_packed, plan_padded
from paft_jax.data.config import DataConfig
from paft_jax.data.dataset import TokenizedDataset, build_dataset

STATE_VERSION = 1


class BatchIterator:
    """Yields dicts of numpy arrays (this process's part of the global batch; see batching.py)."""

    def __init__(self, dataset: TokenizedDataset, cfg: DataConfig):
        if cfg.batch_size % dataset.process_count:
            raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {dataset.process_count} "
                             "processes")
        if not dataset.examples:
            raise ValueError("no usable examples on this process (all sources empty, invalid or too long)")
        self.ds, self.cfg = dataset, cfg
        self.local_batch = cfg.batch_size // dataset.process_count
        self.pairs = cfg.pairs_per_row() if dataset.kind == "preference" else None
        self.lengths = [e.length for e in dataset.examples]
        self.step = 0
        self._plans: dict[int, list] = {}   # epoch -> plan (current and next only)
        self._sizes: dict[int, int] = {}    # epoch -> batches in that epoch
        key = dict(kind=cfg.kind, seq_len=cfg.seq_len, batch_size=cfg.batch_size, pack=cfg.pack,
                   buckets=cfg.bucket_lengths(), pairs=self.pairs, window=cfg.pack_window, shuffle=cfg.shuffle,
                   seed=cfg.seed, drop=cfg.drop_remainder, rows=dataset.total_rows, procs=dataset.process_count,
                   weights=[s.weight for s in cfg.sources], sources=[s.label() for s in cfg.sources])
        self.fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    # -- planning ---------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> tuple[list[int], np.random.Generator]:
        """Local example ids used in `epoch`: each source's rows `weight` times (fractional part: a fresh
        seeded subset), shuffled."""
        rng = np.random.default_rng([self.cfg.seed, epoch, self.ds.process_index])
        order: list[int] = []
        by_source = self.ds.by_source()
        for k, ids in enumerate(by_source):
            w = self.cfg.sources[k].weight if k < len(self.cfg.sources) else 1.0
            whole, frac = int(w), w - int(w)
            order.extend(ids * whole)
            extra = int(round(frac * len(ids)))
            if extra:
                order.extend(sorted(rng.choice(ids, extra, replace=False).tolist()))
        if self.cfg.shuffle:
            order = [order[j] for j in rng.permutation(len(order))]
        return order, rng

    def plan(self, epoch: int) -> list[tuple[int, list[list[int]]]]:
        if epoch not in self._plans:
            order, rng = self.epoch_order(epoch)
            if self.cfg.pack:
                p = plan_packed(order, self.lengths, self.cfg.seq_len, self.local_batch, max_items=self.pairs,
                                window=self.cfg.pack_window, rng=rng if self.cfg.shuffle else None,
                                drop_remainder=self.cfg.drop_remainder)
            else:
                p = plan_padded(order, self.lengths, self.cfg.bucket_lengths(), self.local_batch,
                                drop_remainder=self.cfg.drop_remainder)
            if not p:
                raise ValueError(f"epoch {epoch} has no batches on process {self.ds.process_index} "
                                 f"({len(order)} examples, local batch {self.local_batch}, "
                                 f"drop_remainder={self.cfg.drop_remainder})")
            for old in [e for e in self._plans if e < epoch - 1]:
                del self._plans[old]
            self._plans[epoch] = p
            self._sizes[epoch] = len(p)
        return self._plans[epoch]

    def _locate(self, step: int) -> tuple[int, int]:
        epoch = 0
        while True:
            n = self._sizes[epoch] if epoch in self._sizes else len(self.plan(epoch))
            if step < n:
                return epoch, step
            step -= n
            epoch += 1
            if self.cfg.num_epochs is not None and epoch >= self.cfg.num_epochs:
                return epoch, 0

    def batch(self, row_len: int, rows: list[list[int]]) -> dict[str, np.ndarray]:
        if self.ds.kind == "sft":
            return fill_sft(self.ds.examples, rows, self.local_batch, row_len, self.ds.pad_id)
        return fill_pairs(self.ds.examples, rows, self.local_batch, row_len, self.ds.pad_id, self.pairs)

    # -- iteration and state ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, pos = self._locate(self.step)
        if self.cfg.num_epochs is not None and epoch >= self.cfg.num_epochs:
            raise StopIteration
        row_len, rows = self.plan(epoch)[pos]
        self.step += 1
        return self.batch(row_len, rows)

    def state(self) -> dict[str, Any]:
        epoch, pos = self._locate(self.step)
        return {"version": STATE_VERSION, "step": self.step, "epoch": epoch, "position": pos,
                "seed": self.cfg.seed, "fingerprint": self.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("data iterator state was saved with a different data configuration "
                             f"(seed {state.get('seed')} vs {self.cfg.seed}, fingerprint {state.get('fingerprint')} "
                             f"vs {self.fingerprint}); refusing to resume onto different batches")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"bad iterator state step {step}")
        self.step = step
        if self.ds.process_count == 1:  # epoch/position are this process's view; check when they must agree
            if (state.get("epoch"), state.get("position")) != self._locate(step):
                raise ValueError(f"iterator state {state} is inconsistent with the data "
                                 f"(step {step} is epoch/position {self._locate(step)} here)")

    # -- statistics -------------------------------------------------------------------------------------
    def efficiency(self, epoch: int = 0) -> dict[str, float]:
        """Real tokens / slots over one epoch: of the rows the plan fills, and of whole batches (which
        counts the empty rows padding an epoch's last batch)."""
        p = self.plan(epoch)
        real = sum(self.lengths[e] for _, rows in p for r in rows for e in r)
        rows = sum(len(rows) * n for n, rows in p)
        batches = sum(self.local_batch * n for n, _ in p)
        return {"real_tokens": real, "row_efficiency": real / max(rows, 1),
                "batch_efficiency": real / max(batches, 1), "batches": len(p),
                "rows": sum(len(r) for _, r in p)}


def make_loader(cfg: DataConfig, tokenizer, *, process_index: int | None = None,
                process_count: int | None = None) -> BatchIterator:
    """The one call a trainer makes: sources -> tokenized examples of this process -> batch iterator."""
    return BatchIterator(build_dataset(cfg, tokenizer, process_index=process_index,
                                       process_count=process_count), cfg)


def batch_sharding(mesh, spec=None):
    """NamedSharding splitting dim 0 over the mesh's ('data', 'fsdp') axes (those the mesh has)."""
    from jax.sharding import NamedSharding, PartitionSpec
    if spec is None:
        axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
        spec = PartitionSpec(axes if axes else None)
    return NamedSharding(mesh, spec)


def to_global(batch: dict[str, np.ndarray], mesh, spec=None) -> dict:
    """Process-local batch -> global jax.Arrays sharded on the batch dim (global batch = concatenation
    of every process's rows in process order).  `spec` may be a PartitionSpec or a Sharding."""
    import jax
    from jax.sharding import Sharding
    sharding = spec if isinstance(spec, Sharding) else batch_sharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
