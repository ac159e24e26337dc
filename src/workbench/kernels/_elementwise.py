"""Shared plumbing of the element-wise kernels (``swiglu``, ``geglu``, the LoRA ops of
``_lora_ops.py``): a flat 1-D grid of element blocks over [rows, last_dim] views.

Inputs are viewed as [rows, last_dim] with a unit last stride (no copy for the usual
row-strided views: the two halves of a fused gate_up projection, a slice of a wider
upstream gradient); buffers we allocate are contiguous. A kernel walks the flat
element index in blocks of up to ``BLOCK_CAP`` with int64 offsets, and maps it back
to (row, col) only when some input is not contiguous (``offset`` with ``CONTIG``
False), so the dense case costs no division.

Not a kernel module (the underscore keeps it out of the registry): every kernel that
launches element-wise kernels imports what it needs from here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import _common as C

#: Elements per program on the GPU (8 per thread at 4 warps: two 128-bit loads in fp32).
BLOCK_CAP = 1024


@triton.jit
def offset(idx, n_cols, stride, CONTIG: tl.constexpr):
    """Memory offset of flat element ``idx`` of a [rows, n_cols] view with row stride
    ``stride`` (the flat index itself when every input is contiguous)."""
    off = idx
    if not CONTIG:
        row = idx // n_cols
        off = row * stride + (idx - row * n_cols)
    return off


#: libdevice has no interpreter twin; there tl.exp is numpy's exp, which loses nothing.
_LIBDEVICE = tl.constexpr(not C.INTERPRET)


@triton.jit
def exp_f32(x, EXACT: tl.constexpr):
    """exp(x) in fp32. EXACT: libdevice's expf (CUDA's, which PyTorch's kernels call), for a
    result kept in fp32; otherwise tl.exp (ex2.approx of x log2 e: cheaper, a few ulps less
    accurate, which a 16-bit result's rounding hides)."""
    y = tl.exp(x)
    if EXACT:
        if _LIBDEVICE:
            y = libdevice.exp(x)
    return y


@triton.jit
def div_f32(a, b, EXACT: tl.constexpr):
    """a / b in fp32. EXACT: correctly rounded (div.rn), as PyTorch's; otherwise Triton's
    division (div.full, within 2 ulps)."""
    q = a / b
    if EXACT:
        q = tl.div_rn(a, b)
    return q


def exact(*buffers: torch.Tensor | None) -> bool:
    """Whether a gated kernel computes with correctly rounded exp and division: when any
    result it writes is fp32 (the pooled-ulp test, parity/test_gated_ulps.py, holds it to
    PyTorch's own accuracy there)."""
    return any(b is not None and b.dtype == torch.float32 for b in buffers)


def as_rows(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """[rows, last_dim] view with a unit last stride (a 0-dim tensor is one 1x1 row)."""
    return C.rows_view(op, name, t.reshape(1, 1) if t.dim() == 0 else t)


def contiguous(n_cols: int, *tensors: torch.Tensor) -> bool:
    """Whether every [rows, n_cols] view is dense, so the flat index is its offset."""
    return all(t.shape[0] <= 1 or t.stride(0) == n_cols for t in tensors)


def block(n_elements: int) -> int:
    """Elements per program (the parity suite's forced block when one is set)."""
    return C.block_for(n_elements, cap=BLOCK_CAP, forced=C.forced())


def grid(n_elements: int) -> tuple[tuple[int], int]:
    """(grid, block) of a launch over ``n_elements`` flat elements."""
    b = block(n_elements)
    return (C.cdiv(n_elements, b),), b


# --------------------------------------------------------------------------- gated activations
# swiglu's and geglu's kernels share one signature (an activation's own constexprs aside), so
# their launches are one: ``consts`` carries the activation's (geglu's TANH).
def gated_forward(kernel, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None,
                  **consts) -> torch.Tensor:
    """h = act(gate) * up by ``kernel`` (a gated activation's forward) into ``out`` (a new
    [rows, cols] buffer of gate's dtype when None). Returns ``out``."""
    n_rows, n_cols = gate.shape
    n = n_rows * n_cols
    if out is None:
        out = C.empty((n_rows, n_cols), gate.dtype, gate.device)
    if n:
        g, b = grid(n)
        kernel[g](gate, up, out, gate.stride(0), up.stride(0), n_cols, n,
                  EXACT=exact(out), CONTIG=contiguous(n_cols, gate, up), BLOCK=b, **consts)
    return out


def gated_backward(kernel, dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, need_dgate: bool,
                   need_dup: bool, dgate: torch.Tensor | None, dup: torch.Tensor | None,
                   h_out: torch.Tensor | None = None, **consts):
    """(dgate, dup) by ``kernel`` (a gated activation's backward), each None unless asked for,
    into the buffers given or new ones of gate's dtype; ``up`` is read only for dgate or h.

    ``h_out``: also write h = act(gate) * up there (the forward's formula and rounding, from
    the gate and up the backward loads anyway), for a caller that needs h after the backward
    (lora_mlp's dA of down_proj). It may be ``dh`` itself: each program reads its elements of
    dh before it writes theirs of h, so h replaces dh in place with no second buffer; dh must
    then be dense (h is written at the flat index). Any other h_out is a contiguous buffer
    that overlaps none of the inputs."""
    n_rows, n_cols = gate.shape
    n = n_rows * n_cols
    store_h = h_out is not None
    if store_h and h_out.data_ptr() == dh.data_ptr() and n and (h_out.dtype != dh.dtype
                                                                or not contiguous(n_cols, dh)):
        raise ValueError("gated_backward: h_out in place of dh needs a dense dh of h's dtype")
    if need_dgate and dgate is None:
        dgate = C.empty((n_rows, n_cols), gate.dtype, gate.device)
    if need_dup and dup is None:
        dup = C.empty((n_rows, n_cols), gate.dtype, gate.device)
    if n and (need_dgate or need_dup or store_h):
        g, b = grid(n)
        u_arg = up if (need_dgate or store_h) else gate
        kernel[g](dh, gate, u_arg, dgate if need_dgate else dh, dup if need_dup else dh, h_out if store_h else dh,
                  dh.stride(0), gate.stride(0), u_arg.stride(0), n_cols, n,
                  COMPUTE_DG=need_dgate, COMPUTE_DU=need_dup, STORE_H=store_h,
                  EXACT=exact(dgate if need_dgate else None, dup if need_dup else None),
                  EXACT_H=exact(h_out), CONTIG=contiguous(n_cols, dh, gate, u_arg), BLOCK=b, **consts)
    return (dgate if need_dgate else None), (dup if need_dup else None)
