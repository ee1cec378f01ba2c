"""The leaderboard tasks as lm-evaluation-harness (0.4.x) defines them: prompts, few-shot contexts, metrics.

Pure functions of the data rows; nothing here touches a model.  Each task turns its documents into
requests: multiple choice as one (context, continuation) log-likelihood request per choice, GSM8K as one
greedy generation.  The strings are lm-eval's task YAMLs verbatim (arc_easy.yaml, hellaswag/utils.py,
winogrande/preprocess_winogrande.py, mmlu/default/_default_template_yaml, gsm8k/gsm8k.yaml), so the numbers
compare with published ones:

  context = description + sum(example_text + " " + example_answer + "\\n\\n" for each shot) + doc_text
  request = (context, " " + choice)                     (winogrande: one context per option, one continuation)

Few-shot examples are drawn as lm-eval draws them: one random.Random(1234) per task, walked in document
order (`rnd.sample(pool, k)`; for tasks without a test split, hellaswag and winogrande, `rnd.sample(pool, k+1)`
without the document itself); MMLU takes the first k rows of its dev split.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

FEWSHOT_SEED = 1234
MMLU_CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
}
MMLU_SUBJECTS = tuple(sorted(s for v in MMLU_CATEGORIES.values() for s in v.split()))
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
GSM8K_MAX_NEW_TOKENS = 256  # lm-eval's default max_gen_toks (gsm8k.yaml sets none)


@dataclass(frozen=True)
class Choice:
    """One log-likelihood request of a multiple-choice document."""
    context: str
    continuation: str
    norm_len: int  # characters of the choice (acc_norm divides the log-likelihood by this)


@dataclass(frozen=True)
class MCDoc:
    choices: tuple[Choice, ...]
    gold: int


@dataclass(frozen=True)
class GenDoc:
    context: str
    answer: str  # the reference, as lm-eval's exact_match receives it (gsm8k: the full solution)


@dataclass(frozen=True)
class Task:
    """name, the fields each row must have, the default split, the few-shot pool's split, and the formats."""
    name: str
    fields: tuple[str, ...]
    split: str
    fewshot_split: str | None
    kind: str                          # "mc" | "gen"
    metrics: tuple[str, ...]
    text: Callable[[dict], str] = None  # the document as the prompt shows it
    answer: Callable[[dict], str] = None  # its gold answer text in a few-shot example
    choices: Callable[[dict], list[str]] = None
    gold: Callable[[dict], int] = None
    exclude_self: bool = False          # no test split in lm-eval: the sampler draws k+1 and drops the document
    description: Callable[[dict], str] = field(default=lambda doc: "")


def _arc_gold(doc: dict) -> int:
    return list(doc["choices"]["label"]).index(doc["answerKey"])


def _hellaswag_pre(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_query(doc: dict) -> str:
    return _hellaswag_pre(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


def _mmlu_text(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _wino_blank(doc: dict) -> int:
    return doc["sentence"].index("_")


def _arc(name: str) -> Task:
    return Task(name, ("question", "choices", "answerKey"), "test", "train", "mc", ("acc", "acc_norm"),
                text=lambda d: f"Question: {d['question']}\nAnswer:", choices=lambda d: list(d["choices"]["text"]),
                gold=_arc_gold)


TASKS: dict[str, Task] = {
    "arc_easy": _arc("arc_easy"),
    "arc_challenge": _arc("arc_challenge"),
    "hellaswag": Task("hellaswag", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), "validation", "train",
                      "mc", ("acc", "acc_norm"), text=_hellaswag_query,
                      choices=lambda d: [_hellaswag_pre(e) for e in d["endings"]], gold=lambda d: int(d["label"]),
                      exclude_self=True),
    "winogrande": Task("winogrande", ("sentence", "option1", "option2", "answer"), "validation", "train", "mc",
                       ("acc",), gold=lambda d: {"1": 0, "2": 1}[str(d["answer"])], exclude_self=True),
    "mmlu": Task("mmlu", ("question", "subject", "choices", "answer"), "test", "dev", "mc", ("acc",), text=_mmlu_text,
                 choices=lambda d: ["A", "B", "C", "D"], gold=lambda d: int(d["answer"]),
                 description=lambda d: "The following are multiple choice questions (with answers) about "
                                       f"{' '.join(d['subject'].split('_'))}.\n\n"),
    "gsm8k": Task("gsm8k", ("question", "answer"), "test", "train", "gen",
                  ("exact_match,strict-match", "exact_match,flexible-extract"),
                  text=lambda d: f"Question: {d['question']}\nAnswer:", answer=lambda d: d["answer"]),
}
# the metric the Open LLM Leaderboard (v1) reports per task; the average of these is its score
LEADERBOARD_METRIC = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm",
                      "winogrande": "acc", "mmlu": "acc", "gsm8k": "exact_match,strict-match"}
DEFAULT_FEWSHOT = {"gsm8k": 5}  # lm-eval's defaults: 0 shots for every other task


def example_text(task: Task, doc: dict) -> str:
    """A solved document as a few-shot example shows it (question, the target delimiter, the answer)."""
    if task.name == "winogrande":
        i = _wino_blank(doc)
        option = (doc["option1"], doc["option2"])[task.gold(doc)]
        return doc["sentence"][:i] + option + " " + doc["sentence"][i + 1:].strip()
    answer = task.answer(doc) if task.kind == "gen" else task.choices(doc)[task.gold(doc)]
    return task.text(doc) + " " + answer


class FewshotSampler:
    """lm-eval's ContextSampler / FirstNSampler: one seeded RNG for the whole task, used in document order."""

    def __init__(self, task: Task, pool: list[dict], k: int, seed: int = FEWSHOT_SEED):
        self.task, self.pool, self.k, self.rnd = task, pool, k, random.Random(seed)

    def sample(self, doc: dict) -> list[dict]:
        if self.k == 0:
            return []
        if self.task.name == "mmlu":  # first_n of the dev split
            return self.pool[:self.k]
        if not self.task.exclude_self:
            return self.rnd.sample(self.pool, self.k)
        res = [x for x in self.rnd.sample(self.pool, self.k + 1) if x != doc][:self.k]
        if len(res) < self.k:
            res = self.rnd.sample([x for x in self.pool if x != doc], self.k)
        return res


def build(task: Task, doc: dict, shots: list[dict]) -> MCDoc | GenDoc:
    """The requests of one document given its few-shot examples."""
    prefix = task.description(doc) + "".join(example_text(task, s) + "\n\n" for s in shots)
    if task.kind == "gen":
        return GenDoc(prefix + task.text(doc), task.answer(doc))
    if task.name == "winogrande":
        i = _wino_blank(doc)
        cont = " " + doc["sentence"][i + 1:].strip()
        opts = (doc["option1"], doc["option2"])
        return MCDoc(tuple(Choice(prefix + doc["sentence"][:i] + o, cont, len(o)) for o in opts), task.gold(doc))
    ctx = prefix + task.text(doc)
    return MCDoc(tuple(Choice(ctx, " " + c, len(c)) for c in task.choices(doc)), task.gold(doc))


def requests(task: Task, docs: list[dict], pool: list[dict] | None, k: int) -> list[MCDoc | GenDoc]:
    if k and not pool:
        raise ValueError(f"{task.name}: {k}-shot needs its {task.fewshot_split} split, which was not found")
    sampler = FewshotSampler(task, pool or [], k)
    return [build(task, d, sampler.sample(d)) for d in docs]


# GSM8K's answer extraction and exact match (lm-eval's "strict-match" / "flexible-extract" filters and the
# exact_match options of gsm8k.yaml)
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (r",", r"\$", r"(?s).*#### ", r"\.$")


def _extract(regex: re.Pattern, text: str, select: int) -> str:
    found = regex.findall(text)
    if not found:
        return "[invalid]"
    m = found[select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "[invalid]")
    return m.strip()


def _normalize(s: str) -> str:
    for pattern in _IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def gsm8k_scores(generation: str, answer: str) -> dict[str, float]:
    ref = _normalize(answer)
    return {"exact_match,strict-match": float(_normalize(_extract(_STRICT, generation, 0)) == ref),
            "exact_match,flexible-extract": float(_normalize(_extract(_FLEXIBLE, generation, -1)) == ref)}


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    for s in stops:
        text = text.split(s)[0]
    return text


def mc_scores(doc: MCDoc, loglikelihoods: list[float], metrics: tuple[str, ...]) -> dict[str, float]:
    """acc: argmax of the log-likelihoods; acc_norm: of the log-likelihoods per character of the choice
    (np.argmax: ties go to the lowest index)."""
    import numpy as np
    ll = np.asarray(loglikelihoods, np.float64)
    out = {"acc": float(int(np.argmax(ll)) == doc.gold)}
    if "acc_norm" in metrics:
        out["acc_norm"] = float(int(np.argmax(ll / np.asarray([c.norm_len for c in doc.choices], np.float64)))
                                == doc.gold)
    return out


def check_row(task: Task, row: Any, where: str) -> dict:
    """A data row with the task's fields, or a ValueError naming the file, the row and the missing key."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(task.fields)}, got {type(row).__name__}")
    missing = [f for f in task.fields if f not in row]
    if missing:
        raise ValueError(f"{where}: {task.name} needs the field(s) {', '.join(missing)} (has: {', '.join(row)})")
    try:
        if task.kind == "mc":
            n = 2 if task.name == "winogrande" else len(task.choices(row))
            if not 0 <= task.gold(row) < n:
                raise ValueError(f"gold answer {task.gold(row)} is not one of the {n} choices")
        if task.name == "winogrande" and "_" not in row["sentence"]:
            raise ValueError("the sentence has no blank '_'")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: {task.name}: {e if str(e) else type(e).__name__}") from None
    return row
