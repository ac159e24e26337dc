import os

import torch

# Kernel code launched from tests/ runs on the CPU interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def one_cpu_thread():
    """One torch thread on the CPU: MKL with 2 threads takes ~16 ms per tiny transposed matmul on
    the 2-core CI machines, ~1000x one thread's time; xdist runs a worker per core anyway. Files of
    many tiny matmuls use it for every test (``pytestmark = pytest.mark.usefixtures(...)``)."""
    if torch.cuda.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_forwards():
    """``count_forwards(module) -> list``: wraps the module's forward so that every call, the
    checkpointing recompute included, appends to the returned list (a forward hook would not
    see the recompute: torch skips hooks there)."""
    def wrap(module) -> list:
        calls, forward = [], module.forward

        def counting_forward(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        module.forward = counting_forward
        return calls
    return wrap
