"""The >2^31-element cases (``large.py``): on the GPU in the ``gpu`` profile, each in its own
process; on the CPU, the same code on small shapes, so that the machinery is tested wherever
the suite runs."""
import pytest
import torch

from ._support import profile
from .large import CASES, SHAPES, SKIP, elements, run, run_large_case_in_subprocess
from .mutants import all_mutants, load

GPU = profile() == "gpu" and torch.cuda.is_available()


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_gpu_case_passes_2_31_elements(case):
    assert elements(case, SHAPES[case][0]) > 2**31


# One at a time under xdist (``--dist loadgroup``, as `workbench parity` runs), and with the GPU to
# itself while it runs (``gpu_exclusive``, parity/conftest.py): each takes 10-25 GB.
@pytest.mark.xdist_group("past-2-31")
@pytest.mark.gpu_exclusive
@pytest.mark.skipif(not GPU, reason="the gpu profile's dedicated cases need CUDA (and ~10-25 GB free)")
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernel_is_right_past_2_31_elements(case):
    code, out = run_large_case_in_subprocess(case)
    if code == SKIP:
        pytest.skip(out.strip().splitlines()[-1])
    assert code == 0, f"the {case} case past 2^31 elements failed (exit status {code}):\n{out[-4000:]}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_blockwise_comparison_on_a_small_shape(case):
    assert run(case, small=True) == 0


# A planted bug each small case must see: the blockwise comparison is not blind.
CAUGHT = {"cross_entropy": "cross_entropy:last_vocab_block_mask_off_by_one",
          "fused_linear_cross_entropy": "fused_linear_cross_entropy:upstream_scale_skipped",
          "rope": "rope:bwd_plus_sin"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_blockwise_comparison_catches_a_planted_bug(case):
    mutant = next(m for m in all_mutants() if m.id == CAUGHT[case])
    assert load(mutant)  # the mutant applies to today's source
    assert run(case, small=True, mutant_id=mutant.id) == 1
