"""Whole directories on object stores (gs://, or any fsspec URL): published atomically, fetched whole.

Orbax checkpoints reach gs:// through tensorstore and etils by themselves.  This module is for the
directories paft_jax writes as a unit (HF exports, merge outputs) and reads as a unit (HF model
directories given to the merge).  Each is built or read in a local directory; the store sees whole files.

What "atomic" means on GCS: each object write is atomic, but there is no directory rename.  `publish_dir`
therefore (1) uploads every file under a hidden temporary prefix beside the destination
(`.NAME.tmp-<id>/`): a failure there leaves the destination untouched; (2) writes the marker object
`INCOMPLETE` at the destination, removes what an overwrite replaces, and copies each object server-side
from the temporary prefix (no second upload); (3) deletes the marker last, then the temporary prefix.
A reader that honours the marker (`fetch_dir`, hence the merge's inputs) sees no directory, a directory
it refuses as incomplete, or the complete one, never a mix; and it re-lists after downloading, so a
directory rewritten while being read is refused too.  A reader that ignores the marker (transformers
through gcsfs, gsutil) can see a partial copy during step 2.  A writer killed in step 2 leaves the marker:
the directory stays refused until it is written again with overwrite.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger("paft_jax")

INCOMPLETE = ".paft-incomplete"  # present at a destination while it is being (re)written


class IncompleteDirectoryError(RuntimeError):
    pass


def is_url(path) -> bool:
    """gs://bucket/x and other fsspec URLs; plain and file:// paths are local."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def _fs(url: str):
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def split_url(url: str) -> tuple[str, str]:
    """gs://b/runs/x/ -> ("gs://b/runs", "x")."""
    head, _, name = str(url).rstrip("/").rpartition("/")
    if not name or head.endswith(":/"):
        raise ValueError(f"{url}: expected a directory below a bucket, e.g. gs://bucket/models/name")
    return head, name


def _objects(fs, root: str) -> dict[str, dict]:
    """{relative name: fsspec info} of every object under `root` (fresh, not from fsspec's cache)."""
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {path[len(root):].lstrip("/"): info for path, info in found.items()
            if path[len(root):].lstrip("/") and info.get("type", "file") != "directory"}


def _listing(fs, root: str) -> dict[str, tuple]:
    """{relative name: (size, version)} of every object under `root` (fresh, not from fsspec's cache)."""
    return {rel: (info.get("size"), str(info.get("generation") or info.get("updated") or info.get("mtime")
                                        or info.get("created")))
            for rel, info in _objects(fs, root).items()}


def child_names(url: str) -> set[str]:
    """Names directly under `url` (objects and prefixes); empty when there is nothing."""
    fs, root = _fs(url)
    fs.invalidate_cache(root)
    try:
        return {str(c).rstrip("/").rsplit("/", 1)[-1] for c in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return set()


def list_files(url: str) -> list[str]:
    """Relative names of every object under `url` (fresh listing); empty when there is nothing."""
    fs, root = _fs(url)
    return list(_listing(fs, root))


def exists(url: str) -> bool:
    """Whether any object lives under `url` (a prefix: object stores have no empty directories)."""
    fs, root = _fs(url)
    return bool(_listing(fs, root))


def check_destination(url: str, overwrite: bool) -> None:
    """Refuse a non-empty destination unless overwriting (checked before the work, and again when publishing)."""
    split_url(url)
    if not overwrite and exists(url):
        raise FileExistsError(f"{url}: exists and is not empty (pass overwrite=True / --overwrite)")


def _local_files(local: Path) -> list[str]:
    return sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())


def publish_dir(local: str | Path, url: str, *, overwrite: bool = False) -> str:
    """Upload the local directory `local` to `url` atomically for marker-honouring readers (module doc)."""
    local = Path(local)
    names = _local_files(local)
    if not names:
        raise ValueError(f"{local}: nothing to publish (empty directory)")
    check_destination(url, overwrite)
    fs, root = _fs(url)
    parent, name = root.rsplit("/", 1)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        fs.put([str(local / n) for n in names], [f"{tmp}/{n}" for n in names])
    except BaseException:
        _remove_quietly(fs, tmp)
        raise
    try:
        fs.pipe_file(f"{root}/{INCOMPLETE}", f"being written from {tmp} by pid {os.getpid()}\n".encode())
        stale = [f"{root}/{n}" for n in _listing(fs, root) if n != INCOMPLETE]
        if stale:  # only with overwrite: an old directory is replaced as a whole, never mixed with the new
            fs.rm(stale)
        fs.copy([f"{tmp}/{n}" for n in names], [f"{root}/{n}" for n in names])
        fs.rm_file(f"{root}/{INCOMPLETE}")
    except BaseException as e:
        _remove_quietly(fs, tmp)
        raise IncompleteDirectoryError(f"{url}: publishing failed midway ({type(e).__name__}: {e}); the "
                                       f"directory is marked incomplete ({INCOMPLETE}) until written again "
                                       "with overwrite") from e
    _remove_quietly(fs, tmp)
    return url


def _remove_quietly(fs, prefix: str) -> None:
    try:
        fs.rm(prefix, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001  (a leftover hidden prefix is untidy, not wrong)
        log.warning("could not remove the temporary prefix %s: %s", prefix, e)


def fetch_dir(url: str, local: str | Path) -> Path:
    """Download the directory at `url` into `local`; refuses a missing, incomplete or changing directory."""
    local = Path(local)
    fs, root = _fs(url)
    before = _listing(fs, root)
    if not before:
        raise FileNotFoundError(f"{url}: no such directory (no objects under this prefix)")
    if INCOMPLETE in before:
        raise IncompleteDirectoryError(f"{url}: incomplete ({INCOMPLETE} is present): it is being written, or "
                                       "its upload was interrupted (write it again with overwrite)")
    names = sorted(before)
    for n in names:
        (local / n).parent.mkdir(parents=True, exist_ok=True)
    fs.get([f"{root}/{n}" for n in names], [str(local / n) for n in names])
    if _listing(fs, root) != before:
        raise IncompleteDirectoryError(f"{url}: changed while it was being read (rewritten concurrently?); "
                                       "read it again")
    return local


# ------------------------------------------------------------------ run directories on a store (gs://)
# A run directory given as a URL is written in a local working copy (its mirror) and uploaded file by
# file; small JSON markers are read and written on the store directly (one object write is atomic).


def join(base: str | Path, *names: str) -> str:
    """`base/names...` for a URL (text, no pathlib: gs://b/x must not become gs:/b/x) or a local path."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def mirror_dir(url: str, root: str | Path) -> Path:
    """The local working copy of the store directory `url`: root/mirror/<scheme>/<bucket>/<path>.  Laid out
    like the URL, so the mirror of gs://b/run/sft is the `sft` folder of the mirror of gs://b/run."""
    scheme, _, rest = str(url).partition("://")
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{url}: cannot be mirrored locally (expected scheme://bucket/path)")
    return Path(root).absolute() / "mirror" / scheme / Path(*parts)


def read_text(url: str) -> str | None:
    """One object's text, or None when it does not exist."""
    fs, root = _fs(url)
    try:
        return fs.cat_file(root).decode()
    except FileNotFoundError:
        return None


def write_text(url: str, text: str) -> None:
    """One object write (atomic on GCS: readers see the old object or the new one, never a part)."""
    fs, root = _fs(url)
    fs.pipe_file(root, text.encode())


def remove(url: str) -> None:
    """Remove everything under `url` (an object or a prefix); nothing there is fine."""
    fs, root = _fs(url)
    fs.invalidate_cache(root)
    _remove_quietly(fs, root)


def upload_files(local: str | Path, url: str, names: list[str]) -> list[str]:
    """Upload local/<name> to url/<name> for each name that exists locally (each a whole-object write)."""
    local = Path(local)
    names = [n for n in names if (local / n).is_file()]
    if names:
        fs, root = _fs(url)
        fs.put([str(local / n) for n in names], [f"{root}/{n}" for n in names])
    return names


def download_file(url: str, local: str | Path) -> bool:
    """Make the local file a copy of the object at `url`; when there is no such object, remove the local
    file (the store is the truth).  Returns whether the object existed."""
    local = Path(local)
    fs, root = _fs(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    try:
        fs.get_file(root, str(tmp))
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        local.unlink(missing_ok=True)
        return False
    os.replace(tmp, local)
    return True


def is_complete_dir(url: str) -> bool:
    """Objects exist under `url` and the incomplete-marker of `publish_dir` is not among them."""
    names = child_names(url)
    return bool(names) and INCOMPLETE not in names


def create_text(url: str, text: str) -> bool:
    """Write one object only if none exists at `url` (GCS: the `ifGenerationMatch=0` precondition, so of
    two concurrent writers exactly one succeeds); False when an object is already there."""
    fs, root = _fs(url)
    try:
        fs.pipe_file(root, text.encode(), mode="create")
    except FileExistsError:
        return False
    fs.invalidate_cache(root)
    return True


def read_versioned(url: str) -> tuple[str | None, str | None]:
    """(text, generation) of one object, (None, None) when it does not exist; the generation is GCS's
    object generation (None on stores without one)."""
    fs, root = _fs(url)
    fs.invalidate_cache(root)
    try:
        info = fs.info(root)
        return fs.cat_file(root).decode(), (str(info["generation"]) if info.get("generation") else None)
    except FileNotFoundError:
        return None, None


def remove_version(url: str, generation: str | None) -> bool:
    """Delete the object at `url` if it is still `generation` (GCS: an `ifGenerationMatch` precondition;
    stores without generations delete unconditionally).  False when it is gone or was replaced."""
    fs, root = _fs(url)
    fs.invalidate_cache(root)
    try:
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if generation is not None and "gs" in protocols:  # gcsfs: a DELETE with GCS's precondition
            bucket, _, key = root.partition("/")
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)
        else:
            fs.rm_file(root)
    except (FileNotFoundError, FileExistsError):  # gcsfs reports a failed precondition (412) as FileExistsError
        return False
    finally:
        fs.invalidate_cache(root)
    return True


def object_checksums(url: str) -> dict[str, tuple[int | None, str | None]]:
    """{relative name: (size, crc32c)} of every object under `url`, from a fresh listing: the CRC-32C
    is the one the store computed (GCS verifies it on upload), so nothing is downloaded."""
    fs, root = _fs(url)
    return {rel: (info.get("size"), info.get("crc32c")) for rel, info in _objects(fs, root).items()}
