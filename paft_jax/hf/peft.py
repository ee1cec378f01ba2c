"""A LoRA branch as a PEFT adapter: `adapter_config.json` + `adapter_model.safetensors`, the format peft
loads onto its base (`PeftModel.from_pretrained`) and vLLM serves (`--enable-lora`).

Our factors are stored unscaled, per layer stacked along a leading axis, with a Linear's input and output
axes split out (q_proj: A [L, embed, r], B [L, r, heads, head_dim]); PEFT keeps per layer and module
`lora_A.weight` [r, in] and `lora_B.weight` [out, r] and scales by `lora_alpha / r`, as we do.  So the
adapter is a transpose and reshape of the factors (bit-exact) with our rank and alpha.

A dense branch has no factors: `lora_from_dense` extracts them by truncated SVD of each targeted kernel's
delta (what mergekit's LoRA extraction does), and says how much of the delta the adapter leaves out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from paft_jax.models.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# our module -> its parent in the block (transformers' names, the same for every family)
PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def adapter_tensors(factors: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's state dict (fp32) of LoRA factors {"layers": {parent: {module: {"lora_a", "lora_b"}}}}."""
    out: dict[str, np.ndarray] = {}
    layers = factors.get("layers", {}) if isinstance(factors, dict) else {}
    for parent in ("self_attn", "mlp"):
        for module, ab in sorted((layers.get(parent) or {}).items()):
            a, b = (np.asarray(ab[k], np.float32) for k in ("lora_a", "lora_b"))
            r = a.shape[-1]
            for i in range(cfg.num_layers):
                stem = f"base_model.model.model.layers.{i}.{parent}.{module}"
                out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
                out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def lora_from_dense(reader: Any, rank: int, progress: bool = True) -> tuple[dict, dict]:
    """LoRA factors of rank `rank` (alpha = rank: scale 1) for every kernel LoRA can target, from a dense
    branch's delta read leaf by leaf (`reader`: a DeltaReader), and the report of what they leave out:
    - `relative_error[module]`: ||delta - A B||_F / ||delta||_F over the module's layers;
    - `dropped[path]`: each delta leaf an adapter cannot hold (embeddings, norms, biases, the LM head), as its
      share of the whole delta's squared Frobenius norm."""
    import jax
    from tqdm.auto import tqdm

    from paft_jax.train.delta import LORA_MODULES, low_rank, path_str
    flat = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(reader.shapes)[0]}
    factors: dict = {}
    errors: dict[str, list[float]] = {}
    sq: dict[str, float] = {}
    for path in tqdm(sorted(flat), desc=f"rank-{rank} SVD", unit="tensor", disable=not progress):
        leaf = reader.leaf(tuple(path.split("/")))
        module = path.split("/")[-2] if path.endswith("/kernel") else None
        if path.startswith("layers/") and module in LORA_MODULES:
            lr = low_rank(leaf, LORA_MODULES[module], rank)
            parent = path.split("/")[1]
            factors.setdefault("layers", {}).setdefault(parent, {})[module] = {"lora_a": lr.lora_a, "lora_b": lr.lora_b}
            errors[module] = [float(lr.residual_sq.sum()), float(lr.total_sq.sum())]
            sq[path] = float(lr.total_sq.sum())
        else:
            x = np.asarray(jax.device_get(leaf), np.float64)
            sq[path] = float((x * x).sum())
        del leaf
    total = sum(sq.values()) or 1.0
    kept = {f"layers/{PARENTS[m]}/{m}/kernel" for m in errors}
    report = {
        "rank": rank,
        "relative_error": {m: float(np.sqrt(r / t)) if t > 0 else 0.0 for m, (r, t) in sorted(errors.items())},
        "dropped": {p: v / total for p, v in sorted(sq.items()) if p not in kept and v > 0},
    }
    return factors, report


def adapter_config(rank: int, alpha: float, targets: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(targets), "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_adapter(directory: Path, factors: Any, cfg: ModelConfig, rank: int, alpha: float, base_model: str,
                  how: str) -> list[str]:
    """Write the adapter files into `directory` (the caller publishes it); returns the target modules."""
    from safetensors.numpy import save_file
    tensors = adapter_tensors(factors, cfg)
    targets = sorted({name.split(".")[-3] for name in tensors})
    if not targets:
        raise ValueError("the LoRA delta has no factors to export")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(rank, alpha, targets, base_model), indent=2) + "\n")
    (directory / "README.md").write_text(
        f"---\nlibrary_name: peft\nbase_model: {base_model}\n---\n\n# LoRA adapter exported by paft_jax\n\n"
        f"- {how}\n- rank {rank}, alpha {alpha:g}, modules {', '.join(targets)}, {cfg.num_layers} layers\n"
        "- Load: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_DIR)`; "
        "serve: `vllm serve BASE --enable-lora --lora-modules NAME=THIS_DIR`\n")
    return targets


def adapter_logits(base_dir: str | Path, adapter_dir: str | Path, ids: np.ndarray, mask: np.ndarray,
                   merge: bool = False) -> np.ndarray:
    """fp32 logits of peft's model (the base from `base_dir` with the adapter; `merge`: after
    merge_and_unload()), with transformers' eager attention, the reference path."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True,
                                                trust_remote_code=False, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(pos.astype(np.int64))).logits.float().numpy()
    del model, base
    gc.collect()
    return out
