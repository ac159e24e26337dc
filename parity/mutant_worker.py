"""The mutation self-test's worker process: judges planted mutants one at a time, apart
from the test session, so that a mutant which crashes its kernel -- a segfault, an abort,
an illegal address on the GPU (after which the process's CUDA context is lost) -- is
counted as killed instead of taking the suite down with it.

Run as ``python -m parity.mutant_worker``: it reads one request a line on stdin (JSON:
``{"id": "<kernel>:<name>"}`` for a mutant of ``parity/mutants``, or ``{"mutant": {...}}``
for any other, with ``Mutant``'s fields and dtypes as names) and answers each with one line
``@@verdict {...}`` on stdout: ``outcome`` is

* ``killed``:   the static int64 check flags the mutated source, or the parity property
                fails on it (``by`` says which, ``detail`` the first counterexample);
* ``crashed``:  the kernel raised, or the device failed under it; the worker exits after
                answering (its CUDA context may be gone), and the client starts a new one;
* ``survived``: every example of every dtype of the mutant passed;
* ``error``:    the suite's own failure (a stale mutant, a broken harness): never a kill.

The client (:class:`Worker`) keeps one worker for the whole test session (the imports cost
seconds), restarts it after a crash, and reports a worker that dies without answering (a
signal) or answers nothing within the timeout (a hang) as ``crashed`` too.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

MARK = "@@verdict "
ROOT = Path(__file__).resolve().parents[1]
#: Seconds one mutant may take before the worker is taken for hung (a kill, like a crash).
TIMEOUT_S = float(os.environ.get("PARITY_MUTANT_TIMEOUT", 1800))


@dataclass
class Verdict:
    outcome: str          # killed | crashed | survived | error
    by: str = ""
    detail: str = ""

    @property
    def killed(self) -> bool:
        return self.outcome in ("killed", "crashed")


# --------------------------------------------------------------------------- worker side
def _device_error(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("CUDA error", "illegal memory access", "device-side assert", "CUDA_ERROR",
                                   "misaligned address", "unspecified launch failure"))


def _judge(request: dict) -> tuple[Verdict, bool]:
    """(verdict, exit afterwards)."""
    import torch

    import workbench.kernels as K
    from workbench.kernels._harness import KernelCrash

    from ._profiles import NO_SHRINK
    from ._support import check_property
    from .int64_offsets import findings_in_source, siblings
    from .mutants import Mutant, all_mutants, load, mutated_source

    try:
        if "id" in request:
            matches = [m for m in all_mutants() if m.id == request["id"]]
            if not matches:
                return Verdict("error", detail=f"no mutant {request['id']!r} in parity/mutants"), False
            mutant = matches[0]
        else:
            fields = dict(request["mutant"])
            if "dtypes" in fields:
                fields["dtypes"] = tuple(getattr(torch, d) for d in fields["dtypes"])
            mutant = Mutant(**fields)
        source = mutated_source(mutant)
        # (the calls into shared modules followed from the kernels' own directory)
        static = findings_in_source(source, f"{mutant.kernel} ({mutant.name})", siblings(Path(K.__file__).parent))
        if static:
            return Verdict("killed", "the static int64 check", "\n".join(map(str, static))), False
        spec = load(mutant)
    except Exception as err:  # noqa: BLE001 -- a stale mutant, an import error: the suite's failure
        return Verdict("error", detail="".join(traceback.format_exception(err))), False

    for dtype in mutant.dtypes:
        name = str(dtype).removeprefix("torch.")
        try:
            check_property(spec, dtype, phases=NO_SHRINK)
        except AssertionError as err:
            return Verdict("killed", f"the parity property ({name})", str(err)[:4000]), False
        except KernelCrash as err:
            return Verdict("crashed", f"the kernel crashed ({name})", str(err)[:4000]), True
        except Exception as err:  # noqa: BLE001
            if _device_error(err):
                return Verdict("crashed", f"a device error ({name})", str(err)[:4000]), True
            return Verdict("error", detail="".join(traceback.format_exception(err))), False
    return Verdict("survived"), False


def main() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        verdict, leave = _judge(json.loads(line))
        sys.stdout.write(MARK + json.dumps(verdict.__dict__) + "\n")
        sys.stdout.flush()
        if leave:
            return 3
    return 0


# --------------------------------------------------------------------------- client side
class Worker:
    """A long-lived ``python -m parity.mutant_worker`` process, restarted after a crash."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.log = tempfile.NamedTemporaryFile(prefix="mutant-worker-", suffix=".log", delete=False)

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "parity.mutant_worker"], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, bufsize=1)
        lines = self.lines = queue.Queue()  # a fresh queue: nothing of a dead worker's is read again
        stdout = self.proc.stdout

        def pump():
            for out in stdout:
                lines.put(out)
            lines.put(None)  # EOF: the worker is gone

        threading.Thread(target=pump, daemon=True).start()

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def judge(self, request: dict) -> Verdict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._dead("the worker died before reading the request")
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                self.proc.wait()
                return Verdict("crashed", "a hang", f"no verdict within {self.timeout_s:.0f} s; the worker was "
                                                    f"killed\n{self._log_tail()}")
            if line is None:
                return self._dead("the worker died without a verdict")
            if line.startswith(MARK):
                verdict = Verdict(**json.loads(line[len(MARK):]))
                if verdict.outcome == "crashed":
                    self.proc.wait(timeout=60)
                return verdict
            sys.stdout.write(line)  # whatever the kernel printed

    def _dead(self, what: str) -> Verdict:
        code = self.proc.wait() if self.proc is not None else None
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return Verdict("crashed", f"the worker process ({how})", f"{what} ({how})\n{self._log_tail()}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


if __name__ == "__main__":
    from . import _profiles  # noqa: F401  (the interpreter switch and hypothesis profiles first)

    raise SystemExit(main())
