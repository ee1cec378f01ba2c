"""The PAFT run report: report.json (everything measured), report.md (the reading), img/*.png (loss
curves, the two branches' step timelines, delta sparsity)."""
from __future__ import annotations

import json
from pathlib import Path

from paft_jax.pipeline import split as split_lib
from paft_jax.pipeline.config import BRANCHES, PaftConfig


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_intervals(records: list[dict]) -> list[tuple[float, float]]:
    return [(r["time_start"], r["time_end"]) for r in records if "time_start" in r]


def restarts(records: list[dict]) -> list[float]:
    """When a branch was resumed from a checkpoint (the loop's `event: resumed` rows)."""
    return [r["time"] for r in records if r.get("event") == "resumed"]


def sessions(records: list[dict]) -> list[tuple[float, float]]:
    """(start, end) of each session that trained the branch (a first run, then each resume), from the loop's
    `event: session` records: written as a session starts and again with its end when it ends; a session
    killed outright (SIGKILL, a lost machine) has only the first, and ends here with its last step kept."""
    spans: dict[float, list] = {}  # start -> [end, ended explicitly]
    current = None
    for r in records:
        if r.get("event") == "session":
            current = spans.setdefault(r["start"], [r["start"], False])
            if "end" in r:
                current[:] = [r["end"], True]
        elif current is not None and not current[1] and "time_end" in r:
            current[0] = max(current[0], r["time_end"])
    return [(start, end) for start, (end, _) in spans.items()]


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the intervals."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> dict:
    """How much the two branches' steps ran at the same time: seconds of wall time during which both
    had a step in flight, and for each branch the share of its step time spent overlapping the other."""
    def intersect(x, y):
        out, i, j = [], 0, 0
        x, y = sorted(x), sorted(y)
        while i < len(x) and j < len(y):
            s, e = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
            if s < e:
                out.append((s, e))
            if x[i][1] < y[j][1]:
                i += 1
            else:
                j += 1
        return out

    both = union_length(intersect(a, b))
    return {"both_stepping_s": both,
            "sft_share": both / max(union_length(a), 1e-9) if a else 0.0,
            "preference_share": both / max(union_length(b), 1e-9) if b else 0.0}


def _last(records: list[dict], key: str):
    vals = [r[key] for r in records if key in r]
    return vals[-1] if vals else None


def _first(records: list[dict], key: str):
    vals = [r[key] for r in records if key in r]
    return vals[0] if vals else None


def summarize(cfg: PaftConfig, tcs: dict, plan, trained: dict, merge: dict, answers: list[dict], mcfg,
              total_s: float, local: Path | None = None) -> dict:
    """`local`: where the branches' metrics.jsonl are (a gs:// run's mirror; default: output_dir).  Wall
    times add up the sessions of a resumed run (the time between them not counted); a run whose metrics
    predate session records gets its last session's (done.json)."""
    local = Path(cfg.output_dir) if local is None else Path(local)
    metrics = {n: read_metrics(local / n / "metrics.jsonl") for n in BRANCHES}
    spans = {n: sessions(metrics[n]) for n in BRANCHES}
    branches = {}
    for n in BRANCHES:
        rec, done = metrics[n], trained["branches"].get(n) or {}
        evals = [r for r in rec if any(k.startswith("eval_") for k in r)]
        est = split_lib.estimate(tcs[n], mcfg)
        branches[n] = {
            "objective": tcs[n].objective.kind, "from_adapter": done.get("from_adapter"),
            "steps": 0 if done.get("from_adapter") else tcs[n].steps, "l1_lambda": tcs[n].objective.l1_lambda,
            "devices": done.get("devices"), "processes": done.get("processes"), "mesh": done.get("mesh"),
            "wall_s": sum(e - s for s, e in spans[n]) if spans[n] else done.get("wall_s"),
            "sessions": len(spans[n]) or (1 if done else 0),
            "start": done.get("start"), "end": done.get("end"), "resumed_from": done.get("resumed_from"),
            "estimated_tflop": est.total / 1e12, "step_tflop": est.step_flops / 1e12,
            "first_loss": _first(rec, "loss"), "last_loss": _last(rec, "loss"),
            "eval_first": {k: v for k, v in (evals[0] if evals else {}).items() if k.startswith("eval_")},
            "eval_last": {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")},
            "mean_step_s": (sum(e - s for s, e in step_intervals(rec)) / max(len(step_intervals(rec)), 1)),
            "tokens_per_second": _mean([r["tokens_per_second"] for r in rec if "tokens_per_second" in r]),
        }
    a, b = (step_intervals(metrics[n]) for n in BRANCHES)
    starts = [branches[n]["start"] for n in BRANCHES if branches[n]["start"]]
    ends = [branches[n]["end"] for n in BRANCHES if branches[n]["end"]]
    t0 = min(starts) if starts else None
    return {
        "mode": cfg.mode, "schedule": cfg.schedule if cfg.mode == "parallel" else "serial",
        "output_dir": str(cfg.output_dir), "base": tcs["sft"].model,
        "devices": len(plan.devices), "split": plan.counts,
        "estimate": ({"sft_tflop": plan.works[0] / 1e12, "preference_tflop": plan.works[1] / 1e12,
                      "ideal_devices": split_lib.ideal_counts(plan.works, len(plan.devices)),
                      "predicted_end": split_lib.predicted_end(plan.works, plan.counts)}
                     if all(plan.works) else None),  # None: a branch imported from an adapter (not split)
        "branches": branches,
        "training_wall_s": (union_length(spans["sft"] + spans["preference"]) if all(spans.values()) else
                            (max(ends) - t0) if starts and ends else None),
        "branch_wall_sum_s": sum(branches[n]["wall_s"] or 0 for n in BRANCHES),
        "end_s": {n: (branches[n]["end"] - t0) if t0 and branches[n]["end"] else None for n in BRANCHES},
        "overlap": overlap(a, b),
        "merge": merge, "answers": answers, "pipeline_wall_s_this_invocation": total_s,
    }


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def write_report(out: Path, summary: dict) -> dict[str, Path]:
    """Into the local directory `out` (a gs:// run's mirror: the caller uploads the files)."""
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    paths = {"loss": plot_losses(out, img / "loss.png"), "timeline": plot_timeline(out, img / "timeline.png")}
    rep = (summary.get("merge") or {}).pop("sparsity", None)  # computed by the merge stage (merge.json)
    if rep is not None:
        from paft_jax.merge.sparsity import plot
        summary["sparsity"] = {k: rep[k] for k in ("tolerances", "tolerance_kind", "total", "modules")}
        paths["sparsity"] = plot(rep, img / "sparsity.png", names=list(BRANCHES))
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["md"] = out / "report.md"
    paths["md"].write_text(markdown(summary))
    return paths


def markdown(s: dict) -> str:
    br = s["branches"]
    lines = [f"# PAFT run: {s['output_dir']}", "",
             f"- Mode: **{s['mode']}** (schedule: {s['schedule']}); base: `{s['base']}`; {s['devices']} devices.",
             ]
    if s["mode"] == "parallel" and s["estimate"] is None:
        lines.append("- Device split: none; a branch was imported from an adapter, the other trained on every device.")
    elif s["mode"] == "parallel":
        e = s["estimate"]
        lines += [f"- Device split sft / preference: **{s['split'][0]} / {s['split'][1]}** "
                  f"(estimated work {e['sft_tflop']:.2f} / {e['preference_tflop']:.2f} TFLOP; proportional share "
                  f"{e['ideal_devices'][0]:.2f} / {e['ideal_devices'][1]:.2f} devices; predicted end times on "
                  f"independent devices {e['predicted_end'][0]:.2f} / {e['predicted_end'][1]:.2f} of the later)."]
    ends = s["end_s"]
    if all(v is not None for v in ends.values()):
        lines.append(f"- Measured end times (s after the first branch started): sft {ends['sft']:.1f}, "
                     f"preference {ends['preference']:.1f}.")
    if s["training_wall_s"] is not None:
        resumed = max((b.get("sessions", 1) for b in br.values()), default=1) > 1
        lines.append(f"- Training wall time: **{s['training_wall_s']:.1f} s**" +
                     (" (all sessions: the first run and its resumes, not the time between them)" if resumed
                      else "") + "; the branches' own wall times (set-up, compile, steps, evaluation) sum to "
                     f"{s['branch_wall_sum_s']:.1f} s.")
    ov = s["overlap"]
    lines.append(f"- Overlap: both branches had a step in flight for {ov['both_stepping_s']:.1f} s "
                 f"({ov['sft_share']:.0%} of sft's step time, {ov['preference_share']:.0%} of preference's).")
    lines += ["", "| branch | objective | steps | devices | wall s (sessions) | mean step s | tokens/s | "
              "loss first -> last | held-out first -> last |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for n, b in br.items():
        ev = _eval_text(b)
        if b.get("from_adapter"):
            lines.append(f"| {n} | LoRA adapter `{b['from_adapter']}` (imported, not trained here) | 0 | | | | | | |")
            continue
        lines.append(f"| {n} | {b['objective']}{' +L1 ' + format(b['l1_lambda'], 'g') if b['l1_lambda'] else ''} "
                     f"| {b['steps']} | {len(b['devices'] or [])} | {_f(b['wall_s'])} ({b.get('sessions', 1)}) "
                     f"| {_f(b['mean_step_s'], 2)} "
                     f"| {_f(b['tokens_per_second'])} | {_f(b['first_loss'], 4)} -> {_f(b['last_loss'], 4)} | {ev} |")
    m = s.get("merge") or {}
    lines += ["", "## Merge and export", "",
              f"- {m.get('method')} merge written to `{m.get('dir')}` in {_f(m.get('seconds'))} s "
              f"({m.get('tensors')} tensors; " + (f"on the devices, mesh {m['mesh']})." if m.get("mesh")
                                                 else "streamed on one device).")]
    if m.get("verified"):
        lines.append(f"- Loaded in transformers: max |logit diff| vs paft_jax {m['verify_max_abs_diff']:.2e} "
                     f"(atol {m['verify_atol']:g}).")
    lines += ["", "```yaml", (m.get("recipe") or "").rstrip(), "```"]
    sp = s.get("sparsity")
    if sp:
        lines += ["", "## Delta sparsity", "", "| branch | exact zeros | " +
                  " | ".join(f"abs(d) <= {t:g} x abs(base)" if sp["tolerance_kind"] == "relative"
                             else f"abs(d) <= {t:g}" for t in sp["tolerances"]) + " | changes the bf16 weight |",
                  "| --- | ---: | " + " | ".join("---:" for _ in sp["tolerances"]) + " | ---: |"]
        inputs = sp.get("inputs") or [{} for _ in BRANCHES]
        for i, n in enumerate(BRANCHES):
            t, d = sp["total"]["models"][i], inputs[i]
            n = f"{n} (LoRA rank {d['rank']}, materialized)" if d.get("delta") == "lora" else n
            lines.append(f"| {n} | {t['zero_frac']:.1%} | " +
                         " | ".join(f"{t['under_frac'][format(x, 'g')]:.1%}" for x in sp["tolerances"]) +
                         f" | {t['bf16_visible_frac']:.1%} |")
        if sp["total"].get("sign_agreement") is not None:
            lines.append(f"\nWhere both deltas are nonzero, their signs agree on "
                         f"{sp['total']['sign_agreement']:.1%} of entries.")
    board = s.get("leaderboard")
    if board:
        from paft_jax.evals.table import table, task_columns
        docs = ", ".join(f"{t} {n}" for t, n in board["documents"].items())
        shots = ", ".join(f"{t} {k}" for t, k in board["shots"].items())
        lines += ["", "## Leaderboard tasks (lm-eval's prompts and metrics)", "",
                  table(board["models"], task_columns(board["models"])), "",
                  f"Documents per task: {docs}; shots: {shots}; scored in {_f(board['wall_s'])} s. Standard errors "
                  "in leaderboard.json (`task/<name>/<metric>_stderr`)."]
    if s.get("answers"):
        lines += ["", "## The merged model answers (transformers, greedy)", ""]
        for a in s["answers"]:
            lines += [f"**Q:** {a['prompt']}", "", f"**A:** {a['answer'].strip()}", ""]
    lines += ["", "![loss](img/loss.png)", "", "![timeline](img/timeline.png)"]
    if sp:
        lines += ["", "![sparsity](img/sparsity.png)"]
    return "\n".join(lines) + "\n"


def headline(s: dict) -> str:
    """A few lines for the terminal: what each branch learned, sparsity, timing."""
    lines = []
    for n, b in s["branches"].items():
        lines.append(f"  {n:<10} {b['objective']:<5} held-out: {_eval_text(b)}")
    sp = s.get("sparsity")
    if sp:
        z = [sp["total"]["models"][i]["zero_frac"] for i in range(2)]
        v = [sp["total"]["models"][i]["bf16_visible_frac"] for i in range(2)]
        lines.append(f"  delta exact zeros: sft {z[0]:.1%}, preference {z[1]:.1%}; entries that change the "
                     f"bf16 weight: sft {v[0]:.1%}, preference {v[1]:.1%}")
    board = s.get("leaderboard")
    if board:
        lines.append("  leaderboard average: " + ", ".join(f"{row} {100 * r['task/average']:.1f}"
                                                          for row, r in board["models"].items()))
    if s.get("training_wall_s") is not None:
        lines.append(f"  training wall {s['training_wall_s']:.0f}s; both branches stepping at once for "
                     f"{s['overlap']['both_stepping_s']:.0f}s; merged model in {s['merge'].get('dir')}")
    return "\n".join(lines)


def _eval_text(b: dict) -> str:
    first, last = b["eval_first"], b["eval_last"]
    keys = [k for k in ("eval_loss", "eval_mean_token_accuracy", "eval_rewards/accuracies", "eval_rewards/margins")
            if k in last]
    same = first == last  # evaluated once (at the end)
    return ", ".join(f"{k[5:]} {_f(last[k], 3)}" if same else f"{k[5:]} {_f(first.get(k), 3)} -> {_f(last[k], 3)}"
                     for k in keys) or "-"


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot_losses(out: Path, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, n in zip(axes, BRANCHES):
        rec = read_metrics(out / n / "metrics.jsonl")
        tr = [(r["step"], r["loss"]) for r in rec if "loss" in r and "time_start" in r]
        ev = [(r["step"], r["eval_loss"]) for r in rec if "eval_loss" in r]
        if tr:
            ax.plot(*zip(*tr), label="train loss", lw=1)
        if ev:
            ax.plot(*zip(*ev), "o-", label="held-out loss")
        acc = [(r["step"], r["eval_rewards/accuracies"]) for r in rec if "eval_rewards/accuracies" in r]
        handles = ax.get_legend_handles_labels()[0]
        if acc:
            ax2 = ax.twinx()
            ax2.plot(*zip(*acc), "s--", color="tab:green", label="held-out reward accuracy")
            ax2.set_ylim(0, 1.05)
            handles += ax2.get_legend_handles_labels()[0]
        ax.set_title(n)
        ax.set_xlabel("step")
        if handles:  # one legend for both axes, below the plot: it never covers a point
            ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
                      frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(out: Path, path: Path) -> Path:
    """Each branch's steps as bars on one wall-clock axis: overlap is visible, not assumed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ivs = {n: step_intervals(read_metrics(out / n / "metrics.jsonl")) for n in BRANCHES}
    t0 = min((iv[0][0] for iv in ivs.values() if iv), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for row, (n, iv) in enumerate(ivs.items()):
        ax.broken_barh([(s - t0, e - s) for s, e in iv], (row - 0.35, 0.7),
                       facecolors="tab:blue" if n == "sft" else "tab:orange", edgecolor="white", linewidth=0.5)
        for t in restarts(read_metrics(out / n / "metrics.jsonl")):  # a resumed branch: mark the gap
            before = max((e for s, e in iv if e <= t), default=None)
            if before is not None:
                ax.axvspan(before - t0, t - t0, ymin=row / len(ivs), ymax=(row + 1) / len(ivs), color="0.85",
                           hatch="//", edgecolor="0.6", lw=0)
            ax.axvline(t - t0, ymin=row / len(ivs), ymax=(row + 1) / len(ivs), color="k", ls="--", lw=0.8)
            ax.annotate("resumed", (t - t0, row + 0.38), fontsize=7, ha="left", va="bottom")
    ax.set_yticks(range(len(ivs)), list(ivs))
    ax.set_xlabel("seconds since the first training step")
    ax.set_title("train steps of each branch over wall time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
