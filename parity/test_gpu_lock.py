"""The GPU lock of the parity suite's workers (``_gpu_lock.gpu_share``), on any machine: shared
holders overlap, an exclusive one runs alone, and one waiting for the GPU is not starved by
shared holders that arrive after it; a shared holder can go alone for a while (``alone``: the
out-of-memory retry of a case), and the property retries a case that ran out of memory once."""
import contextlib
import multiprocessing
import time
from types import SimpleNamespace

import pytest
import torch

from ._gpu_lock import alone, gpu_share


def _hold(exclusive, start: float, hold: float, log, lock_dir: str):
    """``exclusive``: True, False, or "alone" (shared, then alone for ``hold``)."""
    import os

    os.environ["PARITY_GPU_LOCK_DIR"] = lock_dir
    time.sleep(max(0.0, start - time.time()))
    with gpu_share(exclusive is True):
        if exclusive == "alone":
            with alone():
                log.put(("in", exclusive, time.time()))
                time.sleep(hold)
                log.put(("out", exclusive, time.time()))
            return
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


def test_a_shared_holder_goes_alone_and_comes_back_shared(run):
    # shared from t=0 for 0.6 s; one that holds the GPU shared from 0.1 s goes alone for 0.3 s
    # (once the first is done); a shared one arrives at 0.3 s, while the second waits
    events = run([(False, 0.0, 0.6), ("alone", 0.1, 0.3), (False, 0.3, 0.2)])
    i = events.index(("in", "alone"))
    assert events[i + 1] == ("out", "alone")                       # nobody else on the GPU meanwhile
    assert events[:i] == [("in", False), ("out", False)]           # it waited for the first holder
    assert events[-2:] == [("in", False), ("out", False)]           # the late one waited for it


def test_a_case_out_of_memory_is_retried_once_with_the_gpu_alone(monkeypatch):
    from workbench.kernels import registry

    from . import _support

    calls, alone_calls = [], []

    def first_call_out_of_memory(spec, params, dtype, seed):
        calls.append(seed)
        if len(calls) % 2:
            raise torch.OutOfMemoryError("CUDA out of memory (another worker's)")
        return SimpleNamespace(ok=True)

    @contextlib.contextmanager
    def counted_alone():
        alone_calls.append(1)
        yield

    monkeypatch.setattr(_support, "gpu_alone", counted_alone)
    monkeypatch.setattr(_support, "run_case", first_call_out_of_memory)
    spec = registry()["rms_norm"]
    _support.check_property(spec, torch.float32, max_examples=2, database=None)
    assert alone_calls and len(calls) == 2 * len(alone_calls)      # each case: once shared, once alone

    def always_out_of_memory(*args):
        raise torch.OutOfMemoryError("the case's own")

    monkeypatch.setattr(_support, "run_case", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="the case's own"):
        _support.check_property(spec, torch.float32, max_examples=2, database=None)
