"""LoRA linear (PEFT-equivalent) on a frozen base weight: the o_proj / down_proj shape.

    y = x W^T + s * (dropout(x) A^T) B^T

W [out, in] frozen (a tensor that does not require grad, or an object with
``.dequantize()``, e.g. NF4), A [r, in], B [out, r], ``scaling`` s = alpha / r
(LoRA) or alpha / sqrt(r) (rsLoRA). See ``_lora.py`` for the dropout-mask and
frozen-weight conventions shared by ``lora_o``, ``lora_qkv`` and ``lora_mlp``.

This file also holds the building blocks of one LoRA linear that ``lora_qkv``
and ``lora_mlp`` import (here, in a registered file, so that the mutation
self-test can reach them).

Every step rounds to the layer's dtype exactly where PEFT (nn.Linear in that
dtype, then ``* scaling``, then ``+``) and autograd round, forward and backward,
so the kernel tracks PyTorch's own roundings; the differences are the GEMMs'
accumulation orders. (Folding the scaling into the GEMM epilogue, as Unsloth's
``addmm_(alpha=s)`` does, skips two of PEFT's roundings: more accurate, but a
gradient that cancels over tokens -- dA of a tiny case -- amplifies that one-ulp
drift past 4x PyTorch's error. Measured here; hence the step-by-step version.)

forward   y    = x W^T (+ b)                  cuBLAS, rounded
          xa   = xd A^T                       [N, r]; xd = dropout(x) (Triton) or x
          lora = xa B^T                       [N, out] scratch
          y    = y + round(lora * s)          Triton ``_lora_add``, in place
backward  ds   = round(dy * s)                Triton ``_scale_fwd``  [N, out] scratch
          dB   = ds^T xa,  dxa = ds B         cuBLAS
          dA   = dxa^T xd                     xd recomputed from x and the mask
          dx   = dy W  (+)  drop'(dxa A)      cuBLAS, then Triton ``_grad_add``: the
                                              dropout's backward and autograd's sum
Mixed mode (x fp32 on a bf16/fp16 layer, QLoRA under autocast; ``_lora.py``): the
GEMMs read x cast to the layer's dtype (xd: the dropout on the fp32 x, rounded once
to it), ``_lora_add`` writes the sum to a new fp32 y without rounding it to the
layer's dtype, the backward casts dy to the layer's dtype once, and dx is an fp32
buffer into which ``_grad_add`` sums the branches' 16-bit terms, as autograd sums
PEFT's upcast gradients.
Saved for backward: x (only if dA is needed), the bool keep-mask (with dropout),
xa [N, r] (only if dB is needed), A (if dx), B (if dA or dx), W (if dx: the
parameter itself, or the quantized object -- never a dequantised copy). Nothing
of size [N, out] is kept and xd is recomputed from x and the 1-byte mask.

The Triton kernels are elementwise over a flat index (a 1-D grid of blocks of
up to 1024 elements, int64 offsets, ``_elementwise.py``); x itself may be row-strided
and is read in place. bf16 results are rounded to nearest even by ``_to``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _elementwise as E
from . import _lora as L
from . import _strategies as S
from ._elementwise import offset
from ._registry import Example, Inputs, KernelSpec, Limits


# --------------------------------------------------------------------------- Triton
@triton.jit
def _to(x, DT: tl.constexpr):
    """fp32 -> DT, rounded to nearest even. For bf16 spelled out in integer ops:
    Triton 3.6's interpreter truncates on ``.to(tl.bfloat16)``, and these kernels
    reproduce PEFT's chain of roundings step by step (a truncated intermediate
    would drift from it). On the GPU this equals cvt.rn.bf16.f32 (NaN kept quiet)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x == x, r, 0x7FC0)
        y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DT)
    return y


# All four are elementwise over a flat index in blocks (a 1-D grid, ``_elementwise.py``):
# buffers we allocate are contiguous; only x itself may be row-strided, and
# _dropout_fwd maps the flat index back to (row, col) for it.
@triton.jit
def _dropout_fwd(X, KEEP, Y, x_stride, n_cols, n_elements, scale, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    # Y = X * keep * scale (PEFT's nn.Dropout on the LoRA branch's input), one rounding.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    x_off = offset(idx, n_cols, x_stride, CONTIG)
    x = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    keep = tl.load(KEEP + idx, mask=mask, other=0)
    tl.store(Y + idx, _to(tl.where(keep != 0, x * scale, 0.0), Y.dtype.element_ty), mask=mask)


@triton.jit
def _lora_add(Y, LORA, OUT, n_elements, s, BLOCK: tl.constexpr):
    # OUT = Y + (LORA * s): PEFT's `result + lora_B(.) * scaling`, rounded where PEFT rounds:
    # the scaled term in the layer's dtype (LORA's), the sum in OUT's (Y's own, in place; or
    # fp32 in the mixed mode, where PEFT adds the 16-bit term to bitsandbytes' fp32 output).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    y = tl.load(Y + idx, mask=mask, other=0.0).to(tl.float32)
    lora = tl.load(LORA + idx, mask=mask, other=0.0).to(tl.float32)
    lora = _to(lora * s, LORA.dtype.element_ty).to(tl.float32)
    tl.store(OUT + idx, _to(y + lora, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _scale_fwd(DY, DS, dy_stride, n_cols, n_elements, s, CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    # DS = DY * s: the gradient reaching lora_B's output (the backward of `* scaling`).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    dy_off = offset(idx, n_cols, dy_stride, CONTIG)
    dy = tl.load(DY + dy_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DS + idx, _to(dy * s, DS.dtype.element_ty), mask=mask)


@triton.jit
def _grad_add(DX, T, KEEP, n_elements, scale, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    # DX += T, or DX += T * keep * scale (the dropout's backward, rounded, then summed):
    # autograd's accumulation of one more consumer's gradient into an input's.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    dx = tl.load(DX + idx, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep = tl.load(KEEP + idx, mask=mask, other=0)
        t = _to(tl.where(keep != 0, t * scale, 0.0), DX.dtype.element_ty).to(tl.float32)
    tl.store(DX + idx, _to(dx + t, DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def dropout_apply(h2: torch.Tensor, keep2: torch.Tensor | None, scale: float,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """xd = h * keep * scale as a fresh [rows, cols] tensor (``h2`` itself when no mask),
    computed in fp32 and rounded once to ``dtype`` (h's by default; the layer's in the
    mixed mode, where PEFT's dropout runs on the fp32 h and autocast casts its result)."""
    if keep2 is None:
        return h2
    n_rows, n_cols = h2.shape
    n = n_rows * n_cols
    out = C.empty((n_rows, n_cols), dtype or h2.dtype, h2.device)
    if n:
        grid, block = E.grid(n)
        _dropout_fwd[grid](h2, keep2.view(torch.uint8), out, h2.stride(0), n_cols, n, scale,
                           CONTIG=E.contiguous(n_cols, h2), BLOCK=block)
    return out


def grad_add(dx2: torch.Tensor, t2: torch.Tensor, keep2: torch.Tensor | None = None, scale: float = 1.0) -> None:
    """dx2 += t2 (masked and scaled by the dropout's backward when ``keep2``), in place
    (both contiguous buffers we own)."""
    n = dx2.numel()
    if n:
        grid, block = E.grid(n)
        _grad_add[grid](dx2, t2, t2 if keep2 is None else keep2.view(torch.uint8), n, scale,
                        HAS_KEEP=keep2 is not None, BLOCK=block)


# --------------------------------------------------------------------------- LoRA building blocks
# PEFT's roundings, step by step: every matmul's output and every elementwise op is
# rounded to the layer's dtype where PEFT's nn.Linear / `* scaling` / `+` / dropout
# round it, forward and backward. The matmuls are torch's (cuBLAS); the elementwise
# steps are fused into the Triton kernels above.
def layer_inputs(x2: torch.Tensor, keep2: torch.Tensor | None, scale: float, lo: torch.dtype):
    """(xc, xd): the base GEMM's input (x2 in the layer dtype ``lo``) and the LoRA
    branch's (the dropout of x2, rounded to ``lo``; xc itself without a mask)."""
    xc = x2 if x2.dtype == lo else x2.to(lo)
    return xc, (xc if keep2 is None else dropout_apply(x2, keep2, scale, lo))


def branch_input(saved: torch.Tensor, keep2: torch.Tensor | None, scale: float, lo: torch.dtype):
    """The LoRA branch's input recomputed in the backward from what the forward saved:
    x itself with a mask, else its cast to ``lo`` (``saved_input``)."""
    return saved if keep2 is None else dropout_apply(saved, keep2, scale, lo)


def saved_input(x2: torch.Tensor, xc: torch.Tensor, keep2: torch.Tensor | None) -> torch.Tensor:
    """What to save for dA: with a mask, x (its dropout is recomputed from it); without
    one, the cast that the branch read (in the mixed mode half the bytes of x)."""
    return xc if keep2 is None else x2


def lora_forward(h2, hd2, w, A, B, s: float, bias=None, out_dtype: torch.dtype | None = None):
    """One LoRA linear: (y, xa) with y = h2 w^T (+ bias) + (xa B^T) * s and xa = hd2 A^T,
    all in the layer's dtype (h2's); y in ``out_dtype`` when given (fp32 in the mixed
    mode: the two terms summed without rounding to the layer's dtype)."""
    n = h2.shape[0]
    out = w.shape[0]
    y = C.empty((n, out), h2.dtype, h2.device)
    if bias is None:
        torch.mm(h2, w.t(), out=y)
    else:
        torch.addmm(bias, h2, w.t(), out=y)
    xa = C.empty((n, A.shape[0]), h2.dtype, h2.device)
    torch.mm(hd2, A.t(), out=xa)
    lora = C.empty((n, out), h2.dtype, h2.device)
    torch.mm(xa, B.t(), out=lora)
    result = y if out_dtype in (None, h2.dtype) else C.empty((n, out), out_dtype, h2.device)
    if n * out:
        grid, block = E.grid(n * out)
        _lora_add[grid](y, lora, result, n * out, s, BLOCK=block)
    return result, xa


def scaled_grad(dy2, s: float) -> torch.Tensor:
    """The gradient reaching lora_B's output: dy * scaling, rounded to dy's dtype (PEFT's
    ``* scaling``, backward)."""
    n, out = dy2.shape
    ds = C.empty((n, out), dy2.dtype, dy2.device)
    if n * out:
        grid, block = E.grid(n * out)
        _scale_fwd[grid](dy2, ds, dy2.stride(0), out, n * out, s, CONTIG=E.contiguous(out, dy2), BLOCK=block)
    return ds


def lora_backward(dy2, hd2, xa, B, s: float, need_a: bool, need_b: bool, need_dxa: bool):
    """(dA, dB, dxa) of one LoRA linear, each None unless asked for. ``hd2`` is
    the (dropped-out) input of the LoRA branch, needed only for dA; ``xa`` only
    for dB; ``B`` only for dA or dxa."""
    dA = dB = dxa = None
    if not (need_a or need_b or need_dxa):
        return dA, dB, dxa
    n, out = dy2.shape
    ds = scaled_grad(dy2, s)
    if need_b:
        dB = C.empty((out, xa.shape[1]), dy2.dtype, dy2.device)
        torch.mm(ds.t(), xa, out=dB)
    if need_a or need_dxa:
        dxa = C.empty((n, B.shape[1]), dy2.dtype, dy2.device)
        torch.mm(ds, B, out=dxa)
    if need_a:
        dA = C.empty((dxa.shape[1], hd2.shape[1]), dxa.dtype, dxa.device)
        torch.mm(dxa.t(), hd2, out=dA)
    return dA, dB, dxa


def add_input_grad(dx, dy2, w, dxa, A, keep2, scale: float, dtype: torch.dtype | None = None):
    """The input gradient of one LoRA linear, dy2 w + dropout'(dxa A), each term
    rounded and summed as autograd sums them: into a new buffer (of ``dtype``, the
    input's: dy2's by default, fp32 in the mixed mode) when ``dx`` is None, else
    accumulated into ``dx``."""
    n, d_in = dy2.shape[0], w.shape[1]
    t = C.empty((n, d_in), dy2.dtype, dy2.device)
    if dx is None and dtype in (None, dy2.dtype):
        dx = C.empty((n, d_in), dy2.dtype, dy2.device)
        torch.mm(dy2, w, out=dx)
    else:
        torch.mm(dy2, w, out=t)
        if dx is None:
            dx = t.to(dtype)  # the branch's 16-bit gradient, upcast exactly
        else:
            grad_add(dx, t)
    torch.mm(dxa, A, out=t)
    grad_add(dx, t, keep2, scale)
    return dx


# --------------------------------------------------------------------------- autograd
class _LoraO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, A, B, keep, scaling, dropout):
        op = "lora_o"
        shape, lo = x.shape, A.dtype
        x2 = C.rows_view(op, "x", x)
        keep2 = L.rows2(keep, shape[-1])
        inv = L.inverse_keep(dropout)
        out, d_in = B.shape[0], shape[-1]
        xc, xd2 = layer_inputs(x2, keep2, inv, lo)
        w = L.dense(op, "W", W, lo, (out, d_in))
        y, xa = lora_forward(xc, xd2, w, A, B, scaling, out_dtype=x.dtype)
        del w, xd2
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        ctx.save_for_backward(saved_input(x2, xc, keep2) if need_a else None, keep2, A if need_x else None,
                              B if (need_a or need_x) else None, xa if need_b else None,
                              W if (need_x and L.is_dense(W)) else None)
        ctx.quantized = W if (need_x and not L.is_dense(W)) else None
        ctx.meta = (shape, out, scaling, inv, x.dtype, lo)
        return y.view(*shape[:-1], out)

    @staticmethod
    def backward(ctx, dy):
        op = "lora_o"
        xs, keep2, A, B, xa, w_saved = ctx.saved_tensors
        shape, out, scaling, inv, x_dtype, lo = ctx.meta
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dy2 = C.rows_view(op, "dy", dy).to(lo)
        xd2 = branch_input(xs, keep2, inv, lo) if need_a else None
        dA, dB, dxa = lora_backward(dy2, xd2, xa, B, scaling, need_a, need_b, need_x)
        del xd2
        dx = None
        if need_x:
            w = L.dense(op, "W", w_saved if w_saved is not None else ctx.quantized, lo, (out, shape[-1]))
            dx = add_input_grad(None, dy2, w, dxa, A, keep2, inv, x_dtype).view(shape)
        return dx, None, dA, dB, None, None, None


def lora_o(x: torch.Tensor, W, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout: float = 0.0,
           dropout_mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT LoRA linear ``x W^T + scaling * (dropout(x) A^T) B^T`` over the last dim of x.

    ``W`` [out, in] is frozen: a tensor that does not require grad, or an object
    with ``.dequantize()`` (NF4). ``A`` [r, in], ``B`` [out, r]. ``scaling`` is
    alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA). ``dropout`` p > 0 applies
    ``dropout_mask`` (bool, x's shape, True = kept; drawn from ``generator`` when
    None) to the LoRA branch's input only, kept elements scaled by 1 / (1 - p).
    x may be float32 on a bf16/fp16 layer (QLoRA under autocast): y and dX are then
    float32, the two terms summed in fp32 as PEFT sums them (``_lora.py``).
    Gradients: dX, dA, dB as required; never dW.
    """
    op = "lora_o"
    C.check_float(op, "x", x)
    L.check_options(op, scaling, dropout)
    L.check_linear(op, x, ("W", "A", "B"), W, A, B)
    keep = L.keep_mask(op, "dropout_mask", dropout_mask, dropout, tuple(x.shape), x, generator)
    return _LoraO.apply(x, W, A, B, keep, float(scaling), float(dropout))


# --------------------------------------------------------------------------- reference
def lora_o_reference(x, W, A, B, scaling, dropout=0.0, dropout_mask=None, generator=None,
                     compute_dtype=torch.float32):
    """PEFT's ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` in ``compute_dtype``,
    each nn.Linear output (and the dropout, the scaling and the sum) rounded to x's dtype."""
    if dropout > 0 and dropout_mask is None:
        raise ValueError("lora_o_reference: pass the dropout_mask explicitly when dropout > 0")
    return L.linear_reference(x, W, A, B, scaling, None, dropout_mask if dropout > 0 else None, dropout,
                              compute_dtype)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    block = draw(S.block(limits))
    cap = L.dim_cap(limits)
    d_in, d_out = draw(S.dim(1, cap)), draw(S.dim(1, cap))
    cfg = draw(L.lora_config([d_in, d_out]))
    batch, tokens = draw(L.rows(limits, max(d_in, d_out)))
    return {
        "batch": batch, "tokens": tokens, "d_in": d_in, "d_out": d_out, **cfg,
        "scale": draw(S.scale()),
        "b_scale": draw(st.sampled_from(L.B_SCALES)),
        "x_fp32": draw(L.mixed_flag()),
        "strided": draw(st.booleans()),
        "grad_x": draw(L.grad_flag()), "grad_A": draw(L.grad_flag()), "grad_B": draw(L.grad_flag()),
        "_block": block,
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    x = L.activations(p, p["d_in"], dtype, device, gen)
    W = L.frozen_weight(p["d_out"], p["d_in"], dtype, device, gen)
    A, B = L.adapters(p["d_out"], p["d_in"], p["r"], p["b_scale"], p["scaling"], dtype, device, gen)
    keep = L.draw_keep(tuple(x.shape), p["dropout"], device, gen) if p["dropout"] > 0 else None
    grads = tuple(n for n, on in (("x", p["grad_x"]), ("A", p["grad_A"]), ("B", p["grad_B"])) if on)
    return Inputs({"x": x, "W": W, "A": A, "B": B, "dropout_mask": keep},
                  {"scaling": p["scaling"], "dropout": p["dropout"]}, grads)


def _case(**over) -> dict:
    return {"batch": 2, "tokens": 5, "d_in": 12, "d_out": 10, "r": 2, "alpha": 16.0, "rslora": False, "scaling": 8.0,
            "dropout": 0.0, "scale": 1.0, "b_scale": 2.0**-10, "x_fp32": True, "strided": False,
            "grad_x": True, "grad_A": True, "grad_B": True, "_block": None, **over}


EXAMPLES = (
    Example(_case(), L.MIXED_SMALL_ADAPTER, dtypes=(torch.bfloat16,)),
    Example(_case(dropout=0.1, strided=True, _dy="strided"), L.MIXED_SMALL_ADAPTER + " (with dropout)",
            dtypes=(torch.bfloat16,)),
    Example(_case(batch=1, tokens=256, d_in=8, d_out=8, x_fp32=False, b_scale=1.0), L.MANY_TOKENS,
            dtypes=(torch.bfloat16,)),
)


SPEC = KernelSpec(
    name="lora_o",
    fn=lora_o,
    reference=lora_o_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("y",),
    grads=("x", "A", "B"),
    options=("scaling (alpha/r or rsLoRA alpha/sqrt(r))", "dropout p with an explicit bool mask",
             "W: tensor or .dequantize() object (NF4)", "fp32 x on a 16-bit layer (QLoRA under autocast)"),
    summary="PEFT LoRA linear on a frozen (or NF4) weight: cuBLAS GEMMs, Triton dropout; dX/dA/dB, never dW.",
    ablate=L.ablate_adapters("B"),
    examples=EXAMPLES,
)
