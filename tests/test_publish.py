"""Publishing exports and merges: --overwrite replaces only a previous export, never a run (issue: data loss)."""
import json

import pytest

from paft_jax import publish
from paft_jax.hf.export import export_hf
from paft_jax.hf.load import load_model
from paft_jax.launch import main


def fake_run(d):
    """What a training run directory holds (checkpoints, metrics, config, TensorBoard)."""
    (d / "checkpoints" / "3").mkdir(parents=True)
    (d / "checkpoints" / "3" / "_METADATA").write_text("{}")
    (d / "tb").mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (d / "config.json").write_text(json.dumps({"steps": 3}))
    return d


def tree(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_export_onto_a_run_refuses_and_deletes_nothing(hf_dir, tmp_path):
    model = hf_dir("llama")
    run = fake_run(tmp_path / "runs" / "ck")
    before = tree(tmp_path / "runs")
    for out, shown in ((run, "checkpoints/"), (tmp_path / "runs", "ck/")):  # the run, and a folder above it
        with pytest.raises(publish.DestinationError, match=f"not a previous paft_jax export.*holds: .*{shown}"):
            main(["export", "--model", str(model), "--out", str(out), "--overwrite", "--no-verify"])
    assert tree(tmp_path / "runs") == before


def test_export_may_not_overlap_its_checkpoint(tmp_path):
    run = fake_run(tmp_path / "ck")
    for out in (run, tmp_path, run / "checkpoints" / "export"):  # the run, above it, inside it
        with pytest.raises(publish.DestinationError, match="overwrite or nest with the input"):
            main(["export", "--checkpoint", str(run), "--out", str(out), "--overwrite"])
    link = tmp_path / "alias"
    link.symlink_to(run)  # the same run through a symlink
    with pytest.raises(publish.DestinationError, match="overwrite or nest"):
        main(["export", "--checkpoint", str(run), "--out", str(link), "--overwrite"])
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints" / "3" / "_METADATA").exists()


def test_overwrite_replaces_a_previous_export_and_a_failed_one_keeps_it(hf_dir, tmp_path):
    lm = load_model(hf_dir("llama"), with_tokenizer=False)
    out = tmp_path / "export"
    export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config, how="first")
    assert "first" in (out / "README.md").read_text()
    with pytest.raises(publish.DestinationError, match="not empty"):
        export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config)

    def reject(built):
        assert (built / "model.safetensors").exists()  # checked before it is published
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError, match="verification failed"):
        export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config, how="second", overwrite=True, check=reject)
    assert "first" in (out / "README.md").read_text()  # the old export is intact
    export_hf(lm.params, lm.cfg, out, hf_config=lm.hf_config, how="third", overwrite=True)
    assert "third" in (out / "README.md").read_text()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no leftovers


def test_overwrite_refuses_a_foreign_model_directory(hf_dir, tmp_path):
    theirs = hf_dir("llama")  # saved by transformers: a model card of its own, or none
    lm = load_model(theirs, with_tokenizer=False)
    before = tree(theirs)
    with pytest.raises(publish.DestinationError, match="not a previous paft_jax export"):
        export_hf(lm.params, lm.cfg, theirs, hf_config=lm.hf_config, overwrite=True)
    assert tree(theirs) == before


def test_merge_overwrite_refuses_a_run(hf_dir, tmp_path):
    from paft_jax.merge import load_recipe, merge_to_hf
    a = hf_dir("llama")
    run = fake_run(tmp_path / "run")
    recipe = load_recipe({"merge_method": "linear", "base_model": str(a),
                          "models": [{"model": str(a), "parameters": {"weight": 1.0}}]})
    with pytest.raises(publish.DestinationError, match="not a previous paft_jax export"):
        merge_to_hf(recipe.spec, recipe.base, recipe.models, run, overwrite=True, verify=False)
    assert (run / "metrics.jsonl").exists()


def test_model_card_marker():
    assert publish.is_export_card("---\nlibrary_name: transformers\ntags: [paft_jax, merge]\n---\n# x\n")
    assert not publish.is_export_card("---\ntags: [other]\n---\npaft_jax mentioned in the text\n")
    assert not publish.is_export_card(None)
