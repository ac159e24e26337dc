"""The building blocks of one PEFT LoRA linear, shared by ``lora_o``, ``lora_qkv`` and
``lora_mlp``: its forward and backward as cuBLAS GEMMs plus the element-wise Triton
kernels that round where PEFT rounds.

    y = x W^T (+ b) + s * (dropout(x) A^T) B^T

Not a kernel module (the underscore keeps it out of the registry); the kernels that
import it are its parity tests, and the mutation self-test reaches it through them:
a mutant names this module (``Mutant.module``) and the kernel it is judged by, whose
copy then calls the patched module (``parity/mutants/__init__.py``).

Every step rounds to the layer's dtype exactly where PEFT (nn.Linear in that
dtype, then ``* scaling``, then ``+``) and autograd round, forward and backward,
so the kernels track PyTorch's own roundings; the differences are the GEMMs'
accumulation orders. (Folding the scaling into the GEMM epilogue, as Unsloth's
``addmm_(alpha=s)`` does, skips two of PEFT's roundings: more accurate, but a
gradient that cancels over tokens -- dA of a tiny case -- amplifies that one-ulp
drift past 4x PyTorch's error. Hence the step-by-step version.)

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

The Triton kernels are element-wise over a flat index (``_elementwise.py``: a 1-D
grid of blocks of up to 1024 elements, int64 offsets); x itself may be row-strided
and is read in place. bf16 results are rounded to nearest even by ``_to``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _elementwise as E
from ._elementwise import offset


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


def add_input_grad(dx, dy2, w, dxa, A, keep2, scale: float, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None):
    """The input gradient of one LoRA linear, dy2 w + dropout'(dxa A), each term
    rounded and summed as autograd sums them: accumulated into ``dx``, or when ``dx``
    is None written to ``out`` (a contiguous buffer of the input's dtype) or to a new
    buffer of ``dtype`` (the input's: dy2's by default, fp32 in the mixed mode)."""
    n, d_in = dy2.shape[0], w.shape[1]
    t = C.empty((n, d_in), dy2.dtype, dy2.device)
    if dx is None:
        dx = C.empty((n, d_in), dtype or dy2.dtype, dy2.device) if out is None else out
        if dx.dtype == dy2.dtype:
            torch.mm(dy2, w, out=dx)
        else:
            torch.mm(dy2, w, out=t)
            dx.copy_(t)  # the branch's 16-bit gradient, upcast exactly
    else:
        torch.mm(dy2, w, out=t)
        grad_add(dx, t)
    torch.mm(dxa, A, out=t)
    grad_add(dx, t, keep2, scale)
    return dx
