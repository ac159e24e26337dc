"""What a person sees on screen, apart from the libraries' chatter.

* :func:`progress` prints one of our progress lines (every stage's ``[stage] ...`` line).
* :func:`quiet` sends everything else written to the process's stdout and stderr for
  the block's duration (transformers', lm-eval's and bitsandbytes' warnings, tqdm bars,
  llama.cpp's C-level messages) to a log file, at the file-descriptor level so that C
  code is caught too. Our progress lines still reach the terminal, and the log as well.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import IO, Iterator

# The real stdout and stderr while quiet() is active.
_out: IO[str] | None = None
_err: IO[str] | None = None
_log: IO[str] | None = None

#: Progress bars the libraries would draw into the log, line by line: off while quiet.
_NO_BARS = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def progress(line: str, detail: bool = False) -> None:
    """One progress line: to stderr, or to the terminal (and the log) inside quiet().
    ``detail``: a stage's inner step, which inside quiet() goes to the log alone (the
    pipeline's own stage lines already say what runs)."""
    if _log is not None:
        print(line, file=_log, flush=True)
        if detail:
            return
    print(line, file=_err or sys.stderr, flush=True)


def say(line: str = "") -> None:
    """A line of a command's result (stdout), which quiet() lets through as well."""
    print(line, file=_out or sys.stdout, flush=True)


def _keep(stream: IO[str], fd: int) -> tuple[IO[str], bool]:
    """(a stream to where ``stream`` writes now, unaffected by redirecting ``fd``; whether
    it is a copy made here, to close afterwards)."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace"), True
    except (AttributeError, OSError, ValueError):
        pass
    return stream, False   # not backed by the descriptor (a test's capture): the caller's, never closed


@contextlib.contextmanager
def quiet(log_path: str | os.PathLike) -> Iterator[Path]:
    """Send the process's own stdout and stderr to ``log_path`` (appended) for the block."""
    global _out, _err, _log
    if _log is not None:   # nested: the outer block already routes everything
        yield Path(log_path)
        return
    log_path = Path(log_path)
    sys.stdout.flush()
    sys.stderr.flush()
    (out, out_copy), (err, err_copy) = _keep(sys.stdout, 1), _keep(sys.stderr, 2)
    saved = os.dup(1), os.dup(2)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    env_before = {k: os.environ.get(k) for k in _NO_BARS}
    os.environ.update(_NO_BARS)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _out, _err, _log = out, err, log
    try:
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        for stream, copy in ((out, out_copy), (err, err_copy)):
            if copy:
                stream.close()
        _out, _err, _log = None, None, None
        log.close()
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
