"""Two processes on one run directory: exactly one proceeds, the other is refused with
one sentence naming the lock holder's pid; a lock whose holder died blocks nobody."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from reliability_support import invoke, one_sentence, workbench_env

#: Long enough (about 15 s on an idle 2-core machine, more under load) that the other
#: processes, started at the same time, reach the lock while the winner trains.
STEPS = 200
TRAIN = ["--set", f"training.max_steps={STEPS}", "--set", "eval.max_rows=0", "--set", "data.builtin_rows=64",
         "--set", "training.logging_steps=50"]


def _start(run: Path, tmp: Path, name: str, *extra) -> tuple[subprocess.Popen, Path]:
    err = tmp / f"{name}.err"
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "train", "--run", str(run), *TRAIN, *extra],
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"), env=workbench_env(), cwd=tmp)
    return proc, err


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_trains_started_together_on_one_run_exactly_one_proceeds_and_the_others_name_its_pid(tmp_path):
    """Two equal configs (before the fix the second crashed on a shared temp name) and a
    different one (before: config.yaml from one run, adapter and record from the other),
    started at the same time: the first to take the lock trains, the others are refused
    at once with its pid."""
    run = tmp_path / "run"
    started = [_start(run, tmp_path, "a", "--set", "training.lr=1e-3"),
               _start(run, tmp_path, "b", "--set", "training.lr=1e-3"),
               _start(run, tmp_path, "c", "--set", "training.lr=5e-4")]
    lrs = {started[0][0].pid: 1e-3, started[1][0].pid: 1e-3, started[2][0].pid: 5e-4}
    try:
        _wait_for(lambda: sum(p.poll() is not None for p, _ in started) >= 2, 600, "two of the three to stop")
        proceeding = [(p, e) for p, e in started if p.poll() is None or p.returncode == 0]
        assert len(proceeding) == 1, [e.read_text()[-1000:] for _, e in started]
        (winner, winner_err), = proceeding
        for proc, err in [(p, e) for p, e in started if p is not winner]:
            assert proc.returncode == 2, err.read_text()[-3000:]
            assert f"in use by another workbench command (pid {winner.pid})" in one_sentence(err.read_text())
        assert winner.wait(timeout=900) == 0, winner_err.read_text()[-3000:]
    finally:
        for p, _ in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    # The run is the winner's alone: its config, and a record whose config hash is that file's.
    config = (run / "config.yaml").read_bytes()
    assert yaml.safe_load(config)["training"]["lr"] == lrs[winner.pid]
    data = json.loads((run / "manifest.json").read_text())
    rec = data["stages"]["train"]
    assert rec["status"] == "complete" and rec["steps"] == STEPS and "attempts" not in data
    assert rec["input_hashes"]["config"] == hashlib.sha256(config).hexdigest()
    assert not list(run.rglob(".*.partial"))


def test_a_lock_whose_holder_was_killed_blocks_nobody(finished, lock_holder, tmp_path, capfd):
    run = finished.copy(tmp_path / "run")
    pid = lock_holder(run)
    code, out, err, tb = invoke(["run", "--run", run], capfd)
    assert tb is None and code == 2 and f"(pid {pid})" in one_sentence(err)
    os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: _gone(pid), 30, "the holder to die")
    assert (run / ".lock").read_text().strip() == str(pid)   # its pid is still in the file ...
    code, out, err, tb = invoke(["run", "--run", run], capfd)
    assert tb is None and code == 0, err[-2000:]             # ... but the kernel dropped its lock
    assert out.count("skipped: up to date") == 5


def _gone(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == pid
    except ChildProcessError:
        return True
