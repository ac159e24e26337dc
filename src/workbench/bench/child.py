"""Child processes of the bench suites: each measurement runs in a process of its own.

:func:`run_child` is ``subprocess.run(cmd, capture_output=True, text=True)`` that a stop can
reach: while it waits, the child is known to :func:`kill_children`, and an exception in the
waiting thread (SIGTERM as SystemExit under workbench.cli, Ctrl-C) kills it, so no orphan
keeps the GPU.
"""
from __future__ import annotations

import subprocess
import threading

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
