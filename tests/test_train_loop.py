"""The training loop and CLI on the tiny configs: metrics, evaluation, reference cache, loud refusals."""
import json
import math

import numpy as np
import pytest

from paft_jax.launch import main
from paft_jax.train.config import load_train_config
from paft_jax.train.loop import train


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    import struct
    from tensorboardX.proto import event_pb2
    out: dict = {}
    for f in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_sft_cli_runs_logs_and_evaluates(tmp_path, capsys, caplog):
    out = tmp_path / "sft"
    with caplog.at_level("INFO", logger="paft_jax"):
        assert main(["sft", "--config", "configs/tiny_sft.yaml", "steps=4", "eval_every=2", f"output_dir={out}",
                     "--no-progress", "log_every=2", "profile=2:3"]) == 0
    # without a bar: a line every log_every steps and at each evaluation, written as the metrics arrive
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[sft] ")]
    assert [ln.split(":")[0] for ln in lines] == ["[sft] step 2/4", "[sft] eval at step 2", "[sft] step 4/4"]
    assert "loss=" in lines[0] and "tokens_per_second=" in lines[0]
    # profile=2:3: a jax.profiler trace of steps 2-3 in the run directory
    assert list((out / "profile").rglob("*.xplane.pb"))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    for key in ("grad_norm", "learning_rate", "mean_token_accuracy", "num_tokens", "tokens_per_second",
                "model_tflops_per_second", "delta/zero_frac", "delta/near_zero_frac", "delta/mean_abs"):
        assert key in train_recs[0]
    # a dense delta after AdamW steps: zero only where no gradient ever arrived (embedding rows of unseen
    # tokens), a positive L1 norm
    last = train_recs[-1]
    assert 0 < last["delta/zero_frac"] < 0.5 and last["delta/near_zero_frac"] >= last["delta/zero_frac"]
    assert last["delta/mean_abs"] > 0
    # TensorBoard event files: every logged scalar, read back record by record (TFRecord framing)
    scalars = tensorboard_scalars(out / "tb")
    assert {"loss", "eval_loss", "delta/zero_frac", "grad_norm"} <= set(scalars)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert scalars["loss"][-1][1] == pytest.approx(train_recs[-1]["loss"], rel=1e-6)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert json.loads((out / "config.json").read_text())["objective"]["kind"] == "sft"


def test_logging_every_n_steps_records_the_same_metrics_for_every_step(tmp_path):
    """Metrics fetched from the device every 3 steps (the loop does not wait on the host in between) are
    those of fetching every step: each step's record, same values; only the clocks differ."""
    runs = {}
    for n in (1, 3):
        cfg = load_train_config("configs/tiny_sft.yaml", ["steps=4", "eval_data=null", f"log_every={n}",
                                                          f"output_dir={tmp_path / str(n)}"])
        train(cfg, progress=False)
        runs[n] = [r for r in map(json.loads, (tmp_path / str(n) / "metrics.jsonl").read_text().splitlines())
                   if "event" not in r]  # the steps' records (not the session's)
    clocks = {"tokens_per_second", "model_tflops_per_second", "time_start", "time_end"}
    assert [r["step"] for r in runs[3]] == [r["step"] for r in runs[1]] == [1, 2, 3, 4]
    for a, b in zip(runs[1], runs[3]):
        assert set(a) == set(b)
        same = {k: a[k] for k in a if k not in clocks}
        assert same == {k: b[k] for k in b if k not in clocks} and "loss" in same and "grad_norm" in same


def test_dpo_reference_cache_is_reused_and_matches_the_in_step_reference(tmp_path, caplog):
    common = ["steps=2", "optim.warmup_steps=0", "eval_data=null", f"cache_dir={tmp_path / 'cache'}", "data.batch_size=8"]
    cached = train(load_train_config("configs/tiny_dpo.yaml", common + ["ref_cache=true",
                                                                         f"output_dir={tmp_path / 'a'}"]),
                   progress=False).history
    files = list((tmp_path / "cache" / "ref_logps").glob("*.npz"))
    assert len(files) == 1
    inline = train(load_train_config("configs/tiny_dpo.yaml", common + ["ref_cache=false",
                                                                         f"output_dir={tmp_path / 'b'}"]),
                   progress=False).history
    # step 1: policy == reference, so sigmoid DPO is log 2 whether the reference is cached or in-step (the
    # policy and reference forwards are separate XLA computations on 8 devices: last-bit differences,
    # measured 3.6e-7; with equal log-probs the loss is exactly log 2, see test_losses)
    assert cached[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert inline[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert cached[1]["loss"] == pytest.approx(inline[1]["loss"], rel=1e-4)
    mtime = files[0].stat().st_mtime_ns
    with caplog.at_level("INFO", logger="paft_jax"):
        train(load_train_config("configs/tiny_dpo.yaml", common + ["steps=1", "ref_cache=true",
                                                                    f"output_dir={tmp_path / 'c'}"]), progress=False)
    assert any("reusing" in r.message for r in caplog.records)
    assert files[0].stat().st_mtime_ns == mtime
    # a different base (another seed) never picks up those values
    train(load_train_config("configs/tiny_dpo.yaml", common + ["steps=1", "seed=5", "ref_cache=true",
                                                                f"output_dir={tmp_path / 'd'}"]), progress=False)
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.npz"))) == 2


def test_micro_batched_reference_and_eval_passes_equal_the_whole_batch(tmp_path):
    """eval_micro_batch=8: the batches of 16 rows go through the reference and evaluation passes 8 rows at a
    time (a loop in the compiled programs, unrolled on these simulated devices: the forward appears once per
    micro-batch); the cached log-probs and the evaluation loss equal one forward of the whole batch."""
    import jax
    from paft_jax.mesh import build_mesh
    from paft_jax.models.config import ModelConfig
    from paft_jax.train.programs import abstract_programs
    runs = {}
    for m in (0, 8):
        cfg = load_train_config("configs/tiny_dpo.yaml", [
            "steps=1", "optim.warmup_steps=0", "ref_cache=true", "eval_every=1", "data.batch_size=16",
            "eval_data.batch_size=16", f"eval_micro_batch={m}", f"cache_dir={tmp_path / f'c{m}'}",
            f"output_dir={tmp_path / f'o{m}'}"])
        history = train(cfg, progress=False).history
        tables = {p.name: dict(np.load(p)) for p in (tmp_path / f"c{m}" / "ref_logps").glob("*.npz")}
        mcfg = ModelConfig(vocab_size=256, **cfg.model_config)
        loops = {name: fn.lower(*a).compile().as_text().count(" dot(")
                 for name, fn, a in abstract_programs(cfg, mcfg, build_mesh(cfg.mesh, devices=jax.devices()))}
        runs[m] = history, tables, loops
    (h0, t0, l0), (h8, t8, l8) = runs[0], runs[8]
    assert sorted(t0) == sorted(t8) and len(t0) == 2   # train and eval splits, the same cache keys
    for name in t0:
        np.testing.assert_array_equal(t0[name]["index"], t8[name]["index"])
        for key in ("chosen", "rejected"):
            np.testing.assert_allclose(t0[name][key], t8[name][key], rtol=1e-5, atol=1e-4)
    ev0, ev8 = [[r for r in h if "eval_loss" in r] for h in (h0, h8)]
    assert len(ev0) == len(ev8) == 1 and ev0[0]["eval_loss"] == pytest.approx(ev8[0]["eval_loss"], rel=1e-5)
    for name in ("eval_step", "reference_logps (train)"):   # the forward of each of the 2 micro-batches
        assert l8[name] == 2 * l0[name], (name, l0, l8)


@pytest.mark.parametrize("override,message", [
    ("optim.learnig_rate=1e-4", "did you mean optim.learning_rate"),
    ("optim.learning_rate=0", "learning_rate=0 must be > 0"),
    ("optim.learning_rate=-1e-5", "must be > 0"),
    ("data.batch_size=12", "not divisible by the data-parallel size 8"),
    ("delta.kind=lora", None),  # valid: no error expected from validation (see below)
    ("delta.lora_targets=[qproj]", "match no module"),
    ("objective.kind=dpo", "needs 'preference' data"),
    ("objective.loss_type=foo", "objective.loss_type='foo': expected one of"),   # bug 8 of issue 14
    ("objective.loss_type=hinge", "has no effect on objective.kind='sft'"),
    ("checkpoint.resume=maybe", "checkpoint.resume='maybe': expected auto, never"),
    ("eval_micro_batch=3", "eval_micro_batch=3: expected 0 or a multiple of the data-parallel size 8"),
    ("optim.schedule_steps=0", "optim.schedule_steps=0 must be >= 1"),
    ("optim.schedule_steps=1", "optim.warmup_steps=2 must be within [0, optim.schedule_steps=1]"),
    # tiny_sft's cosine decays to 0 (min_lr_ratio 0): steps past the horizon would train nothing
    ("optim.schedule_steps=5", "optim.schedule_steps=5 < steps=10 with a final lr of 0"),
])
def test_bad_config_refused_before_anything_loads(override, message, tmp_path, monkeypatch):
    import paft_jax.train.loop as loop
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    argv = ["train", "--config", "configs/tiny_sft.yaml", override, f"output_dir={tmp_path}", "--no-progress"]
    if override == "delta.lora_targets=[qproj]":
        argv.insert(3, "delta.kind=lora")
    if message is None:
        with pytest.raises(pytest.fail.Exception, match="loaded a model"):
            main(argv)
        return
    with pytest.raises(ValueError) as e:   # launch.cli prints it as one line `error: ...`
        main(argv)
    assert message in str(e.value)


def test_command_contradicting_the_config_is_refused(tmp_path, monkeypatch):
    import paft_jax.train.loop as loop
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(ValueError, match="contradicts"):
        main(["dpo", "--config", "configs/tiny_sft.yaml", "objective.kind=sft", f"output_dir={tmp_path}"])
    # bug 8 of issue 14: the command's kind silently replaced the config's
    for cmd, config in (("orpo", "configs/tiny_dpo.yaml"), ("simpo", "configs/tiny_dpo.yaml"),
                        ("dpo", "configs/tiny_sft.yaml"), ("sft", "configs/tiny_dpo.yaml")):
        with pytest.raises(ValueError, match=rf"{config} says objective.kind: \w+, which contradicts the `{cmd}`"):
            main([cmd, "--config", config, f"output_dir={tmp_path}"])
    # saying it on the command line is asking for it: validation goes on (and stops at the patched load)
    with pytest.raises(pytest.fail.Exception, match="loaded a model"):
        main(["orpo", "--config", "configs/tiny_dpo.yaml", "objective.kind=orpo", f"output_dir={tmp_path}",
              "--no-progress"])


def test_lora_branch_trains(tmp_path):
    cfg = load_train_config("configs/tiny_sft.yaml", [
        "steps=4", "eval_data=null", "delta.kind=lora", "delta.lora_rank=4", f"output_dir={tmp_path}",
        "optim.learning_rate=1e-2"])
    hist = train(cfg, progress=False).history
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert np.isfinite([h["loss"] for h in hist]).all()


@pytest.mark.parametrize("name", ["tiny_sft", "tiny_dpo", "smollm2_sft", "smollm2_dpo", "llama3_8b_sft",
                                  "llama3_8b_dpo", "mistral_7b_sft", "mistral_7b_dpo"])
def test_shipped_training_configs_validate(name):
    cfg = load_train_config(f"configs/{name}.yaml")
    sizes = cfg.mesh.axis_sizes()
    cfg.validate(data_parallel=sizes["data"] * max(sizes["fsdp"], 1))


def test_recorder_writes_every_step_in_order_and_stops_at_a_non_finite_loss():
    """The loop's metrics thread: records in step order (evaluations where they were queued), each step's
    time measured from when the one before it finished; a NaN loss is raised in the loop by drain()."""
    from paft_jax.train.recorder import MetricsRecorder
    got = []
    rec = MetricsRecorder(got.append, max_in_flight=2)
    t = 1000.0
    for i, loss in enumerate([3.0, 2.5]):
        rec.reserve()
        rec.step(i, {"loss": np.float32(loss)}, t + i, (10.0, 16), 1e9, None)
    rec.record({"step": 2, "eval_loss": 2.4})
    rec.drain()
    assert [(r["step"], "eval_loss" in r) for r in got] == [(1, False), (2, False), (2, True)]
    assert got[1]["time_start"] >= got[0]["time_end"] and got[0]["tokens"] == 16
    rec.reserve()
    rec.step(2, {"loss": np.float32("nan")}, t + 2, (10.0, 16), 1e9, None)
    with pytest.raises(FloatingPointError, match="step 3: loss is nan"):
        rec.reserve()  # the next step is not dispatched
        rec.reserve()
    with pytest.raises(FloatingPointError, match="step 3: loss is nan"):
        rec.drain()
    assert len(got) == 3  # nothing written after the bad step
    rec.close()



def test_evaluations_are_printed_above_the_progress_bar(tmp_path, capsys):
    assert main(["sft", "--config", "configs/tiny_sft.yaml", "steps=4", "eval_every=2", f"output_dir={tmp_path / 'r'}"]) == 0
    captured = capsys.readouterr()
    assert "[sft] eval at step 2: eval_loss=" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["step"] == 4
