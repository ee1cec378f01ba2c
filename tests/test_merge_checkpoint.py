"""A branch checkpoint stands where mergekit takes a model path: the merge reads its delta directly."""
import numpy as np
from safetensors.numpy import load_file

from paft_jax.hf.export import export_hf
from paft_jax.launch import main
from paft_jax.merge import load_recipe, merge_to_hf
from paft_jax.mesh import build_mesh
from paft_jax.train.config import load_train_config
from paft_jax.train.base import load_base
from paft_jax.train.loop import train


def tensors(d):
    out = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_checkpoint_input_equals_its_exported_model(tmp_path):
    cfg = load_train_config("configs/tiny_sft.yaml", ["steps=2", "eval_data=null", "optim.warmup_steps=0",
                                                      "optim.learning_rate=1e-2", f"output_dir={tmp_path / 'run'}"])
    mesh = build_mesh(cfg.mesh)
    base = load_base(cfg, mesh, cfg.mesh.logical_rules())
    train(cfg, mesh=mesh, base=base, progress=False)
    export_hf(base.params, base.cfg, tmp_path / "base", tokenizer=base.tokenizer)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "sft"), "--no-verify"]) == 0
    outs = {}
    for name, model in (("ckpt", tmp_path / "run"), ("hf", tmp_path / "sft")):
        recipe = load_recipe({"merge_method": "ties", "base_model": str(tmp_path / "base"),
                              "models": [{"model": str(model), "parameters": {"weight": 1.0, "density": 0.3}}],
                              "dtype": "float32"})
        merge_to_hf(recipe.spec, recipe.base, recipe.models, tmp_path / f"merged_{name}", verify=False)
        outs[name] = tensors(tmp_path / f"merged_{name}")
    assert outs["ckpt"].keys() == outs["hf"].keys()
    moved = 0
    for k in outs["hf"]:
        np.testing.assert_allclose(outs["ckpt"][k], outs["hf"][k], rtol=0, atol=1e-6, err_msg=k)
        moved += not np.array_equal(outs["hf"][k], tensors(tmp_path / "base")[k])
    assert moved  # the merge really changed tensors


def test_a_relative_checkpoint_path_is_read(tmp_path, monkeypatch):
    """Run directories are often given relative (output_dir: runs/x); Orbax itself wants absolute paths."""
    from paft_jax.train.restore import CheckpointSource
    cfg = load_train_config("configs/tiny_sft.yaml", ["steps=1", "optim.warmup_steps=0", "eval_data=null",
                                                      f"output_dir={tmp_path / 'run'}"])
    train(cfg, progress=False)
    monkeypatch.chdir(tmp_path)
    src = CheckpointSource("run")
    assert src.step == 1 and np.abs(src.get("model.embed_tokens.weight")).max() > 0
