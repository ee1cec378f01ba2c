"""safetensors files, one tensor at a time.

The safetensors package validates headers but its numpy backend cannot return bfloat16 and its writer
needs every tensor of a file in memory at once.  Here: `safe_open` validates, then tensors are
memory-mapped (zero copy, any dtype via ml_dtypes); the writer lays out the header from the tensor
specs first and then streams each tensor, so host memory holds one tensor, not one shard.
"""
from __future__ import annotations

import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}


class SafetensorsFile:
    """Read-only view of one .safetensors file; errors name the file and the tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            from safetensors import safe_open
            with safe_open(str(self.path), framework="numpy"):
                pass  # validates header, offsets and file length
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.path}: not a valid safetensors file "
                             f"(truncated or corrupt?): {e}") from None
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.header = header

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        st = self.header[name]["dtype"]
        if st not in ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {st}")
        return ST_DTYPES[st]

    def get(self, name: str) -> np.ndarray:
        if name not in self.header:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        start, end = self.header[name]["data_offsets"]
        dtype, shape = self.dtype(name), self.shape(name)
        if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{self.path}: tensor {name!r} byte range does not match shape {shape} {dtype}")
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape)


TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def write_streaming(path: str | Path, specs: Iterable[TensorSpec], produce: Callable[[str], np.ndarray],
                    metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors are produced one at a time, in `specs` order.

    Returns the bytes written.  `produce(name)` must return an array of exactly the declared shape/dtype.
    """
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the reference writer does
    # one write in flight on a thread while the next tensor is produced (the write releases the GIL):
    # memory holds at most two produced tensors
    with open(path, "wb") as f, ThreadPoolExecutor(1) as writer:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        pending = None
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: tensor {name!r} produced {arr.shape} {arr.dtype}, "
                                 f"declared {tuple(shape)} {np.dtype(dtype)}")
            if pending is not None:
                pending.result()
            pending = writer.submit(f.write, arr.reshape(-1).view(np.uint8)) if arr.size else None  # no copy
        if pending is not None:
            pending.result()
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. 2GB, 500MB, 1073741824)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def plan_shards(specs: list[tuple[str, tuple, np.dtype]], max_bytes: int) -> list[list[tuple[str, tuple, np.dtype]]]:
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = np.dtype(spec[2]).itemsize * int(np.prod(spec[1], dtype=np.int64))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards
