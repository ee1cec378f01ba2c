"""Every CLI command, given a representative user mistake, as a user runs it (`python -m paft_jax.launch ...`):
a non-zero exit, exactly one line on stderr starting with `error:`, and no traceback.

Each case fails before any model trains (a few seconds each).  JAX_PLATFORMS=cpu keeps libtpu (installed
in this environment) from probing for a TPU and logging its own warnings when a command touches devices.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
           TOKENIZERS_PARALLELISM="false")


def launch(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paft_jax.launch", *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    shown = f"rc={proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for f in fragments:
        assert f in lines[0], (f, shown)
    return lines[0]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Llama in HF format (no tokenizer)."""
    from conftest import make_hf_model
    root = tmp_path_factory.mktemp("hf")
    make_hf_model("llama").save_pretrained(root / "llama")
    make_hf_model("llama", seed=1).save_pretrained(root / "llama-2")
    return root / "llama"


def _compile_registered() -> bool:
    from paft_jax.launch import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return "compile" in sub.choices


# (argv, fragments the message must contain); {tmp} is the test's tmp_path, {hf} a tiny HF model
CASES = {
    "export-missing-model": (["export", "--model", "{tmp}/nope", "--out", "{tmp}/o"], ["{tmp}/nope"]),
    "export-model-and-checkpoint": (["export", "--model", "{hf}", "--checkpoint", "{tmp}/run", "--out", "{tmp}/o"],
                                    ["exactly one of --model or --checkpoint"]),
    "export-onto-its-input": (["export", "--model", "{hf}", "--out", "{hf}", "--overwrite"], ["{hf}"]),
    "export-empty-checkpoint-dir": (["export", "--checkpoint", "{tmp}/empty", "--out", "{tmp}/o"], ["{tmp}/empty"]),
    "export-bad-mesh": (["export", "--model", "{hf}", "--out", "{tmp}/o", "--mesh", "data=two"], ["--mesh"]),
    "generate-missing-model": (["generate", "--model", "{tmp}/nope", "--prompt", "hi"], ["{tmp}/nope"]),
    "generate-negative-temperature": (["generate", "--model", "{hf}", "--prompt", "hi", "--temperature", "-1"],
                                      ["--temperature=-1"]),
    "generate-no-prompt": (["generate", "--model", "{hf}"], ["--prompt"]),
    "demo-zero-tokens": (["demo", "--max-new-tokens", "0"], ["max_new_tokens=0"]),
    "train-no-config": (["train"], ["--config"]),
    "train-missing-config": (["train", "--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    "train-unknown-key": (["train", "--config", "configs/tiny_sft.yaml", "stepz=3"], ["did you mean steps"]),
    "train-bad-yaml-override": (["train", "--config", "configs/tiny_sft.yaml", "steps=[3"], ["steps=[3", "YAML"]),
    "train-missing-model": (["train", "--config", "configs/tiny_sft.yaml", "model={tmp}/nope",
                             "output_dir={tmp}/run"], ["{tmp}/nope"]),
    "train-output-under-a-file": (["train", "--config", "configs/tiny_sft.yaml", "output_dir={tmp}/file/run"],
                                  ["{tmp}/file/run"]),
    "train-resume-maybe": (["train", "--config", "configs/tiny_sft.yaml", "checkpoint.resume=maybe",
                            "output_dir={tmp}/run"], ["checkpoint.resume='maybe'"]),
    "sft-bad-lr": (["sft", "--config", "configs/tiny_sft.yaml", "optim.learning_rate=0"], ["learning_rate"]),
    "sft-scan-unroll-zero": (["sft", "--config", "configs/tiny_sft.yaml", "scan_unroll=0"], ["scan_unroll=0"]),
    "sft-loss-type": (["sft", "--config", "configs/tiny_sft.yaml", "objective.loss_type=foo"], ["loss_type='foo'"]),
    "dpo-on-sft-config": (["dpo", "--config", "configs/tiny_sft.yaml"], ["contradicts the `dpo` command"]),
    "orpo-on-dpo-config": (["orpo", "--config", "configs/tiny_dpo.yaml"], ["contradicts the `orpo` command"]),
    "simpo-unknown-key": (["simpo", "--config", "configs/tiny_dpo.yaml", "objective.kind=simpo",
                           "objective.simpo_gama=1"], ["simpo_gamma"]),
    "paft-split": (["paft", "--config", "configs/paft_tiny.yaml", "split=[9,9]", "output_dir={tmp}/p"], ["split"]),
    "paft-branch-key": (["paft", "--config", "configs/paft_tiny.yaml", "sft.stepz=3", "output_dir={tmp}/p"],
                        ["did you mean sft.steps"]),
    "paft-missing-config": (["paft", "--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    "paft-unknown-eval-task": (["paft", "--config", "configs/paft_tiny.yaml", "eval_tasks=[arc_eazy]",
                                "output_dir={tmp}/p"], ["eval_tasks: unknown task 'arc_eazy'", "did you mean 'arc_easy'"]),
    "paft-merge-on-mesh": (["paft", "--config", "configs/paft_tiny.yaml", "merge.on_mesh=maybe", "output_dir={tmp}/p"],
                           ["merge.on_mesh='maybe'", "true, false or auto"]),
    "paft-eval-limit-zero": (["paft", "--config", "configs/paft_tiny.yaml", "eval_tasks=[arc_easy]", "eval_limit=0",
                              "output_dir={tmp}/p"], ["eval_limit=0"]),
    "paft-eval-missing-data": (["paft", "--config", "configs/paft_tiny.yaml", "eval_tasks=[winogrande]",
                                "eval_data_dir={tmp}/nodata", "output_dir={tmp}/p"], ["winogrande: eval_data_dir {tmp}/nodata: no such"]),
    "experiment-bad-merge": (["experiment", "--config", "configs/experiments/tiny.yaml", "merges.ties.method=nope",
                              "output_dir={tmp}/e"], ["nope"]),
    "data-stats-missing-config": (["data-stats", "--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    "data-stats-unknown-key": (["data-stats", "--config", "configs/tiny_sft.yaml", "sequence_len=3"],
                               ["sequence_len"]),
    "data-stats-hub-without-type": (["data-stats", "--config", "configs/tiny_sft.yaml",
                                     "sources=[{name: org/set, split: train}]"], ["type: hf_hub"]),
    "data-stats-bad-tokenizer": (["data-stats", "--config", "configs/tiny_sft.yaml", "--tokenizer", "{tmp}/nope"],
                                 ["--tokenizer {tmp}/nope"]),
    "merge-missing-recipe": (["merge", "--config", "{tmp}/nope.yaml", "--out", "{tmp}/m"], ["nope.yaml"]),
    "merge-verification-mismatch": (["merge", "--method", "ties", "--base", "{hf}", "--model", "{hf}-2",
                                     "--atol", "1e-12", "--out", "{tmp}/m"], ["transformers' logits differ"]),
    "merge-bad-method": (["merge", "--method", "tie", "--base", "{hf}", "--model", "{hf}-2", "--out", "{tmp}/m"],
                         ["unknown merge method 'tie'"]),
    "merge-bad-key": (["merge", "--method", "ties", "--base", "{hf}", "--model", "{hf}-2", "--param", "lamda=1",
                       "--out", "{tmp}/m"], ["lamda"]),
    "merge-weights-count": (["merge", "--method", "ties", "--base", "{hf}", "--model", "{hf}-2", "--weight", "1",
                             "--weight", "2", "--weight", "3", "--out", "{tmp}/m"], ["--weight given 3 times"]),
    "sparsity-missing-model": (["sparsity", "--base", "{hf}", "--model", "{tmp}/nope"], ["{tmp}/nope"]),
    "compile-missing-config": (["compile", "--config", "{tmp}/nope.yaml"], ["nope.yaml"]),
    "eval-unknown-task": (["eval", "--model", "{hf}", "--tasks", "arc_easy,hellaswg"], ["did you mean 'hellaswag'"]),
    "eval-limit-zero": (["eval", "--model", "{hf}", "--tasks", "arc_easy", "--limit", "0"], ["--limit 0"]),
    "eval-missing-split": (["eval", "--model", "{hf}", "--tasks", "winogrande", "--split", "train"],
                           ["winogrande: no train split"]),
    "eval-no-tokenizer": (["eval", "--model", "{hf}", "--tasks", "winogrande", "--limit", "1"],
                          ["the model has no tokenizer"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistake_is_one_line(case, tmp_path, tiny_hf):
    if case.startswith("compile") and not _compile_registered():
        pytest.skip("no compile command in this checkout")
    argv, fragments = CASES[case]
    (tmp_path / "file").write_text("a file, not a directory\n")
    (tmp_path / "empty").mkdir()
    fill = {"{tmp}": str(tmp_path), "{hf}": str(tiny_hf)}

    def sub(s: str) -> str:
        for k, v in fill.items():
            s = s.replace(k, v)
        return s
    t0 = time.perf_counter()
    proc = launch(*[sub(a) for a in argv])
    assert_one_line_error(proc, *[sub(f) for f in fragments])
    assert time.perf_counter() - t0 < 120, "a user mistake must be refused before anything trains"
    if case == "export-onto-its-input":  # refused, and nothing of the input was removed
        assert (tiny_hf / "config.json").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = launch("--debug", "train", "--config", tmp_path / "nope.yaml")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr
    # anywhere on the command line; the exit code stays a user's mistake's (2)
    proc = launch("train", "--config", "configs/tiny_sft.yaml", "stepz=3", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "did you mean steps" in proc.stderr


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    """An exception that is not a user's mistake (a TypeError of ours) propagates from cli() unchanged."""
    from paft_jax import launch as launch_mod

    def broken(argv):
        raise TypeError("a bug of ours")
    with pytest.raises(TypeError, match="a bug of ours"):
        launch_mod.cli(["train"], entry=broken)

    def user(argv):
        raise FileNotFoundError(2, "No such file or directory", "/x/y.yaml")
    assert launch_mod.cli([], entry=user) == 2
    assert capsys.readouterr().err == "error: /x/y.yaml: No such file or directory\n"

    def multi(argv):
        raise ValueError("first\n  second")
    assert launch_mod.cli([], entry=multi) == 2
    assert capsys.readouterr().err == "error: first; second\n"


def test_paft_bad_merge_key_fails_before_anything_loads(tmp_path):
    """Bug 2: a bad merge setting is refused when the PAFT config is read, not after both branches trained."""
    for override, fragment in (("merge.method=tie", "unknown merge method 'tie'"),
                               ("merge.sft.densty=0.5", "merge.sft.parameters: ['densty']"),
                               ("merge.preference.density=[{filter: mlp, value: 0}]", "density=0 is outside"),
                               ("merge.parameters={lamda: 1}", "lamda"),
                               ("merge.dtype=fp8", "dtype='fp8'")):
        out = tmp_path / "run"
        t0 = time.perf_counter()
        proc = launch("paft", "--config", "configs/paft_tiny.yaml", "--no-progress", override, f"output_dir={out}")
        wall = time.perf_counter() - t0
        assert_one_line_error(proc, fragment)
        assert not out.exists(), f"{override}: created {out} before refusing"
        assert wall < 30, f"{override}: {wall:.1f}s to refuse (training ran?)"
        print(f"{override}: refused in {wall:.1f}s")


def test_output_files_and_data_paths_are_checked_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """eval --output and sparsity --json/--plot somewhere unwritable, a training data path that does not
    exist: refused before a model loads (none may), and a refused training run leaves no output_dir."""
    from paft_jax import launch
    from paft_jax.train import loop
    from paft_jax.hf import load
    from paft_jax.merge import sparsity

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(loop, "load_base", no_load)
    monkeypatch.setattr(load, "load_model", no_load)
    monkeypatch.setattr(sparsity, "analyze", no_load)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert launch.cli(["eval", "--model", "smollm2", "--tasks", "arc_easy", "--limit", "2",
                        "--output", str(blocker / "r.json")]) == 2
    assert "--output" in capsys.readouterr().err
    assert launch.cli(["sparsity", "--base", str(tmp_path), "--model", str(tmp_path),
                        "--plot", str(tmp_path)]) == 2
    assert "--plot" in capsys.readouterr().err
    out = tmp_path / "run"
    assert launch.cli(["sft", "--config", "configs/tiny_sft.yaml", f"output_dir={out}",
                        "data.sources=[{path: data/arith/nope.jsonl}]"]) == 2
    err = capsys.readouterr().err
    assert "data.sources[0]: data/arith/nope.jsonl: no such file or directory" in err
    assert not out.exists()


def test_a_second_ctrl_c_is_one_line_and_exit_130(capsys):
    """The first SIGINT saves after the step in flight; a second one interrupts at once (KeyboardInterrupt
    from the handler): one line saying how to resume, exit code 130, no traceback (--debug keeps it)."""
    from paft_jax import launch as launch_mod

    def interrupted(argv):
        raise KeyboardInterrupt
    assert launch_mod.cli(["sft"], entry=interrupted) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted at once by a second Ctrl-C") and err.count("\n") == 1
    with pytest.raises(KeyboardInterrupt):
        launch_mod.cli(["sft", "--debug"], entry=interrupted)


def test_a_missing_checkpoint_step_lists_the_steps_there(tmp_path):
    from paft_jax.train.restore import locate
    for s in (2, 4):
        (tmp_path / "checkpoints" / str(s)).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"checkpoints/7: no such checkpoint step; .*holds steps 2, 4"):
        locate(tmp_path / "checkpoints" / "7")


def test_misspelled_split_and_tokenizer_get_a_suggestion():
    from paft_jax.evals.data import load_split
    from paft_jax.evals.tasks import TASKS
    from paft_jax.train.base import resolve_tokenizer
    with pytest.raises(FileNotFoundError, match="did you mean --split validation"):
        load_split(TASKS["arc_easy"], "validaton", None)
    with pytest.raises(ValueError, match="did you mean 'llama3-test'"):
        resolve_tokenizer("llama3_test", None)


def test_a_split_with_no_candidate_says_why():
    """4 chips of one host (v4-8) in steps of 4: no two-way split exists; the message says so instead of
    ending at a colon."""
    from paft_jax.pipeline.split import choose_split
    with pytest.raises(ValueError, match=r"4 devices in steps of 4 \(whole processes\) cannot be split between two "
                                         r"branches: run on at least 8 devices, or use mode=sequential"):
        choose_split(4, [1.0, 1.0], [None, None], granularity=4)
