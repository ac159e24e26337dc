"""Mutation self-test: every planted bug must make the parity property fail."""
import pytest

from ._support import check_property
from .conftest import NO_SHRINK
from .mutants import all_mutants, load

MUTANTS = all_mutants()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_mutant_is_killed(mutant):
    spec = load(mutant)
    failures = []
    for dtype in mutant.dtypes:
        try:
            check_property(spec, dtype, phases=NO_SHRINK)
        except AssertionError as err:
            failures.append((dtype, err))
            break
    assert failures, (f"mutant {mutant.id} survived the parity suite ({mutant.why}). "
                      "This is a hole in the suite: make a strategy draw the case that exposes it.")


CORE = {"rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy"}


def test_there_are_enough_mutants():
    # At least 12 mutants of the core kernels and 6 of the memory kernels (FLCE, LoRA, NF4).
    core = [m for m in MUTANTS if m.kernel in CORE]
    memory = [m for m in MUTANTS if m.kernel not in CORE]
    assert len(core) >= 12, f"only {len(core)} core mutants planted"
    assert len(memory) >= 6, f"only {len(memory)} memory-kernel mutants planted"
