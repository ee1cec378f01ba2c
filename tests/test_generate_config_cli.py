"""Generation against transformers' greedy decoding; typed config refusals; every command has --help."""
import pytest

from conftest import make_hf_model
from paft_jax.config import MeshConfig, load_config
from paft_jax.generate import SamplingConfig, generate_ids
from paft_jax.hf.load import load_model
from paft_jax.launch import main
from paft_jax.models import ModelConfig


def test_greedy_generation_matches_transformers(tmp_path):
    import torch
    model = make_hf_model("llama", seed=3)
    model.save_pretrained(tmp_path / "m")
    lm = load_model(tmp_path / "m", with_tokenizer=False)
    prompts = [[5, 9, 17, 33, 4], [7, 8, 100]]  # different lengths: exercises left padding
    ours = generate_ids(lm.params, lm.cfg, prompts, SamplingConfig(max_new_tokens=12), eos_ids=())
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref


def test_sampling_is_seeded_and_stops_at_eos(tmp_path):
    model = make_hf_model("qwen2", seed=4)
    model.save_pretrained(tmp_path / "m")
    lm = load_model(tmp_path / "m", with_tokenizer=False)
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate_ids(lm.params, lm.cfg, [[3, 4, 5]], s)
    assert a == generate_ids(lm.params, lm.cfg, [[3, 4, 5]], s)
    greedy = generate_ids(lm.params, lm.cfg, [[3, 4, 5]], SamplingConfig(max_new_tokens=10))[0]
    stop = greedy[3]
    cut = generate_ids(lm.params, lm.cfg, [[3, 4, 5]], SamplingConfig(max_new_tokens=10), eos_ids=(stop,))[0]
    assert cut == greedy[:greedy.index(stop)]


def test_max_new_tokens_past_the_context_is_refused(tmp_path):
    """Bug 6 of issue 14: `generate --max-new-tokens 100000` ran on past the model's positions for minutes."""
    make_hf_model("llama", seed=3).save_pretrained(tmp_path / "m")   # max_position_embeddings 64
    lm = load_model(tmp_path / "m", with_tokenizer=False)
    prompt = [[5, 9, 17, 33, 4]]
    assert len(generate_ids(lm.params, lm.cfg, prompt, SamplingConfig(max_new_tokens=59), eos_ids=())[0]) == 59
    with pytest.raises(ValueError, match=r"max_new_tokens=60: the longest prompt \(5 tokens\).*context of 64 "
                                         r"positions; at most 59 new tokens fit"):
        generate_ids(lm.params, lm.cfg, prompt, SamplingConfig(max_new_tokens=60), eos_ids=())


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature=-1.0 must be >= 0"),
    (["--top-p", "0"], "--top-p=0.0 must be within (0, 1]"),
    (["--top-k", "-2"], "--top-k=-2 must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be an integer >= 1"),
])
def test_generate_refuses_bad_sampling_flags_before_loading(flags, message, monkeypatch):
    """Bug 8 of issue 14: `--temperature -1` was accepted."""
    import paft_jax.launch as launch
    monkeypatch.setattr(launch, "_load", lambda args: pytest.fail("loaded the model before refusing"))
    with pytest.raises(ValueError) as e:
        main(["generate", "--model", "smollm2", "--prompt", "hi", *flags])
    assert str(e.value).startswith(message)


def test_config_refuses_unknown_keys_and_bad_types(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data: 2\nfsdp: -1\ntensr: 2\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['tensr'\]"):
        load_config(MeshConfig, y)
    y.write_text("data: two\n")
    with pytest.raises(ValueError, match="data='two' does not match"):
        load_config(MeshConfig, y)
    y.write_text("data: 2\n")
    cfg = load_config(MeshConfig, y, ["tensor=2", "rules.embed=null"])
    assert (cfg.data, cfg.tensor, cfg.rules) == (2, 2, {"embed": None})
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=48)
    with pytest.raises(ValueError, match="rope_scaling type 'longrope'"):
        ModelConfig(rope_scaling=(("rope_type", "longrope"),))
    with pytest.raises(ValueError, match=r"rope_scaling of type 'yarn' needs \['original_max_position_embeddings'\]"):
        ModelConfig(rope_scaling=(("factor", 4.0), ("rope_type", "yarn")))


def test_unsupported_rope_is_refused_with_file_name():
    from paft_jax.hf.config import model_config_from_hf
    d = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "rope_scaling": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 32,
                          "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}
    with pytest.raises(ValueError, match=r"cfg\.json: rope type 'longrope' is not implemented"):
        model_config_from_hf(d, "cfg.json")


@pytest.mark.parametrize("argv", [[], ["export"], ["generate"], ["demo"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_cli_export_round_trip(tmp_path, capsys):
    model = make_hf_model("mistral_sliding", seed=5)
    model.save_pretrained(tmp_path / "m")
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--mesh",
                 "data=2,fsdp=2,tensor=2", "--atol", "1e-4"]) == 0
    assert "max |logits diff|" in capsys.readouterr().out
    assert (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["fsdp", "fsdp_tp", "tensor_parallel"])
def test_shipped_mesh_configs_load_and_build(name):
    from pathlib import Path
    from paft_jax.mesh import build_mesh
    cfg = load_config(MeshConfig, Path(__file__).parent.parent / "configs" / "mesh" / f"{name}.yaml")
    mesh = build_mesh(cfg)
    assert mesh.devices.size == 8
    cfg.logical_rules()


def test_generate_json_keeps_answers_apart(monkeypatch, capsys):
    """--json: one JSON line per prompt, so an answer holding a blank line cannot run into the next."""
    import json
    import types
    import paft_jax.launch as launch
    monkeypatch.setattr(launch, "_load", lambda args: types.SimpleNamespace(params=None, cfg=None, tokenizer=object(),
                                                                            source="fake"))
    import paft_jax.generate as gen
    monkeypatch.setattr(gen, "chat", lambda params, cfg, tok, prompts, sampling, system=None:
                        [f"first line\n\nof {p}" for p in prompts])
    assert main(["generate", "--model", "smollm2", "--prompt", "a", "--prompt", "b", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(l) for l in lines] == [{"prompt": "a", "answer": "first line\n\nof a"},
                                              {"prompt": "b", "answer": "first line\n\nof b"}]
