"""A rerun of a run directory: it continues the run, refuses settings that change what was trained (naming
them), allows those that may change on resume, never rewrites the saved config or repeats metric rows, and
`--fresh` starts a new directory beside it."""
import json

import pytest

from paft_jax.launch import main
from paft_jax.train.config import resume_conflicts

TINY = ["--config", "configs/tiny_sft.yaml", "--no-progress", "eval_every=0", "eval_batches=1",
        "checkpoint.save_every=2", "checkpoint.async_save=false", "optim.warmup_steps=0"]


def test_resume_conflicts_names_result_changing_keys_only():
    saved = {"steps": 10, "optim": {"learning_rate": 3e-3, "b1": 0.9}, "mesh": {"fsdp": 8}, "seed": 0,
             "data": {"sources": [{"path": "a.jsonl"}]}, "old_key": 1}
    new = {"steps": 20, "optim": {"learning_rate": 1e-4, "b1": 0.9}, "mesh": {"fsdp": 4}, "seed": 0,
           "data": {"sources": [{"path": "b.jsonl"}]}, "new_key": 2}
    assert resume_conflicts(saved, new) == ["data.sources: [{'path': 'a.jsonl'}] -> [{'path': 'b.jsonl'}]",
                                            "optim.learning_rate: 0.003 -> 0.0001"]
    assert resume_conflicts(saved, saved) == []
    # tuples and lists are the same once saved as JSON
    assert resume_conflicts({"x": [1, 2]}, {"x": (1, 2)}) == []
    # a dotted key may change (how the log-softmax is chunked), its siblings not
    obj = {"objective": {"kind": "dpo", "logits_chunk": 8192, "beta": 0.1}}
    assert resume_conflicts(obj, {"objective": {"kind": "dpo", "logits_chunk": "auto", "beta": 0.2}}) == \
        ["objective.beta: 0.1 -> 0.2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("rerun") / "sft"
    assert main(["sft", *TINY, "steps=2", f"output_dir={out}"]) == 0
    return out


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_changed_learning_rate_is_refused_naming_it_and_nothing_is_rewritten(finished):
    before = (finished / "config.json").read_text(), (finished / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"optim\.learning_rate: 0\.003 -> 0\.0001.*--fresh"):
        main(["sft", *TINY, "steps=2", "optim.learning_rate=1e-4", f"output_dir={finished}"])
    assert ((finished / "config.json").read_text(), (finished / "metrics.jsonl").read_text()) == before


def test_rerun_of_a_finished_run_trains_and_logs_nothing(finished, capsys, caplog):
    before = (finished / "metrics.jsonl").read_text()
    with caplog.at_level("INFO", logger="paft_jax"):
        assert main(["sft", *TINY, "steps=2", f"output_dir={finished}"]) == 0
    captured = capsys.readouterr()
    assert "already trained to step 2" in caplog.text
    assert (finished / "metrics.jsonl").read_text() == before  # no duplicate eval row
    assert json.loads(captured.out.strip().splitlines()[-1])["step"] == 2  # the run's final numbers


def test_steps_below_the_checkpoint_are_refused(finished):
    with pytest.raises(ValueError, match="is at step 2, past steps=1"):
        main(["sft", *TINY, "steps=1", f"output_dir={finished}"])


def test_more_steps_continue_and_fresh_starts_beside(finished, tmp_path):
    import shutil
    run = tmp_path / "sft"
    shutil.copytree(finished, run)
    # allowed changes (the run's cosine decays to 0 at step 2: going on means stretching it, said explicitly)
    assert main(["sft", *TINY, "steps=3", "optim.schedule_steps=3", "eval_batches=2", f"output_dir={run}"]) == 0
    recs = rows(run)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 3]
    assert json.loads((run / "config.json").read_text())["steps"] == 3
    # each session recorded its start, then the same with its end: the report adds them up (pipeline/report.py)
    from paft_jax.pipeline.report import sessions
    assert [(r["step"], "end" in r) for r in recs if r.get("event") == "session"] == \
        [(0, False), (0, True), (2, False), (2, True)]
    (s1, e1), (s2, e2) = sessions(recs)
    assert s1 < e1 <= s2 < e2
    # --fresh with a changed setting: a new run directory beside, the old one untouched
    assert main(["sft", *TINY, "--fresh", "steps=2", "optim.learning_rate=1e-4", f"output_dir={run}"]) == 0
    fresh = tmp_path / "sft-2"
    assert json.loads((fresh / "config.json").read_text())["optim"]["learning_rate"] == 1e-4
    assert [r["step"] for r in rows(fresh) if "loss" in r] == [1, 2]
    assert json.loads((run / "config.json").read_text())["optim"]["learning_rate"] == 3e-3


def lrs(out) -> dict[int, float]:
    return {r["step"]: r["learning_rate"] for r in rows(out) if "learning_rate" in r}


def test_more_steps_keep_the_lr_schedule_the_run_was_trained_with(tmp_path):
    """A rerun with a larger `steps` resumes mid-schedule: it may not stretch the cosine decay unasked (the lr
    would jump up at the resumed step); with optim.schedule_steps at the first run's horizon the decay ends
    where it did and the new steps train at the final lr, learning_rate x min_lr_ratio."""
    from paft_jax.train.optim import OptimConfig, schedule
    run = tmp_path / "sft"
    args = ["sft", *TINY, "optim.min_lr_ratio=0.1", f"output_dir={run}"]
    assert main([*args, "steps=3"]) == 0
    first = lrs(run)
    before = (run / "config.json").read_text(), (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"checkpoint .*/3: steps=5 would change the lr schedule this run was "
                                         r"trained with \(cosine decay ending at step 3, now 5\); to go on, set "
                                         r"optim\.schedule_steps=3 to keep it \(steps past 3 at its final lr, "
                                         r"0\.0003\), or optim\.schedule_steps=5 to stretch it"):
        main([*args, "steps=5"])
    assert ((run / "config.json").read_text(), (run / "metrics.jsonl").read_text()) == before
    assert main([*args, "steps=5", "optim.schedule_steps=3"]) == 0
    got = lrs(run)
    assert sorted(got) == [1, 2, 3, 4, 5] and {s: got[s] for s in first} == first
    kept = schedule(OptimConfig(learning_rate=3e-3, min_lr_ratio=0.1, schedule_steps=3), 5)
    assert [got[s] for s in range(1, 6)] == pytest.approx([float(kept(s - 1)) for s in range(1, 6)], rel=1e-6)
    assert got[4] == got[5] == pytest.approx(3e-4, rel=1e-6)  # the final lr, held: no jump at the resumed step
    assert all(b <= a for a, b in zip([got[s] for s in range(1, 6)], [got[s] for s in range(2, 6)]))
    # the saved horizon is explicit now: a later rerun must name it again (or another one) to change steps
    with pytest.raises(ValueError, match=r"steps=6 would change .*ending at step 3, now 6"):
        main([*args, "steps=6"])


def test_generate_reads_a_run_directory_as_its_export_would(finished, tmp_path, capsys):
    """`generate --model RUN` (and --checkpoint RUN) answer with base + delta: the same greedy tokens as the
    branch's HF export; the export names the tokenizer's special tokens."""
    args = ["--prompt", "What is 2 + 3?", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(["generate", "--model", str(finished), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(finished / "checkpoints"), *args]) == 0
    assert capsys.readouterr().out == from_run
    assert main(["export", "--checkpoint", str(finished), "--out", str(tmp_path / "hf"), "--no-verify"]) == 0
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 4  # the llama3-test tokenizer's
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 4
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out == from_run
