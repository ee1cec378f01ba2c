"""Typed configuration: dataclasses, built from YAML plus dotted `key=value` overrides.

Unknown keys and ill-typed values are refused with the dotted path of the offending key, before
anything is compiled or loaded (MaxText's "loud refusals").
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Logical axis -> mesh axes.  Model code names logical axes only; changing FSDP to tensor parallelism
# is an edit of this table (or the config's `mesh.rules`), never of the model.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_cache_length", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` (no dot) as a string; learning rates are written that way, so floats too.
    And it reads `5:8` as the base-60 integer 368: here it stays the string `5:8` (profile: START:STOP)."""


_INT = "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
                                                 |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class MeshConfig:
    """Axis sizes of the device mesh; -1 means 'all remaining devices' (at most one axis)."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # overrides of DEFAULT_LOGICAL_RULES: {logical_name: mesh_axis | [mesh_axes] | null}
    rules: dict[str, Any] = field(default_factory=dict)

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def logical_rules(self) -> tuple[tuple[str, Any], ...]:
        known = {name for name, _ in DEFAULT_LOGICAL_RULES}
        unknown = set(self.rules) - known
        if unknown:
            raise ValueError(f"mesh.rules: unknown logical axes {sorted(unknown)}; known: {sorted(known)}")
        out = []
        for name, default in DEFAULT_LOGICAL_RULES:
            target = self.rules.get(name, default)
            if isinstance(target, list):
                target = tuple(target)
            for ax in (target if isinstance(target, tuple) else (target,)):
                if ax is not None and ax not in MESH_AXES:
                    raise ValueError(f"mesh.rules.{name}: {ax!r} is not a mesh axis {MESH_AXES}")
            out.append((name, target))
        return tuple(out)


@dataclass
class DistributedConfig:
    """Multi-host set-up.  `auto` calls jax.distributed.initialize() with no arguments (TPU pods, SLURM)."""
    enabled: bool = False
    auto: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None
    cpu_collectives: str | None = None  # "gloo" for multi-process CPU tests


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def deep_merge(into: dict, over: dict) -> dict:
    """`over` on top of `into`, nested mappings merged key by key (a config file plus its overriding keys)."""
    out = dict(into)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type, data: dict | None, path: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, refusing unknown keys and wrong types by dotted path."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hints_txt = ""
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            if close:
                hints_txt += f" ({path + k}: did you mean {path + close[0]}?)"
        raise ValueError(f"unknown config key(s) {[path + k for k in unknown]}{hints_txt}; "
                         f"valid keys under {path or 'the root'}: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            tp = inner[0]  # Optional[SomeConfig] given a mapping
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config key {path + f.name} must be a mapping, got {value!r}")
            value = from_dict(tp, value, f"{path}{f.name}.")
        elif not _type_ok(value, tp):
            raise ValueError(f"config key {path + f.name}={value!r} does not match type {tp}")
        elif isinstance(value, float) and tp is float:
            value = float(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) onto a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is not None and not isinstance(node[p], dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is {node[p]!r}, not a mapping")
            node[p] = dict(node.get(p) or {})
            node = node[p]
        try:
            node[parts[-1]] = yaml_load(raw)
        except yaml.YAMLError as e:
            detail = str(getattr(e, "problem", None) or e).strip()
            raise ValueError(f"override {item!r}: the value is not valid YAML ({detail}); quote the whole "
                             "KEY=VALUE for the shell if it has spaces") from None
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{path or '<overrides>'}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
