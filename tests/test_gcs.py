"""gs:// for real, through a GCS emulator the test starts (fake-gcs-server): branch checkpoints saved to
a bucket, resumed by a new process, and exported from the bucket; HF exports published to the bucket;
merges reading an HF directory and a branch checkpoint from the bucket and writing their output there;
a TFDS data_dir in the bucket.  Each runs in a subprocess: the emulator settings must be in the
environment before gcsfs, fsspec and google.auth are imported (the `gcs_env` fixture: conftest.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(env, *argv, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "paft_jax.launch", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_checkpoints_on_gs_resume_in_a_new_process_and_export(gcs_env, tmp_path):
    bucket = "gs://paft/runs/tiny/checkpoints"
    common = ["sft", "--config", "configs/tiny_sft.yaml", "eval_data=null", "optim.warmup_steps=1",
              "optim.schedule_steps=8", "checkpoint.save_every=2", f"checkpoint.directory={bucket}",
              f"output_dir={tmp_path / 'run'}", "--no-progress"]  # one lr schedule for the 4, 6 and 8 steps
    run(gcs_env, *common, "steps=4")
    out = run(gcs_env, *common, "steps=6")
    assert f"resumed from {bucket}/4" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [4]  # the timeline marks the restart
    out = run(gcs_env, "export", "--checkpoint", bucket, "--out", str(tmp_path / "hf"))
    assert "verify: max |logits diff|" in out
    assert (tmp_path / "hf" / "config.json").exists()
    # the CLI export straight to the bucket: verified on its local copy, then published
    out = run(gcs_env, "export", "--checkpoint", bucket, "--out", "gs://paft/exports/tiny-sft")
    assert "verify: max |logits diff|" in out
    got = script(gcs_env, "import json, sys\nfrom paft_jax import storage\nimport tempfile\n"
                          "d = storage.fetch_dir('gs://paft/exports/tiny-sft', tempfile.mkdtemp())\n"
                          "import os\nprint(json.dumps({'files': sorted(os.listdir(d))}))\n", tmp_path)
    assert "config.json" in got["files"] and "model.safetensors" in got["files"]
    # a flipped byte in the bucket: the object's CRC-32C (GCS's own) no longer matches the manifest
    flipped = script(gcs_env, FLIP_LARGEST, f"{bucket}/6", tmp_path)["flipped"]
    proc = subprocess.run([sys.executable, "-m", "paft_jax.launch", *common, "steps=8"], cwd=ROOT, env=gcs_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{bucket}/6 cannot be restored (damaged: {flipped} has another checksum (" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6                                    # no step ran


FLIP_LARGEST = r"""
import json, sys
from paft_jax import storage
step = sys.argv[1]
sizes = {k: v[0] for k, v in storage.object_checksums(step).items() if k.startswith("state/")}
name = max(sizes, key=sizes.get)
import fsspec
fs, root = fsspec.core.url_to_fs(f"{step}/{name}")
data = bytearray(fs.cat_file(root))
data[len(data) // 2] ^= 0xFF
fs.pipe_file(root, bytes(data))
print(json.dumps({"flipped": name}))
"""


def script(env, code: str, *args, timeout=300) -> dict:
    """Run `code` in a fresh interpreter with the emulator environment; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


EXPORT_AND_MERGE = r"""
import contextlib, io, json, sys
from pathlib import Path
from paft_jax import storage
from paft_jax.hf.export import export_hf
from paft_jax.hf.verify import flax_logits, probe_batch, verify_export
from paft_jax.launch import main
from paft_jax.merge import load_recipe, merge_to_hf
from paft_jax.mesh import build_mesh
from paft_jax.train.config import load_train_config
from paft_jax.train.base import load_base
from paft_jax.train.loop import train

tmp, gs = Path(sys.argv[1]), "gs://paft/merge"
cfg = load_train_config("configs/tiny_sft.yaml", [
    "steps=2", "eval_data=null", "optim.warmup_steps=0", "optim.learning_rate=1e-2", "model_config.num_layers=1",
    f"output_dir={tmp / 'run'}", f"checkpoint.directory={gs}/run/checkpoints"])
mesh = build_mesh(cfg.mesh)
base = load_base(cfg, mesh, cfg.mesh.logical_rules())
train(cfg, mesh=mesh, base=base, progress=False)  # a branch checkpoint in the bucket
ids, mask = probe_batch(base.cfg.vocab_size)
ref = flax_logits(base.params, base.cfg, ids, mask)
checked = []
export_hf(base.params, base.cfg, f"{gs}/base", tokenizer=base.tokenizer,  # verified before it is published
          check=lambda d: checked.append(str(verify_export(d, ref, ids, mask))))


def merge(b, m, out, **kw):
    r = load_recipe({"merge_method": "ties", "base_model": str(b), "dtype": "float32",
                     "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.3}}]})
    return merge_to_hf(r.spec, r.base, r.models, out, **kw)


# the merge command: an HF dir and a checkpoint from the bucket, the output to the bucket (verified first)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    assert main(["merge", "--method", "ties", "--base", f"{gs}/base", "--model", f"{gs}/run", "--weight", "1.0",
                 "--density", "0.3", "--dtype", "float32", "--out", f"{gs}/merged"]) == 0
storage.fetch_dir(f"{gs}/base", tmp / "base")
storage.fetch_dir(f"{gs}/run", tmp / "ckpt")
merge(tmp / "base", tmp / "ckpt", tmp / "merged", verify=False)  # the same merge from local copies
storage.fetch_dir(f"{gs}/merged", tmp / "merged_gs")
print(json.dumps({"checked": checked, "merge_printed": printed.getvalue(),
                  "names": sorted(storage.child_names(gs)),
                  "base_objects": sorted(storage.child_names(f"{gs}/base"))}))
"""


@pytest.mark.slow
def test_hf_export_and_merge_inputs_and_output_on_gs(gcs_env, tmp_path):
    from safetensors.numpy import load_file
    got = script(gcs_env, EXPORT_AND_MERGE, tmp_path)
    assert len(got["checked"]) == 1 and got["checked"][0].startswith("verify: max |logits diff|")
    assert "into gs://paft/merge/merged" in got["merge_printed"] and "verify: max |logits diff|" in got["merge_printed"]
    assert got["names"] == ["base", "merged", "run"]          # no temporary prefixes left beside them
    assert "config.json" in got["base_objects"] and ".paft-incomplete" not in got["base_objects"]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("merged", "merged_gs"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)   # gs:// inputs == local copies
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert any(not (a[k] == base[k]).all() for k in a)                     # the checkpoint's delta is in it


TFDS_FROM_GS = r"""
import json, sys
import numpy as np
from paft_jax import storage
from paft_jax.data import DataConfig, SourceConfig, make_loader
from paft_jax.data.sources import open_source
from paft_jax.data.testing import llama3_style_tokenizer

local = sys.argv[1]
storage.publish_dir(f"{local}/paft_gcs_sft", "gs://paft/tfds/paft_gcs_sft")
tok = llama3_style_tokenizer()
batches = {}
for where in (local, "gs://paft/tfds"):
    cfg = DataConfig(kind="sft", seq_len=64, batch_size=4,
                     sources=[{"type": "tfds", "name": "paft_gcs_sft", "data_dir": where}])
    it = make_loader(cfg, tok, process_index=0, process_count=1)
    batches[where] = [next(it) for _ in range(4)]
same = all(np.array_equal(x[k], y[k]) for x, y in zip(*batches.values()) for k in x)
src = open_source(SourceConfig(type="tfds", name="paft_gcs_sft", data_dir="gs://paft/tfds"))
print(json.dumps({"same": same, "keys": sorted(batches[local][0]), "tokens": int(batches[local][0]["loss_mask"].sum()),
                  "label": src.label, "rows": len(src), "row": src.get(0)[1]}))
"""


@pytest.mark.slow
def test_tfds_data_dir_on_gs_reads_the_same_batches_as_local(gcs_env, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from etils import epath
    msg = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})

    class PaftGcsSft(tfds.core.GeneratorBasedBuilder):  # array_record, built here without TensorFlow
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(tmp_path)

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"messages": msg}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(16)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"messages": [{"role": "user", "content": f"What is {i} + {i % 3}?"},
                                       {"role": "assistant", "content": f"The answer is {i + i % 3}."}]}

    PaftGcsSft(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    got = script(gcs_env, TFDS_FROM_GS, tmp_path)
    assert got["label"] == "tfds:paft_gcs_sft[train]@gs://paft/tfds" and got["rows"] == 16
    assert got["row"]["messages"][1]["content"].startswith("The answer is")
    assert got["same"] and "input_ids" in got["keys"] and got["tokens"] > 0  # batch by batch, equal to local
