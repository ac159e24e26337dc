"""The GPU lock of the parity suite's workers (``_gpu_lock.gpu_share``), on any machine: shared
holders overlap, an exclusive one runs alone, and one waiting for the GPU is not starved by
shared holders that arrive after it."""
import multiprocessing
import time

import pytest

from ._gpu_lock import gpu_share


def _hold(exclusive: bool, start: float, hold: float, log, lock_dir: str):
    import os

    os.environ["PARITY_GPU_LOCK_DIR"] = lock_dir
    time.sleep(max(0.0, start - time.time()))
    with gpu_share(exclusive):
        log.put(("in", exclusive, time.time()))
        time.sleep(hold)
        log.put(("out", exclusive, time.time()))


@pytest.fixture
def run(tmp_path):
    ctx = multiprocessing.get_context("fork")

    def go(plan):  # plan: (exclusive, start offset s, hold s) per process
        log, t0 = ctx.Queue(), time.time() + 0.3
        procs = [ctx.Process(target=_hold, args=(ex, t0 + at, hold, log, str(tmp_path))) for ex, at, hold in plan]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
        events = sorted((log.get(timeout=5) for _ in range(2 * len(plan))), key=lambda e: e[2])
        return [(kind, ex) for kind, ex, _ in events]
    return go


def test_shared_holders_overlap_and_an_exclusive_one_runs_alone(run):
    # two shared from t=0 for 0.6 s; an exclusive asks at 0.2 s; a shared one arrives at 0.4 s
    events = run([(False, 0.0, 0.6), (False, 0.0, 0.6), (True, 0.2, 0.3), (False, 0.4, 0.2)])
    assert events[:2] == [("in", False), ("in", False)]            # shared: together
    i = events.index(("in", True))
    assert events[i + 1] == ("out", True)                          # alone while it holds the GPU
    assert events[:i].count(("out", False)) == 2                    # after the two it waited for
    assert events[-2:] == [("in", False), ("out", False)]           # the late shared one waited for it
