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


#: This process's hold of the GPU while in ``gpu_share``: (gate file, main file, exclusive).
_held: tuple | None = None


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
        global _held
        _held = (gate, main, exclusive)
        try:
            yield
        finally:
            _held = None
            fcntl.flock(main, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)


@contextlib.contextmanager
def alone():
    """Inside a shared ``gpu_share``: the GPU alone for a while, then shared again (an
    out-of-memory retry: the other workers finish their tests, empty their caches and wait at
    the gate). Outside one, or already alone, nothing changes. Two workers asking at once
    queue at the gate; each has given up its shared hold, so neither waits for the other."""
    global _held
    if _held is None or _held[2]:
        yield
        return
    gate, main, _ = _held
    fcntl.flock(main, fcntl.LOCK_UN)
    fcntl.flock(gate, fcntl.LOCK_EX)
    fcntl.flock(main, fcntl.LOCK_EX)
    _held = (gate, main, True)
    try:
        yield
    finally:
        fcntl.flock(main, fcntl.LOCK_SH)  # converted: held shared again, as gpu_share expects
        fcntl.flock(gate, fcntl.LOCK_UN)
        _held = (gate, main, False)
