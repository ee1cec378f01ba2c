"""Sources: jsonl / json / csv / parquet files and directories, HF save_to_disk directories and hub names
(offline: a clear error), TFDS array_record data sources without TensorFlow (and a model trains on them)."""
import csv
import json
import sys

import pytest

from paft_jax.data import DataConfig, DataError, make_loader
from paft_jax.data.dataset import build_dataset
from paft_jax.data.sources import open_source
from paft_jax.data.testing import llama3_style_tokenizer

U = {"role": "user", "content": "What is 2 + 3?"}
A = {"role": "assistant", "content": "The answer is 5."}
ROWS = [{"messages": [U, A]}, {"prompt": "Hi", "completion": "Hello."}, {"prompt": [U], "completion": [A]},
        {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]}]
PAIRS = [{"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "Six."}]},
         {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
         {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "It is 6."}]}]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        keys = sorted({k for r in rows for k in r})
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        # parquet columns have one type: one format per file
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def examples(cfg, tok=None):
    ds = build_dataset(cfg, tok or llama3_style_tokenizer(), process_index=0, process_count=1)
    return [[s[0].tolist() for s in e.seqs] for e in ds.examples], ds


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_file_formats_give_the_same_examples(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    rows = [r for r in ROWS if "messages" in r]  # one schema per parquet file
    ref, _ = examples(DataConfig(sources=[{"path": str(write(tmp_path / "r.jsonl", rows, "jsonl"))}]))
    got, _ = examples(DataConfig(sources=[{"path": str(write(tmp_path / f"x.{fmt}", rows, fmt))}]))
    assert got == ref and len(got) == 2
    pref_ref, _ = examples(DataConfig(kind="preference", sources=[{"path": str(write(tmp_path / "p.jsonl", PAIRS,
                                                                                      "jsonl"))}]))
    if fmt != "parquet":
        got, _ = examples(DataConfig(kind="preference", sources=[{"path": str(write(tmp_path / f"p.{fmt}", PAIRS,
                                                                                     fmt))}]))
        assert got == pref_ref and len(got) == 3


def test_csv_rows_are_named_by_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('prompt,completion\nHi,Hello.\n"multi\nline",ok\nHey,\n')
    with pytest.raises(DataError) as e:
        examples(DataConfig(sources=[{"path": str(path)}]))
    assert e.value.where == f"{path}:5" and e.value.field == "completion" and e.value.reason == "missing field"


def test_directory_of_files_and_column_renames(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write(d / "a.jsonl", ROWS[:2], "jsonl")
    (d / "sub").mkdir()
    write(d / "sub" / "b.json", [{"question": "Hi", "answer": "Hello."}], "json")
    (d / "notes.txt").write_text("ignored")
    cfg = DataConfig(sources=[{"path": str(d), "columns": {"question": "prompt", "answer": "completion"}}])
    got, ds = examples(cfg)
    assert len(got) == 3 and ds.total_rows == 3
    assert got[2] == got[1]  # the renamed row equals the same prompt/completion written natively


def test_hf_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [PAIRS[0], {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
                       "rejected": [{"role": "assistant", "content": "Go away."}]}]  # one schema per arrow table
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dd"))
    ref, _ = examples(DataConfig(kind="preference", sources=[{"path": str(write(tmp_path / "p.jsonl", rows,
                                                                                 "jsonl"))}]))
    got, _ = examples(DataConfig(kind="preference", sources=[{"path": str(tmp_path / "one")}]))
    assert got == ref
    got, _ = examples(DataConfig(kind="preference", sources=[{"path": str(tmp_path / "dd"), "split": "test"}]))
    assert got == ref[1:]
    with pytest.raises(ValueError, match="no split 'validation'"):
        examples(DataConfig(kind="preference", sources=[{"path": str(tmp_path / "dd"), "split": "validation"}]))


def test_hf_hub_name_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("datasets")
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"cannot load the Hugging Face hub dataset 'nobody/no-such-set'.*save_to_disk"):
        open_source(DataConfig(sources=[{"name": "nobody/no-such-set", "type": "hf_hub"}]).sources[0])


def test_hub_name_without_type_is_a_clear_error():
    """Bug 5 of issue 14: `sources=[{name: org/set, split: train}]` was a TypeError deep in sources.py."""
    with pytest.raises(ValueError, match=r"sources\[0\]: source name='org/set' with type 'auto'.*type: hf_hub"):
        DataConfig(sources=[{"name": "org/set", "split": "train"}])
    with pytest.raises(ValueError, match=r"name='org/set' with type 'jsonl'"):
        DataConfig(sources=[{"name": "org/set", "type": "jsonl"}])


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        examples(DataConfig(sources=[{"path": str(tmp_path / "nope.jsonl")}]))
    (tmp_path / "x.dat").write_text("{}")
    with pytest.raises(ValueError, match="set `type`"):
        examples(DataConfig(sources=[{"path": str(tmp_path / "x.dat")}]))
    got, _ = examples(DataConfig(sources=[{"path": str(write(tmp_path / "y.dat", ROWS[:1], "jsonl")),
                                           "type": "jsonl"}]))
    assert len(got) == 1


# --------------------------------------------------------------------------------------------- TFDS

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny conversational SFT dataset and a preference one, built as array_record without TensorFlow."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from etils import epath
    root = tmp_path_factory.mktemp("tfds")
    msg = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})

    class PaftTinySft(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(root)  # metadata lookup next to the class, which lives in a test file

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"messages": msg}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24)}

        def _generate_examples(self, n):
            for i in range(n):
                a, b = i % 7, i % 5
                yield i, {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                       {"role": "assistant", "content": f"The answer is {a + b}."}]}

    class PaftTinyPrefs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(root)

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
                {"prompt": tfds.features.Text(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"prompt": f"Tip {i}?", "chosen": f"- Rest.\nHope this helps! {i}", "rejected": f"Rest {i}."}

    for cls in (PaftTinySft, PaftTinyPrefs):
        cls(data_dir=str(root), file_format="array_record").download_and_prepare()
    return root


def test_tfds_array_record_source_without_tensorflow(tfds_dir):
    tok = llama3_style_tokenizer()
    cfg = DataConfig(kind="sft", seq_len=128, batch_size=2,
                     sources=[{"type": "tfds", "name": "paft_tiny_sft", "data_dir": str(tfds_dir)}])
    got, ds = examples(cfg, tok)
    assert len(got) == 24 and ds.stats[0].label.startswith("tfds:paft_tiny_sft[train]")
    texts = {tok.decode(e.seqs[0][0][e.seqs[0][1]]) for e in ds.examples}
    assert texts == {f"The answer is {i % 7 + i % 5}.<|eot_id|>" for i in range(24)}  # assistant turns only
    pcfg = DataConfig(kind="preference", seq_len=128, batch_size=2,
                      sources=[{"type": "tfds", "name": "paft_tiny_prefs", "data_dir": str(tfds_dir)}])
    pairs = make_loader(pcfg, tok, process_index=0, process_count=1)
    b = next(pairs)
    assert b["pair_valid"].sum() >= 2 and b["input_ids"].shape == (2, 128)
    assert "tensorflow" not in sys.modules


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="tfds:no_such_set"):
        examples(DataConfig(sources=[{"type": "tfds", "name": "no_such_set", "data_dir": str(tmp_path)}]))


def test_a_model_trains_from_the_tfds_batches(tfds_dir, tmp_path):
    """The TFDS (array_record, no TensorFlow) source through the real training loop: SFT loss falls."""
    from paft_jax.train.config import load_train_config
    from paft_jax.train.loop import train
    src = f"[{{type: tfds, name: paft_tiny_sft, data_dir: '{tfds_dir}'}}]"
    cfg = load_train_config("configs/tiny_sft.yaml", [
        f"data.sources={src}", "data.seq_len=64", "eval_data=null", "steps=12", "optim.learning_rate=1e-2",
        f"output_dir={tmp_path / 'run'}", "model_config.max_position_embeddings=64"])
    hist = train(cfg, progress=False).history
    first, last = hist[0]["loss"], hist[-1]["loss"]
    assert last < 0.7 * first, (first, last)
