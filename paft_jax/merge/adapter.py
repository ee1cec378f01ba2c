"""A PEFT LoRA adapter as a merge input: `BASE+ADAPTER` (mergekit's syntax) is the delta the adapter adds
to BASE, under BASE's tensor names.

The adapter stays factored: a tensor's delta `scaling * B @ A` is formed when the merge reads that tensor
(one [out, in] product at a time, never the whole model), and tensors the adapter does not touch read as
zeros.  What the format can say but paft_jax does not model is refused with the reason.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from paft_jax.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_base, read_adapter_config

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def split_spec(spec: str | Path) -> tuple[str, str] | None:
    """("BASE", "ADAPTER") for a "BASE+ADAPTER" input whose right side is an adapter directory, else None."""
    s = str(spec)
    if "+" not in s:
        return None
    base, adapter = s.rsplit("+", 1)
    if base and (Path(adapter) / ADAPTER_CONFIG).exists():
        return base, adapter
    return None


class AdapterSource:
    """BASE+ADAPTER as a delta source (`is_delta`): BASE's names, shapes and config; each tensor's delta."""

    is_delta = True

    def __init__(self, base, adapter: str | Path):
        from safetensors import safe_open
        self.base, self.dir = base, Path(adapter)
        self.label = f"{base.label}+{adapter}"
        self.adapter_config = cfg = read_adapter_config(self.dir)
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        self.scaling = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        self.config = base.config
        weights = self.dir / ADAPTER_WEIGHTS
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: missing (an adapter directory holds {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS})")
        factors: dict[str, dict[str, np.ndarray]] = {}
        with safe_open(str(weights), framework="numpy") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise ValueError(f"{weights}: tensor {key!r} is not a LoRA factor (base_model.model.<module>."
                                     "lora_A/lora_B.weight)")
                factors.setdefault(m["module"] + ".weight", {})[m["ab"]] = f.get_tensor(key)
        names = set(base.names())
        foreign = sorted(n for n in factors if n not in names)
        if foreign:
            raise ValueError(f"{self.dir}: the adapter targets modules its base {base.label} does not have: "
                             f"{foreign[:4]}{' ...' if len(foreign) > 4 else ''}")
        for name, ab in factors.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{weights}: {name} has lora_{''.join(ab)} only")
            a, b = ab["A"], ab["B"]
            want = tuple(base.shape(name))
            if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != want:
                raise ValueError(f"{self.dir}: {name}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} is not the "
                                 f"base {base.label}'s {want} (another base: hidden size or head count differ)")
        self._factors = factors
        self.rank = r
        self.targets = sorted({n.rsplit(".", 2)[-2] for n in factors})

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def dtype(self, name: str):
        return np.dtype(np.float32)

    def get(self, name: str) -> np.ndarray:
        """The tensor's delta `scaling * B @ A`, formed now (one tensor: what a merge holds of each input)."""
        ab = self._factors.get(name)
        if ab is None:
            return np.zeros(self.shape(name), np.float32)
        a, b = (np.asarray(ab[k], np.float32) for k in ("A", "B"))
        return (np.float32(self.scaling) * (b @ a)).astype(np.float32)


def check_base(adapter: AdapterSource, base_path: str) -> None:
    """The adapter's `base_model_name_or_path` names the recipe's base; refused otherwise, naming both."""
    check_adapter_base(adapter.dir, adapter.adapter_config, base_path)
