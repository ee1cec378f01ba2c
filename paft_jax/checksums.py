"""Checksums of a saved checkpoint step, written when its save commits and checked before it is restored.

Orbax's array files carry no checksum of their data (its zarr3 layout checks only the shard index), so a
flipped byte in a checkpoint restores as a silently different optimizer state or delta.  A manifest,
`<step>/paft_checksums.json`, lists every file of the step with its size and checksum:

- local directories: CRC-32 (zlib) of the bytes, read back once the save is complete;
- gs://: the CRC-32C that GCS itself computes and verifies on upload (from the object listing: nothing is
  downloaded), plus the object's size.

`verify` recomputes the same and names the first file that differs, is missing, or was added.  A step
saved without a manifest (by an older paft_jax, or a run killed between the commit and the manifest) is
reported as unverified, not as damaged.
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

from paft_jax import storage

MANIFEST = "paft_checksums.json"
_CHUNK = 16 << 20


def _file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_crc32c(path: Path) -> str | None:
    """GCS's form of a file's CRC-32C (base64 of the big-endian value); None without google-crc32c."""
    try:
        import google_crc32c
    except ImportError:
        return None
    import base64
    c = google_crc32c.Checksum()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            c.update(chunk)
    return base64.b64encode(c.digest()).decode()


def compute(step_dir: str) -> dict[str, dict]:
    """{relative path: {"size", "crc32" | "crc32c"}} of every file of a step directory (the manifest aside)."""
    if storage.is_url(step_dir):
        return {rel: {"size": size, "crc32c": crc} for rel, (size, crc) in storage.object_checksums(step_dir).items()
                if rel != MANIFEST}
    root = Path(step_dir)
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "crc32": _file_crc32(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write(step_dir: str) -> dict:
    """Compute the step's checksums and write its manifest; returns {"files", "bytes", "seconds"}."""
    t0 = time.perf_counter()
    files = compute(step_dir)
    text = json.dumps({"version": 1, "files": files}, indent=0, sort_keys=True) + "\n"
    if storage.is_url(step_dir):
        storage.write_text(storage.join(step_dir, MANIFEST), text)
    else:
        path = Path(step_dir) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return {"files": len(files), "bytes": sum(f["size"] for f in files.values()),
            "seconds": time.perf_counter() - t0}


def _read_manifest(step_dir: str) -> str | None:
    if storage.is_url(step_dir):
        return storage.read_text(storage.join(step_dir, MANIFEST))
    path = Path(step_dir) / MANIFEST
    return path.read_text() if path.is_file() else None


def verify(step_dir: str) -> str | None:
    """None when every file matches the step's manifest; else what differs (one file named).  A step
    without a manifest raises FileNotFoundError (unverifiable, which is not the same as damaged)."""
    text = _read_manifest(step_dir)
    if text is None:
        raise FileNotFoundError(f"{step_dir}: no {MANIFEST}")
    try:
        expected = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    found = compute(step_dir)
    for rel, want in sorted(expected.items()):
        got = found.get(rel)
        if got is None:
            return f"{rel} is missing"
        differs = _differs(got, want, None if storage.is_url(step_dir) else Path(step_dir) / rel)
        if differs:
            return f"{rel} has another {differs} than when it was saved: its bytes changed"
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"{extra[0]} was added after the save"
    return None


def _differs(got: dict, want: dict, local: Path | None) -> str | None:
    """What differs between a file and its manifest entry, or None.  A step saved on gs:// and copied to
    a disk is checked against GCS's CRC-32C computed here; one saved on a disk and copied to gs:// by its
    sizes (its CRC-32 would need the bytes downloaded)."""
    if got.get("size") != want.get("size"):
        return f"size ({got.get('size')} bytes, saved {want.get('size')})"
    for key in ("crc32", "crc32c"):
        mine = got.get(key)
        if key == "crc32c" and mine is None and local is not None and want.get(key) is not None:
            mine = _file_crc32c(local)
        if mine is not None and want.get(key) is not None and mine != want[key]:
            return f"checksum ({key} {mine}, saved {want[key]})"
    return None
