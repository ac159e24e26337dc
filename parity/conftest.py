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

    @pytest.fixture(autouse=True)
    def _release_cached_gpu_memory():
        """Each xdist worker's caching allocator keeps what its last case freed; on one GPU shared
        by many workers that starves the >2^31-element cases (run in a subprocess of their own) and
        the crash tests' subprocesses of memory. Give it back after every test."""
        yield
        torch.cuda.empty_cache()
