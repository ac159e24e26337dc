"""Runs one parity case of a registered kernel: exact reference (fp64), PyTorch's
own result in the tested dtype (the baseline), and the Triton kernel, with the
same inputs and upstream gradients; then compares every output and gradient.

Used by ``parity/`` (property tests and the mutation self-test) and by tools
that need a quick verdict on one kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import _common
from ._registry import KernelSpec
from ._tolerance import UNIT_ROUNDOFF, Comparison, compare, spurious_nonfinite

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Params keys the harness consumes itself (never passed to make_inputs' tensors).
BLOCK_KEY = "_block"
ROWS_KEY = "_rows"  # a forced row block (_common.forced_rows), for kernels that block their rows
DY_LAYOUT_KEY = "_dy"  # the upstream gradients' memory layout (upstream_layout)
DY_SCALE_KEY = "_dy_scale"  # log2 of the upstream gradients' magnitude
HARNESS_KEYS = (BLOCK_KEY, ROWS_KEY, DY_LAYOUT_KEY, DY_SCALE_KEY)

#: How far (log2) the upstream scale steps down when PyTorch's own backward overflows at it.
BACKOFF_LOG2 = 4


class KernelCrash(RuntimeError):
    """The kernel under test raised, or the device failed under it (an illegal address
    surfaces as a CUDA error): the case cannot be judged. The parity property fails on it
    like on a wrong answer, and the mutation self-test counts it as a kill."""


@dataclass
class CaseReport:
    kernel: str
    dtype: torch.dtype
    params: dict
    seed: int
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def describe(self) -> str:
        head = (f"kernel={self.kernel} dtype={str(self.dtype).removeprefix('torch.')} "
                f"seed={self.seed} params={self.params!r}")
        return "\n".join([head] + ["  note: " + n for n in self.notes] + ["  " + c.line() for c in self.comparisons])


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


@dataclass
class Upstream:
    """One output's upstream gradient: unit-scale fp32 values in a storage ``base``, and
    the ``view`` that lays them out as the output's shape (a slice of a wider, NaN-padded
    buffer, a transpose, a stride-0 expansion, or ``base`` itself)."""

    base: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]

    def values(self) -> torch.Tensor:
        return self.view(self.base)

    def make(self, scale: float, dtype: torch.dtype, out_dtype: torch.dtype, device) -> torch.Tensor:
        """The gradient at ``scale``, rounded once to the tested ``dtype`` (the gradient a
        layer in that dtype hands back), then cast to the output's dtype, in the layout.
        The cast happens on the dense storage, so the view's strides survive it."""
        return self.view((self.base * scale).to(dtype).to(out_dtype).to(device))


def upstream_layout(shape, layout: str, gen: torch.Generator) -> Upstream:
    """An upstream gradient of ``shape`` (values standard normal, from ``gen``) in ``layout``:

    * ``dense``: contiguous (the values every earlier version of the harness drew);
    * ``strided``: the last ``shape[-1]`` columns of a buffer 1-7 columns wider (the gradient
      of ``torch.cat([y, other], -1)``), NaN elsewhere; a 1-D one every other element;
    * ``transposed``: a 2-D one column-major; more dims: the leading dims in reverse memory
      order with the last dim still of unit stride (rows that look contiguous but are not
      one after the other; a 1-D one every third element);
    * ``expanded``: one row broadcast over every leading dim, stride 0 (the gradient of a
      sum or a broadcast add); a 1-D one a single value, stride 0 (``loss_rows.mean()``).

    A 0-dim or one-element output is always dense."""
    shape = tuple(int(d) for d in shape)
    n = len(shape)
    if n == 0 or math.prod(shape) <= 1 or layout == "dense":
        return Upstream(torch.randn(shape, generator=gen, dtype=torch.float32), lambda b: b)
    if layout == "expanded":
        small = (1,) * (n - 1) + (shape[-1],) if n >= 2 else (1,)
        return Upstream(torch.randn(small, generator=gen, dtype=torch.float32), lambda b: b.expand(shape))
    if layout == "transposed" and n >= 2:
        perm = (1, 0) if n == 2 else (*range(n - 2, -1, -1), n - 1)
        inverse = tuple(perm.index(d) for d in range(n))
        base = torch.randn([shape[d] for d in perm], generator=gen, dtype=torch.float32)
        return Upstream(base, lambda b: b.permute(*inverse))
    if layout not in ("strided", "transposed"):
        raise ValueError(f"unknown upstream layout {layout!r}")
    values = torch.randn(shape, generator=gen, dtype=torch.float32)
    if n == 1:
        step = 2 if layout == "strided" else 3
        base = torch.full((shape[0] * step,), float("nan"))
        base[::step] = values
        return Upstream(base, lambda b: b[::step])
    pad = 1 + int(torch.randint(0, 7, (1,), generator=gen))
    base = torch.full((*shape[:-1], shape[-1] + pad), float("nan"))
    base[..., pad:] = values
    return Upstream(base, lambda b: b[..., pad:])


def _range_limit(dtypes) -> float:
    """A quarter of the narrowest dtype's range: room for a sum's partial results to exceed its total."""
    return min(torch.finfo(d).max for d in dtypes) / 4


def _scale_log2(ups, wanted: int, dtypes) -> int:
    """``wanted``, lowered until every upstream value times 2^k fits a quarter of each
    dtype's range (an fp16 upstream of 2^16 times a normal draw would be inf)."""
    k = int(wanted)
    peak = max((u.values().abs().max().item() for u in ups if u is not None), default=0.0)
    limit = _range_limit(dtypes)
    while k > -1000 and peak * 2.0**k > limit:
        k -= 1
    return k


def _grad_excess_log2(refs, grad_names, limit: float) -> int:
    """How many powers of two the exact gradients exceed ``limit`` by (0 when they fit). They are
    linear in the upstream scale, so lowering it by that much brings them within a quarter of the
    range."""
    peak = max((float(e.grad(n).abs().max()) for _, e, _ in refs for n in grad_names
                if e.grad(n) is not None and e.grad(n).numel()), default=0.0)
    return max(0, math.ceil(math.log2(peak / limit))) if peak > limit and math.isfinite(peak) else 0


def _forward_backward(fn, leaves, options, ups, scale, dtype, device, **extra):
    outs = _as_tuple(fn(**leaves, **options, **extra), len(ups))
    pairs = [(o, u) for o, u in zip(outs, ups)
             if isinstance(o, torch.Tensor) and o.requires_grad and u is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [u.make(scale, dtype, o.dtype, device) for o, u in pairs])
    return outs


@dataclass
class _Pass:
    outs: tuple
    leaves: dict

    def grad(self, name):
        leaf = self.leaves.get(name)
        return None if leaf is None else leaf.grad


def _reference_passes(spec, tensors, options, grad_names, ups, scale, dtype, device, seed):
    """(baseline, exact, perturbed) passes of the reference, forward and backward."""
    base_leaves = _leaves(tensors, grad_names, None)
    base = _forward_backward(spec.reference, base_leaves, options, ups, scale, dtype, device,
                             compute_dtype=torch.float32)
    exact_leaves = _leaves(tensors, grad_names, torch.float64)
    exact = _forward_backward(spec.reference, exact_leaves, options, ups, scale, dtype, device,
                              compute_dtype=torch.float64)
    # The conditioning of each output: the exact pass again, every floating input moved by
    # one fp32 unit roundoff (a random sign per element), as fp32 math inside a kernel
    # moves its intermediates (_tolerance's docstring).
    noisy_leaves = _leaves(_perturbed(tensors, seed), grad_names, None)
    noisy = _forward_backward(spec.reference, noisy_leaves, options, ups, scale, dtype, device,
                              compute_dtype=torch.float64)
    return _Pass(base, base_leaves), _Pass(exact, exact_leaves), _Pass(noisy, noisy_leaves)


def _kernel_pass(spec, tensors, options, grad_names, ups, scale, dtype, device, block, rows) -> _Pass:
    leaves = _leaves(tensors, grad_names, None)
    try:
        with _common.poisoned_outputs(), _common.forced_block(block), _common.forced_rows(rows):
            outs = _forward_backward(spec.fn, leaves, options, ups, scale, dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an illegal address surfaces here, as the kernel's
    except Exception as err:  # noqa: BLE001 -- whatever the kernel raised, it is the kernel's failure
        raise KernelCrash(f"{spec.name}: the kernel raised {type(err).__name__}: {err}") from err
    return _Pass(outs, leaves)


def run_case(spec: KernelSpec, params: dict, dtype: torch.dtype, seed: int,
             device: torch.device | None = None) -> CaseReport:
    device = device or default_device()
    params = dict(params)
    block = params.pop(BLOCK_KEY, None)
    rows = params.pop(ROWS_KEY, None)
    layout = params.pop(DY_LAYOUT_KEY, "dense")
    wanted_log2 = params.pop(DY_SCALE_KEY, 0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs = spec.make_inputs(params, dtype, device, gen)
    grad_names = tuple(inputs.requires_grad)
    extra = {k: v for k, v in ((BLOCK_KEY, block), (ROWS_KEY, rows)) if v}
    if layout != "dense" or wanted_log2:
        extra.update({DY_LAYOUT_KEY: layout, DY_SCALE_KEY: wanted_log2})
    report = CaseReport(spec.name, dtype, {**params, **extra}, seed)

    # A probe of the baseline fixes the outputs' shapes, from which upstream grads are drawn.
    with torch.no_grad():
        probe = _as_tuple(spec.reference(**_leaves(inputs.tensors, (), None), **inputs.options,
                                         compute_dtype=torch.float32), len(spec.outputs))
    ups = [upstream_layout(o.shape, layout, gen) if isinstance(o, torch.Tensor) and o.is_floating_point() else None
           for o in probe]
    out_dtypes = {o.dtype for o in probe if isinstance(o, torch.Tensor) and o.is_floating_point()}
    log2 = capped = _scale_log2(ups, wanted_log2, {dtype, *out_dtypes})

    ablated = {**inputs.tensors, **spec.ablate(inputs.tensors)} if spec.ablate is not None else None
    sets = [inputs.tensors] + ([ablated] if ablated is not None else [])
    # GradScaler's back-off: where PyTorch's own backward overflows at this scale (an fp16
    # intermediate beyond 65504 where the fp64 gradient is finite and in range), training
    # would skip the step and lower the scale; so does the case, towards 1.
    def passes(k):
        return [_reference_passes(spec, t, inputs.options, grad_names, ups, 2.0**k, dtype, device, seed)
                for t in sets]

    refs = passes(log2)
    # The cap above sees the upstream values only. The gradients they give can still reach the top
    # of the range (a sum over many outputs), where the order of a sum's additions alone decides
    # whether a partial result overflows; keep the gradients within a quarter of it as well.
    excess = _grad_excess_log2(refs, grad_names, _range_limit({dtype, *out_dtypes}))
    if excess:
        log2 = capped = log2 - excess
        refs = passes(log2)
    while True:
        overflowed = any(spurious_nonfinite(b.grad(n), e.grad(n))
                         for b, e, _ in refs for n in grad_names)
        if log2 <= 0 or not overflowed:
            break
        log2 = max(0, log2 - BACKOFF_LOG2)
        refs = passes(log2)
    if capped != wanted_log2:
        report.notes.append(f"upstream scale 2^{wanted_log2} capped at 2^{capped}: the values fit a quarter of "
                            "the dtype's range")
    if log2 != capped:
        report.notes.append(f"upstream scale backed off to 2^{log2}: PyTorch's own backward overflowed at "
                            f"2^{capped} (GradScaler would skip the step)")
    scale = 2.0**log2
    base, exact, noisy = refs[0]

    snapshot = {n: t.detach().clone() for n, t in inputs.tensors.items() if t is not None}
    kern = _kernel_pass(spec, inputs.tensors, inputs.options, grad_names, ups, scale, dtype, device, block, rows)

    if len(kern.outs) != len(spec.outputs) or len(exact.outs) != len(spec.outputs):
        report.comparisons.append(Comparison(
            "outputs", False, message=f"expected {len(spec.outputs)} outputs {spec.outputs}, kernel gave "
                                      f"{len(kern.outs)}, reference {len(exact.outs)}"))
        return report

    for name, k, b, e, c in zip(spec.outputs, kern.outs, base.outs, exact.outs, noisy.outs):
        if isinstance(e, torch.Tensor) and not e.is_floating_point():
            ok = isinstance(k, torch.Tensor) and torch.equal(k.cpu(), e.cpu())
            report.comparisons.append(Comparison(f"out:{name}", ok, message="" if ok else "integer output differs"))
            continue
        report.comparisons.append(compare(f"out:{name}", k, b, e, dtype, perturbed=c))

    if ablated is not None:
        kern_ab = _kernel_pass(spec, ablated, inputs.options, grad_names, ups, scale, dtype, device, block, rows)
        report.comparisons += _deltas(spec, grad_names, (kern, base, exact, noisy), (kern_ab, *refs[1]), dtype)

    for name in spec.grads:
        if name not in grad_names:
            continue
        report.comparisons.append(compare(
            f"grad:{name}", kern.grad(name), base.grad(name), exact.grad(name), dtype, perturbed=noisy.grad(name)))
    for name, t in inputs.tensors.items():
        if t is not None and name not in grad_names and kern.grad(name) is not None:
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


def _deltas(spec: KernelSpec, grad_names, full: tuple, ablated: tuple, dtype: torch.dtype) -> list[Comparison]:
    """``delta:<output>`` and ``delta:grad:<input>``: the change of each output and of each
    gradient when ``spec.ablate`` removes a term (LoRA: every B = 0), for the kernel, the
    baseline and the exact pass alike (same upstream gradients; differences formed in fp64,
    where the difference of two tensors is exact). ``full`` and ``ablated`` are the
    (kernel, baseline, exact, perturbed) passes. Judged by ``compare``: at most FACTOR times
    PyTorch's own error of the change, plus the floor that each of the two tensors has (the
    roundoff of its dtype), at the tensors' scale: a change 2^-10 the size of the output
    may err by twice the outputs' floor times 2^10 relative, and no less (two fp32 formulas
    of one output differ by a few fp32 ulps, which the difference keeps). A term lost to
    rounding errs by ~100 %: that fails wherever PyTorch keeps it (fp32 outputs, and the
    fp32 input gradient of the mixed mode, which autograd sums from the branches' 16-bit
    gradients in fp32), and passes where PyTorch loses it too (its own error then sets the
    bound). The gradients' changes carry their conditioning (the perturbed passes), as the
    gradients' own comparisons do; a gradient the ablated term does not reach (dB of a
    single LoRA linear: its change is exactly 0) has no change to judge."""
    found = []
    for i, name in enumerate(spec.outputs):
        f = tuple(p.outs[i] for p in full[:3])
        a = tuple(p.outs[i] for p in ablated[:3])
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (*f, *a)):
            continue
        found.append(compare_delta(f"delta:{name}", f, a, dtype, f[0].dtype))
    for name in spec.grads:
        if name not in grad_names:
            continue
        f = tuple(p.grad(name) for p in full)
        a = tuple(p.grad(name) for p in ablated)
        if f[2] is None or a[2] is None or not bool((f[2].double() - a[2].double()).ne(0).any()):
            continue
        if f[0] is None or a[0] is None:
            found.append(Comparison(f"delta:grad:{name}", False, message="kernel produced no gradient"))
            continue
        found.append(compare_delta(f"delta:grad:{name}", f[:3], a[:3], dtype, f[0].dtype, perturbed=(f[3], a[3])))
    return found


def compare_delta(name: str, full: tuple, ablated: tuple, dtype: torch.dtype,
                  out_dtype: torch.dtype, perturbed: tuple | None = None) -> Comparison:
    """The doctrine on an output's (or a gradient's) change: ``full`` and ``ablated`` are
    (kernel, baseline, exact) tensors with and without a term, ``out_dtype`` the dtype the
    kernel returned them in (its roundoff is the tensors' floor, carried to the change's
    scale: see :func:`_deltas`); ``perturbed``, the (full, ablated) perturbed exact passes,
    gives the change's conditioning. Shared by the parity harness and whole-model tests."""
    k, b, e = (f.detach().double() - a.detach().double() for f, a in zip(full, ablated))
    c = None if perturbed is None else perturbed[0].detach().double() - perturbed[1].detach().double()
    # Where either exact tensor is beyond the returned dtype's range (an fp16 gradient of a large
    # upstream), correct rounding gives inf there and the change is undefined: the tensors' own
    # comparisons judge those positions; the change is judged everywhere else.
    fits = torch.isfinite(full[2].detach().to(out_dtype)) & torch.isfinite(ablated[2].detach().to(out_dtype))
    if not bool(fits.all()):
        k, b, e = (torch.where(fits, t, torch.zeros_like(t)) for t in (k, b, e))
        c = None if c is None else torch.where(fits, c, torch.zeros_like(c))
    scale = _rms(full[2]) / max(_rms(e), torch.finfo(torch.float64).tiny)
    return compare(name, k, b, e, dtype, unit=UNIT_ROUNDOFF.get(out_dtype), floor_scale=2.0 * max(1.0, scale),
                   perturbed=c)


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


def shifted_rows(shape, dtype, device, gen: torch.Generator, scale: float, shift) -> torch.Tensor:
    """Rows of a [..., hidden] activation with a per-row mean ``shift`` times their spread
    (``_strategies.row_shift``), of magnitude about ``scale`` whatever the shift (so that
    fp16 holds them): ``scale * (m + z / shift)`` with m one normal value per row and z
    normal per element; ``shift`` 0: ``scale * z``. ``"constant"``: every other row is
    ``scale * m`` exactly (spread 0), the rest have a mean 3x their spread. Drawn in fp32,
    rounded once to ``dtype``."""
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    m = torch.randn((*shape[:-1], 1), generator=gen, dtype=torch.float32)
    if shift == "constant":
        x = m + z / 3.0
        flat = x.view(-1, shape[-1])
        flat[::2] = m.view(-1, 1)[::2].expand(-1, shape[-1])
    elif shift:
        x = m + z / float(shift)
    else:
        x = z
    return (x * scale).to(dtype).to(device)


def maybe_strided(t: torch.Tensor, strided: bool, gen: torch.Generator) -> torch.Tensor:
    """Return ``t`` itself or a non-contiguous view holding the same values: a
    slice out of a wider buffer along the last dim (row stride > row length)."""
    if not strided:
        return t
    pad = 1 + int(torch.randint(0, 7, (1,), generator=gen))
    wide = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., pad:] = t
    return wide[..., pad:]
