"""Child processes of the bench suites: each measurement runs in a process of its own.

:func:`run_child` is ``subprocess.run(cmd, capture_output=True, text=True)`` that a stop can
reach: while it waits, the child is known to :func:`kill_children`, and an exception in the
waiting thread (SIGTERM as SystemExit under workbench.cli, Ctrl-C) kills it, so no orphan
keeps the GPU. :func:`train` is the suites' one way to train a run in a child (``workbench
train``, or the training recipe on a comparison stack) and read what it recorded.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: Processes running now, so that a suite stopped in the main thread can end those its
#: other threads started (a child left running would keep its GPU).
_CHILDREN: set[subprocess.Popen] = set()
_KILLED: set[subprocess.Popen] = set()
_LOCK = threading.Lock()


class Stopped(Exception):
    """A child killed because the suite was stopped: it measured nothing."""


def run_child(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, with the process known
    to :func:`kill_children` while it runs; killed if this thread is interrupted."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        with _LOCK:
            _CHILDREN.add(proc)
        try:
            stdout, stderr = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with _LOCK:
                _CHILDREN.discard(proc)
                killed = proc in _KILLED
                _KILLED.discard(proc)
    if killed:
        raise Stopped(f"stopped: {cmd[-1]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_children() -> None:
    with _LOCK:
        running = list(_CHILDREN)
        _KILLED.update(running)
    for proc in running:
        proc.kill()


def last_line(stderr: str) -> str:
    """What a failed child said last (its error, usually)."""
    return (stderr.strip().splitlines() or ["(no output)"])[-1]


@dataclass
class Trained:
    """What a training child left: its exit code, its last stderr line when it failed, and the
    run's train record and loss log when it finished."""

    exit_code: int
    wall_s: float
    stderr: str
    record: dict | None = None
    losses: list | None = None

    @property
    def error(self) -> str | None:
        return None if self.exit_code == 0 else last_line(self.stderr)


def train_command(config: str | Path, run_dir: str | Path, stack: str | None = None,
                  options: list[str] = ()) -> list[str]:
    """``workbench train`` on ``config`` into ``run_dir``; with ``stack``, the recipe on that
    comparison stack (workbench.bench.train_child, which also takes ``options``)."""
    head = ["-m", "workbench", "train"] if stack is None else ["-m", "workbench.bench.train_child", "--stack", stack]
    return [sys.executable, *head, "--config", str(config), "--run", str(run_dir), *options]


def train(config: str | Path, run_dir: str | Path, stack: str | None = None, env: dict | None = None,
          options: list[str] = ()) -> Trained:
    """Train one run in a child process (:func:`train_command`) and read its record and loss log."""
    t0 = time.perf_counter()
    proc = run_child(train_command(config, run_dir, stack, options), env=env)
    out = Trained(proc.returncode, round(time.perf_counter() - t0, 1), proc.stderr or "")
    if proc.returncode == 0:
        run_dir = Path(run_dir)
        out.record = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]
        log = run_dir / "train" / "loss.jsonl"
        out.losses = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] \
            if log.is_file() else []
    return out
