"""A run directory (a PAFT run or one branch): a local path, or a URL (gs://bucket/runs/x) worked on through
a local mirror.

Local: files are written in place (markers atomically: temporary name, then rename).
URL: the run's files are written in its local mirror (`storage.mirror_dir` under the run's cache_dir) and
uploaded file by file when they are final (or, for a branch's metrics, at each checkpoint save); the
markers (done.json, merge.json) and paft_config.json are read and written on the store directly, one
object write each, which GCS makes atomic.  Checkpoints never touch the mirror: Orbax writes them to
<url>/<branch>/checkpoints itself.  The store is the truth: a rerun from another machine (an empty
mirror) reads the markers there and fetches what it needs (metrics, the merged export) back.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from paft_jax import storage


@dataclass
class RunDir:
    url: str      # output_dir as given: a local path or a URL
    local: Path   # where files are written: the path itself, or the URL's mirror
    remote: bool

    @classmethod
    def of(cls, output_dir: str, cache_dir: str) -> "RunDir":
        if storage.is_url(output_dir):
            url = str(output_dir).rstrip("/")
            return cls(url, storage.mirror_dir(url, cache_dir), True)
        return cls(str(output_dir), Path(output_dir), False)

    def join(self, *names: str) -> str:
        """Where `names` lives for readers of the run (checkpoints, merge inputs): the URL or local path."""
        return storage.join(self.url, *names)

    def read_json(self, rel: str) -> dict | None:
        try:
            text = storage.read_text(self.join(rel)) if self.remote else (self.local / rel).read_text()
            return json.loads(text) if text is not None else None
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_json(self, rel: str, data: dict) -> None:
        """A marker is either absent or complete: one object write on a store, temporary name + rename here."""
        text = json.dumps(data, indent=2, default=str) + "\n"
        if self.remote:
            storage.write_text(self.join(rel), text)
            return
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)

    def remove(self, rel: str) -> None:
        if self.remote:
            storage.remove(self.join(rel))
        else:
            (self.local / rel).unlink(missing_ok=True)

    def upload(self, rels: list[str]) -> list[str]:
        """Copy these mirror files to the store (nothing to do for a local run)."""
        if not self.remote:
            return []
        return storage.upload_files(self.local, self.url, rels)

    def pull(self, rel: str) -> Path:
        """The local copy of a file of the run, fetched from the store first on a remote run."""
        if self.remote:
            storage.download_file(self.join(rel), self.local / rel)
        return self.local / rel


def holds_run(output_dir: str) -> bool:
    """Whether output_dir already has something in it (a run, or anything else)."""
    if storage.is_url(output_dir):
        return storage.exists(output_dir)
    p = Path(output_dir)
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


def fresh_dir(output_dir: str) -> str:
    """`--fresh`: output_dir itself when it is empty or absent, else the first free <output_dir>-2, -3, ..."""
    base = str(output_dir).rstrip("/")
    candidate, n = base, 1
    while holds_run(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate

