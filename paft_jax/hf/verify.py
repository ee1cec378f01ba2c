"""Prove an export: reload it with transformers (PyTorch, CPU) and compare logits with the Flax model."""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paft_jax.models.config import ModelConfig, to_dtype
from paft_jax.models.decoder import Decoder


class ExportMismatchError(RuntimeError):
    pass


@dataclass
class VerifyReport:
    max_abs_diff: float
    mean_kl: float
    tokens: int
    atol: float

    def __str__(self):
        return (f"verify: max |logits diff| = {self.max_abs_diff:.3g} (atol {self.atol:g}), "
                f"mean KL(flax || transformers) = {self.mean_kl:.3g} over {self.tokens} tokens")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


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
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False,
                                                 local_files_only=True)
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


class Verifier:
    """A verification in a process of its own, started before the output is written: its imports (torch,
    transformers, the Flax model; ~4 s of a ~7 s verification on 2 cores) overlap the work that writes it.
    `check(dir)` then loads the directory with paft_jax and with transformers, compares their logits (as
    `verify_export` does) and returns the report, or raises ExportMismatchError."""

    def __init__(self, atol: float = 1e-3, model_type: str | None = None):
        self.atol = atol
        self.proc = subprocess.Popen([sys.executable, "-m", "paft_jax.hf.verify", model_type or ""],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def check(self, model_dir: str | Path) -> VerifyReport:
        out, err = self.proc.communicate(json.dumps({"dir": str(model_dir), "atol": self.atol}) + "\n")
        line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
        if self.proc.returncode != 0 or line is None:
            raise RuntimeError(f"verification of {model_dir} failed (rc {self.proc.returncode}):\n{err[-3000:]}")
        res = json.loads(line)
        if "mismatch" in res:
            raise ExportMismatchError(res["mismatch"])
        return VerifyReport(**res)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _serve(model_type: str) -> None:
    """Verifier's process: import everything, then verify the one directory named on stdin."""
    import torch  # noqa: F401
    import transformers
    import paft_jax.hf.load  # noqa: F401
    if model_type:  # the config and modeling modules from_pretrained would import later
        try:
            importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            pass
    transformers.logging.set_verbosity_error()
    req = json.loads(sys.stdin.readline())
    try:
        report = verify_dir(req["dir"], req["atol"])
    except ExportMismatchError as e:
        print(json.dumps({"mismatch": str(e)}))
        return
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "")
