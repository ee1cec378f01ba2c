"""Reference log-probs of the frozen base, computed once per data set and cached on disk.

DPO's reference is the base (delta = 0), so its log-probs of every chosen and rejected completion are
fixed for a run: computing them once saves one forward pass per step.  The cache file is keyed by a
content hash of the tokenized examples (token ids and masks, hence data, tokenizer and truncation),
the model config and compute dtype, and a fingerprint of the base weights (per-tensor sums and a
strided sample, computed on the devices), so a different base, data set or sequence length can never
pick up stale values, and reruns and resumes reuse them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paft_jax.data import one_pass
from paft_jax.models import loops
from paft_jax.train.programs import branch_model, reference_program
from paft_jax.train.turns import one_at_a_time

log = logging.getLogger("paft_jax")


class RefTable:
    def __init__(self, total_rows: int, index: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, path: Path):
        self.path = path
        self.chosen = np.full(total_rows, np.nan, np.float32)
        self.rejected = np.full(total_rows, np.nan, np.float32)
        self.chosen[index], self.rejected[index] = chosen, rejected

    def lookup(self, example_index: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(example_index)
        safe = np.where(idx >= 0, idx, 0)
        c = np.where(idx >= 0, self.chosen[safe], 0.0).astype(np.float32)
        r = np.where(idx >= 0, self.rejected[safe], 0.0).astype(np.float32)
        if np.isnan(c).any() or np.isnan(r).any():
            missing = sorted(set(idx[np.isnan(c) | np.isnan(r)].tolist()))[:5]
            raise ValueError(f"reference cache {self.path} has no log-probs for rows {missing}")
        return {"ref_chosen": c, "ref_rejected": r}


def weights_fingerprint(params: Any) -> str:
    def stats(x):
        flat = x.reshape(-1).astype(jnp.float32)
        stride = max(flat.size // 4096, 1)
        return jnp.stack([flat.sum(), jnp.abs(flat).sum(), (flat * flat).sum(), flat[::stride].sum(),
                          (flat[::stride] * jnp.arange(flat[::stride].size)).sum()])
    leaves = jax.tree_util.tree_leaves(jax.jit(lambda p: jax.tree_util.tree_map(stats, p))(params))
    h = hashlib.sha256()
    for leaf in leaves:
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def data_fingerprint(ds) -> str:
    h = hashlib.sha256(f"{ds.kind}|{ds.total_rows}|{ds.process_index}/{ds.process_count}".encode())
    for e in ds.examples:
        h.update(np.int64(e.index).tobytes())
        for ids, mask in e.seqs:
            h.update(np.asarray(ids, np.int32).tobytes())
            h.update(np.packbits(np.asarray(mask, bool)).tobytes())
    return h.hexdigest()


def reference_table(branch, it, split: str) -> RefTable:
    """Load or compute (and atomically save) the base's chosen/rejected log-probs for `it`'s data set."""
    base, cfg = branch.base, branch.cfg
    chunk = loops.logits_chunk(cfg.objective.logits_chunk, branch.mesh)
    key = hashlib.sha256(json.dumps({
        "data": data_fingerprint(it.ds), "model": asdict(base.cfg), "weights": weights_fingerprint(base.params),
        "chunk": chunk}, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(cfg.cache_dir) / "ref_logps" / f"{key}-p{it.ds.process_index}.npz"
    if path.exists():
        with np.load(path) as z:
            table = RefTable(it.ds.total_rows, z["index"], z["chosen"], z["rejected"], path)
        log.info("reference log-probs for %s: reusing %s", split, path)
        return table

    ref = one_at_a_time(reference_program(branch_model(cfg, base.cfg), cfg.objective.logits_chunk, branch.mesh,
                                          branch.rules, branch.base_sh, branch.data_sharding,
                                          cfg.forward_micro_rows()))
    idx, ch, rj = [], [], []
    from tqdm.auto import tqdm
    from paft_jax.mesh import is_mesh_primary
    for batch in tqdm(one_pass(it, mesh=branch.mesh), desc=f"reference log-probs ({split})",
                      disable=not is_mesh_primary(branch.mesh)):
        c, r, i = jax.device_get(ref(base.params, branch.device_batch(batch, "none")))
        keep = np.asarray(i) >= 0
        idx.append(np.asarray(i)[keep]), ch.append(np.asarray(c)[keep]), rj.append(np.asarray(r)[keep])
    index, chosen, rejected = (np.concatenate(a) for a in (idx, ch, rj))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, index=index, chosen=chosen, rejected=rejected)
    os.replace(tmp, path)
    log.info("reference log-probs for %s: %d pairs computed, saved to %s", split, len(index), path)
    return RefTable(it.ds.total_rows, index, chosen, rejected, path)
