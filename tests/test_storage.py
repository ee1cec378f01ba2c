"""Whole directories on an object store (paft_jax.storage), with fsspec's in-memory filesystem standing in
for the bucket: publishing is atomic for marker-honouring readers, failures leave nothing half-visible, and
HF exports and merges take URLs for inputs and outputs.  The same code against a GCS emulator: test_gcs.py."""
import fsspec
import numpy as np
import pytest
from safetensors.numpy import load_file

from paft_jax import storage
from paft_jax.merge import merge_to_hf
from paft_jax.merge.recipe import MergeSpec


@pytest.fixture
def bucket(request):
    """A fresh memory:// prefix per test (the memory filesystem is shared by the whole process)."""
    root = f"memory://bucket-{request.node.name.replace('[', '-').replace(']', '')}"
    yield root
    fs, path = storage._fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def objects(url: str) -> list[str]:
    return sorted(storage._listing(*storage._fs(url)))


def make_dir(path, files: dict):
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_publish_then_fetch_round_trips_and_leaves_no_temporary_prefix(bucket, tmp_path):
    src = make_dir(tmp_path / "src", {"a.json": b"{}", "sub/w.bin": bytes(range(256)) * 10})
    assert storage.publish_dir(src, f"{bucket}/models/m") == f"{bucket}/models/m"
    assert objects(bucket) == ["models/m/a.json", "models/m/sub/w.bin"]  # no .m.tmp-*, no marker
    got = storage.fetch_dir(f"{bucket}/models/m", tmp_path / "got")
    assert (got / "sub/w.bin").read_bytes() == (src / "sub/w.bin").read_bytes()
    with pytest.raises(FileExistsError, match="models/m: exists and is not empty"):
        storage.publish_dir(src, f"{bucket}/models/m")
    new = make_dir(tmp_path / "new", {"b.json": b"[]"})
    storage.publish_dir(new, f"{bucket}/models/m", overwrite=True)
    assert objects(f"{bucket}/models") == ["m/b.json"]  # replaced as a whole, not merged with the old files


def test_a_failed_upload_publishes_nothing(bucket, tmp_path, monkeypatch):
    src = make_dir(tmp_path / "src", {"a": b"1", "b": b"2"})
    fs = fsspec.filesystem("memory")
    real_put = type(fs).put

    def put_then_fail(self, lpaths, rpaths, **kw):
        real_put(self, lpaths[:1], rpaths[:1], **kw)  # one file reaches the temporary prefix, then a fault
        raise OSError("injected: connection reset during upload")

    monkeypatch.setattr(type(fs), "put", put_then_fail)
    with pytest.raises(OSError, match="injected"):
        storage.publish_dir(src, f"{bucket}/out")
    assert objects(bucket) == []  # neither the destination nor the temporary prefix


def test_an_interrupted_copy_leaves_the_directory_marked_incomplete_and_refused(bucket, tmp_path, monkeypatch):
    src = make_dir(tmp_path / "src", {"a": b"1", "b": b"2"})
    fs = fsspec.filesystem("memory")
    real_copy = type(fs).copy

    def copy_then_fail(self, p1, p2, **kw):
        real_copy(self, p1[:1], p2[:1], **kw)  # the destination holds one file of two
        raise OSError("injected: copy failed midway")

    monkeypatch.setattr(type(fs), "copy", copy_then_fail)
    with pytest.raises(storage.IncompleteDirectoryError, match="marked incomplete"):
        storage.publish_dir(src, f"{bucket}/out")
    assert objects(bucket) == ["out/.paft-incomplete", "out/a"]
    with pytest.raises(storage.IncompleteDirectoryError, match=r"out: incomplete \(\.paft-incomplete"):
        storage.fetch_dir(f"{bucket}/out", tmp_path / "got")
    monkeypatch.setattr(type(fs), "copy", real_copy)
    storage.publish_dir(src, f"{bucket}/out", overwrite=True)  # written again: complete
    assert objects(bucket) == ["out/a", "out/b"]


def test_a_directory_rewritten_while_being_fetched_is_refused(bucket, tmp_path, monkeypatch):
    storage.publish_dir(make_dir(tmp_path / "v1", {"a": b"1"}), f"{bucket}/d")
    fs = fsspec.filesystem("memory")
    real_get = type(fs).get

    def get_while_rewritten(self, rpaths, lpaths, **kw):
        real_get(self, rpaths, lpaths, **kw)
        fs.pipe_file(f"{rpaths[0]}", b"2")  # a writer replaces the object just read

    monkeypatch.setattr(type(fs), "get", get_while_rewritten)
    with pytest.raises(storage.IncompleteDirectoryError, match="changed while it was being read"):
        storage.fetch_dir(f"{bucket}/d", tmp_path / "got")


def test_missing_directory_and_bad_url_are_clear_errors(bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here: no such directory"):
        storage.fetch_dir(f"{bucket}/nothing-here", tmp_path / "x")
    with pytest.raises(ValueError, match="expected a directory below a bucket"):
        storage.split_url("gs://bucket-only")
    assert storage.is_url("gs://b/x") and not storage.is_url("/tmp/x") and not storage.is_url("file:///tmp/x")


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_export_to_a_url_equals_a_local_export_and_a_failed_check_publishes_nothing(bucket, hf_dir, tmp_path):
    from paft_jax.hf.export import export_hf
    from paft_jax.hf.load import load_model
    lm = load_model(hf_dir("llama"), with_tokenizer=False)
    export_hf(lm.params, lm.cfg, tmp_path / "local", hf_config=lm.hf_config, max_shard_size="40KB")
    seen = []
    url = export_hf(lm.params, lm.cfg, f"{bucket}/exports/m", hf_config=lm.hf_config, max_shard_size="40KB",
                    check=lambda d: seen.append(sorted(p.name for p in d.iterdir())))
    assert url == f"{bucket}/exports/m"
    got = storage.fetch_dir(url, tmp_path / "got")
    assert seen == [sorted(p.name for p in got.iterdir())]  # the check saw exactly what was published
    assert len(list(got.glob("*.safetensors"))) > 1
    local, remote = _tensors(tmp_path / "local"), _tensors(got)
    assert local.keys() == remote.keys() and all(np.array_equal(local[k], remote[k]) for k in local)
    with pytest.raises(FileExistsError, match="exports/m: exists"):  # refused before any work
        export_hf(lm.params, lm.cfg, url, hf_config=lm.hf_config)

    def reject(d):
        raise RuntimeError(f"{d}: logits differ")

    with pytest.raises(RuntimeError, match="logits differ"):
        export_hf(lm.params, lm.cfg, f"{bucket}/exports/bad", hf_config=lm.hf_config, check=reject)
    assert objects(f"{bucket}/exports") == sorted(f"m/{n}" for n in objects(url))  # nothing of "bad"


def test_merge_reads_url_inputs_and_writes_a_url_output_equal_to_the_local_merge(bucket, hf_dir, tmp_path):
    from conftest import make_hf_model
    paths = []
    for i in range(2):
        make_hf_model("llama", seed=i).save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
        storage.publish_dir(paths[-1], f"{bucket}/in/m{i}")
    spec = MergeSpec("ties", 1, {}, [{"weight": 1.0, "density": 0.5}])
    local = merge_to_hf(spec, paths[0], [paths[1]], tmp_path / "merged", verify=False)
    res = merge_to_hf(spec, f"{bucket}/in/m0", [f"{bucket}/in/m1"], f"{bucket}/out/merged", verify=True)
    assert res.out == f"{bucket}/out/merged" and res.verify is not None  # verified before publishing
    got = storage.fetch_dir(res.out, tmp_path / "got")
    a, b = _tensors(local.out), _tensors(got)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert f"model: {bucket}/in/m1" in (got / "README.md").read_text()
    assert (got / "config.json").exists()
    with pytest.raises(ValueError, match="would overwrite or nest with the input"):
        merge_to_hf(spec, f"{bucket}/in/m0", [f"{bucket}/in/m1"], f"{bucket}/in/m1/out", verify=False)
