"""The run directory and its manifest.

Every stage (train, merge, export, eval, report, qualify) is a function that reads
artifacts from a run directory and writes new ones, and records itself in
``<run>/manifest.json`` under ``stages.<name>``:

    {"inputs": {...}, "input_hashes": {...}, "outputs": {rel_path: {"sha256", "bytes"}},
     "versions": {...}, "timings": {...}, "status": "complete", ...extra}

The manifest is rewritten atomically after a stage completes, so a killed stage
never looks finished; earlier stages' records and artifacts are untouched.

A stage that is tried again while its complete record is kept (a retrain that is
refused, fails or is killed) notes the try under ``attempts.<name>`` (status
"running", "failed", "refused" or "interrupted"), beside the record it leaves as it
was.

Paths of artifacts inside the run are recorded relative to it (``relative``), so a
run directory can be moved or copied; ``resolve`` reads either form back.

Every command that writes into a run holds ``RUN/.lock`` (``lock``): an exclusive
``flock`` whose file names the holder's pid. A second process is refused with that
pid; the kernel drops the lock when its holder exits, however it exits, so a lock
file left by a killed process blocks nobody.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from pathlib import Path

from workbench import atomic
from workbench.errors import UserError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: str | os.PathLike) -> str:
    """One sha256 over a file or over every file of a folder (relative names and
    contents, sorted), ignoring ``.partial`` temp files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".partial")):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def outputs_record(run: str | os.PathLike, paths) -> dict:
    """{relative path: {sha256, bytes}} for every file under each given path."""
    run = Path(run)
    out: dict[str, dict] = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[f.relative_to(run).as_posix()] = file_record(f)
    return out


def read(run: str | os.PathLike) -> dict:
    path = Path(run) / MANIFEST
    if not path.exists():
        return {"stages": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); restore it or start a new --run directory.") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as err:
        raise UserError(f"{path} cannot be read ({err}); restore it or start a new --run directory.") from None
    stages = data.get("stages", {}) if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(r, dict) for r in stages.values()) \
            or not isinstance(data.get("attempts", {}), dict):
        raise UserError(f"{path} is not a workbench manifest (it must be a JSON object whose \"stages\" maps each "
                        "stage to its record); restore it or start a new --run directory.")
    data.setdefault("stages", {})
    return data


def stage(run: str | os.PathLike, name: str) -> dict | None:
    return read(run).get("stages", {}).get(name)


def require_run(run: str | os.PathLike, made_by: str = "that `workbench train` wrote") -> Path:
    """``run`` resolved, when it is an existing run directory; otherwise a UserError saying to
    pass the --run DIR ``made_by`` ("that `workbench train` wrote")."""
    run = Path(run).resolve()
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a run directory; pass the --run DIR {made_by}.")
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; pass the --run DIR {made_by}.")
    return run


def require_stage(run: str | os.PathLike, name: str, hint: str) -> dict:
    rec = stage(run, name)
    if not rec or rec.get("status") != "complete":
        raise UserError(f"{Path(run)} has no completed {name} stage; {hint}")
    return rec


def record_stage(run: str | os.PathLike, name: str, record: dict) -> dict:
    """Write one stage's record (status complete, with a timestamp) atomically. A
    complete record ends the stage's attempt, if one was noted."""
    from workbench.envinfo import environment

    data = read(run)
    record = {"status": "complete", "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(), **record}
    data.setdefault("stages", {})[name] = record
    if record.get("status") == "complete":
        data.get("attempts", {}).pop(name, None)
        if not data.get("attempts"):
            data.pop("attempts", None)
    atomic.write_json(Path(run) / MANIFEST, data)
    return record


def has_complete(run: str | os.PathLike, name: str) -> bool:
    return (stage(run, name) or {}).get("status") == "complete"


def note_attempt(run: str | os.PathLike, name: str, status: str, **extra) -> None:
    """The state of a try at stage ``name``. While the stage has a complete record, that
    record is kept and the try is noted under ``attempts``; otherwise the try is the
    stage's record (as "running", "failed", "refused" or "interrupted")."""
    data = read(run)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if (data["stages"].get(name) or {}).get("status") == "complete":
        data.setdefault("attempts", {})[name] = {"status": status, "time_utc": now, **extra}
        atomic.write_json(Path(run) / MANIFEST, data)
    else:
        record_stage(run, name, {"status": status, **extra})


def attempt(run: str | os.PathLike, name: str) -> dict | None:
    """The last unfinished try at ``name`` noted beside its kept complete record, if any."""
    return read(run).get("attempts", {}).get(name)


def settle_attempts(run: str | os.PathLike) -> None:
    """Tries still noted as "running" belong to a process that is gone (the caller holds the
    run's lock): note them as "killed"."""
    data = read(run)
    stale = {name: a for name, a in data.get("attempts", {}).items() if (a or {}).get("status") == "running"}
    if stale:
        for name, a in stale.items():
            data["attempts"][name] = {**a, "status": "killed",
                                      "error": "the try was killed; the complete record was kept"}
        atomic.write_json(Path(run) / MANIFEST, data)


def clean_leftovers(run: str | os.PathLike) -> list[str]:
    """Remove what killed writers leave in the run: temp names (``.*.partial``, files or
    folders, at any depth), the train stage's staging folder and the trainer scratch
    folders of older versions (``train/.trainer.*``). Only call it holding the run's lock:
    then none of them belongs to a live process. Returns what was removed (relative)."""
    import shutil

    run = Path(run)
    if not run.is_dir():
        return []
    found = [p for p in run.rglob(".*.partial")] + list((run / "train").glob(".trainer.*"))
    removed = []
    for path in sorted(found, key=lambda p: len(p.parts)):
        if not path.exists() and not path.is_symlink():
            continue   # inside a folder already removed
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.relative_to(run).as_posix())
    return removed


def relative(run: str | os.PathLike, path: str | os.PathLike) -> str:
    """``path`` relative to the run when it lies inside it (so the run can move), else absolute."""
    run, path = Path(run).resolve(), Path(path).resolve()
    try:
        return path.relative_to(run).as_posix() or "."
    except ValueError:
        return str(path)


def resolve(run: str | os.PathLike, recorded: str | os.PathLike) -> Path:
    """A recorded path: relative ones are inside the run."""
    recorded = Path(recorded)
    return recorded if recorded.is_absolute() else Path(run) / recorded


# --------------------------------------------------------------------------- the run lock
LOCK = ".lock"
_held: dict[str, list] = {}   # resolved run -> [fd, depth]: the lock is re-entrant within a process


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "a process that has not written its pid yet"


@contextlib.contextmanager
def lock(run: str | os.PathLike):
    """Hold RUN/.lock for the duration (creating RUN). A second process is refused with a
    UserError naming the holder's pid; the same process may nest."""
    import fcntl

    run = Path(run).resolve()
    key = str(run)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    path = run / LOCK
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"run directory {run} is not writable ({err.strerror}); make it writable, or copy it "
                            "and pass the copy as --run.") from None
        if err.errno in (errno.ENOTDIR, errno.EEXIST):
            raise UserError(f"--run {run} (or a folder above it) is a file, not a run directory; pass a "
                            "directory.") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"run directory {run} is in use by another workbench command ({_holder(path)}); wait "
                            "for it to finish, or use another --run directory.") from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = [fd, 1]
        yield
    finally:
        _held.pop(key, None)
        os.close(fd)   # closing the descriptor releases the flock


def verify_outputs(run: str | os.PathLike, name: str) -> list[str]:
    """Problems (missing file, changed hash) with a stage's recorded outputs; empty if none."""
    run = Path(run)
    rec = stage(run, name) or {}
    problems = []
    for rel, meta in (rec.get("outputs") or {}).items():
        f = run / rel
        if not f.exists():
            problems.append(f"{rel} is missing")
        elif sha256_file(f) != meta["sha256"]:
            problems.append(f"{rel} changed since the {name} stage wrote it (sha256 differs)")
    return problems
