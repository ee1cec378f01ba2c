"""Row sources with random access: local jsonl/json/parquet/csv files and directories, HF `datasets`
(save_to_disk directories, hub names), TFDS array_record data sources (no TensorFlow needed).

Every source is `len(src)` rows and `src.get(i) -> (where, row dict)`; `where` names the file and the row
(1-based line number for jsonl/csv, 1-based element/row number otherwise) for error messages.  Parsing
happens in `get`, so a process that only asks for its own rows only parses (and later tokenizes) those.
A row that cannot be parsed raises `DataError` from `get` (counted like any invalid row when skipping).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from paft_jax.data.config import SourceConfig
from paft_jax.data.records import DataError

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class Source:
    label: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> tuple[str, Any]:
        raise NotImplementedError


class JsonlSource(Source):
    """One JSON object per line; blank lines are ignored (but line numbers stay physical)."""

    def __init__(self, path: Path):
        self.label, self.path = str(path), path
        lines = path.read_bytes().split(b"\n")
        self.lines = [(n + 1, line) for n, line in enumerate(lines) if line.strip()]

    def __len__(self):
        return len(self.lines)

    def get(self, i):
        lineno, raw = self.lines[i]
        where = f"{self.label}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(where, None, "invalid UTF-8", f"byte {e.start} of the line") from None
        try:
            return where, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(where, None, "malformed JSON", e.msg + f" at column {e.colno}") from None


def _decode_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}", None, "invalid UTF-8", f"byte {e.start} of the file") from None


class ListSource(Source):
    """Rows held in memory (a JSON array file, or rows a test or caller provides)."""

    def __init__(self, rows: list, label: str, unit: str = "row"):
        self.rows, self.label, self.unit = rows, label, unit

    def __len__(self):
        return len(self.rows)

    def get(self, i):
        return f"{self.label} {self.unit} {i + 1}", self.rows[i]


def json_source(path: Path) -> Source:
    """A .json file: a JSON array of row objects, or (as HF `to_json` writes) JSON lines."""
    text = _decode_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return JsonlSource(path)
        raise DataError(f"{path}:{e.lineno}", None, "malformed JSON", e.msg) from None
    if isinstance(data, dict):  # a single object: one row
        data = [data]
    if not isinstance(data, list):
        raise DataError(str(path), None, "wrong type", f"a .json file must hold an array of rows, got "
                                                       f"{type(data).__name__}")
    return ListSource(data, str(path), "element")


class CsvSource(Source):
    """CSV with a header row; cells are strings, except that a cell of a list field (messages, prompt,
    completion, chosen, rejected) that holds a JSON array is parsed, so conversations fit in CSV too.
    Empty cells are absent fields (so one file can mix row formats, e.g. implicit-prompt pairs)."""
    LIST_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")

    def __init__(self, path: Path):
        self.label = str(path)
        reader = csv.DictReader(io.StringIO(_decode_file(path), newline=""))
        self.rows = []
        for row in reader:
            self.rows.append((reader.line_num, row))
        if reader.fieldnames is None:
            raise DataError(self.label, None, "empty", "no header row")

    def __len__(self):
        return len(self.rows)

    def get(self, i):
        lineno, row = self.rows[i]
        where = f"{self.label}:{lineno}"
        out = {}
        for k, v in row.items():
            if k is None:
                raise DataError(where, None, "malformed CSV", "more cells than header columns")
            if v is None or v == "":
                continue  # CSV cannot tell an empty cell from an absent field: treat it as absent
            if k in self.LIST_FIELDS and v.lstrip().startswith("["):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError as e:
                    raise DataError(where, k, "malformed JSON", e.msg) from None
            out[k] = v
        return where, out


class ParquetSource(Source):
    def __init__(self, path: Path):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        self.label = str(path)
        self.table = pq.read_table(path)

    def __len__(self):
        return self.table.num_rows

    def get(self, i):
        return f"{self.label} row {i + 1}", self.table.slice(i, 1).to_pylist()[0]


class ConcatSource(Source):
    def __init__(self, parts: list[Source], label: str):
        self.parts, self.label = parts, label
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.offsets[-1])

    def get(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k].get(i - int(self.offsets[k]))


class HFSource(Source):
    """A `datasets.Dataset` (from save_to_disk or the hub); rows are read one at a time."""

    def __init__(self, ds, label: str):
        self.ds, self.label = ds, label

    def __len__(self):
        return len(self.ds)

    def get(self, i):
        return f"{self.label} row {i + 1}", self.ds[i]


def _plain(value: Any, where: str, field: str) -> Any:
    """TFDS values -> JSON-like Python: bytes -> str, arrays -> lists, and a dict of equal-length lists
    (how a Sequence of {role, content} features comes back) -> a list of dicts."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(where, field, "invalid UTF-8") from None
    if isinstance(value, np.ndarray):
        return [_plain(v, where, field) for v in value.tolist()] if value.ndim else _plain(value.item(), where, field)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, field) for v in value]
    if isinstance(value, dict):
        d = {k: _plain(v, where, f"{field}.{k}") for k, v in value.items()}
        lens = {len(v) for v in d.values() if isinstance(v, list)}
        if d and len(lens) == 1 and all(isinstance(v, list) for v in d.values()):
            n = lens.pop()
            return [{k: d[k][j] for k in d} for j in range(n)]
        return d
    return value


class TfdsSource(Source):
    """`tfds.data_source(name, split, data_dir)`: random access to array_record files, no TensorFlow."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("TFDS sources need the tfds extra: pip install 'paft_jax[tfds]' "
                              f"(tensorflow-datasets<4.10, importlib_resources, array_record): {e}") from None
        self.label = f"tfds:{name}[{split}]" + (f"@{data_dir}" if data_dir else "")
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; name the source
            raise ValueError(f"{self.label}: cannot open the TFDS data source (it must be prepared in "
                             f"array_record format; TFDS cannot build it here without TensorFlow): {e}") from None

    def __len__(self):
        return len(self.ds)

    def get(self, i):
        where = f"{self.label} row {i + 1}"
        row = self.ds[i]
        return where, {k: _plain(v, where, k) for k, v in row.items()}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("Hugging Face dataset sources need the `datasets` package: pip install datasets") from None
    return datasets


def _hf_disk(path: Path, split: str) -> Source:
    datasets = _datasets()
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    return HFSource(ds, f"{path}[{split}]")


def _hf_hub(name: str, split: str, data_dir: str | None) -> Source:
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(name, split=split, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - offline errors come in many types; make one clear message
        raise ValueError(
            f"cannot load the Hugging Face hub dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Without network access (or with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 and nothing cached), "
            "hub names cannot be used: on a machine with access run "
            f"`datasets.load_dataset({name!r}).save_to_disk(DIR)` and point `path:` at DIR.") from None
    return HFSource(ds, f"hf:{name}[{split}]")


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or ((path / "state.json").exists()
                                                     and (path / "dataset_info.json").exists())


def _file_source(path: Path, kind: str) -> Source:
    if kind == "jsonl":
        return JsonlSource(path)
    if kind == "json":
        return json_source(path)
    if kind == "csv":
        return CsvSource(path)
    if kind == "parquet":
        return ParquetSource(path)
    raise ValueError(f"{path}: unsupported file type {kind!r}")


def open_source(cfg: SourceConfig) -> Source:
    """Open one configured source (no tokenization); errors name the path."""
    kind = cfg.type
    if kind == "hf_hub":
        src = _hf_hub(cfg.name, cfg.split, cfg.data_dir)
    elif kind == "tfds":
        src = TfdsSource(cfg.name, cfg.split, cfg.data_dir or cfg.path)
    else:
        path = Path(cfg.path)
        if not path.exists():
            raise FileNotFoundError(f"data source {path}: no such file or directory")
        if kind == "auto":
            if path.is_dir():
                kind = "hf_disk" if _is_hf_disk(path) else "dir"
            elif path.suffix in FILE_TYPES:
                kind = FILE_TYPES[path.suffix]
            else:
                raise ValueError(f"{path}: cannot tell the format from the suffix; set `type` "
                                 f"(one of {sorted(set(FILE_TYPES.values()))})")
        if kind == "hf_disk":
            src = _hf_disk(path, cfg.split)
        elif kind == "dir":
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_TYPES)
            if not files:
                raise ValueError(f"{path}: no {sorted(FILE_TYPES)} files in this directory")
            src = ConcatSource([_file_source(p, FILE_TYPES[p.suffix]) for p in files], str(path))
        else:
            src = _file_source(path, kind)
    if cfg.columns:
        src = RenamedSource(src, cfg.columns)
    return src


class RenamedSource(Source):
    def __init__(self, inner: Source, columns: dict[str, str]):
        self.inner, self.columns, self.label = inner, dict(columns), inner.label

    def __len__(self):
        return len(self.inner)

    def get(self, i):
        where, row = self.inner.get(i)
        if isinstance(row, dict):
            row = {self.columns.get(k, k): v for k, v in row.items()}
        return where, row
