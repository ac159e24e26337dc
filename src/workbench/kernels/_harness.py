"""Runs one parity case of a registered kernel: exact reference (fp64), PyTorch's
own result in the tested dtype (the baseline), and the Triton kernel, with the
same inputs and upstream gradients; then compares every output and gradient.

Used by ``parity/`` (property tests and the mutation self-test) and by tools
that need a quick verdict on one kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import _common
from ._registry import KernelSpec
from ._tolerance import UNIT_ROUNDOFF, Comparison, compare

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Params keys the harness consumes itself (never passed to make_inputs' tensors).
BLOCK_KEY = "_block"
ROWS_KEY = "_rows"  # a forced row block (_common.forced_rows), for kernels that block their rows


@dataclass
class CaseReport:
    kernel: str
    dtype: torch.dtype
    params: dict
    seed: int
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def describe(self) -> str:
        head = (f"kernel={self.kernel} dtype={str(self.dtype).removeprefix('torch.')} "
                f"seed={self.seed} params={self.params!r}")
        return "\n".join([head] + ["  " + c.line() for c in self.comparisons])


def default_device() -> torch.device:
    if not _common.INTERPRET and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _as_tuple(out: Any, n: int | None = None) -> tuple:
    """Outputs as a tuple, padded with None to ``n`` (an optional output a call
    did not ask for, e.g. cross-entropy's z-loss, is None on every side)."""
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return out + (None,) * max(0, (n or 0) - len(out))


def _leaves(tensors: dict[str, torch.Tensor | None], grad_names, cast: torch.dtype | None):
    """Fresh leaves sharing the case's data. ``cast`` upcasts (for the exact pass);
    without it the tensors keep their dtype *and strides* (non-contiguous stays so)."""
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        leaf = t.detach()
        if cast is not None and leaf.is_floating_point():
            leaf = leaf.to(cast)
        if name in grad_names:
            leaf.requires_grad_(True)
        out[name] = leaf
    return out


def _forward_backward(fn, leaves, options, upstream, **extra):
    outs = _as_tuple(fn(**leaves, **options, **extra), len(upstream))
    pairs = [(o, g) for o, g in zip(outs, upstream)
             if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
    return outs


def run_case(spec: KernelSpec, params: dict, dtype: torch.dtype, seed: int,
             device: torch.device | None = None) -> CaseReport:
    device = device or default_device()
    params = dict(params)
    block = params.pop(BLOCK_KEY, None)
    rows = params.pop(ROWS_KEY, None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs = spec.make_inputs(params, dtype, device, gen)
    grad_names = tuple(inputs.requires_grad)
    report = CaseReport(spec.name, dtype, {**params, **({BLOCK_KEY: block} if block else {}),
                                           **({ROWS_KEY: rows} if rows else {})}, seed)

    # Baseline first: it fixes output shapes, from which upstream grads are drawn.
    base_leaves = _leaves(inputs.tensors, grad_names, None)
    with torch.no_grad():
        probe = _as_tuple(spec.reference(**base_leaves, **inputs.options, compute_dtype=torch.float32),
                          len(spec.outputs))
    upstream = [
        (torch.randn(o.shape, generator=gen, dtype=torch.float32).to(device)
         if isinstance(o, torch.Tensor) and o.is_floating_point() else None)
        for o in probe
    ]

    base_outs = _forward_backward(spec.reference, base_leaves, inputs.options,
                                  [None if g is None else g.to(dtype) for g in upstream],
                                  compute_dtype=torch.float32)
    exact_leaves = _leaves(inputs.tensors, grad_names, torch.float64)
    exact_outs = _forward_backward(spec.reference, exact_leaves, inputs.options,
                                   [None if g is None else g.to(dtype).double() for g in upstream],
                                   compute_dtype=torch.float64)
    # The conditioning of each output: the exact pass again, every floating input moved by
    # one fp32 unit roundoff (a random sign per element), as fp32 math inside a kernel
    # moves its intermediates (_tolerance's docstring).
    noisy_leaves = _leaves(_perturbed(inputs.tensors, seed), grad_names, None)
    noisy_outs = _forward_backward(spec.reference, noisy_leaves, inputs.options,
                                   [None if g is None else g.to(dtype).double() for g in upstream],
                                   compute_dtype=torch.float64)

    snapshot = {n: t.detach().clone() for n, t in inputs.tensors.items() if t is not None}
    kern_leaves = _leaves(inputs.tensors, grad_names, None)
    with _common.poisoned_outputs(), _common.forced_block(block), _common.forced_rows(rows):
        kern_outs = _forward_backward(spec.fn, kern_leaves, inputs.options,
                                      [None if g is None else g.to(dtype) for g in upstream])

    if len(kern_outs) != len(spec.outputs) or len(exact_outs) != len(spec.outputs):
        report.comparisons.append(Comparison(
            "outputs", False, message=f"expected {len(spec.outputs)} outputs {spec.outputs}, kernel gave "
                                      f"{len(kern_outs)}, reference {len(exact_outs)}"))
        return report

    for name, k, b, e, c in zip(spec.outputs, kern_outs, base_outs, exact_outs, noisy_outs):
        if isinstance(e, torch.Tensor) and not e.is_floating_point():
            ok = isinstance(k, torch.Tensor) and torch.equal(k.cpu(), e.cpu())
            report.comparisons.append(Comparison(f"out:{name}", ok, message="" if ok else "integer output differs"))
            continue
        report.comparisons.append(compare(f"out:{name}", k, b, e, dtype, perturbed=c))

    if spec.ablate is not None:
        report.comparisons += _deltas(spec, inputs, dtype, block, (kern_outs, base_outs, exact_outs), rows)

    for name in spec.grads:
        if name not in grad_names:
            continue
        report.comparisons.append(compare(
            f"grad:{name}", kern_leaves[name].grad, base_leaves[name].grad, exact_leaves[name].grad, dtype,
            perturbed=noisy_leaves[name].grad))
    for name, t in inputs.tensors.items():
        if t is not None and name not in grad_names and kern_leaves[name].grad is not None:
            report.comparisons.append(Comparison(f"grad:{name}", False,
                                                 message="kernel produced a gradient for an input that does not require grad"))

    for name, before in snapshot.items():
        after = inputs.tensors[name].detach()
        same = torch.equal(torch.nan_to_num(before), torch.nan_to_num(after))
        if not same:
            report.comparisons.append(Comparison(f"input:{name}", False, message="kernel modified its input in place"))
    return report


def _perturbed(tensors: dict, seed: int) -> dict:
    """fp64 copies of the floating tensors, each element times (1 +- u_fp32)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    u = UNIT_ROUNDOFF[torch.float32]
    out = {}
    for name, t in tensors.items():
        if t is None or not t.is_floating_point():
            out[name] = t
            continue
        sign = torch.randint(0, 2, t.shape, generator=gen).to(t.device, torch.float64) * 2 - 1
        out[name] = t.detach().double() * (1 + u * sign)
    return out


def _deltas(spec: KernelSpec, inputs, dtype: torch.dtype, block, outs: tuple, rows=None) -> list[Comparison]:
    """``delta:<output>``: each output's change when ``spec.ablate`` removes a term of
    it, for the kernel, the baseline and the exact pass alike (forward only, in fp64,
    where the difference of two outputs is exact). Judged by ``compare``: at most
    FACTOR times PyTorch's own error of the change, plus the floor that each of the
    two outputs has (the roundoff of the output's dtype), at the outputs' scale: a
    change 2^-10 the size of the output may err by twice the outputs' floor times
    2^10 relative, and no less (two fp32 formulas of one output differ by a few fp32
    ulps, which the difference keeps). A term lost to rounding errs by ~100 %: that
    fails wherever PyTorch keeps it (fp32 outputs), and passes where PyTorch loses
    it too (its own error then sets the bound)."""
    tensors = {**inputs.tensors, **spec.ablate(inputs.tensors)}
    with torch.no_grad():
        base = _as_tuple(spec.reference(**_leaves(tensors, (), None), **inputs.options,
                                        compute_dtype=torch.float32), len(spec.outputs))
        exact = _as_tuple(spec.reference(**_leaves(tensors, (), torch.float64), **inputs.options,
                                         compute_dtype=torch.float64), len(spec.outputs))
        with _common.poisoned_outputs(), _common.forced_block(block), _common.forced_rows(rows):
            kern = _as_tuple(spec.fn(**_leaves(tensors, (), None), **inputs.options), len(spec.outputs))
    found = []
    for name, full, ablated in zip(spec.outputs, zip(*outs), zip(kern, base, exact)):
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (*full, *ablated)):
            continue
        found.append(compare_delta(f"delta:{name}", full, ablated, dtype, full[0].dtype))
    return found


def compare_delta(name: str, full: tuple, ablated: tuple, dtype: torch.dtype,
                  out_dtype: torch.dtype) -> Comparison:
    """The doctrine on an output's change: ``full`` and ``ablated`` are (kernel, baseline,
    exact) outputs with and without a term, ``out_dtype`` the dtype the kernel returned
    them in (its roundoff is the outputs' floor, carried to the change's scale: see
    :func:`_deltas`). Shared by the parity harness and whole-model tests."""
    k, b, e = (f.detach().double() - a.detach().double() for f, a in zip(full, ablated))
    scale = _rms(full[2]) / max(_rms(e), torch.finfo(torch.float64).tiny)
    return compare(name, k, b, e, dtype, unit=UNIT_ROUNDOFF.get(out_dtype), floor_scale=2.0 * max(1.0, scale))


def _rms(t: torch.Tensor) -> float:
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return t.pow(2).mean().sqrt().item() if t.numel() else 0.0


# ---------------------------------------------------------------------------
# Helpers for make_inputs implementations.
# ---------------------------------------------------------------------------
def randn(shape, dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Standard normal * scale, drawn in fp32 on the CPU from ``gen`` (so every
    device sees the same values), rounded once to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)


def maybe_strided(t: torch.Tensor, strided: bool, gen: torch.Generator) -> torch.Tensor:
    """Return ``t`` itself or a non-contiguous view holding the same values: a
    slice out of a wider buffer along the last dim (row stride > row length)."""
    if not strided:
        return t
    pad = 1 + int(torch.randint(0, 7, (1,), generator=gen))
    wide = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., pad:] = t
    return wide[..., pad:]
