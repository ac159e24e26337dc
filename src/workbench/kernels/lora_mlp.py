"""LoRA gated MLP (PEFT-equivalent), in one autograd Function:

    g = lora(x; Wg, Ag, Bg),  u = lora(x; Wu, Au, Bu)
    h = act(g) * u            act = silu (``"swiglu"``) or gelu (``"geglu"``, exact or tanh)
    y = lora(h; Wd, Ad, Bd)

each ``lora(.)`` a PEFT LoRA linear on a frozen weight (see ``lora_o``; W a
tensor that does not require grad or a ``.dequantize()`` object such as NF4),
``scaling`` s = alpha / r or rsLoRA's alpha / sqrt(r) shared by the three.
With ``dropout`` p > 0 each projection has its own keep-mask (PEFT's dropout
modules draw independently): ``dropout_mask`` bool [2, *x.shape] for gate and
up, ``dropout_mask_down`` bool [*x.shape[:-1], intermediate] for down's input h.

The activation and its backward are ``swiglu_forward`` / ``swiglu_backward`` and
``geglu_forward`` / ``geglu_backward`` (the launch functions of ``swiglu.py`` /
``geglu.py``: fp32 math, one rounding, as HF's ``act_fn(gate) * up``); the
projections are the building blocks of one LoRA linear (``_lora_ops.py``). As in
Unsloth, h is not saved, and only dAd (= dxa_d^T h) needs it in the backward. The
activation's backward reads g and u anyway, so it writes h too (``h_out``, the
forward's formula and rounding), over dh's buffer in place: each element's dh is read
before its h is written. dxa_d (= s dy Bd) does not need h, so dh is formed first and
dAd after the activation's backward: g and u are read once, not twice (at Llama-3.2-1B's
8192 tokens x 8192 in bf16, 256 MiB less traffic a layer a step; h is still written once),
one launch less, and no [N, intermediate] buffer of its own for h. A
separate recompute (``_act_forward``) remains where that does not apply cleanly
(``_h_from_act_backward``): a dropout mask on down's input (dAd reads dropout(h)), the
mixed mode (dh is fp32, h is rounded to the layer's dtype), dh formed in several row
blocks (long context), and dAd asked for with no gradient upstream of the activation.

Gate and up read the same x. Without a dropout mask their LoRA branches share every
pass over x and dx (``_lora_ops.py``, stacked adapters cat(Ag, Au)): one GEMM forms
xa for both (each epilogue reads its column slice), one GEMM forms dAg and dAu, and
dX takes the two base terms, then both LoRA terms in one GEMM, summed in its fp32
accumulator and rounded once (in the mixed mode: rounded once to the layer's dtype,
then summed into the fp32 dX). With masks each branch reads its own dropped-out x and
runs its own GEMMs.

Saved for backward: x (if dAg or dAu), the keep-masks (with dropout), g and u
[N, intermediate] (if anything upstream of the activation needs a gradient, or
dAd), xa of each projection [N, r] (if its dB; gate's and up's column slices of one
[N, rg + ru] buffer without masks), each A (if the gradient flows
through its input) and B (if its dA or its input's gradient), each W (likewise;
the parameter or the quantized object, never a dequantised copy).

The backward past down's weights is one loop over blocks of rows
(``_gate_up_backward``, ``DH_BLOCK_BYTES``): one block at training shapes, several at
long context, where down's input gradient dh [N, intermediate] (fp32 in the mixed
mode), d_gate and d_up are then never whole beside the saved g and u. Each row's
arithmetic is the same in every block; over several blocks dBg and dBu add the
blocks' scaled products in fp32 and round once, as one GEMM's fp32 accumulator does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from . import _common as C
from . import _lora as L
from . import _strategies as S
from ._lora_ops import (add_input_grad, add_lora_grad, branch_input, dropout_apply, layer_inputs, lora_a_grads_shared,
                        lora_a_shared, lora_backward, lora_forward, rank_slices, saved_input, scaled_mm,
                        stack_rows)
from ._registry import Example, Inputs, KernelSpec, Limits
from .geglu import APPROXIMATE_MODES, geglu_backward, geglu_forward
from .swiglu import swiglu_backward, swiglu_forward

ACTIVATIONS = ("swiglu", "geglu")

#: Triton 3.6's CPU interpreter truncates fp32 -> bf16 casts where the GPU rounds
#: to nearest even, and swiglu.py / geglu.py store with a plain ``.to()``. This
#: kernel rounds h and d_gate where its reference twin rounds them (to nearest even),
#: and a truncated h or d_gate drifts from it by up to an ulp, which an ill-conditioned dA (a sum over
#: tokens that cancels) amplifies past the doctrine's bound. So under the
#: interpreter only, bf16 activation outputs are staged in fp32 and rounded by
#: torch (to nearest even, as the GPU's store does). On the GPU the kernels write
#: bf16 directly. Remove once the shared kernels round bf16 to nearest even.
_STAGE_BF16 = C.INTERPRET

#: The largest block of dh rows formed at once in the backward. dh is the biggest buffer
#: of the layer's backward besides g and u, and it lives at the same time as both and as
#: d_gate and d_up: 56 KiB a token in fp32 at Llama-3.1-8B's intermediate 14336. Whole,
#: at 131072 tokens, that is 7 GiB. 512 MiB blocks keep each block's GEMM large (9362 rows
#: of 14336 in fp32) and leave the training shapes of the benchmarks (4 x 2048 tokens)
#: one block.
DH_BLOCK_BYTES = 512 * 2**20


def _act_buffer(n_rows: int, n_cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    staged = _STAGE_BF16 and dtype == torch.bfloat16
    return C.empty((n_rows, n_cols), torch.float32 if staged else dtype, device)


def _unstage(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


# --------------------------------------------------------------------------- activation
def _act_forward(g2, u2, activation: str, approximate: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """h = act(g) * u through ``swiglu_forward`` / ``geglu_forward``, in fp32 math, rounded
    once to ``dtype`` (g's by default)."""
    dtype = dtype or g2.dtype
    h = _act_buffer(*g2.shape, dtype, g2.device)
    if activation == "swiglu":
        swiglu_forward(g2, u2, out=h)
    else:
        geglu_forward(g2, u2, approximate, out=h)
    return _unstage(h, dtype)


def _act_backward(dh2, g2, u2, activation: str, approximate: str, need_dg: bool, need_du: bool,
                  dtype: torch.dtype | None = None, h_out: torch.Tensor | None = None):
    """(dg, du) of h = act(g) * u through ``swiglu_backward`` / ``geglu_backward``, in fp32
    math, each rounded once to ``dtype`` (g's by default). ``h_out``: the same kernel also
    writes h there, as ``_act_forward`` would in h_out's dtype; ``dh2`` itself (dense, of
    h's dtype) takes it in place, each element read as dh before it is written as h."""
    dtype = dtype or g2.dtype
    dg = _act_buffer(*g2.shape, dtype, g2.device) if need_dg else None
    du = _act_buffer(*g2.shape, dtype, g2.device) if need_du else None
    staged_h = h_out is not None and _STAGE_BF16 and h_out.dtype == torch.bfloat16
    h = _act_buffer(*g2.shape, h_out.dtype, g2.device) if staged_h else h_out
    if activation == "swiglu":
        swiglu_backward(dh2, g2, u2, need_dg, need_du, dg, du, h_out=h)
    else:
        geglu_backward(dh2, g2, u2, approximate, need_dg, need_du, dg, du, h_out=h)
    if staged_h:
        h_out.copy_(h)  # after the kernel has read dh (h_out may be dh's buffer)
    return _unstage(dg, dtype), _unstage(du, dtype)


# --------------------------------------------------------------------------- backward past down's weights
def _dh_block_rows(n_cols: int, dtype: torch.dtype) -> int:
    forced = C.forced_row_block()  # the parity suite's, so that tiny shapes run several blocks
    return forced if forced is not None else max(1, DH_BLOCK_BYTES // (max(1, n_cols) * dtype.itemsize))


def _h_from_act_backward(g: torch.Tensor, keep_d: torch.Tensor | None, lo: torch.dtype) -> bool:
    """Whether down's dA can take h from the activation's backward (written over dh) instead
    of a recompute: when dA's h is exactly that kernel's output over dh's buffer. So: no
    dropout on down's input (dA would need dropout(h), another pass), dh in the layer's
    dtype, which h is rounded to (in the mixed mode dh is fp32: h would need a buffer of its
    own beside it), and dh formed for every row at once (over several blocks dA would sum
    the blocks' products, each block's h gone before the next)."""
    n_rows, inter = g.shape
    return keep_d is None and g.dtype == lo and 0 < n_rows <= _dh_block_rows(inter, g.dtype)


def _block_sum_dtype(lo: torch.dtype) -> torch.dtype:
    """The dtype in which dB's blocks are multiplied and summed over several row blocks: wider
    than the layer's, so that the running sum adds no rounding of its own. fp32 for 16-bit
    layers; fp64 for fp32 ones, whose running sum in fp32 loses up to an ulp of the largest
    partial sum at each block, all of it left over when the big terms cancel."""
    return torch.float64 if lo == torch.float32 else torch.float32


@dataclass
class _Proj:
    """One LoRA projection as the backward sees it: what the forward saved of it."""

    name: str                  # its frozen weight's ("Wg"), for a failed dequantisation's message
    W: object                  # the parameter or the quantized object (None unless dX flows through it)
    shape: tuple[int, int]     # W's [out, in]
    A: torch.Tensor | None
    B: torch.Tensor | None
    xa: torch.Tensor | None
    keep: torch.Tensor | None  # its dropout's keep-mask, [rows, in]
    need_a: bool = False       # (down: whether dA is formed here, from the h written over dh)
    need_b: bool = False

    def weight(self, lo: torch.dtype) -> torch.Tensor:
        return L.dense("lora_mlp", self.name, self.W, lo, self.shape)


def _gate_up_backward(dy2, dxaT_d, down: _Proj, gate: _Proj | None, up: _Proj | None, g, u, activation: str,
                      approximate: str, xs, scaling: float, inv: float, lo: torch.dtype, x_dtype: torch.dtype,
                      need_x: bool):
    """(dAg, dBg, dAu, dBu, dx, dAd): the backward from down's input gradient dh back to x, a
    block of rows at a time (``_dh_block_rows``; one block at training shapes). ``gate`` /
    ``up`` are None when nothing upstream of them needs a gradient. dAd is None unless
    ``down.need_a`` (``_h_from_act_backward``: one block), when the activation's backward
    writes h over dh and dAd = dxa_d^T h is one GEMM right after it.

    Each block forms dh, d_gate and d_up for its rows only, with the arithmetic of one
    LoRA linear's backward (``lora_backward``, ``add_input_grad``) on those rows. dB sums
    over every row: one block's is one GEMM in the layer's dtype (s times its fp32
    accumulator, rounded once); over several blocks each block's scaled product is formed and
    added in a wider accumulator (``_block_sum_dtype``), rounded once at the end: the same sum
    in another order. dxa^T of gate and up is one [rg + ru, N] buffer (each block writes its
    columns, a [r, rows] view of row stride N that cuBLAS writes in place); without masks
    each block adds both LoRA terms of its
    rows of dX in one GEMM (dxaT[:, rows]^T cat(Ag, Au)), and dAg, dAu are one GEMM
    against x after the blocks (with masks: each its own, against its dropped-out x).
    Each block dequantises the frozen weights it needs afresh and drops them after use,
    and forms its [rows, intermediate] buffers in the unblocked backward's order, so one
    block's peak memory is the unblocked backward's (up to the few [N, r] buffers)."""
    n_rows, inter = g.shape
    dev = g.device
    step = _dh_block_rows(inter, g.dtype)
    whole = 0 < n_rows <= step
    assert whole or not down.need_a, "h over dh gives dAd only when dh is formed for every row at once"
    dAd = None
    Ad, keep_d = down.A, down.keep
    # Without masks gate and up read the same x: their dA is one GEMM against it and their
    # terms of dx one GEMM against cat(Ag, Au), from one stacked [rg + ru, N] dxa^T (each
    # projection's rows at its slice; with masks the buffer is shared, the GEMMs are not).
    fused = all(proj is None or proj.keep is None for proj in (gate, up))
    members = [proj for proj in (gate, up) if proj is not None and (proj.need_a or need_x)]
    slices = dict(zip((p.name for p in members), rank_slices([p.B.shape[1] for p in members])))
    dxaT = C.empty((sum(sl.stop - sl.start for sl in slices.values()), n_rows), lo, dev) if members else None
    branches = []  # per projection: (proj, dB (an fp32 accumulator over several blocks), its rows of dxaT), or None
    for proj in (gate, up):
        if proj is None:
            branches.append(None)
            continue
        r = (proj.B if proj.B is not None else proj.xa).shape[1]  # B is saved only when dA or dX needs it
        acc = None
        if proj.need_b:
            acc = C.empty((inter, r), lo, dev) if whole else torch.zeros((inter, r), dtype=_block_sum_dtype(lo),
                                                                           device=dev)
        branches.append((proj, acc, dxaT[slices[proj.name]] if proj.name in slices else None))
    A_gu = stack_rows((gate.A, up.A)) if (fused and need_x) else None  # the rows of dxaT, in order
    dx = None
    for start in range(0, n_rows, step):
        rows = slice(start, min(n_rows, start + step))
        wd = down.weight(lo)
        dh = add_input_grad(None, dy2[rows], wd, dxaT_d[:, rows], Ad, None if keep_d is None else keep_d[rows], inv,
                            g.dtype)
        del wd
        # The gradients reaching gate's and up's outputs, written in the layer's dtype: in the
        # mixed mode that is autograd's cast of g's and u's fp32 gradients (rounded once from
        # the kernel's fp32 math; the fp32 gradients are never formed).
        grads = _act_backward(dh, g[rows], u[rows], activation, approximate, gate is not None, up is not None, lo,
                              h_out=dh if down.need_a else None)
        if down.need_a:  # dh's buffer now holds h (one block: every row)
            dAd = C.empty((dxaT_d.shape[0], inter), lo, dev)
            torch.mm(dxaT_d, dh, out=dAd)
        del dh
        # gate's and up's LoRA branches (their inputs: x, through each one's own mask), as
        # lora_backward on this block's rows: the scaling is each GEMM's alpha ...
        for branch, d_b in zip(branches, grads):
            if branch is None:
                continue
            proj, acc, dxaT_p = branch
            xa = proj.xa
            if acc is not None and whole:  # one GEMM over every row
                scaled_mm(d_b.t(), xa, scaling, out=acc)
            elif acc is not None:  # summed across blocks in the wider accumulator
                acc.addmm_(d_b.t().to(acc.dtype), xa[rows].to(acc.dtype), alpha=scaling)
            if dxaT_p is not None:  # its dxa^T, this block's columns ([r, rows] of row stride N)
                scaled_mm(proj.B.t(), d_b.t(), scaling, out=dxaT_p[:, rows])
        # ... then dX, both projections' terms summed as autograd sums them (dx is allocated
        # here, after dh is gone, as in an unblocked backward): the two base terms, each with
        # its masked LoRA term under a mask, else both LoRA terms in one GEMM after them.
        if need_x:
            if dx is None:
                dx = C.empty((n_rows, gate.shape[1]), x_dtype, dev)
            for (proj, _, dxaT_p), d_b in zip(branches, grads):
                W, A, dxaT_b = proj.weight(lo), proj.A, None if fused else dxaT_p[:, rows]
                keep_b = None if proj.keep is None else proj.keep[rows]
                if proj is gate:
                    add_input_grad(None, d_b, W, dxaT_b, A, keep_b, inv, out=dx[rows])
                else:
                    add_input_grad(dx[rows], d_b, W, dxaT_b, A, keep_b, inv, x_dtype)
                del W
            if fused:
                add_lora_grad(dx[rows], dxaT[:, rows], A_gu)
        del grads
    out = []
    if fused:
        dAs = iter(lora_a_grads_shared(dxaT, xs, list(slices.values()), [p.need_a for p in members]))
    for branch in branches:
        if branch is None:
            out += [None, None]
            continue
        proj, acc, dxaT_p = branch
        dA = None
        if fused and dxaT_p is not None:
            dA = next(dAs)
        elif proj.need_a:
            xd2 = branch_input(xs, proj.keep, inv, lo)
            dA = C.empty((dxaT_p.shape[0], xd2.shape[1]), lo, dev)
            torch.mm(dxaT_p, xd2, out=dA)
            del xd2
        out += [dA, None if acc is None else acc.to(lo)]
    return (*out, dx, dAd)


# --------------------------------------------------------------------------- autograd
class _LoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd, keep_gu, keep_d, scaling, dropout, activation,
                approximate):
        op = "lora_mlp"
        shape, lo = x.shape, Ag.dtype
        d_in, inter, d_out = shape[-1], Bg.shape[0], Bd.shape[0]
        x2 = C.rows_view(op, "x", x)
        inv = L.inverse_keep(dropout)
        keep_g = keep_u = keep_d2 = None
        if keep_gu is not None:
            keep_g, keep_u = L.rows2(keep_gu[0], d_in), L.rows2(keep_gu[1], d_in)
            keep_d2 = L.rows2(keep_d, inter)
        need = ctx.needs_input_grad
        need_x, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = (need[0], need[2], need[3], need[5],
                                                                        need[6], need[8], need[9])
        need_dg = need_x or need_ag or need_bg
        need_du = need_x or need_au or need_bu
        need_dh = need_dg or need_du

        # g, u and y in x's dtype: fp32 in the mixed mode, where HF's act_fn(gate) * up runs
        # on the projections' fp32 outputs and down_proj casts h to the layer's dtype. h is
        # written in the layer's dtype unless a dropout on down's input must see the fp32 h
        # (the same rounding, once, from the kernel's fp32 math; the fp32 h is never formed).
        # Without masks gate's and up's LoRA branches read the same xc: one GEMM for their xa.
        xc, xd2 = layer_inputs(x2, keep_g, inv, lo)
        xas = (None, None) if keep_gu is not None else lora_a_shared(xc, (Ag, Au))[1]
        w = L.dense(op, "Wg", Wg, lo, (inter, d_in))
        g, xa_g = lora_forward(xc, xd2, w, Ag, Bg, scaling, out_dtype=x.dtype, xa=xas[0])
        del w, xd2
        xd2 = xc if keep_u is None else dropout_apply(x2, keep_u, inv, lo)
        w = L.dense(op, "Wu", Wu, lo, (inter, d_in))
        u, xa_u = lora_forward(xc, xd2, w, Au, Bu, scaling, out_dtype=x.dtype, xa=xas[1])
        del w, xd2, xas
        h = _act_forward(g, u, activation, approximate, lo if keep_d2 is None else None)
        hc, hd = layer_inputs(h, keep_d2, inv, lo)
        w = L.dense(op, "Wd", Wd, lo, (d_out, inter))
        y, xa_d = lora_forward(hc, hd, w, Ad, Bd, scaling, out_dtype=x.dtype)
        del w, hd, hc, h

        def keep_w(W, needed):
            return (W if (needed and L.is_dense(W)) else None), (W if (needed and not L.is_dense(W)) else None)

        (wg_s, wg_q), (wu_s, wu_q), (wd_s, wd_q) = keep_w(Wg, need_x), keep_w(Wu, need_x), keep_w(Wd, need_dh)
        keep_gu_2d = None if keep_gu is None else (keep_g, keep_u)
        ctx.save_for_backward(
            saved_input(x2, xc, keep_gu) if (need_ag or need_au) else None,
            *(keep_gu_2d or (None, None)), keep_d2,
            g if (need_dh or need_ad) else None, u if (need_dh or need_ad) else None,
            Ag if need_x else None, Bg if (need_ag or need_x) else None, xa_g if need_bg else None, wg_s,
            Au if need_x else None, Bu if (need_au or need_x) else None, xa_u if need_bu else None, wu_s,
            Ad if need_dh else None, Bd if (need_ad or need_dh) else None, xa_d if need_bd else None, wd_s)
        ctx.quantized = (wg_q, wu_q, wd_q)
        ctx.meta = (shape, inter, d_out, scaling, inv, activation, approximate, x.dtype, lo)
        return y.view(*shape[:-1], d_out)

    @staticmethod
    @C.full_precision_reductions()
    def backward(ctx, dy):
        op = "lora_mlp"
        (xs, keep_g, keep_u, keep_d, g, u,
         Ag, Bg, xa_g, wg_s, Au, Bu, xa_u, wu_s, Ad, Bd, xa_d, wd_s) = ctx.saved_tensors
        shape, inter, d_out, scaling, inv, activation, approximate, x_dtype, lo = ctx.meta
        wg_q, wu_q, wd_q = ctx.quantized
        d_in = shape[-1]
        need = ctx.needs_input_grad
        need_x, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = (need[0], need[2], need[3], need[5],
                                                                        need[6], need[8], need[9])
        need_dg = need_x or need_ag or need_bg
        need_du = need_x or need_au or need_bu
        need_dh = need_dg or need_du
        dy2 = C.rows_view(op, "dy", dy).to(lo)

        # down projection: dAd = dxa_d^T hd needs its input h = act(g) * u, which is not saved.
        # Where the activation's backward runs anyway, on every row at once, with no dropout on
        # h and dh in h's dtype (``_h_from_act_backward``), that kernel writes h over dh from
        # the g and u it reads (``_gate_up_backward``) and dAd follows it; else h is recomputed
        # here, a pass of its own over g and u.
        fused_ad = need_ad and need_dh and _h_from_act_backward(g, keep_d, lo)
        hd = None
        if need_ad and not fused_ad:
            h = _act_forward(g, u, activation, approximate, lo if keep_d is None else None)
            hd = layer_inputs(h, keep_d, inv, lo)[1]  # (no name for the other: it would outlive ``del hd``)
            del h
        dAd, dBd, dxaT_d = lora_backward(dy2, hd, xa_d, Bd, scaling, need_ad and not fused_ad, need_bd, need_dh)
        del hd
        dAg = dBg = dAu = dBu = dx = None
        if need_dh:
            down = _Proj("Wd", wd_s if wd_s is not None else wd_q, (d_out, inter), Ad, Bd, None, keep_d,
                         need_a=fused_ad)
            gate = up = None
            if need_dg:
                gate = _Proj("Wg", wg_s if wg_s is not None else wg_q, (inter, d_in), Ag, Bg, xa_g, keep_g,
                             need_ag, need_bg)
            if need_du:
                up = _Proj("Wu", wu_s if wu_s is not None else wu_q, (inter, d_in), Au, Bu, xa_u, keep_u,
                           need_au, need_bu)
            dAg, dBg, dAu, dBu, dx, dAd_h = _gate_up_backward(dy2, dxaT_d, down, gate, up, g, u, activation,
                                                              approximate, xs, scaling, inv, lo, x_dtype, need_x)
            if fused_ad:
                dAd = dAd_h
            del dxaT_d
            if dx is not None:
                dx = dx.view(shape)
        return (dx, None, dAg, dBg, None, dAu, dBu, None, dAd, dBd) + (None,) * 6


def lora_mlp(x: torch.Tensor, Wg, Ag: torch.Tensor, Bg: torch.Tensor, Wu, Au: torch.Tensor, Bu: torch.Tensor,
             Wd, Ad: torch.Tensor, Bd: torch.Tensor, scaling: float, activation: str = "swiglu",
             approximate: str = "none", dropout: float = 0.0, dropout_mask: torch.Tensor | None = None,
             dropout_mask_down: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """``down(act(gate(x)) * up(x))`` with every projection a PEFT LoRA linear (see
    ``lora_o``). ``activation`` is ``"swiglu"`` (silu) or ``"geglu"`` (gelu with
    ``approximate`` ``"none"`` or ``"tanh"``). With ``dropout`` p > 0:
    ``dropout_mask`` bool [2, *x.shape] (gate, up) and ``dropout_mask_down`` bool
    [*x.shape[:-1], intermediate], True = kept, drawn from ``generator`` when None.
    x may be float32 on a bf16/fp16 layer (QLoRA under autocast): gate's and up's outputs,
    y and dX are then float32, and the activation is computed in fp32 and rounded to the
    layer's dtype where down_proj casts it (``_lora.py``)."""
    op = "lora_mlp"
    C.check_float(op, "x", x)
    L.check_options(op, scaling, dropout)
    if activation not in ACTIVATIONS:
        raise C.KernelInputError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if approximate not in APPROXIMATE_MODES:
        raise C.KernelInputError(f"{op}: approximate must be one of {APPROXIMATE_MODES}, got {approximate!r}.")
    if activation == "swiglu" and approximate != "none":
        raise C.KernelInputError(f"{op}: approximate={approximate!r} applies to geglu only.")
    inter, _ = L.check_linear(op, x, ("Wg", "Ag", "Bg"), Wg, Ag, Bg)
    L.check_linear(op, x, ("Wu", "Au", "Bu"), Wu, Au, Bu)
    C.check_shape(op, "Bu", Bu, (inter, Au.shape[0]))
    L.check_linear(op, x.new_empty((0, inter)), ("Wd", "Ad", "Bd"), Wd, Ad, Bd, x_name="the intermediate size")
    C.check_same_dtype(op, Ag=Ag, Au=Au, Ad=Ad)  # one layer dtype (each may differ from an fp32 x alike)
    keep_gu = L.keep_mask(op, "dropout_mask", dropout_mask, dropout, (2, *x.shape), x, generator)
    keep_d = L.keep_mask(op, "dropout_mask_down", dropout_mask_down, dropout, (*x.shape[:-1], inter), x, generator)
    return _LoraMLP.apply(x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd, keep_gu, keep_d, float(scaling), float(dropout),
                          activation, approximate)


# --------------------------------------------------------------------------- reference
def lora_mlp_reference(x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd, scaling, activation="swiglu", approximate="none",
                       dropout=0.0, dropout_mask=None, dropout_mask_down=None, generator=None,
                       compute_dtype=torch.float32, numerics="folded"):
    """HF's ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with PEFT LoRA on every
    projection (each as ``lora_o_reference``; gate and up as ``_lora.linears_reference``,
    so that x's gradient rounds as the kernel rounds it: without masks both LoRA terms
    summed before one rounding); the activation product in fp32 (``compute_dtype``),
    rounded to x's dtype."""
    if dropout > 0 and (dropout_mask is None or dropout_mask_down is None):
        raise ValueError("lora_mlp_reference: pass the dropout masks explicitly when dropout > 0")
    cd = compute_dtype
    on = dropout > 0
    g, u = L.linears_reference(x, [(Wg, Ag, Bg, None, dropout_mask[0] if on else None),
                                   (Wu, Au, Bu, None, dropout_mask[1] if on else None)], scaling, dropout, cd, numerics)
    if activation == "swiglu":
        a = torch.nn.functional.silu(g.to(cd))
    else:
        a = torch.nn.functional.gelu(g.to(cd), approximate=approximate)
    h = (a * u.to(cd)).to(x.dtype)
    return L.linear_reference(h, Wd, Ad, Bd, scaling, None, dropout_mask_down if on else None, dropout, cd, numerics)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    block = draw(S.block(limits))
    cap = L.dim_cap(limits)
    d_in, inter, d_out = draw(S.dim(1, cap)), draw(S.dim(1, cap)), draw(S.dim(1, cap))
    cfg = draw(L.lora_config([d_in, inter, d_out]))
    # A forced small block runs one interpreter program per few elements of [N, inter]: fewer tokens then
    # (and every case runs twice, with and without the adapters, for the delta comparisons).
    batch, tokens = draw(L.rows(limits, max(d_in, inter, d_out), cap=limits.max_rows if block is None else 8))
    activation = draw(st.sampled_from(("swiglu", "geglu", "geglu")))  # geglu has two modes
    return {
        "batch": batch, "tokens": tokens, "d_in": d_in, "inter": inter, "d_out": d_out, **cfg,
        "activation": activation,
        "approximate": draw(st.sampled_from(APPROXIMATE_MODES)) if activation == "geglu" else "none",
        # No 30.0: h = act(g) * u squares the activations' magnitude (fp16 overflows).
        "scale": draw(st.sampled_from([1e-3, 0.1, 1.0, 1.0, 4.0])),
        "b_scale": draw(st.sampled_from(L.B_SCALES)),
        "x_fp32": draw(L.mixed_flag()),
        "strided": draw(st.booleans()),
        "layout": draw(st.sampled_from(L.LAYOUTS)),
        "grad_x": draw(L.grad_flag()),
        "grad_adapters": [draw(L.grad_flag()) for _ in range(6)],
        "_block": block,
        # Blocks of 1 to 5 rows of dh in a third of the cases: the blocked backward of long
        # sequences, on the few rows drawn here (None: one block, as at training shapes).
        "_rows": draw(st.one_of(st.none(), st.none(), st.integers(1, 5))),
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    x = L.activations(p, p["d_in"], dtype, device, gen)
    tensors = {"x": x}
    for n, out, d_in in (("g", p["inter"], p["d_in"]), ("u", p["inter"], p["d_in"]), ("d", p["d_out"], p["inter"])):
        tensors[f"W{n}"] = L.frozen_weight(out, d_in, dtype, device, gen)
        tensors[f"A{n}"], tensors[f"B{n}"] = L.adapters(out, d_in, p["r"], p["b_scale"], p["scaling"],
                                                         dtype, device, gen)
    L.lay_out(tensors, "gud", p.get("layout", "separate"))
    on = p["dropout"] > 0
    tensors["dropout_mask"] = L.draw_keep((2, *x.shape), p["dropout"], device, gen) if on else None
    tensors["dropout_mask_down"] = (L.draw_keep((*x.shape[:-1], p["inter"]), p["dropout"], device, gen)
                                    if on else None)
    adapters = [f"{m}{n}" for n in "gud" for m in "AB"]
    grads = (("x",) if p["grad_x"] else ()) + tuple(a for a, on_ in zip(adapters, p["grad_adapters"]) if on_)
    return Inputs(tensors, {"scaling": p["scaling"], "activation": p["activation"],
                            "approximate": p["approximate"], "dropout": p["dropout"]}, grads)


def _case(**over) -> dict:
    return {"batch": 2, "tokens": 5, "d_in": 12, "inter": 10, "d_out": 8, "r": 2, "alpha": 16.0, "rslora": False,
            "scaling": 8.0, "dropout": 0.0, "activation": "swiglu", "approximate": "none", "scale": 1.0,
            "b_scale": 2.0**-10, "x_fp32": True, "strided": False, "grad_x": True, "grad_adapters": [True] * 6,
            "_block": None, "_rows": None, **over}


EXAMPLES = (
    Example(_case(), L.MIXED_SMALL_ADAPTER, dtypes=(torch.bfloat16,)),
    # The blocked backward (10 rows in blocks of 3) with dropout, every gradient asked for: random
    # draws take it in a third of the cases, but with a dropout and all seven gradients rarely.
    Example(_case(x_fp32=False, b_scale=1.0, dropout=0.25, _rows=3), "the blocked backward of long sequences "
            "(row blocks of 3) with dropout masks, every gradient", dtypes=(torch.float32,)),
    # dAd from the h that the activation's backward writes over dh (one block, no dropout, not the
    # mixed mode): the ci draws take it with geglu in about one example in 20 a dtype.
    *(Example(_case(x_fp32=False, b_scale=1.0, activation="geglu", approximate=a), f"geglu ({a}) with dAd taken "
              "from the h its backward writes over dh, every gradient") for a in APPROXIMATE_MODES),
    # (dA and dB are torch's GEMMs over the tokens; the kernel's own reduction across tokens is the
    # blocked backward's dB, summed in fp32 across row blocks: a bf16 accumulator there needs ~300
    # blocks to show, ~25 s under the interpreter at ~7 launches a block. The gpu profile draws
    # forced row blocks of 1-5 rows over up to 16k tokens.)
    # A case a mutant once survived random draws with: taken on every run.
    Example(_case(dropout=0.25, x_fp32=False), "dropout on every projection's input, one row block: dA of down "
            "takes dropout(h), not the h written over dh", dtypes=(torch.float32,)),
)


SPEC = KernelSpec(
    name="lora_mlp",
    fn=lora_mlp,
    reference=lora_mlp_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("y",),
    grads=("x", "Ag", "Bg", "Au", "Bu", "Ad", "Bd"),
    options=("activation: swiglu|geglu", "approximate: none|tanh (geglu)",
             "scaling (alpha/r or rsLoRA alpha/sqrt(r))", "dropout p with explicit bool masks",
             "fp32 x on a 16-bit layer (QLoRA under autocast)"),
    summary="PEFT LoRA gated MLP in one Function: cuBLAS GEMMs, Triton SwiGLU/GeGLU; h for down's dA written by "
            "the activation's backward.",
    ablate=L.ablate_adapters("Bg", "Bu", "Bd"),
    examples=EXAMPLES,
)
