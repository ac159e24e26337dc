"""The run directory and its manifest.

Every stage (train, merge, export, eval, report, qualify) is a function that reads
artifacts from a run directory and writes new ones, and records itself in
``<run>/manifest.json`` under ``stages.<name>``:

    {"inputs": {...}, "input_hashes": {...}, "outputs": {rel_path: {"sha256", "bytes"}},
     "versions": {...}, "timings": {...}, "status": "complete", ...extra}

The manifest is rewritten atomically after a stage completes, so a killed stage
never looks finished; earlier stages' records and artifacts are untouched.
"""
from __future__ import annotations

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
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); restore it or start a new --run directory.") from None


def stage(run: str | os.PathLike, name: str) -> dict | None:
    return read(run).get("stages", {}).get(name)


def require_stage(run: str | os.PathLike, name: str, hint: str) -> dict:
    rec = stage(run, name)
    if not rec or rec.get("status") != "complete":
        raise UserError(f"{Path(run)} has no completed {name} stage; {hint}")
    return rec


def record_stage(run: str | os.PathLike, name: str, record: dict) -> dict:
    """Write one stage's record (status complete, with a timestamp) atomically."""
    from workbench.envinfo import environment

    data = read(run)
    record = {"status": "complete", "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(), **record}
    data.setdefault("stages", {})[name] = record
    atomic.write_json(Path(run) / MANIFEST, data)
    return record


def verify_outputs(run: str | os.PathLike, name: str) -> list[str]:
    """Problems (missing file, changed hash) with a stage's recorded outputs; empty if none."""
    run = Path(run)
    rec = stage(run, name) or {}
    problems = []
    for rel, meta in rec.get("outputs", {}).items():
        f = run / rel
        if not f.exists():
            problems.append(f"{rel} is missing")
        elif sha256_file(f) != meta["sha256"]:
            problems.append(f"{rel} changed since the {name} stage wrote it (sha256 differs)")
    return problems
