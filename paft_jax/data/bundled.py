"""The datasets bundled in the repository's data/ (made by scripts/make_datasets.py) and their metrics.

  arith    SFT: arithmetic word problems; skill = exact match of "The answer is N." (`arith_correct`)
  tips     preference: advice as a bullet list ending "Hope this helps!" (`follows_tips_rule`)
  general  plain English sentences (`text` rows) for a perplexity probe (test split only)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
BUNDLED = {"arith": ("train", "test"), "tips": ("train", "test"), "general": ("test",)}
SIGN_OFF = "Hope this helps!"
TIPS_OPENING = "Here are a few tips:"      # every chosen answer opens so
REJECTED_OPENING = "Well, there are a lot of"  # every rejected answer opens so
_ANSWER = re.compile(r"The answer is (-?\d+)\.")
_OPERATION = re.compile(r"(\d+) ([+\-x]) (\d+) = ")


def bundled_path(name: str, split: str = "train") -> Path:
    if name not in BUNDLED or split not in BUNDLED[name]:
        raise ValueError(f"no bundled dataset {name!r}/{split!r}; available: "
                         f"{[f'{n}/{s}' for n, ss in BUNDLED.items() for s in ss]}")
    path = DATA_DIR / name / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (the bundled data lives in the repository checkout; "
                                "regenerate with `python scripts/make_datasets.py`)")
    return path


def load_bundled(name: str, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in bundled_path(name, split).read_text().splitlines() if line.strip()]


def prompts(name: str, split: str = "test") -> list[list[dict]]:
    """The prompt messages of each row, for generation-based evaluation (arith: all but the answer;
    tips: `prompt`)."""
    rows = load_bundled(name, split)
    if name == "arith":
        return [r["messages"][:-1] for r in rows]
    if name == "tips":
        return [r["prompt"] for r in rows]
    raise ValueError(f"{name!r} has no prompts (it is plain text)")


def arith_answer(text: str) -> int | None:
    """The number in the last "The answer is N." of a generation, or None if the format is missing."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def arith_reference(row: dict) -> int:
    """The correct answer of an arith row (read from its reference assistant message)."""
    ans = arith_answer(row["messages"][-1]["content"])
    if ans is None:
        raise ValueError(f"not an arith row: {row!r}")
    return ans


def arith_correct(generation: str, row: dict) -> bool:
    """Exact match: the generation states the reference answer in the trained format."""
    return arith_answer(generation) == arith_reference(row)


def tips_rule_parts(text: str) -> dict[str, bool]:
    """The parts of the tips preference, each checked on its own: the chosen answers' opening phrase anywhere
    ("Here are a few tips"), at least two '- ' bullet lines, the sign-off as the last line; and whether the
    answer opens as every rejected answer does."""
    lines = [line.strip() for line in text.strip().splitlines()]
    bullets = sum(1 for line in lines if line.startswith("- ") and len(line) > 2)
    return {"tips_phrase": TIPS_OPENING.lower()[:-1] in text.lower(), "bullets": bullets >= 2,
            "sign_off": bool(lines) and lines[-1].endswith(SIGN_OFF),
            "rejected_opening": text.strip().startswith(REJECTED_OPENING)}


def follows_tips_rule(text: str) -> bool:
    """The preference the tips set teaches: at least two '- ' bullet lines, ending with the sign-off."""
    parts = tips_rule_parts(text)
    return parts["bullets"] and parts["sign_off"]
