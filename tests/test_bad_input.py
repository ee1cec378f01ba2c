"""Bad input is a clear error naming the file or tensor, and a failed export leaves nothing behind."""
import json
import os

import pytest

from paft_jax.hf.export import export_hf
from paft_jax.hf.load import load_model
from paft_jax.launch import main


def test_missing_config_json(hf_dir):
    d = hf_dir("llama")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(d, with_tokenizer=False)


def test_unknown_model_type(hf_dir):
    d = hf_dir("llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: model_type='gpt_neox' is not supported"):
        load_model(d, with_tokenizer=False)


def test_tensor_shape_disagrees_with_config(hf_dir):
    d = hf_dir("llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight "
                                         r"has shape \(96, 64\), but the config implies \(80, 64\)"):
        load_model(d, with_tokenizer=False)


def test_truncated_safetensors(hf_dir):
    d = hf_dir("llama")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(d, with_tokenizer=False)


def test_missing_and_unexpected_tensors(hf_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    d = hf_dir("llama")
    sd = load_file(d / "model.safetensors")
    sd2 = dict(sd)
    del sd2["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd2, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors .*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(d, with_tokenizer=False)
    sd["model.layers.0.extra_adapter.weight"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"refusing to drop weights silently.*extra_adapter"):
        load_model(d, with_tokenizer=False)


def test_pickled_weights_need_opt_in(hf_dir):
    import torch
    from safetensors.torch import load_file
    d = hf_dir("llama")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled pytorch_model\*\.bin .*--allow-pickle"):
        load_model(d, with_tokenizer=False)
    lm = load_model(d, with_tokenizer=False, allow_pickle=True)
    assert lm.cfg.num_layers == 2


def test_unwritable_output_directory(hf_dir, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/paft_cannot_write_here/out"  # root ignores mode bits; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "out")
    lm = load_model(hf_dir("llama"), with_tokenizer=False)
    with pytest.raises(OSError, match="paft_cannot_write_here|ro"):
        export_hf(lm.params, lm.cfg, target, hf_config=lm.hf_config)
    assert not os.path.exists(target)


def test_failed_export_leaves_nothing(hf_dir, tmp_path):
    lm = load_model(hf_dir("llama"), with_tokenizer=False)
    out = tmp_path / "out"
    broken = dict(lm.params)
    del broken["norm"]  # fails midway, after some shards were written
    with pytest.raises(KeyError):
        export_hf(broken, lm.cfg, out, hf_config=lm.hf_config, max_shard_size="20KB")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_export_refuses_non_empty_out_and_keeps_it(hf_dir, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        main(["export", "--model", str(hf_dir("llama")), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "precious"


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere", with_tokenizer=False)
