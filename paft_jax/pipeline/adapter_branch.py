"""A PAFT branch whose result is a PEFT LoRA adapter trained elsewhere (`sft.from_adapter: DIR`).

The adapter is imported as that branch's finished result: a LoRA branch checkpoint (step 0, nothing trained
here) holding the adapter's factors, its config.json and a done.json naming the adapter and its sha256.  The
merge (streamed or on the mesh), the leaderboard, the sparsity report, sequential mode's stacked base and
`export --checkpoint` then read it exactly as they read a LoRA branch trained here.  An adapter whose file
changes is imported again (and the merge redone, its sha256 being part of the merge key).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
import time
from pathlib import Path

from paft_jax.hf.peft import ADAPTER_WEIGHTS
from paft_jax.models.config import ModelConfig
from paft_jax.rundir import RunDir
from paft_jax.train.config import TrainConfig


def adapter_digest(adapter: str) -> str:
    """sha256 of the adapter's weights file: what identifies the imported branch.  Hashed once per version of
    the file (its size and mtime) in a process, although a run asks for it at each stage (merge key, import)."""
    st = (Path(adapter) / ADAPTER_WEIGHTS).stat()
    return _digest(str(Path(adapter) / ADAPTER_WEIGHTS), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def imported(rd: RunDir, name: str, adapter: str, digest: str) -> dict | None:
    """The branch's done.json when it holds this adapter (same path and weights), else None."""
    done = rd.read_json(f"{name}/done.json")
    if done and done.get("from_adapter") == str(adapter) and done.get("adapter_sha256") == digest:
        return done
    return None


def import_adapter(rd: RunDir, name: str, tc: TrainConfig, mcfg: ModelConfig, adapter: str, digest: str) -> dict:
    """Write the adapter as branch `name`'s finished checkpoint (replacing what an earlier import left) and
    return its done.json record.  `tc.delta` already carries the adapter's rank, alpha and targets
    (pipeline/config.py); the factors are checked against `mcfg`'s shapes here."""
    import jax
    import jax.numpy as jnp

    from paft_jax import storage
    from paft_jax.checkpoint import BranchCheckpointer
    from paft_jax.config import to_dict
    from paft_jax.hf.peft import factors_from_adapter
    from paft_jax.train.delta import freeze_mask
    from paft_jax.train.optim import make_optimizer
    from paft_jax.train.step_fn import TrainState
    t0 = time.time()
    try:
        factors = factors_from_adapter(adapter, mcfg)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{name}.from_adapter: {e}") from None
    ckpts = rd.join(name, "checkpoints")
    rd.remove(f"{name}/done.json")
    if rd.remote:
        storage.remove(ckpts)
    else:
        shutil.rmtree(ckpts, ignore_errors=True)
    delta = jax.device_put(factors, jax.local_devices()[0])
    opt = make_optimizer(tc.optim, tc.steps, freeze_mask(delta, tc.delta))
    state = TrainState(step=jnp.zeros((), jnp.int32), delta=delta, opt_state=opt.init(delta))
    meta = {"config": to_dict(tc), "base": tc.model, "model_config": dataclasses.asdict(mcfg), "step": 0,
            "from_adapter": str(adapter)}
    ckpt = BranchCheckpointer(dataclasses.replace(tc.checkpoint, async_save=False), ckpts,
                              processes=[jax.process_index()])
    try:
        ckpt.save(0, state, {}, meta, wait=True)
    finally:
        ckpt.close()
    rd.write_json(f"{name}/config.json", to_dict(tc))
    record = {"branch": name, "from_adapter": str(adapter), "adapter_sha256": digest, "steps": 0,
              "objective": tc.objective.kind, "r": tc.delta.lora_rank, "lora_alpha": tc.delta.lora_alpha,
              "target_modules": list(tc.delta.lora_targets), "devices": [], "processes": [],
              "start": None, "end": None, "wall_s": None, "import_s": round(time.time() - t0, 2)}
    rd.write_json(f"{name}/done.json", record)
    return record
