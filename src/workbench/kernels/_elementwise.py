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
    return (triton.cdiv(n_elements, b),), b
