"""lm-evaluation-harness itself, on the documents `launch eval` scores: the reference paft_jax's evaluation
is checked against (tests/test_evals.py on a few documents, benchmarks/lm_eval_crosscheck.py on more).

lm-eval (the `test` extra) runs its HF backend on an exported model (transformers, PyTorch, fp32, CPU). It
gets our rows through `datasets.load_dataset`, answered with them in the splits its task YAML names (the
machine has no hub access), so both sides score the same documents. 0-shot (the few-shot contexts are
checked against lm-eval's separately, tests/test_evals.py::test_prompts_match_lm_eval).  Multiple choice
tasks compare every choice's log-likelihood; MMLU is lm-eval's group of 57 subject tasks, each served its own
rows; GSM8K compares the greedy generations themselves and both exact-match filters.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

from paft_jax.evals import tasks as T
from paft_jax.evals.data import load_split

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande")
TASKS = (*MC_TASKS, "mmlu", "gsm8k")


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
def serving(splits: dict[str, list[dict]] | Callable[[str | None], dict[str, list[dict]]]):
    """datasets.load_dataset answers every call with `splits` (or `splits(name)`: one data set per lm-eval
    subtask, by the `name` it asks for) while the block runs."""
    import datasets
    original = datasets.load_dataset
    datasets.load_dataset = lambda *a, **k: datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows)
         for s, rows in (splits(k.get("name")) if callable(splits) else splits).items()})
    try:
        yield
    finally:
        datasets.load_dataset = original


def documents(name: str, limit: int | None) -> tuple[list[dict], list[dict]]:
    """The documents `launch eval --limit` scores (None: the whole split; MMLU: the first `limit` of each
    subject, in subject order), and rows for lm-eval's few-shot split (its sampler is built even at 0 shots;
    the wheel ships no train splits: other rows of the same split stand in; MMLU has its dev split)."""
    task = T.TASKS[name]
    rows = load_split(task, task.split, None)
    if name == "mmlu":
        return [r for s in T.MMLU_SUBJECTS for r in [x for x in rows if x["subject"] == s][:limit]], \
            load_split(task, task.fewshot_split, None)
    docs = rows[:limit]
    return docs, rows[len(docs):len(docs) + 40] or rows[:40]


def _metrics(results: dict, name: str) -> dict[str, float]:
    """lm-eval's "acc,none" / "exact_match,strict-match" keys as our metric names."""
    out = {}
    for k, v in results.items():
        m = k if k in T.TASKS[name].metrics else k.split(",")[0]
        if m in T.TASKS[name].metrics and isinstance(v, (int, float)):
            out[m] = float(v)
    return out


def run_lm_eval(hf_dir: str, name: str, docs: list[dict], pool: list[dict], batch_size: int = 8,
                task_manager: Any = None) -> dict[str, Any]:
    """lm-eval's HF backend on `docs`, 0-shot: {"metrics": {metric: value}, "loglikelihoods": per document,
    per choice (multiple choice) or "generations" (GSM8K), "seconds": wall time of simple_evaluate (model load
    included)}."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    if name == "mmlu":  # one subtask per subject, each asking load_dataset for its subject by name
        splits = {s: lm_eval_splits(name, [d for d in docs if d["subject"] == s], [p for p in pool
                                                                                    if p["subject"] == s])
                  for s in T.MMLU_SUBJECTS}
        served = lambda subject: splits[subject]  # noqa: E731
        subtasks = [f"mmlu_{s}" for s in T.MMLU_SUBJECTS if splits[s]["test"]]
    else:
        served, subtasks = lm_eval_splits(name, docs, pool), [name]
    t0 = time.perf_counter()
    with serving(served):
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"},
            tasks=subtasks if name == "mmlu" else [name], num_fewshot=0, batch_size=batch_size, device="cpu",
            bootstrap_iters=0, log_samples=True, task_manager=task_manager or TaskManager(),
            fewshot_random_seed=T.FEWSHOT_SEED)
    seconds = time.perf_counter() - t0
    samples = [s for t in subtasks for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]
    if name == "gsm8k":  # one sample per filter: the raw generation is the same in each
        gens = [s["resps"][0][0] for s in samples if s["filter"] == "strict-match"]
        return {"metrics": _metrics(out["results"][name], name), "generations": gens, "seconds": seconds}
    if name == "mmlu":  # the size-weighted mean over the subjects, as lm-eval's group reports it
        accs = [s["acc"] for s in samples]
        metrics = {"acc": sum(accs) / len(accs)}
    else:
        metrics = _metrics(out["results"][name], name)
    lls = [[float(r[0] if isinstance(r, (list, tuple)) else r) for r in s["filtered_resps"]] for s in samples]
    return {"metrics": metrics, "loglikelihoods": lls, "seconds": seconds}


def run_ours(params: Any, cfg: Any, tokenizer: Any, mesh: Any, rules: tuple, name: str, limit: int | None,
             batch_size: int = 8) -> dict[str, Any]:
    """`launch eval --limit` 0-shot on the same documents, in run_lm_eval's shape (compile included)."""
    from paft_jax.evals import run
    from paft_jax.evals.engine import Scorer, generate_until
    t0 = time.perf_counter()
    prepared = run.prepare([name], split=None, limit=limit, num_fewshot=0, data_dir=None)
    if name == "gsm8k":
        p = prepared[0]
        gens = generate_until(params, cfg, tokenizer, [d.context for d in p.docs], T.GSM8K_STOP,
                              T.GSM8K_MAX_NEW_TOKENS, batch_size)
        per_doc = [T.gsm8k_scores(g, d.answer) for g, d in zip(gens, p.docs)]
        metrics = {m: sum(s[m] for s in per_doc) / len(per_doc) for m in p.task.metrics}
        return {"metrics": metrics, "generations": gens, "seconds": time.perf_counter() - t0}
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
