"""Prove an export: reload it with transformers (PyTorch, CPU) and compare logits with the Flax model.

`python -m paft_jax.hf.verify MODEL_TYPE` is the process of a `hf.verifier.Verifier` (`_serve`)."""
from __future__ import annotations

import gc
import importlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paft_jax.hf.verifier import ExportMismatchError, VerifyReport, torch_available  # noqa: F401 (the API)
from paft_jax.models.config import ModelConfig, to_dtype
from paft_jax.models.decoder import Decoder


def probe_batch(vocab_size: int, batch: int = 2, length: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and a 0/1 mask whose second row is right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    if batch > 1:
        mask[1, length * 2 // 3:] = 0
    return ids, mask


def flax_logits(params: Any, cfg: ModelConfig, ids: np.ndarray, mask: np.ndarray, as_dtype: str | None = None) -> np.ndarray:
    """fp32 logits; with `as_dtype`, weights are first rounded to that dtype (what an export stores)."""
    cfg32 = cfg.replace(dtype="float32", param_dtype="float32")

    @jax.jit
    def run(p):
        if as_dtype is not None:
            p = jax.tree_util.tree_map(lambda x: x.astype(to_dtype(as_dtype)), p)
        p = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), p)
        return Decoder(cfg32).apply({"params": p}, jnp.asarray(ids), segment_ids=jnp.asarray(mask))[0]

    # exact fp32 matmuls: on GPU/TPU the default precision (TF32 / bf16 passes) moves logits by ~1e-2
    with jax.default_matmul_precision("highest"):
        return np.asarray(run(params))


def hf_logits(model_dir: str | Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM
    # eager attention: transformers' reference path (sdpa differs from it by up to ~1e-5 in fp32)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False,
                                                 local_files_only=True, attn_implementation="eager")
    model.eval()
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(pos.astype(np.int64))).logits.float().numpy()
    del model
    gc.collect()
    return out


def compare(ref: np.ndarray, got: np.ndarray, mask: np.ndarray, atol: float) -> VerifyReport:
    keep = mask.astype(bool)
    a, b = ref[keep].astype(np.float64), got[keep].astype(np.float64)
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(la) * (la - lb), axis=-1))) if a.size else 0.0
    return VerifyReport(diff, kl, int(keep.sum()), atol)


def verify_export(model_dir: str | Path, ref_logits: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                  atol: float = 1e-3) -> VerifyReport:
    """Reload `model_dir` with transformers and compare with precomputed Flax logits; raise on mismatch."""
    report = compare(ref_logits, hf_logits(model_dir, ids, mask), mask, atol)
    if not np.isfinite(report.max_abs_diff) or report.max_abs_diff > atol:
        raise ExportMismatchError(f"{model_dir}: transformers' logits differ from the Flax model: {report}")
    return report


def verify_dir(model_dir: str | Path, atol: float = 1e-3) -> VerifyReport:
    """Load `model_dir` with paft_jax, then (its params dropped) with transformers: their logits must agree."""
    from paft_jax.hf.load import load_model
    lm = load_model(model_dir, with_tokenizer=False)
    ids, mask = probe_batch(lm.cfg.vocab_size)
    ref = flax_logits(lm.params, lm.cfg, ids, mask)
    del lm
    gc.collect()
    return verify_export(model_dir, ref, ids, mask, atol=atol)


def _serve(model_type: str) -> None:
    """The process of a `hf.verifier.Verifier`: import everything, then verify the one directory named on stdin
    and print its report as one JSON line."""
    import torch  # noqa: F401
    import transformers
    if model_type:  # the config and modeling modules from_pretrained would import later
        try:
            from transformers.models.auto.configuration_auto import model_type_to_module_name
            module = model_type_to_module_name(model_type)
            importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        except ImportError:
            pass
    transformers.logging.set_verbosity_error()
    line = sys.stdin.readline()
    if not line:  # nothing to verify (the merge failed or was stopped)
        return
    req = json.loads(line)
    try:
        res = asdict(verify_dir(req["dir"], req["atol"]))
    except ExportMismatchError as e:
        res = {"mismatch": str(e)}
    print(json.dumps(res), flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip the teardown of torch and XLA (~1 s): nothing is left to write


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "")
