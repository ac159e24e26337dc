"""The yardstick itself: compare() accepts what correct rounding allows and nothing else."""
import torch

from workbench.kernels._tolerance import compare

F16 = torch.float16
MAX16 = torch.finfo(F16).max


def _exact(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_overflow_to_inf_of_the_same_sign_is_what_rounding_gives():
    exact = _exact(1.0, 70000.0, -80000.0)          # beyond float16's 65504
    kernel = torch.tensor([1.0, float("inf"), float("-inf")], dtype=F16)
    assert compare("g", kernel, kernel.clone(), exact, F16).ok


def test_overflow_just_below_the_threshold_may_stay_finite():
    exact = _exact(1.0, 65530.0)                    # rounds to inf; a fp32 sum of 65500 rounds to 65504
    kernel = torch.tensor([1.0, MAX16], dtype=F16)
    assert compare("g", kernel, kernel.clone(), exact, F16).ok


def test_overflow_of_the_wrong_sign_or_a_finite_garbage_value_fails():
    exact = _exact(1.0, 70000.0)
    for wrong in (float("-inf"), 0.0, 1000.0, float("nan")):
        kernel = torch.tensor([1.0, wrong], dtype=F16)
        baseline = torch.tensor([1.0, float("inf")], dtype=F16)
        result = compare("g", kernel, baseline, exact, F16)
        assert not result.ok, wrong
        assert "overflowed" in result.message


def test_inf_where_the_value_is_in_range_fails():
    exact = _exact(1.0, 60000.0)
    kernel = torch.tensor([1.0, float("inf")], dtype=F16)
    assert not compare("g", kernel, kernel.clone(), exact, F16).ok


def test_an_exact_result_passes_and_five_ulps_off_fails():
    exact = _exact(*[1.0 + i / 64 for i in range(64)])  # representable in float16: torch's error is 0
    torch_out = exact.to(F16)
    off = exact.clone()
    off[3] += 5 * 2.0 ** -10                         # 5 ulps: beyond the floor of 2 units + 16 fp32 units
    assert compare("y", torch_out.clone(), torch_out, exact, F16).ok
    assert not compare("y", off.to(torch.float32).to(F16), torch_out, exact, F16).ok
