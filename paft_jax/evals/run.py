"""Evaluate one model on the leaderboard tasks: data and prompts first (every refusal before a compile),
then the requests on the mesh, then lm-eval's metrics with their standard errors.

Results are keyed as lm-eval keys them: results[task][metric] and results[task][metric + "_stderr"]
(metric names "acc", "acc_norm", "exact_match,strict-match", "exact_match,flexible-extract"); MMLU adds its
four categories (results["mmlu_stem"], ...) and per-subject scores under "subtasks".
"""
from __future__ import annotations

import difflib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from paft_jax.evals import tasks as T
from paft_jax.evals.data import load_split
from paft_jax.evals.engine import Scorer, generate_until

LEADERBOARD = ("arc_challenge", "hellaswag", "mmlu", "winogrande", "gsm8k")  # the paper's six, less TruthfulQA


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks: give at least one task")
    for n in names:
        if n not in T.TASKS:
            close = difflib.get_close_matches(n, list(T.TASKS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--tasks: unknown task {n!r}{hint} (tasks: {', '.join(T.TASKS)})")
    return list(dict.fromkeys(names))


def mean_stderr(values: list[float]) -> float:
    """lm-eval's: sample standard deviation (n - 1) over sqrt(n); NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled(scores: dict[str, list[float]]) -> tuple[float, float]:
    """lm-eval's group aggregate weighted by size, and its pooled standard error over the groups."""
    sizes = [len(v) for v in scores.values()]
    means = [sum(v) / len(v) for v in scores.values()]
    errs = [mean_stderr(v) for v in scores.values()]
    n = sum(sizes)
    mean = sum(m * s for m, s in zip(means, sizes)) / n
    if len(sizes) == n or any(math.isnan(e) for e in errs):
        return mean, float("nan")
    var = sum((s - 1) * e ** 2 * s for s, e in zip(sizes, errs)) / (n - len(sizes))
    return mean, math.sqrt(var / n)


@dataclass
class Prepared:
    task: T.Task
    split: str
    shots: int
    docs: list                      # MCDoc | GenDoc
    subjects: list[str] | None      # MMLU: the subject of each document
    tokens: list | None = None      # MC: per choice, (token ids, continuation length)


def check_limit(limit: int | dict[str, int] | None, names: list[str]) -> None:
    """A number of documents per task (MMLU: per subject), or {task: number} (a task not named: all)."""
    per = limit if isinstance(limit, dict) else {} if limit is None else {None: limit}
    for task, n in per.items():
        if task is not None and task not in names:
            raise ValueError(f"--limit {{{task}: {n}}}: {task!r} is not among the tasks ({', '.join(names)})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            where = f"{{{task}: {n}}}" if task is not None else f"{n}"
            raise ValueError(f"--limit {where}: give a positive number of documents per task (or leave it out)")


def parse_limit(spec: str | None) -> int | dict[str, int] | None:
    """`--limit`: "N" (every task) or "task=N,task=N" (the tasks not named: all their documents)."""
    if spec is None:
        return None
    if "=" not in spec:
        try:
            return int(spec)
        except ValueError:
            raise ValueError(f"--limit {spec}: give a number of documents, or task=N,... per task") from None
    out = {}
    for part in spec.split(","):
        task, _, n = part.partition("=")
        try:
            out[task.strip()] = int(n)
        except ValueError:
            raise ValueError(f"--limit {part}: expected task=N (a number of documents)") from None
    return out


def checked_config(tasks: list, limit, fewshot, batch_size: int, keys: tuple[str, str, str, str]) -> list[str]:
    """A config's task settings checked when it is read (a typo must not surface after training); errors name
    the config's own keys (`keys`: those of the tasks, the limit, the shots, the batch size).  -> the tasks."""
    k_tasks, k_limit, k_shots, k_batch = keys
    if not isinstance(tasks, list):
        raise ValueError(f"{k_tasks}={tasks!r}: expected a list of task names")
    if tasks:
        try:
            tasks = parse_tasks(",".join(map(str, tasks)))
        except ValueError as e:
            raise ValueError(f"{k_tasks}: {str(e).removeprefix('--tasks: ')}") from None
    try:
        check_limit(limit, tasks)
    except ValueError as e:
        raise ValueError(f"{k_limit}={str(e).removeprefix('--limit ')}") from None
    if fewshot is not None and fewshot < 0:
        raise ValueError(f"{k_shots}={fewshot} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"{k_batch}={batch_size} must be >= 1")
    return tasks


def prepare(names: list[str], *, split: str | None, limit: int | dict[str, int] | None, num_fewshot: int | None,
            data_dir: str | None) -> list[Prepared]:
    """Rows and few-shot contexts for every task, checked (no model needed).  `limit`: see check_limit."""
    check_limit(limit, names)
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot {num_fewshot} must be >= 0")
    out = []
    for name in names:
        task = T.TASKS[name]
        lim = limit.get(name) if isinstance(limit, dict) else limit
        sp = split or task.split
        k = T.DEFAULT_FEWSHOT.get(name, 0) if num_fewshot is None else num_fewshot
        rows = load_split(task, sp, data_dir)
        pool = None
        if k:
            if task.fewshot_split == sp:
                raise ValueError(f"{name}: few-shot examples come from {task.fewshot_split}, the split being "
                                 f"evaluated; choose another --split")
            try:
                pool = load_split(task, task.fewshot_split, data_dir)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e}; {k}-shot {name} draws its examples from that split (or give "
                                        "--num-fewshot 0)") from None
        docs, subjects = [], None
        if name == "mmlu":  # one lm-eval task per subject: its own dev examples, its own --limit
            subjects = []
            for subject in T.MMLU_SUBJECTS:
                rs = [r for r in rows if r["subject"] == subject][:lim]
                ps = [r for r in pool if r["subject"] == subject] if pool else None
                docs += T.requests(task, rs, ps, k)
                subjects += [subject] * len(rs)
        else:
            docs = T.requests(task, rows[:lim], pool, k)
        out.append(Prepared(task, sp, k, docs, subjects))
    return out


def tokenize(prepared: list[Prepared], scorer: Scorer) -> None:
    """Every request's tokens, before anything is compiled: a tokenizer that cannot serve a task is refused."""
    if scorer.tok is None:
        raise ValueError("the model has no tokenizer; the tasks' prompts are text (give a model directory with "
                         "tokenizer files)")
    for p in prepared:
        if p.task.kind == "mc":
            pairs = [(c.context, c.continuation) for d in p.docs for c in d.choices]
            try:
                p.tokens = scorer.tokens(pairs)
            except ValueError as e:
                raise ValueError(f"{p.task.name}: {e}; this tokenizer cannot score the task") from None


def _summary(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), mean_stderr(values)


def score(prepared: list[Prepared], scorer: Scorer, params, cfg, tokenizer, batch_size: int,
          progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm
    results, timing, samples = {}, {}, {}
    for p in prepared:
        t0 = time.perf_counter()
        n_req = sum(len(d.choices) for d in p.docs) if p.task.kind == "mc" else len(p.docs)
        with tqdm(total=n_req, desc=p.task.name, unit="req", disable=not progress) as bar:
            if p.task.kind == "mc":
                scorer.progress = bar.update
                lls = scorer.loglikelihoods(p.tokens)
                per_doc, at = [], 0
                for d in p.docs:
                    ll = [x[0] for x in lls[at:at + len(d.choices)]]
                    at += len(d.choices)
                    per_doc.append(T.mc_scores(d, ll, p.task.metrics))
            else:
                gens = generate_until(params, cfg, tokenizer, [d.context for d in p.docs], T.GSM8K_STOP,
                                      T.GSM8K_MAX_NEW_TOKENS, batch_size, progress=bar.update)
                per_doc = [T.gsm8k_scores(g, d.answer) for g, d in zip(gens, p.docs)]
                samples[p.task.name] = [{"generation": g, **s} for g, s in zip(gens, per_doc)]
        timing[p.task.name] = round(time.perf_counter() - t0, 1)
        res: dict[str, Any] = {"n": len(p.docs), "num_fewshot": p.shots, "split": p.split}
        for m in p.task.metrics:
            vals = [s[m] for s in per_doc]
            res[m], res[m + "_stderr"] = _summary(vals)
        if p.subjects is not None:  # MMLU: lm-eval's size-weighted groups, pooled standard errors
            by_subject: dict[str, list[float]] = {}
            for s, d in zip(p.subjects, per_doc):
                by_subject.setdefault(s, []).append(d["acc"])
            res["acc"], res["acc_stderr"] = pooled(by_subject)
            res["subtasks"] = {s: {"acc": float(np.mean(v)), "acc_stderr": mean_stderr(v), "n": len(v)}
                               for s, v in by_subject.items()}
        results[p.task.name] = res
        if p.subjects is not None:
            for cat, members in T.MMLU_CATEGORIES.items():
                group = {s: by_subject[s] for s in members.split() if s in by_subject}
                if group:
                    acc, se = pooled(group)
                    results[f"mmlu_{cat}"] = {"acc": acc, "acc_stderr": se, "n": sum(map(len, group.values())),
                                              "num_fewshot": p.shots, "split": p.split}
    return {"results": results, "timing_s": timing, "samples": samples}


def json_safe(x: Any) -> Any:
    """NaN (a standard error of fewer than two documents) as null: strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def table(report: dict) -> str:
    rows = []
    for task, res in report["results"].items():
        for m, v in res.items():
            if m.endswith("_stderr") or m in ("n", "num_fewshot", "split", "subtasks"):
                continue
            se = res.get(m + "_stderr", float("nan"))
            rows.append((task, m, f"{100 * v:.2f}", "" if math.isnan(se) else f"{100 * se:.2f}", str(res["n"]),
                         str(res["num_fewshot"]), res["split"], f"{report['timing_s'].get(task, '')}"))
    head = ("task", "metric", "value %", "stderr", "n", "shots", "split", "time s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 or i == 6 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])
