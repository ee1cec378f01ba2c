"""Markdown tables of models' scores, laid out as the paper's Table 1 (one row per model, one column per
task, then the average); used by the PAFT report and the experiment's results."""
from __future__ import annotations

from paft_jax.evals.tasks import LEADERBOARD_METRIC


def task_columns(models: dict) -> list[tuple[str, str, str]]:
    """(key, header, format) of the leaderboard tasks the models were scored on (the leaderboard's metric of
    each, in %) and their average."""
    first = next(iter(models.values()))
    tasks = [t for t in LEADERBOARD_METRIC if f"task/{t}/{LEADERBOARD_METRIC[t]}" in first]
    cols = [(f"task/{t}/{LEADERBOARD_METRIC[t]}", f"{t} ({LEADERBOARD_METRIC[t].split(',')[0]})", "{:.1%}")
            for t in tasks]
    return cols + [("task/average", "average", "{:.1%}")] if cols else []


def table(models: dict, cols: list[tuple[str, str, str]]) -> str:
    """`models`: {row name: {key: value}}; a missing value is an empty cell."""
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, r in models.items():
        cells = [c[2].format(r[c[0]]) if r.get(c[0]) is not None else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
