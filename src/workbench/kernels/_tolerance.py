"""The tolerance doctrine, as code (see ../shared/CONVENTIONS.md and parity/README.md).

For every compared tensor we have three versions computed from the *same* inputs:

  exact     the reference run in float64 (inputs upcast exactly, no rounding);
  baseline  the reference run the way PyTorch / HF run it in the tested dtype:
            inputs and outputs in that dtype, math upcast to float32 where HF
            upcasts. Its distance to ``exact`` is "PyTorch's own error";
  kernel    our Triton kernel in the tested dtype.

A kernel passes when, in two norms, its error is at most ``FACTOR`` times the
baseline's error plus ``ATOL_ULPS`` unit roundoffs of the dtype (and a floor of
``COMPUTE_ULPS_FP32`` fp32 roundoffs for the fp32 math every kernel does):

  * max-norm of the scaled elementwise error
        e_i = |x_i - exact_i| / (|exact_i| + rms(exact) + tiny)
    The ``rms(exact)`` term is the "scale by the tensor's magnitude where
    values cancel to near zero" rule: an element far below the tensor's typical
    size is judged by absolute error at that size, a large one relatively.
  * the relative Frobenius norm ||x - exact|| / (||exact|| + tiny).

Both bounds come from arithmetic, not tuning: an op that computes in fp32 and
rounds once to the output dtype errs by at most one unit roundoff ``u`` per
element, and so does the baseline; two different fp32 summation orders differ by
small multiples of ``u_fp32`` times the condition number, which the baseline's own
error usually carries. Not always: a sum that cancels (a weight gradient of one
element summed over a hundred tokens) amplifies a one-ulp difference in its terms by
its condition number, and a baseline that happened to land close says nothing about
that. So the factor applies to the larger of the baseline's error and the
*conditioning* error: how far ``exact`` itself moves when every input is perturbed by
one fp32 unit roundoff (the harness's perturbed fp64 pass). For a well-conditioned
output that is ~u_fp32, far below every floor; only cancelling outputs get more room,
exactly as much as fp32-level differences in their inputs can cause. NaN or Inf where
``exact`` is finite always fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: Unit roundoff (half an ulp at 1.0) of each tested dtype: 2^-(mantissa bits + 1).
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

#: The kernel may err up to FACTOR times PyTorch's own error. 4 is the top of the
#: doctrine's "2 to 4x" range: the kernel and the baseline round the same fp32
#: values, but sum in different orders (block trees vs. ATen's vectorised
#: pairwise sums), and the realised error of one order can exceed the other's by
#: ~2-3x on an unlucky draw (measured: see parity/README.md for the observed
#: worst ratio). A wrong formula errs by far more than 4x the rounding error.
FACTOR = 4.0

#: Plus this many unit roundoffs. The baseline can be exact by luck (tiny tensors,
#: exactly representable values) while the kernel's fp32 result sits on the other
#: side of a rounding boundary: that is one ulp = 2u relative. 2u covers exactly
#: one flipped rounding and nothing more.
ATOL_ULPS = 2.0

#: Plus this many fp32 unit roundoffs, whatever the output dtype. Every kernel
#: computes in fp32, and a correct fp32 formula of a handful of operations
#: (exp, a division, a product chain: SwiGLU's dgate is six) errs by up to about
#: one u_fp32 per operation, more where the result cancels. The baseline runs a
#: similar chain but can land on the exact value by luck, which happens often on
#: tensors of one to three elements (a 1-element max is no estimate of a
#: distribution). 16 u_fp32 ~ 1e-6 relative: invisible next to bf16/fp16
#: rounding (u = 4e-3 / 5e-4), and 4000x below the error of a bf16 accumulator,
#: the subtlest planted mutant.
COMPUTE_ULPS_FP32 = 16.0


@dataclass
class Comparison:
    name: str
    ok: bool
    kernel_err: float = 0.0
    baseline_err: float = 0.0
    bound: float = 0.0
    kernel_rel: float = 0.0
    baseline_rel: float = 0.0
    rel_bound: float = 0.0
    message: str = ""
    cond_err: float = 0.0
    cond_rel: float = 0.0

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        if self.message and not self.ok:
            return f"{status} {self.name}: {self.message}"
        cond = f", cond {self.cond_err:.3g}" if self.cond_err > self.baseline_err else ""
        cond_rel = f", cond {self.cond_rel:.3g}" if self.cond_rel > self.baseline_rel else ""
        return (
            f"{status} {self.name}: max scaled err {self.kernel_err:.3g} (torch {self.baseline_err:.3g}{cond}, "
            f"bound {self.bound:.3g}); rel norm err {self.kernel_rel:.3g} "
            f"(torch {self.baseline_rel:.3g}{cond_rel}, bound {self.rel_bound:.3g})"
        )


def _errors(x: torch.Tensor, exact: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    tiny = torch.finfo(torch.float64).tiny
    diff = (x.double() - exact).abs()
    diff = torch.where(mask, diff, torch.zeros_like(diff))
    ex = torch.where(mask, exact, torch.zeros_like(exact))
    rms = ex.pow(2).mean().sqrt() if ex.numel() else ex.new_zeros(())
    scaled = diff / (ex.abs() + rms + tiny)
    max_scaled = scaled.max().item() if scaled.numel() else 0.0
    rel = (diff.norm() / (ex.norm() + tiny)).item() if ex.numel() else 0.0
    return max_scaled, rel


def _overflow_masks(x: torch.Tensor, exact: torch.Tensor):
    """(finite, over, bad) masks of ``x`` against ``exact`` (fp64).

    Overflow: an exact value beyond the output dtype's range (e.g. a float16 gradient
    summed over 16k tokens) rounds to inf in that dtype. There ``x`` must give what correct
    rounding gives -- inf of the same sign -- or a value of that sign within 8 units of the
    largest finite one (its fp32 sum fell just below the threshold). Those positions
    (``over``) leave the error norms (for the baseline too, which may be inf there).
    ``bad``: non-finite where ``exact`` is finite and in range, or a wrong overflow."""
    finite = torch.isfinite(exact)
    over = finite & torch.isinf(exact.to(x.dtype))
    fmax = torch.finfo(x.dtype).max
    x64 = x.detach().double()
    near_max = x64.abs() >= fmax * (1 - 8 * UNIT_ROUNDOFF.get(x.dtype, 2.0**-53))
    over_ok = over & (torch.sign(x64) == torch.sign(exact)) & near_max
    bad = (finite & ~torch.isfinite(x64) & ~over_ok) | (over & ~over_ok)
    return finite, over, bad


def spurious_nonfinite(x: torch.Tensor | None, exact: torch.Tensor | None) -> bool:
    """Whether ``x`` is non-finite (or overflows wrongly) where ``exact`` is finite and in
    range: what ``compare`` always fails. The harness asks it of PyTorch's own result to
    tell an upstream scale beyond the dtype's range (GradScaler would skip the step)."""
    if x is None or exact is None or tuple(x.shape) != tuple(exact.shape):
        return False
    return bool(_overflow_masks(x, exact.detach().double())[2].any())


def compare(name: str, kernel: torch.Tensor | None, baseline: torch.Tensor | None,
            exact: torch.Tensor | None, dtype: torch.dtype, unit: float | None = None,
            floor_scale: float = 1.0, perturbed: torch.Tensor | None = None) -> Comparison:
    """Judge ``kernel`` against ``exact`` with ``baseline`` as PyTorch's own error, and
    ``perturbed`` (the exact pass on inputs perturbed by one fp32 unit roundoff) as the
    output's conditioning.

    ``unit`` replaces the unit roundoff of the floor (by default the produced tensor's)
    and ``floor_scale`` multiplies the floor: the harness's ``delta:`` comparisons judge
    a difference of two outputs with the outputs' own floor at the outputs' scale
    (``_harness._deltas``)."""
    if exact is None:
        if kernel is not None:
            return Comparison(name, False, message="kernel produced a tensor where the reference has none")
        return Comparison(name, True)
    if kernel is None:
        return Comparison(name, False, message="kernel produced no tensor (None) where the reference has one")
    if tuple(kernel.shape) != tuple(exact.shape):
        return Comparison(name, False, message=f"shape {tuple(kernel.shape)} != reference {tuple(exact.shape)}")
    if baseline is not None and kernel.dtype != baseline.dtype:
        return Comparison(name, False, message=f"dtype {kernel.dtype} != reference {baseline.dtype}")

    exact = exact.detach().double()
    kernel = kernel.detach()
    finite, over, bad = _overflow_masks(kernel, exact)
    fmax = torch.finfo(kernel.dtype).max
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        return Comparison(name, False, message=f"{int(bad.sum())} non-finite or overflowed value(s) where the "
                                               f"reference is finite (first at index {idx}: {kernel[idx].item()}, "
                                               f"reference {exact[idx].item():.6g}, {kernel.dtype} max {fmax:.6g})")
    nonfinite = ~finite
    finite = finite & ~over
    # Where the reference itself is non-finite the kernel must agree exactly on the value class.
    if nonfinite.any():
        k_nf = kernel.double()[nonfinite]
        e_nf = exact[nonfinite]
        same = (torch.isnan(k_nf) & torch.isnan(e_nf)) | (k_nf == e_nf)
        if not bool(same.all()):
            return Comparison(name, False, message="non-finite reference values not reproduced")

    # The roundoff of the tensor actually produced: a loss returned in fp32 from
    # bf16 logits is judged at fp32 precision, a bf16 gradient at bf16's.
    u = unit or UNIT_ROUNDOFF.get(kernel.dtype, UNIT_ROUNDOFF[dtype])
    k_err, k_rel = _errors(kernel, exact, finite)
    if baseline is not None:
        b_err, b_rel = _errors(baseline.detach(), exact, finite)
    else:
        b_err = b_rel = 0.0
    c_err = c_rel = 0.0
    if perturbed is not None and tuple(perturbed.shape) == tuple(exact.shape):
        c_err, c_rel = _errors(perturbed.detach(), exact, finite & torch.isfinite(perturbed.detach().double()))
    floor = (ATOL_ULPS * u + COMPUTE_ULPS_FP32 * UNIT_ROUNDOFF[torch.float32]) * floor_scale
    bound = FACTOR * max(b_err, c_err) + floor
    rel_bound = FACTOR * max(b_rel, c_rel) + floor
    ok = k_err <= bound and k_rel <= rel_bound
    return Comparison(name, ok, k_err, b_err, bound, k_rel, b_rel, rel_bound, cond_err=c_err, cond_rel=c_rel)
