"""Tensor sources for the streaming merge: anything with names, shapes, dtypes and get(name).

HF model directories (safetensors, single or sharded, memory-mapped through
`paft_jax.hf.load.SafetensorsSource`), and paft_jax branch checkpoints (`train.restore.CheckpointSource`,
`is_delta = True`: the merge uses their tensors as deltas instead of subtracting the base).  Both may be
gs:// URLs: checkpoints are read by Orbax in place; an HF directory is fetched whole into a local
temporary directory (removed with the source), since safetensors are memory-mapped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from paft_jax.hf.config import TEXT_MODEL_OF
from paft_jax.hf.load import SafetensorsSource, TextModelSource


class TensorSource(Protocol):
    label: str  # what errors name: a directory or checkpoint path
    is_delta: bool  # tensors are deltas from the base (checkpoints) rather than full weights
    config: dict | None  # the HF config.json contents, when there is one

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def get(self, name: str) -> np.ndarray: ...


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class HFDirSource:
    """An HF model directory; tensors are memory-mapped, so reading one costs one tensor."""

    is_delta = False

    def __init__(self, path: str | Path, files_dir: str | Path | None = None):
        """`files_dir`: where the tokenizer and generation config a merge copies next to its output are
        (default: the model directory itself)."""
        from paft_jax import storage
        self.label = str(path)
        if storage.is_url(path):  # fetched whole (refused if incomplete); removed when this source goes
            local = tempfile.mkdtemp(prefix="paft_merge_input_")
            weakref.finalize(self, shutil.rmtree, local, True)
            self.dir = storage.fetch_dir(str(path), local)
        else:
            self.dir = Path(path)
            self.label = str(self.dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: no such model directory")
        if not (list(self.dir.glob("*.safetensors")) or (self.dir / "model.safetensors.index.json").exists()):
            raise FileNotFoundError(f"{self.dir}: no *.safetensors weights (the merge reads safetensors only)")
        self._st = SafetensorsSource(self.dir)
        self.files_dir = Path(files_dir) if files_dir is not None else self.dir
        cfg = self.dir / "config.json"
        try:
            self.config = json.loads(cfg.read_text()) if cfg.exists() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg}: not valid JSON ({e})") from None
        # a multimodal checkpoint (Gemma 3 4B-27B) takes part as its language model: text names, text config
        self._file_name: dict[str, str] = {}
        if (self.config or {}).get("model_type") in TEXT_MODEL_OF:
            from paft_jax.hf.config import hf_config_dict, model_config_from_hf
            self._file_name = TextModelSource(self._st).to_source
            self.config = hf_config_dict(model_config_from_hf(self.config, str(cfg)), self.config)
        self._names = sorted(self._file_name or self._st.names(), key=_natural)

    def _in_file(self, name: str) -> str:
        return self._file_name.get(name, name)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._st.shape(self._in_file(name)))

    def dtype(self, name: str) -> np.dtype:
        name = self._in_file(name)
        return self._st.where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._st.get(self._in_file(name))

    def file_of(self, name: str) -> str:
        return self._st.file_of(self._in_file(name))

    def flat(self, name: str) -> "FlatReader":
        """The tensor as a flat array whose slices are read from the file on demand."""
        name = self._in_file(name)
        f = self._st.where[name]
        start, end = f.header[name]["data_offsets"]
        n = int(np.prod(f.shape(name), dtype=np.int64))
        if end - start != n * f.dtype(name).itemsize:
            raise ValueError(f"{f.path}: tensor {name!r} byte range does not match its shape")
        return FlatReader(f.path, f._data_start + start, n, f.dtype(name))


class FlatReader:
    """A flat on-disk tensor sliced with pread: unlike a memory map, the pages read never count in
    this process's resident memory (they stay in the OS page cache), so a merge that passes over an
    embedding several times holds a few chunks of it, not three copies."""

    def __init__(self, path: Path, offset: int, size: int, dtype: np.dtype):
        self.path, self.offset, self.dtype = path, offset, np.dtype(dtype)
        self.shape = (size,)

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, step = sl.indices(self.shape[0])
        if step != 1:
            raise IndexError("FlatReader: contiguous slices only")
        raw = np.empty(max(0, stop - start) * self.dtype.itemsize, np.uint8)  # bytes: bfloat16 has no buffer code
        with open(self.path, "rb", buffering=0) as fh:
            got = os.preadv(fh.fileno(), [raw], self.offset + start * self.dtype.itemsize)
        if got != raw.nbytes:
            raise ValueError(f"{self.path}: short read (truncated file?)")
        return raw.view(self.dtype)

    def reshape(self, *shape):
        if shape in ((-1,), (self.shape[0],), ((-1,),)):
            return self
        raise ValueError("FlatReader: only flat views")


def is_checkpoint(path: str | Path) -> bool:
    """A paft_jax branch run / checkpoints dir / step dir (Orbax), as opposed to an HF model directory.
    Local paths and gs:// (any fsspec) URLs."""
    from paft_jax import storage
    if storage.is_url(path):
        names = storage.child_names(str(path))
        return "checkpoints" in names or "_CHECKPOINT_METADATA" in names or any(
            n.isdigit() and "state" in storage.child_names(f"{str(path).rstrip('/')}/{n}") for n in names)
    p = Path(path)
    return (p / "checkpoints").is_dir() or (p / "_CHECKPOINT_METADATA").exists() \
        or (p.is_dir() and any(c.name.isdigit() and (c / "state").is_dir() for c in p.iterdir()))


def open_source(path: str | Path) -> TensorSource:
    """A merge input: an HF model directory, a paft_jax branch checkpoint (its delta), or BASE+ADAPTER (a PEFT
    LoRA adapter's delta on BASE, mergekit's syntax)."""
    from paft_jax.merge.adapter import AdapterSource, check_base, split_spec
    pair = split_spec(path)
    if pair is not None:
        src = AdapterSource(open_source(pair[0]), pair[1])
        check_base(src, pair[0])
        return src
    if is_checkpoint(path):
        from paft_jax.train.restore import CheckpointSource
        return CheckpointSource(path)
    return HFDirSource(path)


def num_layers(src: TensorSource) -> int | None:
    """Layer count for gradients: the config's, else one more than the largest layer index."""
    cfg = src.config or {}
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    if n:
        return int(n)
    idx = [int(m.group(1)) for m in (re.search(r"layers\.(\d+)\.", k) for k in src.names()) if m]
    return max(idx) + 1 if idx else None


# config.json keys that describe the file or generation defaults, not the function the weights compute
CONFIG_KEYS_IGNORED = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype", "architectures", "auto_map",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_attentions",
    "output_hidden_states", "return_dict", "tokenizer_class", "id2label", "label2id", "problem_type",
    "task_specific_params", "prefix", "finetuning_task", "_attn_implementation", "attn_implementation",
    "_attn_implementation_autoset", "quantization_config", "generation_config", "chat_template"})


def _rope_as_v5(cfg: dict) -> dict:
    """transformers v4's `rope_theta` / `rope_scaling` folded into v5's `rope_parameters`, so that one model
    saved by either version compares equal."""
    if "rope_theta" not in cfg and not isinstance(cfg.get("rope_scaling"), dict):
        return cfg
    cfg = dict(cfg)
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" in cfg:
        rope.setdefault("rope_theta", cfg.pop("rope_theta"))
    for k, v in (cfg.pop("rope_scaling", None) or {}).items():
        rope.setdefault("rope_type" if k == "type" else k, v)
    rope.setdefault("rope_type", "default")
    cfg["rope_parameters"] = rope
    return cfg


def _with_defaults(cfg: dict) -> dict:
    """The config as transformers' own class for its model_type reads it (absent keys at their defaults),
    so that a key written by one saver and left out by another as a default does not count as a difference;
    unchanged when transformers does not know the model_type or cannot parse the config."""
    import transformers
    try:
        cls = transformers.CONFIG_MAPPING[cfg.get("model_type")]
        full = cls.from_dict(dict(cfg)).to_dict()
    except Exception:  # noqa: BLE001 - unknown type or a config transformers refuses: compare as written
        return cfg
    return {**full, **{k: v for k, v in cfg.items() if k not in full}}


def config_differences(base: dict, other: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, base value, other value) for every computation-relevant config key whose value differs
    (nested mappings such as rope_parameters or text_config compared key by key; a missing key differs)."""
    if not prefix:
        base, other = _with_defaults(_rope_as_v5(base)), _with_defaults(_rope_as_v5(other))
    out = []
    for key in sorted(set(base) | set(other)):
        if key in CONFIG_KEYS_IGNORED:
            continue
        a, b = base.get(key, _MISSING), other.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (_is_number(a) and _is_number(b) and float(a) == float(b)):
            out.append((prefix + key, a, b))
    return out


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_compatible(base: TensorSource, models: list[TensorSource], accept: Sequence[str] = ()) -> None:
    """Same architecture, config and tensor names and shapes: otherwise an error naming the difference.
    `accept`: config keys allowed to differ from the base's (dotted, e.g. rope_parameters.rope_theta, or
    the last part alone, rope_theta)."""
    arch = _arch(base)
    names = set(base.names())
    for m in models:
        if arch and _arch(m) and _arch(m) != arch:
            raise ValueError(f"{m.label}: architecture {_arch(m)} differs from the base's {arch} ({base.label})")
        theirs = set(m.names())
        missing, extra = sorted(names - theirs, key=_natural), sorted(theirs - names, key=_natural)
        if missing:
            raise ValueError(f"{m.label}: missing tensors the base {base.label} has: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if extra:
            raise ValueError(f"{m.label}: tensors the base {base.label} does not have (refusing to drop them): "
                             f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for n in base.names():
            if tuple(m.shape(n)) != tuple(base.shape(n)):
                raise ValueError(f"{m.label}: tensor {n} has shape {tuple(m.shape(n))}, the base "
                                 f"{base.label} has {tuple(base.shape(n))} (models of different sizes cannot "
                                 "be merged)")
        if base.config and m.config:
            diffs = [d for d in config_differences(base.config, m.config)
                     if d[0] not in accept and d[0].rsplit('.', 1)[-1] not in accept]
            if diffs:
                shown = ", ".join(f"{k} {b!r} (base {a!r})" for k, a, b in diffs[:6])
                raise ValueError(f"{m.label}: its config differs from the base {base.label}'s: {shown}"
                                 f"{' ...' if len(diffs) > 6 else ''}; the merged model would take the base's. "
                                 "If that is intended, accept the keys (recipe accept_config_differences: "
                                 f"[{', '.join(k for k, _, _ in diffs)}], or --accept-config-difference KEY)")


def read_order(names: list[str], sources: list) -> list[str]:
    """`names` reordered so that the tensors a source stores together (its `group`, e.g. the layers of one
    stacked checkpoint leaf) are read one after the other: each group is then restored once and held
    alone.  Without grouped sources, `names` as given."""
    grouped = [s for s in sources if hasattr(s, "group")]
    if not grouped:
        return list(names)
    first: dict = {}
    key = [first.setdefault(grouped[0].group(n), len(first)) for n in names]
    return [n for _, _, n in sorted(zip(key, range(len(names)), names))]


def _arch(src: TensorSource):
    cfg = src.config or {}
    a = cfg.get("architectures")
    return (tuple(a) if a else None) or cfg.get("model_type")
