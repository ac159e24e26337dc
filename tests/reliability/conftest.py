"""Fixtures of the reliability suite (helpers: reliability_support.py).

* ``finished``: one tiny finished run (`workbench run`, train to report, 3 steps),
  built once per session; cases copy it (``shutil.copytree``) and never touch it.
* ``models``: tiny user checkpoints (2 and 4 layers of width 64, 4 of width 32) and a
  LoRA adapter of each (random, non-zero B), for the merge and train cases.
* ``lock_holder``: a process holding a run's lock, as a running command does.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from reliability_support import SMALL, main, write_adapter, write_checkpoint


class Finished:
    """The finished run, the pipeline's output and each stage's duration (seconds)."""

    def __init__(self, path: Path, out: str):
        self.path, self.out = path, out
        self.durations = {name: float(s) for name, s in re.findall(r"^\[\d/5\] (\w+): done in ([\d.]+)s", out,
                                                                       flags=re.M)}

    def copy(self, dest: Path) -> Path:
        return Path(shutil.copytree(self.path, dest, symlinks=True))


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("finished") / "run"
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            code = main(["run", "--run", str(run), *SMALL, "--eval-limit", "4"])
    finally:
        torch.set_num_threads(before)
    assert code == 0, buf.getvalue()[-3000:]
    return Finished(run, buf.getvalue())


class Models:
    """Tiny user checkpoints and adapters, built once (read-only for the cases)."""

    def __init__(self, root: Path):
        self.root = root
        self.base4 = write_checkpoint(root / "base4", layers=4)
        self.base2 = write_checkpoint(root / "base2", layers=2)
        self.narrow4 = write_checkpoint(root / "narrow4", layers=4, hidden=32)
        self.adapter2 = write_adapter(root / "adapter2", self.base2)                # covers 2 of base4's 4 layers
        self.adapter4 = write_adapter(root / "adapter4", self.base4)                # fits base4
        self.adapter_narrow = write_adapter(root / "adapter_narrow", self.narrow4)  # other widths


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("models"))


_HOLD = ("import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.ftruncate(fd, 0); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n")


@pytest.fixture
def lock_holder():
    """start(run) -> pid: a process that holds RUN/.lock until the test ends."""
    procs = []

    def start(run: Path) -> int:
        run.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
