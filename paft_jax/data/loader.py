"""Deterministic, resumable batch iterator over a TokenizedDataset, and global-array assembly.

Each epoch's plan (which examples, in which rows and batches) is a pure function of (seed, epoch,
process, data): mixture sampling and shuffling use `np.random.default_rng([seed, epoch, process])`.
The iterator's only moving part is `step`, the number of batches yielded so far; state() records it
(plus the epoch/position where the next batch starts, for people), restore() recomputes the plans.  So a resumed run yields exactly the
batches the uninterrupted run would have, and `step` is the same number on every process.
"""
from __future__ import annotations

import dataclasses
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
        self._sizes: dict[int, int] = {}    # epoch -> units in that epoch
        self._starts: dict[int, int] = {0: 0}  # epoch -> index of its first unit in the stream of epochs
        self._per_batch = self.local_batch if cfg.pack else 1  # units per batch
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

    def units(self, epoch: int) -> list[tuple[int, list[list[int]]]]:
        """The epoch's plan as units of (row_len, rows).  Packed: one unit per packed row, and batches
        take `local_batch` consecutive rows of the stream of epochs, so an epoch's last rows share a batch
        with the next epoch's first ones (no filler rows while repeating).  Padded: one unit per batch,
        each of one bucket length (an epoch's partial buckets become partial batches)."""
        if epoch not in self._plans:
            order, rng = self.epoch_order(epoch)
            if self.cfg.pack:
                rows = plan_packed(order, self.lengths, self.cfg.seq_len, max_items=self.pairs,
                                   window=self.cfg.pack_window, rng=rng if self.cfg.shuffle else None)
                p = [(self.cfg.seq_len, [r]) for r in rows]
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

    def _size(self, epoch: int) -> int:
        return self._sizes[epoch] if epoch in self._sizes else len(self.units(epoch))

    def _done(self, epoch: int) -> bool:
        return self.cfg.num_epochs is not None and epoch >= self.cfg.num_epochs

    def _locate(self, step: int) -> tuple[int, int]:
        """(epoch, unit position) where batch `step` starts.  Walks epoch sizes forward from the latest
        known epoch start at or before it (so iterating costs O(1) per batch, not O(epochs))."""
        u = step * self._per_batch
        epoch = max((e for e, start in self._starts.items() if start <= u), default=0)
        u -= self._starts.get(epoch, 0)
        while not self._done(epoch):
            n = self._size(epoch)
            if u < n:
                return epoch, u
            u -= n
            self._starts[epoch + 1] = self._starts[epoch] + n
            epoch += 1
        return epoch, 0

    def _gather(self, epoch: int, pos: int) -> tuple[int, list[list[int]]] | None:
        """The batch starting at (epoch, pos), or None when the data is exhausted."""
        if self._done(epoch):
            return None
        if not self.cfg.pack:
            return self.units(epoch)[pos]
        rows: list[list[int]] = []
        while len(rows) < self.local_batch and not self._done(epoch):
            part = self.units(epoch)[pos:pos + self.local_batch - len(rows)]
            rows.extend(r for _, rr in part for r in rr)
            epoch, pos = epoch + 1, 0
        if len(rows) < self.local_batch and self.cfg.drop_remainder:
            return None
        return self.cfg.seq_len, rows

    def batch(self, row_len: int, rows: list[list[int]]) -> dict[str, np.ndarray]:
        if self.ds.kind == "sft":
            return fill_sft(self.ds.examples, rows, self.local_batch, row_len, self.ds.pad_id)
        return fill_pairs(self.ds.examples, rows, self.local_batch, row_len, self.ds.pad_id, self.pairs)

    # -- iteration and state ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        got = self._gather(*self._locate(self.step))
        if got is None:
            raise StopIteration
        self.step += 1
        return self.batch(*got)

    def state(self) -> dict[str, Any]:
        epoch, pos = self._locate(self.step)
        return {"version": STATE_VERSION, "step": self.step, "epoch": epoch, "position": pos,
                "process_index": self.ds.process_index, "seed": self.cfg.seed, "fingerprint": self.fingerprint}

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
        # epoch/position are the saving process's view of `step`: on the same process they are an anchor
        # (no need to re-plan every earlier epoch) and a consistency check
        if state.get("process_index", 0) == self.ds.process_index:
            epoch, pos = int(state["epoch"]), int(state["position"])
            if self._done(epoch):
                if self._locate(step) != (epoch, pos):
                    raise ValueError(f"iterator state {state} is inconsistent with the data")
            else:
                if pos >= self._size(epoch):
                    raise ValueError(f"iterator state {state}: position {pos} is past epoch {epoch}'s "
                                     f"{self._size(epoch)} units")
                self._starts[epoch] = step * self._per_batch - pos
        self.step = step

    # -- statistics -------------------------------------------------------------------------------------
    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Batches this process needs to see epoch `epoch` once (packed: ceil(rows / local batch); the
        stream continues into the next epoch).  Processes can differ: see `global_steps_per_epoch`."""
        n = self._size(epoch)
        return -(-n // self._per_batch)

    def efficiency(self, epoch: int = 0) -> dict[str, Any]:
        """Real tokens / slots over one epoch's rows (packing or bucket-padding efficiency), and over
        whole batches when the epoch is run alone (counting empty rows that fill its last batch)."""
        p = self.units(epoch)
        real = sum(self.lengths[e] for _, rows in p for r in rows for e in r)
        n_rows = sum(len(rows) for _, rows in p)
        slots = sum(len(rows) * n for n, rows in p)
        if self.cfg.pack:
            batches = -(-n_rows // self.local_batch)
            batch_slots = batches * self.local_batch * self.cfg.seq_len
        else:
            batches, batch_slots = len(p), sum(self.local_batch * n for n, _ in p)
        return {"examples": sum(len(r) for _, rows in p for r in rows), "real_tokens": real, "rows": n_rows,
                "row_efficiency": real / max(slots, 1), "batches": batches,
                "batch_efficiency": real / max(batch_slots, 1)}


def make_loader(cfg: DataConfig, tokenizer, *, batch_size: int | None = None, seq_len: int | None = None,
                process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """The one call a trainer makes: sources -> tokenized examples of this process -> batch iterator.
    `batch_size` (global rows per step) and `seq_len` override the config's; process index/count default
    to jax's."""
    changes = {k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len)) if v is not None}
    if changes:
        cfg = dataclasses.replace(cfg, **changes)  # re-validated by __post_init__
    return BatchIterator(build_dataset(cfg, tokenizer, process_index=process_index,
                                       process_count=process_count), cfg)


def global_steps_per_epoch(it: BatchIterator, epoch: int = 0, mesh=None) -> int:
    """The largest `steps_per_epoch` over all processes (a collective when there are several), e.g. to
    size LR schedules: packing per process gives processes slightly different epoch lengths.  With
    `mesh`, only that mesh's processes take part (a branch's sub-mesh in a multi-host PAFT run)."""
    import jax
    n = it.steps_per_epoch(epoch)
    if mesh is not None:
        from paft_jax.mesh import mesh_max
        return int(mesh_max(n, mesh))
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int32))))


def one_pass(it: BatchIterator, max_batches: int = 0, mesh=None):
    """Batches of one unshuffled pass over `it`'s examples (same tokenization and layout).  Every process
    (of `mesh`, when given) yields the same number of batches (the largest over them, at most
    `max_batches` when > 0): one that runs out first yields empty rows, so collectives stay in step."""
    view = BatchIterator(it.ds, dataclasses.replace(it.cfg, shuffle=False, num_epochs=1, drop_remainder=False))
    n = global_steps_per_epoch(view, mesh=mesh)
    for _ in range(min(n, max_batches) if max_batches else n):
        try:
            yield next(view)
        except StopIteration:
            yield view.batch(view.cfg.seq_len, [])


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
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype == np.int64 and not jax.config.jax_enable_x64:
            # example_index: int32 on device unless x64 is on (jax would truncate silently; we check)
            if v.size and (v.max() > np.iinfo(np.int32).max):
                raise ValueError(f"{k}: values exceed int32; enable jax_enable_x64")
            v = v.astype(np.int32)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
