"""GeGLU: y = gelu(gate, approximate) * up, elementwise (any shape, gate and up alike).

``approximate="none"`` is the exact, erf-based GELU x * Phi(x); ``"tanh"`` is
PyTorch's tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

Backward (as ATen's gelu_backward after the product rule):
  d_gate = (dy * up) * gelu'(g),  d_up = dy * gelu(g)
with gelu'(x) = Phi(x) + x phi(x) (exact) or the derivative of the tanh form.

The tanh form is evaluated through 1 + tanh(z) = 2 sigmoid(2z) and
1 - tanh(z)^2 = 4 sigmoid(2z) sigmoid(-2z), with a cancellation-free sigmoid
pair: no 1 - t or 1 + t cancels for large |z| (the naive 1 - 2/(e^2z + 1) tanh
measured up to 3.9x PyTorch's fp32 error in d_gate and 1.15x in y here). Where
tanh(z) is -1 even in fp64 (z < -19) PyTorch's result is exactly 0; we flush to 0
from z < -15 (true value below 1e-13 |x|), else a one-element tensor there fails.
The exact form follows ATen's formulas and order of operations.
Exact GELU uses ``tl.math.erf`` (libdevice's erff on the GPU; the interpreter
evaluates it with math.erf).

Layout as in ``swiglu``: [rows, last_dim] views with a unit last stride, a 1-D
grid of element blocks, (row, col) addressing only for non-contiguous inputs
(``_elementwise.py``). ``geglu_forward`` / ``geglu_backward`` launch the kernels
with no autograd, as ``swiglu_forward`` / ``swiglu_backward`` do (``lora_mlp``
calls them too, and has the backward write h over its dh for down_proj's dA).
The cases drawn are SwiGLU's (its ``SPEC``), in both GELU forms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _elementwise as E
from ._elementwise import div_f32, exp_f32, offset
from ._registry import Example, Inputs, KernelSpec, Limits
from .swiglu import SPEC as SWIGLU

APPROXIMATE_MODES = ("none", "tanh")

SQRT1_2 = tl.constexpr(0.7071067811865476)         # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)    # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
KAPPA = tl.constexpr(0.044715)
#: Below this z, tanh(z) is -1 exactly even in fp64 (1 + tanh z < 2^-53 from z < -19.06) and in
#: fp32 (from z < -9.1): PyTorch's tanh GELU and its derivative are exactly 0 there, so ours are too.
TANH_FLUSH_Z = tl.constexpr(-15.0)


# --------------------------------------------------------------------------- Triton
@triton.jit
def _sigmoid_pair(x, EXACT: tl.constexpr):
    """(sigmoid(x), 1 - sigmoid(x)) in fp32 with neither overflow nor cancellation:
    e = exp(-|x|) lies in (0, 1], and each half is formed directly, not as 1 - the other."""
    e = exp_f32(-tl.abs(x), EXACT)
    big = div_f32(1.0, 1.0 + e, EXACT)  # sigmoid(|x|)
    small = e * big            # sigmoid(-|x|)
    pos = x >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _gelu(x, TANH: tl.constexpr, EXACT: tl.constexpr):
    if TANH:
        z = SQRT_2_OVER_PI * (x + KAPPA * (x * x * x))
        s, _ = _sigmoid_pair(2.0 * z, EXACT)
        s = tl.where(z < TANH_FLUSH_Z, 0.0, s)
        y = x * s  # 0.5 x (1 + tanh z)
    else:
        y = x * 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
    return y


@triton.jit
def _gelu_grad(x, TANH: tl.constexpr, EXACT: tl.constexpr):
    if TANH:
        x_sq = x * x
        z = SQRT_2_OVER_PI * (x + KAPPA * (x_sq * x))
        s, s_neg = _sigmoid_pair(2.0 * z, EXACT)
        s = tl.where(z < TANH_FLUSH_Z, 0.0, s)
        dz = SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * x_sq)
        # 0.5 (1 + tanh z) + 0.5 x (1 - tanh^2 z) dz/dx
        d = s + 2.0 * x * s * s_neg * dz
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
        pdf = INV_SQRT_2PI * exp_f32(-0.5 * (x * x), EXACT)
        d = cdf + x * pdf
    return d


@triton.jit
def _geglu_fwd(G, U, Y, g_stride, u_stride, n_cols, n_elements,
               TANH: tl.constexpr, EXACT: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    g_off = offset(idx, n_cols, g_stride, CONTIG)
    u_off = offset(idx, n_cols, u_stride, CONTIG)
    g = tl.load(G + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + u_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + idx, (_gelu(g, TANH, EXACT) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd(DY, G, U, DG, DU, H, dy_stride, g_stride, u_stride, n_cols, n_elements,
               TANH: tl.constexpr, COMPUTE_DG: tl.constexpr, COMPUTE_DU: tl.constexpr, STORE_H: tl.constexpr,
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
    if COMPUTE_DG:
        tl.store(DG + idx, ((dy * u) * _gelu_grad(g, TANH, EXACT)).to(DG.dtype.element_ty), mask=mask)
    if COMPUTE_DU:
        tl.store(DU + idx, (dy * _gelu(g, TANH, EXACT)).to(DU.dtype.element_ty), mask=mask)
    # h as _geglu_fwd forms and rounds it, written last: H may be DY's buffer (in place).
    if STORE_H:
        tl.store(H + idx, (_gelu(g, TANH, EXACT_H) * u).to(H.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """h = gelu(gate, approximate) * up: launches the Triton kernel, no autograd, no input
    checks. Layouts, dtypes and ``out`` as ``swiglu.swiglu_forward``. Returns ``out``."""
    return E.gated_forward(_geglu_fwd, gate, up, out, TANH=approximate == "tanh")


def geglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, approximate: str = "none",
                   need_dgate: bool = True, need_dup: bool = True, dgate: torch.Tensor | None = None,
                   dup: torch.Tensor | None = None, h_out: torch.Tensor | None = None):
    """(dgate, dup) of h = gelu(gate, approximate) * up for the upstream gradient ``dh``:
    launches the Triton kernel, no autograd, no input checks. Layouts, dtypes, buffers and
    the gradients asked for as ``swiglu.swiglu_backward``; so is ``h_out`` (h written as
    ``geglu_forward`` writes it, in place of dh when it is dh, for lora_mlp's dA of
    down_proj)."""
    return E.gated_backward(_geglu_bwd, dh, gate, up, need_dgate, need_dup, dgate, dup, h_out,
                            TANH=approximate == "tanh")


class _GeGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, approximate):
        shape = gate.shape
        g2, u2 = E.as_rows("geglu", "gate", gate), E.as_rows("geglu", "up", up)
        y = geglu_forward(g2, u2, approximate)
        ctx.save_for_backward(g2, u2 if ctx.needs_input_grad[0] else None)
        ctx.meta = (shape, approximate)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        shape, approximate = ctx.meta
        dg, du = geglu_backward(E.as_rows("geglu", "dy", dy), g2, u2, approximate, ctx.needs_input_grad[0],
                                ctx.needs_input_grad[1])
        return (None if dg is None else dg.view(shape)), (None if du is None else du.view(shape)), None


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` elementwise; ``gate`` and ``up`` share shape,
    dtype and device. ``approximate`` is ``"none"`` (exact, erf) or ``"tanh"``,
    as in ``torch.nn.functional.gelu``. Computed in fp32, rounded once."""
    op = "geglu"
    C.check_float(op, "gate", gate)
    C.check_float(op, "up", up)
    C.check_same_dtype(op, gate=gate, up=up)
    C.check_device(op, gate, up)
    C.check_shape(op, "up", up, tuple(gate.shape))
    if approximate not in APPROXIMATE_MODES:
        raise C.KernelInputError(f"{op}: approximate must be one of {APPROXIMATE_MODES}, got {approximate!r}.")
    return _GeGLU.apply(gate, up, approximate)


# --------------------------------------------------------------------------- reference
def geglu_reference(gate, up, approximate="none", compute_dtype=torch.float32):
    """``F.gelu(gate, approximate) * up`` computed in ``compute_dtype`` (fp32; fp64 for the exact pass)."""
    h = torch.nn.functional.gelu(gate.to(compute_dtype), approximate=approximate)
    return (h * up.to(compute_dtype)).to(gate.dtype)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    # SwiGLU's shapes, scales, strides and grad flags, plus the GELU form.
    return {**draw(SWIGLU.params(limits)), "approximate": draw(st.sampled_from(APPROXIMATE_MODES))}


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    inputs = SWIGLU.make_inputs(p, dtype, device, gen)
    inputs.options = {"approximate": p["approximate"]}
    return inputs


#: SwiGLU's, in both GELU forms.
EXAMPLES = tuple(Example({**e.params, "approximate": a}, e.why, e.dtypes, e.seed)
                 for e in SWIGLU.examples for a in APPROXIMATE_MODES)


SPEC = KernelSpec(
    name="geglu",
    fn=geglu,
    reference=geglu_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("y",),
    grads=("gate", "up"),
    options=("approximate: none|tanh",),
    summary="GeGLU gelu(gate) * up (exact erf or tanh GELU), elementwise over any shape.",
    examples=EXAMPLES,
)
