"""Parity suite set-up. Runs before anything imports triton: the interpreter switch and
the hypothesis profiles live in ``_profiles.py`` (shared with the mutation worker)."""
import torch
from hypothesis import settings

from ._profiles import NO_SHRINK, PROFILE  # noqa: F401  (NO_SHRINK: imported from here by tests)


def pytest_report_header(config):
    import os

    interp = os.environ.get("TRITON_INTERPRET", "0")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [f"parity profile: {PROFILE} (max_examples={settings.default.max_examples}); "
            f"device: {dev}; TRITON_INTERPRET={interp}"]


if torch.cuda.is_available():
    import pytest

    from ._gpu_lock import gpu_share

    @pytest.fixture(autouse=True)
    def _gpu_memory(request):
        """The GPU shared or alone (``_gpu_lock.gpu_share``; alone for a ``gpu_exclusive`` test),
        and each xdist worker's caching allocator emptied after every test: it keeps what its last
        case freed, which on one GPU shared by many workers starves the others and the crash
        tests' subprocesses of memory."""
        with gpu_share(request.node.get_closest_marker("gpu_exclusive") is not None):
            yield
            torch.cuda.empty_cache()
