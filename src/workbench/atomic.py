"""Atomic artifact writes, the project's one way to write a file or folder: a temp name in
the same folder, fsync, then rename. A killed writer never leaves a file that looks finished,
only ``.*.partial`` names, which the next command holding the run's lock removes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def file(path: str | os.PathLike):
    """Yield a temp file name next to ``path`` for a writer to fill (a library that writes to a
    path of its own: GGUFWriter, llama.cpp's quantizer); on success it is synced and renamed to
    ``path``, on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


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
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(f)
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


def move_in(staging: str | os.PathLike, dest: str | os.PathLike, rels: list[str]) -> None:
    """Rename each of ``rels`` that exists under the folder ``staging`` to the same place under
    ``dest`` (:func:`replace`: a folder replaces the old folder whole)."""
    for rel in rels:
        if (Path(staging) / rel).exists():
            replace(Path(staging) / rel, Path(dest) / rel)


def free_stem(directory: str | os.PathLike, stem: str, reusable=None) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when ``directory`` already holds something of that
    name (``stem.*``, or a ``stem-profile`` folder): a report is never overwritten by a second
    one of the same day, device and tag. ``reusable(name)``: True for a name whose files the
    caller may take over (a report its own command left incomplete, to be resumed)."""
    directory = Path(directory)

    def taken(s: str) -> bool:
        used = directory.is_dir() and (any(directory.glob(f"{s}.*")) or (directory / f"{s}-profile").exists())
        return used and not (reusable is not None and reusable(s))
    n, candidate = 1, stem
    while taken(candidate):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate
