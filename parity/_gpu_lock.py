"""A reader-writer lock over the GPU across the parity suite's xdist workers.

Every GPU test holds it shared; a ``gpu_exclusive`` test (the >2^31-element cases, 10-25 GB
each) holds it alone, so that the other workers' cases and their mutant subprocesses cannot
take the memory it needs: on an H100 with 12 workers they did, and out-of-memory errors were
reported as failures. A gate lock keeps new shared holders out while an exclusive one waits,
so the exclusive one is not starved. ``flock`` locks die with their process: a killed worker
never leaves the GPU locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


def lock_dir() -> Path:
    return Path(os.environ.get("PARITY_GPU_LOCK_DIR") or tempfile.gettempdir())


@contextlib.contextmanager
def gpu_share(exclusive: bool):
    uid = os.getuid()
    root = lock_dir()
    with open(root / f"parity-gpu-gate-{uid}", "a") as gate, open(root / f"parity-gpu-{uid}", "a") as main:
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_EX)   # no new shared holder from here on
            fcntl.flock(main, fcntl.LOCK_EX)   # wait for the current ones
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(main, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
