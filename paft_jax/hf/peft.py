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
import re
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


def read_adapter_config(adapter: Path) -> dict:
    """adapter_config.json, refused (with every reason) where it asks for what paft_jax does not model."""
    path = adapter / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable adapter config ({e})") from None
    refuse = []
    if cfg.get("peft_type") != "LORA":
        refuse.append(f"peft_type={cfg.get('peft_type')!r} (only LORA)")
    if cfg.get("fan_in_fan_out"):
        refuse.append("fan_in_fan_out=true (Conv1D-style weights; none of the families has them)")
    if cfg.get("bias", "none") != "none":
        refuse.append(f"bias={cfg.get('bias')!r} (trained biases are not modelled)")
    if cfg.get("modules_to_save"):
        refuse.append(f"modules_to_save={cfg.get('modules_to_save')} (whole replaced modules are not modelled)")
    if cfg.get("use_dora"):
        refuse.append("use_dora=true (DoRA's magnitude vectors are not modelled)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        refuse.append("rank_pattern / alpha_pattern (per-module ranks are not modelled)")
    if refuse:
        raise ValueError(f"{path}: {'; '.join(refuse)}")
    return cfg


def check_adapter_base(adapter_dir: Path, acfg: dict, base_path: str) -> None:
    """An adapter's `base_model_name_or_path` names `base_path` (the same path, or the same last component,
    e.g. Qwen/Qwen3-8B for /models/Qwen3-8B); refused otherwise, naming both."""
    named = str(acfg.get("base_model_name_or_path") or "")
    if not named:
        return
    if named.rstrip("/") == str(base_path).rstrip("/") or Path(named).name == Path(str(base_path).rstrip("/")).name:
        return
    raise ValueError(f"{adapter_dir}: an adapter for {named!r}, but the base here is {base_path!r} (give the base it "
                     "was trained on)")


_FACTOR_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def adapter_lora(adapter_dir: str | Path) -> tuple[int, float, list[str]]:
    """(rank, alpha, target modules) of a PEFT LoRA adapter as a LoRA branch would hold it: alpha / rank is the
    adapter's scaling (rsLoRA's included).  Reads the config and the tensor names only; anything a LoRA branch
    cannot hold (other modules, biases, DoRA, per-module ranks) is refused naming it."""
    from safetensors import safe_open
    adapter_dir = Path(adapter_dir)
    acfg = read_adapter_config(adapter_dir)
    rank, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scaling = alpha / (rank ** 0.5 if acfg.get("use_rslora") else rank)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: missing (an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    targets = set()
    with safe_open(str(weights), framework="numpy") as f:
        for k in f.keys():
            m = _FACTOR_KEY.match(k)
            if m is None or PARENTS.get(m[3]) != m[2]:
                raise ValueError(f"{weights}: tensor {k!r} is not a LoRA factor of a layer's q/k/v/o or gate/up/down "
                                 "projection, which is what a LoRA branch holds")
            targets.add(m[3])
    if not targets:
        raise ValueError(f"{weights}: no LoRA factors")
    return rank, scaling * rank, sorted(targets)


def factors_from_adapter(adapter_dir: str | Path, cfg: ModelConfig) -> dict:
    """A PEFT LoRA adapter's factors in the layout a LoRA branch trains ({"layers": {parent: {module:
    {"lora_a": [L, *in, r], "lora_b": [L, r, *out]}}}}, unscaled): the inverse of `adapter_tensors`.  Layers the
    adapter leaves out get zero factors; a factor that does not fit the base is refused naming it."""
    from safetensors import safe_open

    from paft_jax.train.delta import DeltaConfig, delta_abstract
    rank, _, targets = adapter_lora(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    shapes, _ = delta_abstract(cfg, DeltaConfig(kind="lora", lora_rank=rank, lora_targets=targets))
    factors: dict = {}
    with safe_open(str(weights), framework="numpy") as f:
        for k in f.keys():
            i, parent, module, ab = _FACTOR_KEY.match(k).groups()
            i = int(i)
            node = factors.setdefault("layers", {}).setdefault(parent, {}).setdefault(module, {})
            which = "lora_a" if ab == "A" else "lora_b"
            full = shapes["layers"][parent][module][which].shape
            if which not in node:
                node[which] = np.zeros(full, np.float32)
            if i >= cfg.num_layers:
                raise ValueError(f"{weights}: {k}: the base has {cfg.num_layers} layers")
            w = f.get_tensor(k)
            want = (rank, int(np.prod(full[1:-1]))) if ab == "A" else (int(np.prod(full[2:])), rank)
            if tuple(w.shape) != want:
                raise ValueError(f"{weights}: {k} is {tuple(w.shape)}; the base's {module} at rank {rank} needs "
                                 f"{want} (an adapter for another base: hidden size or head count differ)")
            node[which][i] = w.astype(np.float32).T.reshape(full[1:])
    for parent, modules in factors["layers"].items():
        for module, node in modules.items():
            for which in ("lora_a", "lora_b"):
                if which not in node:
                    raise ValueError(f"{weights}: {module} has no lora_{'A' if which == 'lora_a' else 'B'} factors")
    return factors


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
