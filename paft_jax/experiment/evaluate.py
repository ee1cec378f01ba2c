"""Every model of the experiment evaluated the same way, on held-out rows (pure passes, no training):

  skill       the SFT branch's eval_data: token-mean loss and token accuracy; greedy generations
              scored by a rule (arith: exact match of "The answer is N.")
  preference  the preference branch's eval_data: DPO implicit rewards beta * (log pi - log base) with the
              *base* as the reference for every model (TRL's rewards/accuracies and margins), and greedy
              generations scored by a rule (tips: bullets + sign-off), with the win rate against the base
  general     perplexity on plain held-out text (data/general): what a recipe costs elsewhere
  tasks       `eval.tasks`: the leaderboard tasks with lm-eval's prompts and metrics (paft_jax.evals), and
              the average of the leaderboard's metric per task, as in the paper's Table 1

The base's reference log-probs and generations are computed once; a model is a full parameter pytree.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from paft_jax.config import from_dict
from paft_jax.data.bundled import arith_correct, follows_tips_rule, tips_rule_parts
from paft_jax.data.config import DataConfig
from paft_jax.data.loader import make_loader, one_pass, to_global
from paft_jax.experiment.config import EvalConfig, GenerationTask
from paft_jax.generate import SamplingConfig, chat_messages
from paft_jax.train import objectives
from paft_jax.train.config import TrainConfig, eval_view
from paft_jax.train.objectives import ObjectiveConfig
from paft_jax.train.step_fn import batch_spec, make_logp_fn, model_variables


def _batches(dcfg: DataConfig, tokenizer, batch_size: int, max_batches: int) -> list[dict]:
    view = dataclasses.replace(eval_view(dcfg), batch_size=batch_size)
    return list(one_pass(make_loader(view, tokenizer), max_batches))


def rule_score(task: GenerationTask, text: str, row: dict) -> bool:
    return arith_correct(text, row) if task.metric == "arith" else follows_tips_rule(text)


def win_rate(passed: list[bool], base_passed: list[bool]) -> float:
    """Pairwise against the base on the same prompts: a win is passing the rule where the base fails, a
    loss the reverse; ties (both pass or both fail) count half.  0.5 = no better than the base."""
    if len(passed) != len(base_passed) or not passed:
        raise ValueError(f"win_rate: {len(passed)} results against {len(base_passed)} base results")
    wins = sum(a and not b for a, b in zip(passed, base_passed))
    losses = sum(b and not a for a, b in zip(passed, base_passed))
    return (wins + 0.5 * (len(passed) - wins - losses)) / len(passed)


def score_generations(tasks: list[GenerationTask], rows: dict[str, list[dict]], texts: dict[str, list[str]],
                      base_texts: dict[str, list[str]]) -> dict[str, float]:
    """Rule scores of one model's generations (and of each part of the tips format), and the win rate against
    the base's generations on the same prompts.  Pure: rerunning the experiment rescores stored generations."""
    res: dict[str, float] = {}
    for task in tasks:
        got, base, rs = texts[task.name], base_texts[task.name], rows[task.name]
        if not (len(got) == len(base) == len(rs)):
            raise ValueError(f"generate[{task.name}]: {len(got)} generations, {len(base)} of the base, {len(rs)} rows")
        passed = [rule_score(task, t, r) for t, r in zip(got, rs)]
        res[f"gen/{task.name}/rate"] = sum(passed) / len(passed)
        res[f"gen/{task.name}/win_rate_vs_base"] = win_rate(passed, [rule_score(task, t, r) for t, r in zip(base, rs)])
        res[f"gen/{task.name}/n"] = len(passed)
        if task.metric == "tips":  # each part of the format on its own: how far a model moved toward it
            parts = [tips_rule_parts(t) for t in got]
            for k in parts[0]:
                res[f"gen/{task.name}/{k}"] = sum(p[k] for p in parts) / len(parts)
    return res


def _prompt_messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"][:-1]
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class Evaluator:
    def __init__(self, base_params: Any, mcfg, tokenizer, tcs: dict[str, TrainConfig], ecfg: EvalConfig, mesh, rules):
        self.mcfg, self.tok, self.ecfg, self.mesh = mcfg, tokenizer, ecfg, mesh
        sft_tc, pref_tc = tcs["sft"], tcs["preference"]
        if sft_tc.eval_data is None or pref_tc.eval_data is None:
            raise ValueError("the experiment evaluates on the branches' eval_data: set eval_data for both branches")
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        if ecfg.batch_size % dp:
            raise ValueError(f"eval.batch_size={ecfg.batch_size} is not divisible by the data-parallel size {dp}")
        self.sft_obj = ObjectiveConfig(kind="sft")
        self.pref_obj = ObjectiveConfig(kind="dpo", beta=pref_tc.objective.beta)
        general = from_dict(DataConfig, {"kind": "sft", "batch_size": ecfg.batch_size, **ecfg.general}, "eval.general.")
        self.data = {"sft": _batches(sft_tc.eval_data, tokenizer, ecfg.batch_size, ecfg.sft_batches),
                     "preference": _batches(pref_tc.eval_data, tokenizer, ecfg.batch_size, ecfg.preference_batches),
                     "general": _batches(general, tokenizer, ecfg.batch_size, ecfg.general_batches)}
        self.rows = {t.name: read_rows(t) for t in ecfg.generate}
        self.sharding = jax.sharding.NamedSharding(mesh, batch_spec(rules))
        logp_fn = make_logp_fn(mcfg, mesh, rules, sft_tc.objective.logits_chunk)  # one for every pass

        def sums(ocfg):
            def f(params, batch):
                return objectives.micro_loss(ocfg, logp_fn, params, None, batch, objectives.batch_totals(ocfg, batch))[1]
            return jax.jit(f)
        self._sft_sums, self._pref_sums = sums(self.sft_obj), sums(self.pref_obj)
        self._ref = jax.jit(lambda p, b: objectives.reference_pair_logps(logp_fn, p, b))
        # the base as every model's reference: its log-probs once per preference batch
        ref = objectives.reference_params(base_params)
        self.ref_logps = [jax.device_get(self._ref(ref, self._put(b))) for b in self.data["preference"]]
        self.base_generations = self.generate(base_params)
        self.tasks, self.scorer = [], None
        if ecfg.tasks:  # documents, few-shot contexts and their tokens once, for every model
            from paft_jax.evals import run as tasks_run
            from paft_jax.evals.engine import Scorer
            self.tasks = tasks_run.prepare(ecfg.tasks, split=None, limit=ecfg.task_limit,
                                           num_fewshot=ecfg.task_fewshot, data_dir=ecfg.task_data_dir)
            self.scorer = Scorer(base_params, mcfg, tokenizer, mesh, rules, ecfg.task_batch_size)
            tasks_run.tokenize(self.tasks, self.scorer)

    def _put(self, batch: dict) -> dict:
        return to_global(batch, self.mesh, self.sharding)

    def _total(self, fn, params, batches, extra=None) -> dict[str, float]:
        total = None
        for i, b in enumerate(batches):
            if extra is not None:
                rc, rr = extra[i]
                b = dict(b, ref_chosen=np.asarray(rc), ref_rejected=np.asarray(rr))
            s = jax.device_get(fn(params, self._put(b)))
            total = s if total is None else jax.tree_util.tree_map(np.add, total, s)
        return {k: float(v) for k, v in total.items()}

    def generate(self, params) -> dict[str, list[str]]:
        """Greedy answers per generation task."""
        out = {}
        for task in self.ecfg.generate:
            rows, texts = self.rows[task.name], []
            sampling = SamplingConfig(max_new_tokens=task.max_new_tokens)
            for i in range(0, len(rows), task.batch_size):
                chunk = rows[i:i + task.batch_size]
                texts += chat_messages(params, self.mcfg, self.tok, [_prompt_messages(r) for r in chunk], sampling)
            out[task.name] = texts
        return out

    def evaluate(self, params) -> dict[str, Any]:
        """All metrics of one model (full params in the base's layout and compute dtype)."""
        variables = model_variables(params)  # read as stored, cast to the compute dtype, as in training
        s = self._total(self._sft_sums, variables, self.data["sft"])
        sft = objectives.finalize(self.sft_obj, s)
        p = self._total(self._pref_sums, variables, self.data["preference"], self.ref_logps)
        pref = objectives.finalize(self.pref_obj, p)
        g = self._total(self._sft_sums, variables, self.data["general"])
        res: dict[str, Any] = {
            "sft/loss": float(sft["loss"]), "sft/token_accuracy": float(sft["mean_token_accuracy"]),
            "sft/tokens": int(s["tokens"]),
            "pref/loss": float(pref["loss"]), "pref/reward_accuracy": float(pref["rewards/accuracies"]),
            "pref/reward_margin": float(pref["rewards/margins"]), "pref/rewards_chosen": float(pref["rewards/chosen"]),
            "pref/rewards_rejected": float(pref["rewards/rejected"]), "pref/pairs": int(p["pairs"]),
            "general/nll": float(g["nll"] / max(g["tokens"], 1.0)), "general/tokens": int(g["tokens"]),
        }
        res["general/perplexity"] = math.exp(res["general/nll"])
        if self.tasks:
            res.update(self.leaderboard(params))
        generations = self.generate(params)
        res.update(score_generations(self.ecfg.generate, self.rows, generations, self.base_generations))
        res["generations"] = generations
        return res

    def leaderboard(self, params) -> dict[str, float]:
        """`task/<name>/<metric>` and its `_stderr` for every metric of every task, and `task/average`: the
        mean of the leaderboard's metric per task (LEADERBOARD_METRIC)."""
        from paft_jax.evals import run as tasks_run
        from paft_jax.evals.tasks import LEADERBOARD_METRIC
        self.scorer.params = params
        rep = tasks_run.score(self.tasks, self.scorer, params, self.mcfg, self.tok, self.ecfg.task_batch_size,
                              progress=False)["results"]
        out = {f"task/{name}/{m}": float(v) for name, r in rep.items() if name in self.ecfg.tasks
               for m, v in r.items() if isinstance(v, float)}
        out["task/average"] = float(np.mean([rep[t][LEADERBOARD_METRIC[t]] for t in self.ecfg.tasks]))
        return out


def read_rows(task: GenerationTask) -> list[dict]:
    path = Path(task.path)
    if not path.exists():
        raise FileNotFoundError(f"eval.generate[{task.name}].path: {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" not in row and "prompt" not in row:
            raise ValueError(f"{path}: row {i + 1} has neither `messages` nor `prompt` to generate from")
        if task.metric == "arith" and "messages" not in row:
            raise ValueError(f"{path}: row {i + 1}: the arith metric needs `messages` with the reference answer")
        rows.append(row)
        if len(rows) == task.rows:
            break
    return rows
