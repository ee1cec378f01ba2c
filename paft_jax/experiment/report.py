"""results.json, results.md and the plots of an experiment run."""
from __future__ import annotations

from pathlib import Path

from paft_jax.evals.table import table, task_columns


COLUMNS = [  # (key, header, format)
    ("sft/loss", "skill loss", "{:.3f}"), ("sft/token_accuracy", "skill token acc", "{:.3f}"),
    ("pref/reward_accuracy", "reward acc", "{:.2f}"), ("pref/reward_margin", "reward margin", "{:.2f}"),
    ("general/perplexity", "general ppl", "{:.2f}"),
]


def gen_columns(models: dict) -> list[tuple[str, str, str]]:
    """Per generation task: the rule's pass rate, the win rate against the base, then any rule parts."""
    first = next(iter(models.values()))
    cols = []
    for t in sorted({k.split("/")[1] for k in first if k.startswith("gen/") and k.endswith("/rate")}):
        cols += [(f"gen/{t}/rate", f"{t} rule", "{:.0%}"), (f"gen/{t}/win_rate_vs_base", f"{t} win vs base", "{:.2f}")]
        cols += [(k, f"{t}: {k.split('/')[2].replace('_', ' ')}", "{:.0%}") for k in first
                 if k.startswith(f"gen/{t}/") and k.split("/")[2] not in ("rate", "win_rate_vs_base", "n")]
    return cols


def sparsity_table(sparsity: dict) -> str:
    keys = [k for k in next(iter(sparsity.values())) if k.startswith("abs_le_")]
    lines = ["| delta | exact zeros | " + " | ".join(f"abs <= {k[7:]}" for k in keys)
             + " | changes the bf16 weight | mean abs |",
             "| --- | ---: |" + " ---: |" * len(keys) + " ---: | ---: |"]
    for name, s in sparsity.items():
        vis = f"{s['bf16_visible']:.1%}" if "bf16_visible" in s else "n/a"  # results.json of older runs
        lines.append(f"| {name} | {s['exact_zero']:.1%} | " + " | ".join(f"{s[k]:.1%}" for k in keys)
                     + f" | {vis} | {s['mean_abs']:.3g} |")
    return "\n".join(lines)


def markdown(s: dict) -> str:
    trained = s["trained"]
    train_s = sum(t.get("wall_s") or 0 for t in trained.values())
    eval_s = sum(r.get("eval_s") or 0 for r in s["models"].values())
    lines = [f"# Experiment results ({s['config']['output_dir']})", "",
             f"Base: {s['base']}; {s['devices']} device(s), mesh {s['mesh']}.",
             f"Training (sum over the four runs): {train_s / 60:.1f} min; evaluation (sum over models): "
             f"{eval_s / 60:.1f} min; this invocation: {s['wall_s_this_run'] / 60:.1f} min.", "",
             "## Held-out likelihoods", "", table(s["models"], COLUMNS), "",
             *(["## Leaderboard tasks (lm-eval's prompts and metrics)", "", table(s["models"], task_columns(s["models"])), "",
                f"Documents per task (MMLU: per subject): {_limits(s['config']['eval']['task_limit'])}; standard errors in "
                "results.json (`task/<name>/<metric>_stderr`).", ""] if task_columns(s["models"]) else []),
             "## Greedy generations, scored by rule", "", table(s["models"], gen_columns(s["models"])), "",
             "## Delta sparsity", "", sparsity_table(s["sparsity"]), "",
             "![skill vs preference](img/skill_vs_preference.png)", "", "![sparsity](img/sparsity.png)", ""]
    return "\n".join(lines)


def _limits(limit) -> str:
    if isinstance(limit, dict):
        return ", ".join(f"{t} {n}" for t, n in limit.items()) + "; any other task: all"
    return str(limit or "all")


def write_results(rd, s: dict) -> None:
    """`rd`: the run's RunDir (paft_jax.rundir)."""
    out = rd.local
    rd.write_json("results.json", s)
    (out / "img").mkdir(exist_ok=True)
    try:
        plot_tradeoff(s["models"], out / "img" / "skill_vs_preference.png")
        plot_sparsity(s["sparsity"], out / "img" / "sparsity.png")
    except ImportError:  # matplotlib is optional at run time
        pass
    (out / "results.md").write_text(markdown(s))


def plot_tradeoff(models: dict, path: Path) -> None:
    """Skill (SFT eval loss, lower is better) against preference (reward accuracy vs the base), one point
    per model: the alignment tax is a move away from the lower right corner."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for name, r in models.items():
        marker = "o" if not name.startswith("paft/") else ("s" if name.endswith("/l1") else "^")
        ax.scatter(r["sft/loss"], r["pref/reward_margin"], marker=marker, s=50)
        ax.annotate(name, (r["sft/loss"], r["pref/reward_margin"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("skill: held-out SFT loss (lower is better)")
    ax.set_ylabel("preference: held-out reward margin vs the base (higher is better)")
    ax.set_title("Skill vs preference (triangles: PAFT, dense SFT delta; squares: PAFT, L1 SFT delta)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sparsity(sparsity: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    keys = ["exact_zero"] + [k for k in next(iter(sparsity.values())) if k.startswith("abs_le_")]
    names = list(sparsity)
    x = np.arange(len(names))
    w = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for j, k in enumerate(keys):
        ax.bar(x + j * w, [100 * sparsity[n][k] for n in names], w, label=k.replace("abs_le_", "|d| <= "))
    ax.set_xticks(x + w * (len(keys) - 1) / 2, names)
    ax.set_ylabel("% of delta entries")
    ax.set_title("Delta sparsity per branch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
