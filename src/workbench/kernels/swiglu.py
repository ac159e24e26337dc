"""SwiGLU: y = silu(gate) * up, elementwise (any shape, gate and up alike).

Backward (as ATen's silu_backward after the product rule, in its order of fp32
operations, so that the kernel's roundings track PyTorch's):
  d_gate = (dy * up) * sig(g) * (1 + g * (1 - sig(g)))
  d_up   = dy * silu(g)
Either input may not require grad; only the gradients asked for are computed.

Layout: both inputs are viewed as [rows, last_dim] with a unit last stride (no
copy for the usual row-strided views, e.g. the two halves of a fused gate_up
projection); the kernels walk the flat element index in blocks over a 1-D grid
and map it back to (row, col) only when some input is not contiguous
(``_elementwise.py``).

``swiglu_forward`` / ``swiglu_backward`` launch the kernels on such views, with no
autograd: the Function here calls them, and so does ``lora_mlp`` (on its own
buffers and dtypes). ``swiglu_backward`` can also write h = silu(gate) * up (as the
forward would) over its dh, for lora_mlp, which would otherwise recompute h in a
pass of its own for down_proj's dA; the Function here never asks for it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _elementwise as E
from . import _strategies as S
from ._elementwise import div_f32, exp_f32, offset
from ._harness import maybe_strided, randn
from ._registry import Example, Inputs, KernelSpec, Limits


# --------------------------------------------------------------------------- Triton
@triton.jit
def _swiglu_fwd(G, U, Y, g_stride, u_stride, n_cols, n_elements,
                EXACT: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    g_off = offset(idx, n_cols, g_stride, CONTIG)
    u_off = offset(idx, n_cols, u_stride, CONTIG)
    g = tl.load(G + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + u_off, mask=mask, other=0.0).to(tl.float32)
    # ATen's order: silu = g / (1 + exp(-g)); exp overflowing to inf gives -0, not NaN.
    tl.store(Y + idx, (div_f32(g, 1.0 + exp_f32(-g, EXACT), EXACT) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, H, dy_stride, g_stride, u_stride, n_cols, n_elements,
                COMPUTE_DG: tl.constexpr, COMPUTE_DU: tl.constexpr, STORE_H: tl.constexpr,
                EXACT: tl.constexpr, EXACT_H: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    dy_off = offset(idx, n_cols, dy_stride, CONTIG)
    g_off = offset(idx, n_cols, g_stride, CONTIG)
    u_off = offset(idx, n_cols, u_stride, CONTIG)
    g = tl.load(G + g_off, mask=mask, other=0.0).to(tl.float32)
    if COMPUTE_DG or STORE_H:
        u = tl.load(U + u_off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + dy_off, mask=mask, other=0.0).to(tl.float32)
    # ATen's silu_backward order, so that the fp32 roundings match PyTorch's.
    # EXACT (fp32 gradients) and EXACT_H (an fp32 h): ``_elementwise.exact``.
    sig = div_f32(1.0, 1.0 + exp_f32(-g, EXACT), EXACT)
    if COMPUTE_DG:
        d_silu = 1.0 + g * (1.0 - sig)
        tl.store(DG + idx, ((dy * u) * sig * d_silu).to(DG.dtype.element_ty), mask=mask)
    if COMPUTE_DU:
        tl.store(DU + idx, (dy * div_f32(g, 1.0 + exp_f32(-g, EXACT), EXACT)).to(DU.dtype.element_ty), mask=mask)
    # h as _swiglu_fwd forms and rounds it, written last: H may be DY's buffer (in place).
    if STORE_H:
        tl.store(H + idx, (div_f32(g, 1.0 + exp_f32(-g, EXACT_H), EXACT_H) * u).to(H.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(gate) * up: launches the Triton kernel, no autograd, no input checks.

    ``gate`` and ``up`` are [rows, cols] views with a unit last stride (any row stride,
    ``_elementwise.as_rows``). h is computed in fp32 and rounded once to ``out``'s dtype:
    ``out`` a contiguous [rows, cols] buffer of any float dtype, or a new one of gate's.
    Returns ``out``."""
    return E.gated_forward(_swiglu_fwd, gate, up, out)


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, need_dgate: bool = True,
                    need_dup: bool = True, dgate: torch.Tensor | None = None, dup: torch.Tensor | None = None,
                    h_out: torch.Tensor | None = None):
    """(dgate, dup) of h = silu(gate) * up for the upstream gradient ``dh``: launches the
    Triton kernel, no autograd, no input checks.

    ``dh``, ``gate`` and ``up`` are [rows, cols] views with a unit last stride; ``up`` is
    read only for dgate or h (None will do without them). Each gradient is None unless asked
    for, computed in fp32 and rounded once to the dtype of its buffer: ``dgate`` / ``dup``
    when given (contiguous [rows, cols], any float dtype), else a new one of gate's.

    ``h_out``: the kernel also writes h there, bit for bit what ``swiglu_forward`` writes to
    a buffer of that dtype, from the gate and up it loads anyway, so a caller that needs h
    after the backward (lora_mlp's dA of down_proj) saves a forward pass over gate and up.
    It may be ``dh`` itself when dh is dense: h then replaces dh in place, no extra memory
    (``_elementwise.gated_backward``)."""
    return E.gated_backward(_swiglu_bwd, dh, gate, up, need_dgate, need_dup, dgate, dup, h_out)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        shape = gate.shape
        g2, u2 = E.as_rows("swiglu", "gate", gate), E.as_rows("swiglu", "up", up)
        y = swiglu_forward(g2, u2)
        ctx.save_for_backward(g2, u2 if ctx.needs_input_grad[0] else None)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = swiglu_backward(E.as_rows("swiglu", "dy", dy), g2, u2, ctx.needs_input_grad[0],
                                 ctx.needs_input_grad[1])
        return (None if dg is None else dg.view(ctx.shape)), (None if du is None else du.view(ctx.shape))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` elementwise; ``gate`` and ``up`` share shape, dtype and device.

    Computed in fp32 with one rounding to the input dtype, like HF's
    ``act_fn(gate_proj(x)) * up_proj(x)`` run in fp32.
    """
    op = "swiglu"
    C.check_float(op, "gate", gate)
    C.check_float(op, "up", up)
    C.check_same_dtype(op, gate=gate, up=up)
    C.check_device(op, gate, up)
    C.check_shape(op, "up", up, tuple(gate.shape))
    return _SwiGLU.apply(gate, up)


# --------------------------------------------------------------------------- reference
def swiglu_reference(gate, up, compute_dtype=torch.float32):
    """``F.silu(gate) * up`` computed in ``compute_dtype`` (fp32; fp64 for the exact pass)."""
    return (torch.nn.functional.silu(gate.to(compute_dtype)) * up.to(compute_dtype)).to(gate.dtype)


# --------------------------------------------------------------------------- registry
@st.composite
def _shape(draw, limits: Limits, forced_block: int | None) -> list[int]:
    """1 to 3 dims, awkward sizes, numel within the profile. A forced small block
    means one program per few elements: keep those cases smaller."""
    budget = limits.max_elements if forced_block is None else max(1, limits.max_elements // 8)
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    if ndim == 1:
        return [draw(S.dim(1, budget))]
    last = draw(S.dim(1, min(limits.max_hidden, budget)))
    lead = [draw(st.sampled_from([1, 2, 3]))] if ndim == 3 else []
    rows = draw(S.dim(1, max(1, min(limits.max_rows, budget // (last * (lead[0] if lead else 1))))))
    return lead + [rows, last]


@st.composite
def _params(draw, limits: Limits) -> dict:
    block = draw(S.block(limits))
    return {
        "shape": draw(_shape(limits, block)),
        "gate_scale": draw(S.scale()),
        "up_scale": draw(S.scale()),
        "strided_gate": draw(st.booleans()),
        "strided_up": draw(st.booleans()),
        "grad_gate": draw(st.sampled_from([True, True, False])),
        "grad_up": draw(st.sampled_from([True, True, False])),
        "_block": block,
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    shape = tuple(p["shape"])
    gate = randn(shape, dtype, device, gen, p["gate_scale"])
    up = randn(shape, dtype, device, gen, p["up_scale"])
    grads = tuple(n for n, on in (("gate", p["grad_gate"]), ("up", p["grad_up"])) if on)
    return Inputs({"gate": maybe_strided(gate, p["strided_gate"], gen),
                   "up": maybe_strided(up, p["strided_up"], gen)}, {}, grads)


def _case(**over) -> dict:
    return {"shape": [2, 5, 33], "gate_scale": 1.0, "up_scale": 1.0, "strided_gate": False, "strided_up": False,
            "grad_gate": True, "grad_up": True, "_block": None, **over}


#: Contiguous gate and up with a strided (torch.cat's) or expanded (a sum's) upstream gradient:
#: the layout where a contiguity fast path that forgets dy reads it wrong. The random draws
#: pair a non-dense dy with two dense inputs in about one example in six.
EXAMPLES = (
    Example(_case(_dy="strided"), "dense inputs, a strided upstream gradient (torch.cat([swiglu(g, u), other], -1))"),
    Example(_case(_dy="expanded", shape=[7, 33]), "dense inputs, an expanded (stride-0) upstream gradient"),
)


SPEC = KernelSpec(
    name="swiglu",
    fn=swiglu,
    reference=swiglu_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("y",),
    grads=("gate", "up"),
    options=(),
    summary="SwiGLU silu(gate) * up, elementwise over any shape; row-strided inputs without copies.",
    examples=EXAMPLES,
)
