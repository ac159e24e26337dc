"""Atomic artifact writes: a temp file in the same folder, fsync, then rename.
A killed writer never leaves a file that looks finished."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def directory(path: str | os.PathLike):
    """Yield a temp folder next to ``path`` to fill (e.g. with save_pretrained); on
    success it replaces ``path``, on an exception it is removed and ``path`` is
    left as it was. A killed writer leaves only ``.partial`` folders (the old
    contents among them if it died between the two renames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace(src: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the finished file or folder ``src`` (on the same file system) to ``path``,
    replacing what is there. A folder cannot be renamed onto a non-empty one, so an old
    folder is moved aside under a ``.partial`` name first and removed after; a kill
    between the two renames leaves ``path`` missing, never half of each."""
    src, path = Path(src), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if path.is_dir() and not path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=".partial", dir=path.parent))
        os.replace(path, old)
    os.replace(src, path)
    if old is not None:
        shutil.rmtree(old)
    return path
