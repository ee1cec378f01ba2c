"""One atomic publish for the directories paft_jax writes as a whole: HF exports and merge outputs.

A directory is built (and verified) under a temporary name beside its destination, then published:
locally, the old copy is renamed aside, the new one renamed in, the old one removed, so the destination
holds the old directory or the new one at every moment; on a store (gs://), `storage.publish_dir`.

`overwrite` replaces only what paft_jax itself published there before: a flat directory whose model
card (README.md) carries the `paft_jax` tag, or a store directory an interrupted publish left marked.
Anything else at the destination (a training run, a folder of runs, someone's downloaded model) is
refused and named, whatever `overwrite` says; so is a destination that is, contains, or lies inside one
of the inputs (compared after resolving symlinks).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from paft_jax import storage

CARD = "README.md"
_TAG = re.compile(r"^tags:\s*\[([^\]]*)\]", re.M)


class DestinationError(FileExistsError, ValueError):
    """The destination cannot be written: it holds something that is not a previous export, or overlaps an input."""


def _location(path: str | Path) -> tuple[str, ...]:
    """Path components for comparing locations: a URL by its text, a local path resolved (symlinks too)."""
    if storage.is_url(path):
        scheme, _, rest = str(path).partition("://")
        return (scheme + "://", *[c for c in rest.split("/") if c])
    return Path(path).expanduser().resolve().parts


def is_export_card(text: str | None) -> bool:
    """Whether a model card's front matter carries the paft_jax tag (every export and merge writes one)."""
    if not text or not text.startswith("---"):
        return False
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    m = _TAG.search(front)
    return bool(m) and "paft_jax" in [t.strip() for t in m.group(1).split(",")]


def _contents(out: str | Path) -> tuple[list[str], str | None]:
    """(names of what is at `out`, with a trailing / for folders; the model card's text or None)."""
    if storage.is_url(out):
        names = sorted(storage.list_files(str(out)))
        shown = sorted({n.split("/", 1)[0] + ("/" if "/" in n else "") for n in names})
        return shown, storage.read_text(storage.join(out, CARD)) if CARD in names else None
    out = Path(out)
    if not out.exists():
        return [], None
    if not out.is_dir():
        return [out.name], None
    shown = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    card = out / CARD
    return shown, card.read_text(errors="replace") if card.is_file() else None


def check_destination(out: str | Path, inputs: Sequence[str | Path] = (), *, overwrite: bool) -> Path | str:
    """Refuse an output that overlaps an input, or that holds anything but a previous export (and that
    only with overwrite).  Returns the destination normalised (a URL without its trailing /, a local path
    absolute).  Checked before the work and again when publishing."""
    o = _location(out)
    for i in inputs:
        p = _location(i)
        if o[:len(p)] == p or p[:len(o)] == o:
            raise DestinationError(f"output {out} would overwrite or nest with the input {i}: choose another output")
    names, card = _contents(out)
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
        if not overwrite:
            raise DestinationError(f"{out}: exists and is not empty ({shown}); --overwrite replaces a previous "
                                   "paft_jax export, nothing else")
        if storage.INCOMPLETE in names:  # an interrupted publish of ours (storage.publish_dir)
            return normalised(out)
        folders = [n for n in names if n.endswith("/")]
        if not is_export_card(card) or folders:
            why = f"it holds folders ({', '.join(folders[:8])})" if folders and is_export_card(card) else \
                "it has no paft_jax model card (README.md)"
            raise DestinationError(f"{out}: not a previous paft_jax export, so --overwrite will not replace it "
                                   f"({why}; it holds: {shown}); choose an empty or new output directory")
    return normalised(out)


def normalised(out: str | Path) -> Path | str:
    """A URL without its trailing /, a local path absolute."""
    return str(out).rstrip("/") if storage.is_url(out) else Path(out).expanduser().absolute()


@contextmanager
def staged(out: str | Path, inputs: Sequence[str | Path] = (), *, overwrite: bool, writer: bool = True):
    """Build a directory for `out` in the yielded temporary folder; it is published when the block ends
    without an error, and removed otherwise (a failed write or check publishes nothing).  `writer=False`
    (the other processes of a multi-host export) builds nothing worth keeping: the folder is removed."""
    out = check_destination(out, inputs, overwrite=overwrite)  # before the work; again when publishing
    remote = storage.is_url(out)
    if remote:
        stage, name = Path(tempfile.mkdtemp(prefix="paft_publish_")), storage.split_url(out)[1]
    else:  # beside the output, so the final rename stays on one filesystem
        stage, name = out.parent, out.name
        stage.mkdir(parents=True, exist_ok=True)
        if not os.access(stage, os.W_OK):
            raise PermissionError(f"{stage}: output directory is not writable")
    tmp = stage / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if writer:
            _publish(tmp, out, overwrite=overwrite)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if remote:
            shutil.rmtree(stage, ignore_errors=True)


def _publish(built: Path, out: str | Path, *, overwrite: bool) -> None:
    """Put the complete directory `built` at `out`: the old output stays readable until the new one is whole."""
    check_destination(out, overwrite=overwrite)
    if storage.is_url(out):
        storage.publish_dir(built, str(out), overwrite=overwrite)
        return
    out = Path(out)
    if not out.exists():
        built.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        built.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output file (`flag`: the option that named it) that could not be written
    at the end: it is a directory, or its nearest existing ancestor is a file or not writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a directory; give a file name")
    parent = existing_ancestor(p.parent)
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, so the file cannot be created under it")
    target = p if p.exists() else parent
    if not os.access(target, os.W_OK):
        raise PermissionError(f"{flag} {path}: {target} is not writable")


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else its nearest ancestor that does (what creating it would go under)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
