"""HF -> paft_jax -> HF: every tensor bit-identical, sharded output, transformers loads and agrees."""
import json

import jax
import numpy as np
import pytest
from safetensors import safe_open

from paft_jax.config import MeshConfig
from paft_jax.hf.export import export_hf
from paft_jax.hf.load import load_model
from paft_jax.hf.verify import flax_logits, probe_batch, verify_export
from paft_jax.mesh import build_mesh


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


@pytest.mark.parametrize("variant,dtype", [("llama", None), ("qwen2_tied", None), ("llama", "bfloat16"),
                                           ("mistral", "bfloat16"), ("qwen2_mixed", None), ("qwen3", None),
                                           ("gemma3", None), ("gemma3", "bfloat16"), ("olmo2", None),
                                           ("olmo3", "bfloat16"), ("smollm3", None)])
def test_round_trip_bit_identical(hf_dir, tmp_path, variant, dtype):
    import torch
    src = hf_dir(variant, dtype=dtype)
    mcfg = MeshConfig(data=2, fsdp=2, tensor=2)
    lm = load_model(src, mesh=build_mesh(mcfg), rules=mcfg.logical_rules(), with_tokenizer=False)
    assert lm.cfg.param_dtype == (dtype or "float32")
    out = tmp_path / "export"
    # a small shard size forces several shards and an index
    export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = _tensors(src), _tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k]), k
    ids, mask = probe_batch(lm.cfg.vocab_size)
    report = verify_export(out, flax_logits(lm.params, lm.cfg, ids, mask), ids, mask, atol=1e-4)
    assert report.max_abs_diff <= 1e-4
    for name in ("config.json", "generation_config.json", "README.md"):
        assert (out / name).exists()


def test_export_in_another_dtype_verifies(hf_dir, tmp_path):
    lm = load_model(hf_dir("llama"), with_tokenizer=False)
    out = tmp_path / "bf16"
    export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ids, mask = probe_batch(lm.cfg.vocab_size)
    verify_export(out, flax_logits(lm.params, lm.cfg, ids, mask, as_dtype="bfloat16"), ids, mask, atol=1e-4)


def test_verify_catches_a_wrong_export(hf_dir, tmp_path):
    from paft_jax.hf.verify import ExportMismatchError
    lm = load_model(hf_dir("llama"), with_tokenizer=False)
    out = tmp_path / "e"
    export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config)
    bad = jax.tree_util.tree_map(lambda x: x, lm.params)
    bad["layers"]["mlp"]["up_proj"]["kernel"] = bad["layers"]["mlp"]["up_proj"]["kernel"] * 1.01
    ids, mask = probe_batch(lm.cfg.vocab_size)
    with pytest.raises(ExportMismatchError, match="differ"):
        verify_export(out, flax_logits(bad, lm.cfg, ids, mask), ids, mask, atol=1e-4)


def test_streaming_writer_is_read_by_safetensors(tmp_path):
    import ml_dtypes
    from paft_jax.hf.st_io import SafetensorsFile, write_streaming
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((5,), ml_dtypes.bfloat16),
              "c": np.zeros((0, 3), np.float16)}
    write_streaming(tmp_path / "x.safetensors", [(k, v.shape, v.dtype) for k, v in arrays.items()],
                    lambda k: arrays[k], {"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for k, v in arrays.items():
        assert f.get(k).dtype == v.dtype and np.array_equal(f.get(k), v)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as st:
        assert st.metadata() == {"format": "pt"}
        assert st.get_tensor("a").sum().item() == 66
