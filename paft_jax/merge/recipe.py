"""What to merge and how: a `MergeSpec` (method + parameters), resolved per tensor, and mergekit's
YAML recipe format (`merge_method`, `base_model`, `models[].model/.parameters`, `parameters`,
`dtype`, `out_dtype`) read into one.

Parameter values follow mergekit 0.1.5: a scalar; a list of numbers is a gradient interpolated over
the layers (t = layer / (num_layers - 1); tensors outside the layers use t = 0); a list of
non-numbers picks one by t; `{filter, value}` entries (or a list of them) apply when `filter` is a
substring of the tensor name ("*" or no filter matches all), the first match winning.  Lookup order
for a per-model parameter: the model's own `parameters`, then the global `parameters`, then the
default.  paft_jax adds `overrides` (glob patterns on tensor names, applied last; `skip: true`
keeps the base's tensor) and a `seed` for the random methods.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from paft_jax.merge.catalog import RESCALES, get_method

PER_MODEL = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}
GLOBAL = {"normalize": None, "lambda": 1.0, "rescale": None, "int8_mask": False, "t": None, "seed": 0}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# mergekit recipe keys we read; everything else in a recipe is refused, naming the key
RECIPE_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "overrides",
               "accept_config_differences"}
UNSUPPORTED = {"slices": "layer slicing (frankenmerges)", "modules": "per-module definitions",
               "tokenizer": "tokenizer merging", "chat_template": "chat template selection"}


class RecipeError(ValueError):
    pass


def _allowed(method: str) -> tuple[set[str], set[str]]:
    """(per-model, global) parameter names a method understands."""
    m = get_method(method)
    if m.kind == "slerp":
        return set(), {"t"}
    if m.kind == "linear":
        return {"weight"}, {"normalize"}
    per = {"weight", "density"} | ({"gamma"} if m.sparsify == "outliers" else set()) | (
        {"epsilon"} if m.sparsify == "della" else set())
    return per, {"normalize", "lambda", "rescale", "int8_mask", "seed"}


def evaluate(setting: Any, tensor: str, t: float, where: str) -> Any:
    """One mergekit parameter setting for one tensor at layer position t (None: no filter matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            nums = [_num(e) for e in setting]
            if any(isinstance(e, bool) for e in setting) or any(v is None for v in nums):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(nums) - 1)
            i0 = int(scaled)
            i1 = min(len(nums) - 1, i0 + 1)
            return (1 - (scaled - i0)) * nums[i0] + (scaled - i0) * nums[i1]
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise RecipeError(f"{where}: expected a number, a list of numbers (gradient) or "
                                  f"{{filter, value}} entries, got {cond!r}")
            f = cond.get("filter")
            if f is None or f == "*" or (tensor and str(f) in tensor):
                return evaluate(cond["value"], tensor, t, where)
        return None
    raise RecipeError(f"{where}: unsupported parameter value {setting!r}")


def _num(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:  # YAML reads 1e-3 without a dot as a string; mergekit accepts it as a number
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclass
class Override:
    pattern: str  # fnmatch glob on the tensor name, e.g. "model.embed_tokens.*" or "*mlp*"
    parameters: dict = field(default_factory=dict)
    skip: bool = False  # keep the base's tensor unchanged


@dataclass
class TensorParams:
    """Everything the merge of one tensor needs, resolved and validated on the host."""
    skip: bool
    weight: np.ndarray
    density: np.ndarray
    gamma: np.ndarray
    epsilon: np.ndarray
    normalize: bool
    lam: float
    rescale: str
    t: float


@dataclass
class MergeSpec:
    """A merge: method, global parameters, one parameter dict per model, overrides, seed, dtype.

    `parameters` and `model_parameters[i]` hold mergekit settings (scalars, gradients, filters).
    """
    method: str
    num_models: int
    parameters: dict = field(default_factory=dict)
    model_parameters: list[dict] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    dtype: str | None = None  # output dtype; None keeps the base's
    accept_config: tuple[str, ...] = ()  # config keys the models may have other values of than the base

    def __post_init__(self):
        m = get_method(self.method)
        per, glob = _allowed(self.method)
        if self.num_models < 1:
            raise RecipeError(f"merge method {self.method}: needs at least one model besides the base")
        if m.kind == "slerp" and self.num_models != 1:
            raise RecipeError(f"slerp: interpolates the base and exactly one other model, got {self.num_models} models")
        if not self.model_parameters:
            self.model_parameters = [{} for _ in range(self.num_models)]
        if len(self.model_parameters) != self.num_models:
            raise RecipeError(f"{len(self.model_parameters)} per-model parameter sets for {self.num_models} models")
        bad = set(self.parameters) - glob - per
        if bad:
            raise RecipeError(f"parameters: {sorted(bad)} not understood by {self.method} "
                              f"(accepted: {sorted(glob | per)})")
        for i, mp in enumerate(self.model_parameters):
            bad = set(mp or {}) - per
            if bad:
                raise RecipeError(f"models[{i}].parameters: {sorted(bad)} not understood by {self.method} "
                                  f"(accepted per model: {sorted(per)})")
        for o in self.overrides:
            bad = set(o.parameters) - per - glob
            if bad:
                raise RecipeError(f"overrides[{o.pattern!r}]: {sorted(bad)} not understood by {self.method}")
        if m.kind == "slerp" and "t" not in self.parameters:
            raise RecipeError("slerp: missing required parameter t")

    @property
    def seed(self) -> int:
        s = self.parameters.get("seed", 0)
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise RecipeError(f"parameters.seed: expected a non-negative integer, got {s!r}")
        return s

    def resolve(self, name: str, num_layers: int | None) -> TensorParams:
        m = get_method(self.method)
        t = layer_t(name, num_layers)
        over = [o for o in self.overrides if fnmatch.fnmatchcase(name, o.pattern)]

        def glob(key, default):
            v = evaluate(self.parameters.get(key), name, t, f"parameters.{key}") if key in self.parameters else None
            for o in over:
                if key in o.parameters:
                    v = evaluate(o.parameters[key], name, t, f"overrides[{o.pattern!r}].{key}")
            return default if v is None else v

        def per_model(key):
            out = []
            for i, mp in enumerate(self.model_parameters):
                v = evaluate(mp[key], name, t, f"models[{i}].parameters.{key}") if mp and key in mp else None
                if v is None:
                    v = glob(key, PER_MODEL[key])
                else:
                    for o in over:
                        if key in o.parameters:
                            v = evaluate(o.parameters[key], name, t, f"overrides[{o.pattern!r}].{key}")
                f = _num(v)
                if f is None:
                    raise RecipeError(f"{name}: models[{i}] parameter {key}={v!r} is not a number")
                out.append(f)
            return np.asarray(out, np.float64)

        normalize = glob("normalize", m.normalize)
        rescale = glob("rescale", m.rescale)
        if rescale is True:
            rescale = m.rescale if m.rescale != "none" else "l1"  # mergekit's rescale: true is an L1 match
        elif rescale is False:
            rescale = "none"
        if rescale not in RESCALES:
            raise RecipeError(f"{name}: rescale={rescale!r}; expected true, false or one of {RESCALES}")
        tp = TensorParams(skip=any(o.skip for o in over), weight=per_model("weight"), density=per_model("density"),
                          gamma=per_model("gamma"), epsilon=per_model("epsilon"), normalize=bool(normalize),
                          lam=float(_num(glob("lambda", 1.0))), rescale=rescale,
                          t=float(_num(glob("t", 0.0)) if m.kind == "slerp" else 0.0))
        if not tp.skip:
            self._validate(name, tp)
        return tp

    def check(self, num_layers: int | None = None) -> None:
        """Resolve every parameter for the tensor names of a decoder (Llama / Mistral / Qwen2 naming) at every
        layer position, so a bad value, gradient or filter is refused before any model is loaded or trained
        (`resolve` checks one tensor when the merge reaches it)."""
        layers = num_layers or 32
        names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        per_layer = [f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")] + [
            f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")] + [
            "input_layernorm.weight", "post_attention_layernorm.weight"]
        for i in range(layers):
            names += [f"model.layers.{i}.{n}" for n in per_layer]
        for name in names:
            self.resolve(name, layers)
        self.seed  # noqa: B018 (validates it)
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise RecipeError(f"dtype={self.dtype!r}: expected float32, bfloat16 or float16")

    def _validate(self, name: str, tp: TensorParams) -> None:
        m = get_method(self.method)
        if m.kind == "delta" and m.sparsify is not None:
            for i, d in enumerate(tp.density):
                if not (0.0 < d <= 1.0):
                    raise RecipeError(f"{name}: models[{i}] density={d:g} is outside (0, 1]")
                if m.sparsify == "della" and d < 1 and not (0 < d - tp.epsilon[i] and d + tp.epsilon[i] < 1):
                    raise RecipeError(f"{name}: models[{i}] della needs density +/- epsilon inside (0, 1), "
                                      f"got density={d:g}, epsilon={tp.epsilon[i]:g}")
                if m.sparsify == "outliers" and not (0.0 <= tp.gamma[i] < 1.0):
                    raise RecipeError(f"{name}: models[{i}] gamma={tp.gamma[i]:g} is outside [0, 1)")
        elif m.kind == "delta" and any(d != 1.0 for d in tp.density):
            raise RecipeError(f"{name}: {self.method} does not sparsify; density={list(tp.density)} would be ignored")
        if tp.normalize and not (m.kind == "delta" and m.consensus) and m.kind != "slerp":
            s = float(np.sum(tp.weight))
            if abs(s) < 1e-8:
                raise RecipeError(f"{name}: weights {list(tp.weight)} sum to {s:g}; normalize divides by "
                                  "that sum (set normalize: false or change the weights)")
        if not all(math.isfinite(x) for x in tp.weight):
            raise RecipeError(f"{name}: non-finite weight {list(tp.weight)}")


def layer_t(name: str, num_layers: int | None) -> float:
    """mergekit's gradient position: layer i of L -> i / (L - 1); other tensors -> 0."""
    mt = _LAYER.search(name)
    if not mt or not num_layers:
        return 0.0
    return int(mt.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def rank_window(method: str, n: int, density: float, gamma: float) -> tuple[int, int]:
    """Kept ascending-rank range [lo, hi) of a tensor of n elements (mergekit 0.1.5's counts)."""
    how = get_method(method).sparsify
    if density >= 1 or how not in ("magnitude", "outliers"):
        return 0, n
    if how == "magnitude":
        k = max(1, int(density * n))
        return n - k, n
    target = int(density * n)
    bot = max(0, n - target - int(gamma * n))
    return bot, bot + target


# ---------------------------------------------------------------------------------------------------
# mergekit YAML recipes


@dataclass
class Recipe:
    spec: MergeSpec
    base: str | None
    models: list[str]
    text: str  # the recipe as given, for the model card


def load_recipe(source: str | Path | dict, *, where: str | None = None) -> Recipe:
    """Read a mergekit recipe (YAML file, YAML text or dict); refuse what we do not implement."""
    if isinstance(source, dict):
        data, text, where = source, yaml.safe_dump(source, sort_keys=False), where or "recipe"
    else:
        p = Path(source)
        if "\n" not in str(source) and p.exists():
            text, where = p.read_text(), str(p)
        elif "\n" not in str(source) and str(source).endswith((".yaml", ".yml", ".json")):
            raise RecipeError(f"{source}: no such recipe file")
        else:
            text, where = str(source), where or "recipe"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with merge_method, base_model and models")
    for key in data:
        if key in UNSUPPORTED:
            raise RecipeError(f"{where}: '{key}' ({UNSUPPORTED[key]}) is not supported by paft_jax's merge; "
                              "use 'models' with 'base_model'")
        if key not in RECIPE_KEYS:
            raise RecipeError(f"{where}: unknown key '{key}' (accepted: {sorted(RECIPE_KEYS)})")
    if "merge_method" not in data:
        raise RecipeError(f"{where}: missing 'merge_method'")
    method = data["merge_method"]
    try:
        get_method(method)
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from None
    if data.get("tokenizer_source") not in (None, "base"):
        raise RecipeError(f"{where}: tokenizer_source={data['tokenizer_source']!r}: only the base's tokenizer is "
                          "supported (tokenizer_source: base)")
    base = data.get("base_model")
    base = str(base) if base is not None else None
    entries = data.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models, params = [], []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"model": e}
        if not isinstance(e, dict) or "model" not in e or set(e) - {"model", "parameters"}:
            raise RecipeError(f"{where}: models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {e!r}")
        path = str(e["model"])
        if base is not None and _same(path, base) and get_method(method).kind != "linear":
            continue  # mergekit lists the base among the models for slerp; it is the base, not a delta
        models.append(path)
        params.append(dict(e.get("parameters") or {}))
    if base is not None and get_method(method).kind == "linear" and not any(_same(m, base) for m in models):
        models.append(base)  # mergekit's linear averages base_model too (its weight from `parameters`)
        params.append({})
    if base is None and get_method(method).kind != "linear":
        raise RecipeError(f"{where}: merge_method {method} needs a base_model (the deltas are taken from it)")
    overrides = []
    for j, o in enumerate(data.get("overrides") or []):
        if not isinstance(o, dict) or "pattern" not in o or set(o) - {"pattern", "parameters", "skip"}:
            raise RecipeError(f"{where}: overrides[{j}]: expected {{pattern: GLOB, parameters: {{...}}, skip: bool}}")
        overrides.append(Override(str(o["pattern"]), dict(o.get("parameters") or {}), bool(o.get("skip", False))))
    dtype = data.get("out_dtype") or data.get("dtype")
    accept = data.get("accept_config_differences") or []
    if not isinstance(accept, list) or not all(isinstance(k, str) for k in accept):
        raise RecipeError(f"{where}: accept_config_differences must be a list of config keys, e.g. [rope_theta]")
    try:
        spec = MergeSpec(method, len(models), dict(data.get("parameters") or {}), params, overrides, dtype,
                         tuple(accept))
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    return Recipe(spec, base, models, text)


def _same(a: str, b: str) -> bool:
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
