"""`launch experiment`: config refusals, the pure pieces (win rate, the linear recipe), and the tiny run
end to end (every model evaluated, branch evals agree with the training loop's, a rerun redoes nothing)."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paft_jax.experiment.config import load_experiment_config
from paft_jax.experiment.evaluate import win_rate

TINY = "configs/experiments/tiny.yaml"


def test_win_rate_counts_ties_half():
    assert win_rate([True, False, True, False], [False, False, True, True]) == pytest.approx(0.5)
    assert win_rate([True, True], [False, False]) == 1.0
    assert win_rate([False, False], [True, False]) == 0.25
    with pytest.raises(ValueError, match="2 results against 1"):
        win_rate([True, False], [True])


def test_tips_rule_parts_separate_the_chosen_and_rejected_styles():
    from paft_jax.data.bundled import follows_tips_rule, load_bundled, tips_rule_parts
    for row in load_bundled("tips", "test")[:20]:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert tips_rule_parts(chosen) == {"tips_phrase": True, "bullets": True, "sign_off": True,
                                           "rejected_opening": False} and follows_tips_rule(chosen)
        assert tips_rule_parts(rejected) == {"tips_phrase": False, "bullets": False, "sign_off": False,
                                             "rejected_opening": True} and not follows_tips_rule(rejected)
    assert tips_rule_parts("Sure! Here are a few tips:\n1. **Plan**\n2. **Rest**") == {
        "tips_phrase": True, "bullets": False, "sign_off": False, "rejected_opening": False}


def test_score_generations_rates_and_win_rate_against_the_base():
    from paft_jax.experiment.config import GenerationTask
    from paft_jax.experiment.evaluate import score_generations
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"The answer is {n}."}]}
            for n in (3, 4, 5, 6)]
    task = GenerationTask(name="arith", path="unused", metric="arith")
    got = ["The answer is 3.", "The answer is 4.", "7", "The answer is 6."]
    base = ["The answer is 3.", "no", "The answer is 5.", "no"]
    res = score_generations([task], {"arith": rows}, {"arith": got}, {"arith": base})
    assert res["gen/arith/rate"] == 0.75 and res["gen/arith/n"] == 4
    assert res["gen/arith/win_rate_vs_base"] == (2 + 0.5 * 1) / 4   # 2 wins, 1 loss, 1 tie
    with pytest.raises(ValueError, match="3 generations"):
        score_generations([task], {"arith": rows}, {"arith": got[:3]}, {"arith": base})


@pytest.mark.parametrize("override, match", [
    ("merges.ties.densty=0.5", "unknown keys"),
    ("merges.ties.method=nope", "nope"),
    ("l1.l1_lambda=0", "l1_lambda must be > 0"),
    ("eval.generate=[{name: a, path: data/arith/test.jsonl, metric: bleu}]", "metric='bleu'"),
    ("paft_overrides.sft.optim.learning_rate=0", "learning_rate"),
    ("paft=configs/nope.yaml", "nope.yaml does not exist"),
    ("eval.tasks=[arc_esy]", "eval.tasks: unknown task 'arc_esy'; did you mean 'arc_easy'"),
    ("eval.task_limit=0", "task_limit=0"),
    ("eval.task_fewshot=-1", "eval.task_fewshot=-1 must be >= 0"),
])
def test_bad_config_is_refused_before_anything_loads(override, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_experiment_config(TINY, [override])


def test_linear_recipe_averages_the_two_deltas_not_the_base():
    from paft_jax.merge import load_recipe
    from paft_jax.merge.tree import merge_deltas
    cfg = load_experiment_config(TINY)
    spec = load_recipe(cfg.recipe("linear")).spec
    k = jax.random.split(jax.random.key(0), 3)
    base = {"w": jax.random.normal(k[0], (8, 4))}
    ds, dp = ({"w": 0.1 * jax.random.normal(kk, (8, 4))} for kk in k[1:])
    out = merge_deltas(base, [ds, dp, {"w": jnp.zeros((8, 4))}], spec)
    np.testing.assert_allclose(out["w"], base["w"] + 0.5 * (ds["w"] + dp["w"]), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_tiny_experiment_end_to_end_and_rerun(tmp_path):
    from paft_jax.experiment.run import model_names, run_experiment
    cfg = load_experiment_config(TINY, [f"output_dir={tmp_path}"])
    s = run_experiment(cfg, progress=False)
    names = model_names(cfg)
    assert list(s["models"]) == names and len(names) == 5 + 2 * 4
    base, sft = s["models"]["base"], s["models"]["sft"]
    # the base against itself: every pair ties (margin 0, accuracy 0, DPO loss log 2)
    assert base["pref/reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert base["pref/reward_accuracy"] == 0.0
    assert base["pref/loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the experiment's SFT evaluation is the training loop's held-out evaluation (same rows, same numerics)
    final = [r for r in map(json.loads, (tmp_path / "branches/sft/metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r][-1]
    assert sft["sft/loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert sft["sft/loss"] < base["sft/loss"]
    assert s["models"]["preference"]["pref/reward_accuracy"] > 0.5
    assert s["sparsity"]["sft_l1"]["exact_zero"] > s["sparsity"]["sft"]["exact_zero"]
    # sequential trained on top of the dense SFT model: its delta is its own, not the SFT one
    assert s["sparsity"]["sequential"]["mean_abs"] > 0
    md = (tmp_path / "results.md").read_text()
    assert md.count("| paft/") == 24  # three tables
    # the leaderboard tasks: each model scored on the same 2 documents per task, Table 1's columns
    for r in s["models"].values():
        assert 0 <= r["task/arc_easy/acc_norm"] <= 1 and r["task/winogrande/acc"] in (0.0, 0.5, 1.0)
        assert r["task/average"] == pytest.approx((r["task/arc_easy/acc_norm"] + r["task/winogrande/acc"]) / 2)
    assert "## Leaderboard tasks" in md and "| arc_easy (acc_norm) | winogrande (acc) | average |" in md
    gens = json.loads((tmp_path / "evals/sft.generations.json").read_text())
    assert [len(v) for v in gens.values()] == [4, 4] and s["models"]["sft"]["samples"]["arith"] == gens["arith"][:3]
    assert (tmp_path / "img/skill_vs_preference.png").stat().st_size > 0
    # a rerun trains nothing and evaluates nothing: every marker is reused as is
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("evals/*.json")}
    done = {p: p.read_text() for p in tmp_path.glob("branches/*/done.json")}
    s2 = run_experiment(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("evals/*.json")} == stamps
    assert {p: p.read_text() for p in tmp_path.glob("branches/*/done.json")} == done
    assert s2["models"] == json.loads(json.dumps(s["models"]))


def test_full_scale_config_is_consistent():
    """The documented Mistral-7B version loads, and its batches divide its meshes (nothing is run)."""
    cfg = load_experiment_config("configs/experiments/mistral_7b.yaml")
    tcs = cfg.branch_configs()
    assert set(tcs) == {"sft", "sft_l1", "preference", "sequential"}
    assert tcs["sft"].objective.l1_lambda == 0 and tcs["sft_l1"].objective.l1_mode == "proximal_adam"
    for tc in tcs.values():
        tc.validate(data_parallel=4)
        assert tc.data.batch_size % (tc.grad_accum * 4) == 0
    assert cfg.eval.batch_size % 4 == 0
