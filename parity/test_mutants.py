"""Mutation self-test: every planted bug must make the suite fail.

Each mutant is judged in a worker process (``mutant_worker.py``): killed when the static
int64 check flags its source or the parity property fails on it, and killed too when its
kernel crashes (a segfault, an abort, an illegal address on the GPU), which a worker
survives by dying alone."""
import dataclasses
import os

import pytest
import torch

from ._support import profile
from .mutant_worker import Worker
from .mutants import Mutant, all_mutants, load

MUTANTS = all_mutants()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _fmt(verdict) -> str:
    return f"{verdict.outcome} by {verdict.by}: {verdict.detail[:1500]}"


# A mutant judged by a >2^31-element case needs the GPU to itself, as that case does (test_large.py).
@pytest.mark.parametrize("mutant", [pytest.param(m, marks=[pytest.mark.gpu_exclusive] if m.large else [])
                                    for m in MUTANTS], ids=[m.id for m in MUTANTS])
def test_mutant_is_killed(mutant, worker):
    device = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"
    if device not in mutant.devices:
        pytest.skip(f"{mutant.id} patches a line that runs only on {', '.join(mutant.devices)}")
    verdict = worker.judge({"id": mutant.id})
    assert verdict.outcome != "error", f"mutant {mutant.id} could not be judged:\n{verdict.detail}"
    assert verdict.killed, (f"mutant {mutant.id} survived the parity suite ({mutant.why}). "
                            "This is a hole in the suite: make a strategy draw the case that exposes it.")
    print(f"{mutant.id}: {verdict.outcome} by {verdict.by}")


def test_every_mutant_applies_to_todays_source():
    """A mutant skipped on this device (its line runs only on the other) must still match the
    source, so that the run on the other device judges a real bug, not a stale patch."""
    from pathlib import Path

    from .mutants import mutated_source, target_module

    for mutant in MUTANTS:  # mutated_source raises StaleMutant when the patched text is gone
        assert mutated_source(mutant) != Path(target_module(mutant).__file__).read_text(), mutant.id


CORE = {"rms_norm", "add_rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy"}


def test_there_are_enough_mutants():
    # At least 12 mutants of the core kernels and 6 of the memory kernels (FLCE, LoRA, NF4).
    core = [m for m in MUTANTS if m.kernel in CORE]
    memory = [m for m in MUTANTS if m.kernel not in CORE]
    assert len(core) >= 12, f"only {len(core)} core mutants planted"
    assert len(memory) >= 6, f"only {len(memory)} memory-kernel mutants planted"


# A crash of the kernel under test is a kill, and the session goes on after it.
_LAUNCHER = ("def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) "
             "-> torch.Tensor:\n")
_CRASH = "raise RuntimeError('CUDA error: an illegal memory access was encountered')"


def _synthetic(name: str, line: str) -> dict:
    m = Mutant("swiglu", name, "planted crash", old=_LAUNCHER, new=_LAUNCHER + f"    {line}\n")
    return {**dataclasses.asdict(m), "dtypes": ["float32"]}


#: A function of the shared LoRA building blocks that lora_o calls in its forward.
_SHARED = "def lora_forward(h2, hd2, w, A, B, s: float, bias=None, out_dtype: torch.dtype | None = None, xa=None):\n"


def _shared(kernel: str, name: str, line: str) -> Mutant:
    return Mutant(kernel, name, "planted in a shared module", old=_SHARED, new=_SHARED + f"    {line}\n",
                  module="_lora_ops")


@pytest.mark.parametrize(("name", "line", "by"), [
    ("segfault", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "worker process (signal 11)"),
    ("abort", "import os; os.abort()", "worker process (signal 6)"),
    ("illegal_address", _CRASH, "the kernel crashed"),
])
def test_a_crashing_kernel_counts_as_killed_and_the_session_goes_on(name, line, by, worker):
    verdict = worker.judge({"mutant": _synthetic(name, line)})
    assert verdict.outcome == "crashed", _fmt(verdict)
    assert by in verdict.by, _fmt(verdict)
    # the next judgement runs in a fresh worker, and a correct kernel still passes there
    again = worker.judge({"mutant": _synthetic("harmless", "pass")})
    assert again.outcome == "survived", _fmt(again)


def test_a_mutant_of_a_shared_module_reaches_the_kernel_under_test(worker):
    # The planted crash is in _lora_ops.lora_forward: it kills lora_o only if the kernel copy calls the copy.
    m = _shared("lora_o", "shared_crash", _CRASH)
    verdict = worker.judge({"mutant": {**dataclasses.asdict(m), "dtypes": ["float32"]}})
    assert verdict.outcome == "crashed" and "the kernel crashed" in verdict.by, _fmt(verdict)


def test_a_shared_module_is_patched_in_a_copy_only():
    import workbench.kernels._lora_ops as ops
    import workbench.kernels.lora_o as lora_o

    real = ops.lora_forward
    spec = load(_shared("lora_o", "shared_copy", "pass"))
    fn_globals = spec.fn.__globals__
    assert fn_globals["lora_forward"] is not real and fn_globals["lora_forward"].__module__.endswith("_lora_ops")
    assert fn_globals["lora_backward"] is not ops.lora_backward  # every name imported from it, not only the patched
    assert ops.lora_forward is real and lora_o.lora_forward is real  # the real modules are untouched


def test_a_mutant_of_a_module_its_kernel_does_not_import_is_an_error(worker):
    m = _shared("swiglu", "not_imported", "pass")
    verdict = worker.judge({"mutant": {**dataclasses.asdict(m), "dtypes": ["float32"]}})
    assert verdict.outcome == "error" and "does not import" in verdict.detail, _fmt(verdict)


def test_a_stale_mutant_is_an_error_not_a_kill(worker):
    m = Mutant("swiglu", "stale", "text that is not there", old="no such text in the kernel", new="x")
    verdict = worker.judge({"mutant": {**dataclasses.asdict(m), "dtypes": ["float32"]}})
    assert verdict.outcome == "error" and "update the mutant" in verdict.detail, _fmt(verdict)


@pytest.mark.skipif(not (profile() == "gpu" and torch.cuda.is_available()),
                    reason="the >2^31-element cases run in the gpu profile, on CUDA")
@pytest.mark.parametrize("mutant", [m for m in MUTANTS if m.large], ids=[m.id for m in MUTANTS if m.large])
def test_int32_mutants_are_killed_on_the_gpu_by_the_large_cases(mutant):
    from .large import run_large_case_in_subprocess

    code, out = run_large_case_in_subprocess(mutant.large, mutant=mutant.id)
    if code == 77:
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else "not enough GPU memory")
    assert code != 0, f"the {mutant.large} 2^31 case passed on mutant {mutant.id}:\n{out[-3000:]}"
    assert os.environ.get("PARITY_PROFILE", "gpu") == "gpu"
