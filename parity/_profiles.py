"""Hypothesis profiles of the parity suite, and the interpreter switch. Imported by
``conftest.py`` and by the mutation worker (``mutants/runner.py``), which runs outside
pytest: both must run before anything imports triton.

Without CUDA, Triton's CPU interpreter is switched on here (it must be set before
triton is first imported). The hypothesis profile comes from PARITY_PROFILE:
``ci`` (CPU interpreter, small shapes), ``gpu`` (real shapes) or ``nightly``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_COMMON = dict(
    deadline=None,
    print_blob=True,
    # Inputs are built from a drawn seed, so hypothesis' data-size checks do not apply.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# ci: a fixed (derandomized) sequence keeps CI reproducible; the budget keeps the
# whole suite within a few minutes on 2 cores under the interpreter. PARITY_RANDOM=1 draws
# afresh each run instead: repeated, it finds mutants that the fixed sequence kills by luck.
settings.register_profile("ci", max_examples=int(os.environ.get("PARITY_EXAMPLES", 20)),
                          derandomize=not os.environ.get("PARITY_RANDOM"), database=None, **_COMMON)
settings.register_profile("gpu", max_examples=int(os.environ.get("PARITY_EXAMPLES", 60)), **_COMMON)
settings.register_profile("nightly", max_examples=int(os.environ.get("PARITY_EXAMPLES", 500)), **_COMMON)

PROFILE = os.environ.get("PARITY_PROFILE") or ("gpu" if torch.cuda.is_available() else "ci")
if PROFILE not in ("ci", "gpu", "nightly"):
    raise RuntimeError(f"PARITY_PROFILE must be ci, gpu or nightly, not {PROFILE!r}")
settings.load_profile(PROFILE)

#: Phases used where a failure is expected (mutation self-test): no shrinking.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
