"""lm-evaluation-harness itself, on the documents `launch eval` scores: the reference paft_jax's evaluation
is checked against (tests/test_evals.py on a few documents, benchmarks/lm_eval_crosscheck.py on more).

lm-eval (the `test` extra) runs its HF backend on an exported model (transformers, PyTorch, fp32, CPU). It
gets our rows through `datasets.load_dataset`, answered with them in the splits its task YAML names (the
machine has no hub access), so both sides score the same documents. 0-shot (the few-shot contexts are
checked against lm-eval's separately, tests/test_evals.py::test_prompts_match_lm_eval); multiple choice
tasks only: GSM8K's greedy generation is checked by its extraction tests instead.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

from paft_jax.evals import tasks as T
from paft_jax.evals.data import load_split

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande")


def lm_eval_splits(name: str, docs: list[dict], pool: list[dict]) -> dict[str, list[dict]]:
    """Our documents and few-shot pool under the split names lm-eval's task reads them from."""
    if name in ("hellaswag", "winogrande"):    # evaluates validation, draws examples from train
        return {"train": pool, "validation": docs}
    if name.startswith("mmlu"):
        return {"dev": pool, "test": docs, "validation": docs}
    if name == "gsm8k":
        return {"train": pool, "test": docs}
    return {"train": pool, "validation": pool, "test": docs}   # ARC: evaluates test, examples from train


@contextlib.contextmanager
def serving(splits: dict[str, list[dict]]):
    """datasets.load_dataset answers every call with `splits` while the block runs."""
    import datasets
    original = datasets.load_dataset
    datasets.load_dataset = lambda *a, **k: datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows) for s, rows in splits.items()})
    try:
        yield
    finally:
        datasets.load_dataset = original


def documents(name: str, limit: int) -> tuple[list[dict], list[dict]]:
    """The first `limit` documents `launch eval --limit` scores, and rows after them for lm-eval's train split
    (its few-shot sampler is built even at 0 shots; the wheel ships no train splits)."""
    rows = load_split(T.TASKS[name], T.TASKS[name].split, None)
    return rows[:limit], rows[limit:limit + 40]


def run_lm_eval(hf_dir: str, name: str, docs: list[dict], pool: list[dict], batch_size: int = 8,
                task_manager: Any = None) -> dict[str, Any]:
    """lm-eval's HF backend on `docs`, 0-shot: {"metrics": {metric: value}, "loglikelihoods": per document,
    per choice, "seconds": wall time of simple_evaluate (model load included)}."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    t0 = time.perf_counter()
    with serving(lm_eval_splits(name, docs, pool)):
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, tasks=[name],
            num_fewshot=0, batch_size=batch_size, device="cpu", limit=len(docs), bootstrap_iters=0,
            log_samples=True, task_manager=task_manager or TaskManager(), fewshot_random_seed=T.FEWSHOT_SEED)
    seconds = time.perf_counter() - t0
    metrics = {k.split(",")[0]: float(v) for k, v in out["results"][name].items()
               if k.split(",")[0] in T.TASKS[name].metrics and isinstance(v, (int, float))}
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0] if isinstance(r, (list, tuple)) else r) for r in s["filtered_resps"]] for s in samples]
    return {"metrics": metrics, "loglikelihoods": lls, "seconds": seconds}


def run_ours(params: Any, cfg: Any, tokenizer: Any, mesh: Any, rules: tuple, name: str, limit: int,
             batch_size: int = 8) -> dict[str, Any]:
    """`launch eval --limit` 0-shot on the same documents, in run_lm_eval's shape (compile included)."""
    from paft_jax.evals import run
    from paft_jax.evals.engine import Scorer
    t0 = time.perf_counter()
    prepared = run.prepare([name], split=None, limit=limit, num_fewshot=0, data_dir=None)
    scorer = Scorer(params, cfg, tokenizer, mesh, rules, batch_size)
    run.tokenize(prepared, scorer)
    p = prepared[0]
    flat = [ll for ll, _ in scorer.loglikelihoods(p.tokens)]
    lls, at = [], 0
    for d in p.docs:
        lls.append(flat[at:at + len(d.choices)])
        at += len(d.choices)
    per_doc = [T.mc_scores(d, ll, p.task.metrics) for d, ll in zip(p.docs, lls)]
    metrics = {m: sum(s[m] for s in per_doc) / len(per_doc) for m in p.task.metrics}
    return {"metrics": metrics, "loglikelihoods": lls, "seconds": time.perf_counter() - t0}
