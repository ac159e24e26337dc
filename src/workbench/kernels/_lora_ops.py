"""The building blocks of one PEFT LoRA linear, shared by ``lora_o``, ``lora_qkv`` and
``lora_mlp``: its forward and backward as cuBLAS GEMMs, the LoRA scaling and sums in
the GEMMs' epilogues, the LoRA-A GEMMs of several linears of one input stacked into
one, and the element-wise Triton kernels that the epilogues cannot express (a dropout
mask, the mixed mode's fp32 sums).

    y = x W^T (+ b) + s * (dropout(x) A^T) B^T

Not a kernel module (the underscore keeps it out of the registry); the kernels that
import it are its parity tests, and the mutation self-test reaches it through them:
a mutant names this module (``Mutant.module``) and the kernel it is judged by, whose
copy then calls the patched module (``parity/mutants/__init__.py``).

The numerics are the folded ones (Unsloth's, ``addmm_(alpha=s)``), not PEFT's chain
(nn.Linear in the layer's dtype, then ``* scaling``, then ``+``, each rounded): the
scaling is the GEMM's alpha and each sum with an earlier term is its beta = 1, so
the scaled term is never rounded on its own. Each line below rounds once, from the
GEMM's fp32 accumulator to the layer's dtype; PEFT rounds the same quantities two or
three times. The reference twin (``_lora.linear_reference``, ``linears_reference`` for
several linears of one input) computes this chain, so the parity suite measures
PyTorch's own error on the roundings the kernel makes; ``parity/test_lora_numerics.py``
checks that the chain is at least as accurate against fp64 as PEFT's, pooled over draws
of the kernels' own strategies.

forward   y    = x W^T (+ b)                  cuBLAS, rounded
          xa   = xd A^T                       [N, r]; xd = dropout(x) (Triton) or x
          y    = y + s * xa B^T               addmm_(alpha=s, beta=1): one rounding
backward  dB   = s * dy^T xa                  addmm(alpha=s)
          dxaT = s * B^T dy^T                 addmm(alpha=s); dxa transposed, [r, N]
          dA   = dxaT xd                      xd recomputed from x and the mask
          dx   = dy W;  dx = dx + dxaT^T A    addmm_(beta=1)

Several linears of one input (q/k/v of ``lora_qkv``, gate/up of ``lora_mlp``) without
a dropout mask read the same x, and the memory-bound passes over x and dx are taken
once for all of them, their adapters stacked (A_all = cat(A_i), [sum r, in], per call; a
view, no copy, where the A_i lie back to back in one buffer, ``stack_rows``):
  xa_all = x A_all^T once (``lora_a_shared``), each linear's epilogue reading its column
  slice in place; each dxaT_i written into its rows of one [sum r, N] buffer; dA_all =
  dxaT_all x once (``lora_a_grads_shared``, each dA_i its rows); and dx takes the base
  terms one epilogue after another, then all the LoRA terms in ONE GEMM:
          dx = dy_1 W_1;  dx = dx + dy_2 W_2;  ...  (beta=1, each rounded)
          dx = dx + dxaT_all^T A_all          (``add_lora_grad``): sum_i dxa_i A_i
                                              summed in the fp32 accumulator, one rounding
  xa_i, dxaT_i and dA_i are the same dot products as each linear's own GEMMs form; what
  changes is dx, whose LoRA terms are rounded once together, not once each.
Exceptions, Triton element-wise passes (and no stacking of the LoRA terms):
  * a dropout mask: each linear's branch reads its own dropped-out x (its own xa and dA
    GEMMs), and dx's LoRA term is t = round(dxaT^T A), then ``_grad_add`` adds
    round(t * keep / (1 - p)) (the dropout's backward, rounded where autograd rounds),
    one linear after another;
  * the mixed mode (x fp32 on a bf16/fp16 layer, QLoRA under autocast; ``_lora.py``):
    the GEMMs read x cast to the layer's dtype (xd: the dropout on the fp32 x, rounded
    once to it), the scaled term is rounded to the layer's dtype (addmm(alpha=s) into
    a scratch), ``_lora_add`` sums it with the base output in fp32 into a new fp32 y,
    the backward casts dy to the layer's dtype once, and dx is an fp32 buffer into
    which ``_grad_add`` sums the branches' 16-bit terms, as autograd sums PEFT's upcast
    gradients: each base term rounded to the layer's dtype, and the LoRA term (of
    several linears: their one GEMM's sum) rounded to it once. A 16-bit epilogue would
    round those sums to the layer's dtype and lose a small adapter's term (the parity
    suite's ``delta:`` comparisons).

The Triton kernels are element-wise over a flat index (``_elementwise.py``: a 1-D
grid of blocks of up to 1024 elements, int64 offsets); x itself may be row-strided
and is read in place. bf16 results are rounded to nearest even by ``_common.round_to``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _elementwise as E
from ._common import round_to
from ._elementwise import offset


# --------------------------------------------------------------------------- Triton
# All three are elementwise over a flat index in blocks (a 1-D grid, ``_elementwise.py``):
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
    tl.store(Y + idx, round_to(tl.where(keep != 0, x * scale, 0.0), Y.dtype.element_ty), mask=mask)


@triton.jit
def _lora_add(Y, LORA, OUT, n_elements, BLOCK: tl.constexpr):
    # OUT = Y + LORA in fp32, rounded to OUT's dtype: the mixed mode's sum of the 16-bit base
    # output and the 16-bit scaled LoRA term into a new fp32 y, where PEFT adds the LoRA term
    # to bitsandbytes' fp32 output.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    y = tl.load(Y + idx, mask=mask, other=0.0).to(tl.float32)
    lora = tl.load(LORA + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + idx, round_to(y + lora, OUT.dtype.element_ty), mask=mask)


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
        t = round_to(tl.where(keep != 0, t * scale, 0.0), DX.dtype.element_ty).to(tl.float32)
    tl.store(DX + idx, round_to(dx + t, DX.dtype.element_ty), mask=mask)


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


def scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float, out: torch.Tensor) -> torch.Tensor:
    """out = s * (a @ b), the scaling as the GEMM's alpha: one rounding. beta = 0 ignores
    out's contents (NaN included, as the parity suite's poisoned buffers hold)."""
    return torch.addmm(out, a, b, beta=0, alpha=s, out=out)


# --------------------------------------------------------------------------- LoRA building blocks
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


def lora_a_shared(hd2: torch.Tensor, As) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The LoRA-A products of several linears reading one input (q/k/v, gate/up; no dropout
    mask): (A_all, xa) with A_all = cat(As) [sum r, in] and one GEMM xa_all = hd2 A_all^T
    [N, sum r], so the input is read once, not once per linear. ``xa`` holds each linear's
    column slice of xa_all ([N, r], row stride sum r): a strided operand that the epilogue's
    GEMM (``lora_forward``) and dB's read in place (cuBLAS takes a leading dimension; torch
    copies neither on the GPU nor on the CPU). Each element is the same dot product over
    the input's columns as the linear's own GEMM would form, rounded once."""
    A_all = stack_rows(As)
    xa_all = C.empty((hd2.shape[0], A_all.shape[0]), hd2.dtype, hd2.device)
    torch.mm(hd2, A_all.t(), out=xa_all)
    return A_all, [xa_all[:, sl] for sl in rank_slices([A.shape[0] for A in As])]


def packed(ts, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """The 2-D tensors ``ts`` (in ``dtype``, default their own) as views of one new contiguous
    buffer, back to back in this order: the patcher's adapter cast lays a decoder layer's
    adapters out so (workbench.patch._CastAdapters), and the parity strategies draw that layout
    (``_lora.lay_out``). Each element is cast alone, as ``t.to(dtype)`` casts it."""
    ts = tuple(ts)
    flat = torch.cat([t.reshape(-1) for t in ts])
    if dtype is not None:
        flat = flat.to(dtype)
    out, at = [], 0
    for t in ts:
        rows, cols = t.shape
        out.append(flat.as_strided((rows, cols), (cols, 1), at))  # as_strided: the cheapest view on the host
        at += rows * cols
    return tuple(out)


def stack_rows(ts) -> torch.Tensor:
    """cat(ts) along rows: the 2-D tensors stacked, [sum rows, cols]. Where they already lie
    back to back in one buffer, in this order (the patcher casts a decoder layer's adapters
    into one, q/k/v's A's and gate/up's A's each adjacent), the stack is a view of that buffer:
    the same values, without the copy."""
    ts = tuple(ts)
    if len(ts) == 1:
        return ts[0]
    first = ts[0]
    cols, size = first.shape[1], first.element_size()
    storage = first.untyped_storage().data_ptr()
    at = first.data_ptr()
    for t in ts:
        if not (t.dim() == 2 and t.shape[1] == cols and t.dtype == first.dtype and t.is_contiguous()
                and t.untyped_storage().data_ptr() == storage and t.data_ptr() == at):
            return torch.cat(ts)
        at += t.numel() * size
    return first.as_strided((sum(t.shape[0] for t in ts), cols), (cols, 1))


def rank_slices(ranks) -> list[slice]:
    """Each linear's rows of a stacked [sum r, ...] buffer (or columns of xa_all), in order."""
    out, start = [], 0
    for r in ranks:
        out.append(slice(start, start + r))
        start += r
    return out


def lora_forward(h2, hd2, w, A, B, s: float, bias=None, out_dtype: torch.dtype | None = None, xa=None):
    """One LoRA linear: (y, xa) with y = h2 w^T (+ bias) + s * xa B^T and xa = hd2 A^T,
    all in the layer's dtype (h2's), the LoRA term added in the GEMM's epilogue; y in
    ``out_dtype`` when given (fp32 in the mixed mode: the base output and the scaled
    LoRA term, each rounded to the layer's dtype, summed in fp32 by ``_lora_add``).
    ``xa``: hd2 A^T already formed (its column slice of ``lora_a_shared``'s product);
    hd2 and A are then not read."""
    n = h2.shape[0]
    out = w.shape[0]
    y = C.empty((n, out), h2.dtype, h2.device)
    if bias is None:
        torch.mm(h2, w.t(), out=y)
    else:
        torch.addmm(bias, h2, w.t(), out=y)
    if xa is None:
        xa = C.empty((n, A.shape[0]), h2.dtype, h2.device)
        torch.mm(hd2, A.t(), out=xa)
    if out_dtype in (None, h2.dtype):
        y.addmm_(xa, B.t(), alpha=s)
        return y, xa
    lora = scaled_mm(xa, B.t(), s, C.empty((n, out), h2.dtype, h2.device))
    result = C.empty((n, out), out_dtype, h2.device)
    if n * out:
        grid, block = E.grid(n * out)
        _lora_add[grid](y, lora, result, n * out, BLOCK=block)
    return result, xa


def lora_backward(dy2, hd2, xa, B, s: float, need_a: bool, need_b: bool, need_dxa: bool, dxaT=None):
    """(dA, dB, dxaT) of one LoRA linear, each None unless asked for. ``hd2`` is
    the (dropped-out) input of the LoRA branch, needed only for dA; ``xa`` only
    for dB; ``B`` only for dA or dxaT. The scaling is each GEMM's alpha.

    dxa is formed transposed, dxaT = s B^T dy^T [r, N] (the same dot products as
    s dy B), into ``dxaT`` when given: a linear's rows of one contiguous [sum r, N]
    buffer for several linears of one input, whose dA and whose term of dx are then
    one GEMM each (``lora_a_grads_shared``, ``add_lora_grad``); its rows are
    contiguous, or, in a block of rows of lora_mlp's backward, a [r, block] view of
    row stride N that cuBLAS writes in place."""
    dA = dB = None
    n = dy2.shape[0]
    if need_b:
        dB = scaled_mm(dy2.t(), xa, s, C.empty((dy2.shape[1], xa.shape[1]), dy2.dtype, dy2.device))
    if need_a or need_dxa:
        if dxaT is None:
            dxaT = C.empty((B.shape[1], n), dy2.dtype, dy2.device)
        scaled_mm(B.t(), dy2.t(), s, out=dxaT)
    else:
        dxaT = None
    if need_a:
        dA = C.empty((dxaT.shape[0], hd2.shape[1]), dxaT.dtype, dxaT.device)
        torch.mm(dxaT, hd2, out=dA)
    return dA, dB, dxaT


def lora_a_grads_shared(dxaT, hd2, slices, need) -> list:
    """dA of several LoRA linears reading one input ``hd2`` (no dropout mask), from their
    stacked dxaT [sum r, N] (``lora_backward``'s, each linear's rows at its slice): one
    GEMM dA_all = dxaT hd2 reads the input once; each dA is its rows of dA_all (a
    contiguous [r, in] view; None where ``need`` is False). The same dot products over
    the tokens as each linear's own dA, rounded once."""
    if not any(need):
        return [None] * len(slices)
    dA_all = C.empty((dxaT.shape[0], hd2.shape[1]), dxaT.dtype, dxaT.device)
    torch.mm(dxaT, hd2, out=dA_all)
    return [dA_all[sl] if nd else None for sl, nd in zip(slices, need)]


def add_input_grad(dx, dy2, w, dxaT, A, keep2, scale: float, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None):
    """The input gradient of one LoRA linear, dy2 w + dropout'(dxa A): accumulated into
    ``dx``, or when ``dx`` is None written to ``out`` (a contiguous buffer of the input's
    dtype) or to a new buffer of ``dtype`` (the input's: dy2's by default, fp32 in the
    mixed mode). A buffer in the layer's dtype takes each term in the GEMM's epilogue
    (beta = 1); a dropout mask, or the mixed mode's fp32 dx, goes through ``_grad_add``.
    ``dxaT`` None: the base term only (the LoRA terms of several linears of one input
    are then added together, ``add_lora_grad``)."""
    lo = dy2.dtype
    n, d_in = dy2.shape[0], w.shape[1]
    fresh = dx is None
    if fresh:
        dx = C.empty((n, d_in), dtype or lo, dy2.device) if out is None else out
    if dx.dtype == lo and fresh:
        torch.mm(dy2, w, out=dx)
    elif dx.dtype == lo:
        dx.addmm_(dy2, w)
    else:
        t = C.empty((n, d_in), lo, dy2.device)
        torch.mm(dy2, w, out=t)
        if fresh:
            dx.copy_(t)  # the branch's 16-bit gradient, upcast exactly
        else:
            grad_add(dx, t)
        del t
    if dxaT is not None:
        add_lora_grad(dx, dxaT, A, keep2, scale)
    return dx


def add_lora_grad(dx, dxaT, A, keep2=None, scale: float = 1.0):
    """dx += dropout'(dxaT^T A), in place: the LoRA term of one linear's input gradient, or,
    given the stacked dxaT [sum r, N] and A_all = cat(As) [sum r, in], of several linears of
    one input at once (their terms summed inside one GEMM in fp32). A dx in the layer's
    dtype takes it in the GEMM's epilogue (beta = 1, one rounding); under a dropout mask, or
    into the mixed mode's fp32 dx, the term is rounded to the layer's dtype (dxaT's) and
    added by ``_grad_add`` (masked and scaled first under a mask)."""
    lo = dxaT.dtype
    if dx.dtype == lo and keep2 is None:
        dx.addmm_(dxaT.t(), A)
    else:
        t = C.empty((dxaT.shape[1], A.shape[1]), lo, dxaT.device)
        torch.mm(dxaT.t(), A, out=t)
        grad_add(dx, t, keep2, scale)
    return dx
