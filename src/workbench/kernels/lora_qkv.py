"""LoRA q/k/v projections sharing one input, in one autograd Function (PEFT-equivalent).

    q = x Wq^T (+ bq) + s * (drop_q(x) Aq^T) Bq^T      (k, v alike)

Wq [q_out, in], Wk / Wv [kv_out, in] (GQA: kv_out may be smaller than q_out),
frozen (tensors that do not require grad, or ``.dequantize()`` objects such as
NF4); optional frozen biases bq, bk, bv (Qwen2); A* [r, in], B* [out, r];
``scaling`` s = alpha / r or rsLoRA's alpha / sqrt(r), shared by the three.
With ``dropout`` p > 0 each projection has its own keep-mask, as PEFT's three
dropout modules draw independently: ``dropout_mask`` is bool [3, *x.shape]
(q, k, v; True = kept).

Each projection runs the LoRA building blocks of ``_lora_ops.py`` (cuBLAS GEMMs,
the scaling and the LoRA sum in their epilogues, Triton dropout kernels). Without a
dropout mask (the common case, 16-bit or the mixed mode) the three LoRA branches read
the same x, and every pass over x or dx that they would take three times is taken
once, on the stacked adapters A_all = cat(Aq, Ak, Av) [rq + rk + rv, in]:

    forward   xa_all = x A_all^T                  one GEMM; q's epilogue reads xa_all[:, :rq]
    backward  dxaT_all[rows of q] = s Bq^T dq^T   (k, v alike): one [sum r, N] buffer
              dA_all = dxaT_all x                 one GEMM; dAq = dA_all[:rq], ...
              dx = dq Wq;  dx += dk Wk;  dx += dv Wv              (beta = 1, each rounded)
              dx += dxaT_all^T A_all              the three LoRA terms in one GEMM: one rounding

(only the projections whose dA or dx needs dxa take part in the backward's stack;
an A that needs no gradient gets None, its rows of dA_all unused). In the mixed mode dx
is fp32 and each of those four terms is rounded to the layer's dtype and summed in fp32
(the first copied, the others by ``_grad_add``). With a mask each projection reads its own dropped-out x, and runs its
own xa, dA and masked LoRA term of dx (base term, then LoRA term, one projection after
the other). Each projection's dequantised W lives only for its own GEMM.

Saved for backward: x (if any dA), the [3, ...] keep-mask (with dropout), per
projection xa [N, r] (if its dB; without a mask a column slice of xa_all, which then
stays whole: [N, sum r]), A (if dx),
B (if its dA or dx), W (if dx; the parameter or the quantized object, never a
dequantised copy).
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from . import _common as C
from . import _lora as L
from . import _strategies as S
from ._harness import randn
from ._lora_ops import (add_input_grad, add_lora_grad, branch_input, dropout_apply, lora_a_grads_shared,
                        lora_a_shared, lora_backward, lora_forward, rank_slices, saved_input, stack_rows)
from ._registry import Example, Inputs, KernelSpec, Limits

_NAMES = ("q", "k", "v")


class _LoraQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, Wq, Aq, Bq, Wk, Ak, Bk, Wv, Av, Bv, bq, bk, bv, keep, scaling, dropout):
        op = "lora_qkv"
        shape, lo = x.shape, Aq.dtype
        d_in = shape[-1]
        x2 = C.rows_view(op, "x", x)
        xc = x2 if x2.dtype == lo else x2.to(lo)  # the base GEMMs' input (the mixed mode's cast, once)
        inv = L.inverse_keep(dropout)
        keeps = (None,) * 3 if keep is None else tuple(L.rows2(keep[i], d_in) for i in range(3))
        projs = ((Wq, Aq, Bq, bq), (Wk, Ak, Bk, bk), (Wv, Av, Bv, bv))
        # Without a mask the three LoRA branches read the same xc: one GEMM for their xa.
        xas = (None,) * 3 if keep is not None else lora_a_shared(xc, (Aq, Ak, Av))[1]
        need = ctx.needs_input_grad
        need_x = need[0]
        outs, saved, quantized = [], [], []
        for i, (W, A, B, bias) in enumerate(projs):
            need_a, need_b = need[2 + 3 * i], need[3 + 3 * i]
            xd2 = None if keep is None else dropout_apply(x2, keeps[i], inv, lo)
            w = L.dense(op, f"W{_NAMES[i]}", W, lo, (B.shape[0], d_in))
            y, xa = lora_forward(xc, xd2, w, A, B, scaling, bias, out_dtype=x.dtype, xa=xas[i])
            del w, xd2
            outs.append(y.view(*shape[:-1], B.shape[0]))
            saved += [A if need_x else None, B if (need_a or need_x) else None, xa if need_b else None,
                      W if (need_x and L.is_dense(W)) else None]
            quantized.append(W if (need_x and not L.is_dense(W)) else None)
        need_any_a = need[2] or need[5] or need[8]
        ctx.save_for_backward(saved_input(x2, xc, keep) if need_any_a else None, keep, *saved)
        ctx.quantized = quantized
        ctx.meta = (shape, tuple(B.shape[0] for _, _, B, _ in projs), scaling, inv, x.dtype, lo)
        return tuple(outs)

    @staticmethod
    @C.full_precision_reductions()
    def backward(ctx, dq, dk, dv):
        op = "lora_qkv"
        xs, keep, *saved = ctx.saved_tensors
        shape, outs, scaling, inv, x_dtype, lo = ctx.meta
        d_in = shape[-1]
        keeps = (None,) * 3 if keep is None else tuple(L.rows2(keep[i], d_in) for i in range(3))
        need = ctx.needs_input_grad
        need_x = need[0]
        need_a = [need[2 + 3 * i] for i in range(3)]
        fused = keep is None
        grads = [None] * 16
        # dxa^T of every projection whose dA or dx's LoRA term needs it, stacked in one
        # [sum r, N] buffer (its rows at slices[i]): without a mask, dA of the three is one
        # GEMM against x and their terms of dx one GEMM against cat(A) (after the loop).
        members = [i for i in range(3) if need_a[i] or need_x]
        slices = dict(zip(members, rank_slices([saved[4 * i + 1].shape[1] for i in members])))
        n_rows = math.prod(shape[:-1])
        dxaT = C.empty((sum(sl.stop - sl.start for sl in slices.values()), n_rows), lo, dq.device) if members else None
        dx = None
        for i, dy in enumerate((dq, dk, dv)):
            A, B, xa, w_saved = saved[4 * i: 4 * i + 4]
            need_b = need[3 + 3 * i]
            dy2 = C.rows_view(op, f"d{_NAMES[i]}", dy).to(lo)
            xd2 = branch_input(xs, keeps[i], inv, lo) if (need_a[i] and not fused) else None
            dA, dB, dxaT_i = lora_backward(dy2, xd2, xa, B, scaling, need_a[i] and not fused, need_b, i in slices,
                                           None if i not in slices else dxaT[slices[i]])
            del xd2
            grads[2 + 3 * i], grads[3 + 3 * i] = dA, dB
            if need_x:
                # Fused: the base term dy W only (the first writes dx, the next two add to it);
                # with a mask each projection adds its own masked LoRA term after its base term.
                W = w_saved if w_saved is not None else ctx.quantized[i]
                w = L.dense(op, f"W{_NAMES[i]}", W, lo, (outs[i], d_in))
                dx = add_input_grad(dx, dy2, w, None if fused else dxaT_i, A, keeps[i], inv, x_dtype)
                del w
        if fused and members:
            dAs = lora_a_grads_shared(dxaT, xs, [slices[i] for i in members], [need_a[i] for i in members])
            for i, dA in zip(members, dAs):
                grads[2 + 3 * i] = dA
            if need_x:
                # dx += dxa_q Aq + dxa_k Ak + dxa_v Av, summed inside one GEMM: one rounding.
                add_lora_grad(dx, dxaT, stack_rows(saved[4 * i] for i in range(3)))
        if need_x:
            grads[0] = dx.view(shape)
        return tuple(grads)


def lora_qkv(x: torch.Tensor, Wq, Aq: torch.Tensor, Bq: torch.Tensor, Wk, Ak: torch.Tensor, Bk: torch.Tensor,
             Wv, Av: torch.Tensor, Bv: torch.Tensor, scaling: float, bq: torch.Tensor | None = None,
             bk: torch.Tensor | None = None, bv: torch.Tensor | None = None, dropout: float = 0.0,
             dropout_mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """(q, k, v): three PEFT LoRA linears of the same ``x`` (see ``lora_o``), in one
    autograd Function that saves x once. Optional frozen biases bq/bk/bv (Qwen2).
    ``dropout_mask`` is bool [3, *x.shape] (one mask per projection, True = kept),
    drawn from ``generator`` when None and ``dropout`` > 0. x may be float32 on a bf16/fp16
    layer (QLoRA under autocast): q, k, v and dX are then float32 (``_lora.py``)."""
    op = "lora_qkv"
    C.check_float(op, "x", x)
    L.check_options(op, scaling, dropout)
    for n, (W, A, B, b) in zip(_NAMES, ((Wq, Aq, Bq, bq), (Wk, Ak, Bk, bk), (Wv, Av, Bv, bv))):
        L.check_linear(op, x, (f"W{n}", f"A{n}", f"B{n}"), W, A, B, f"b{n}", b)
    C.check_same_dtype(op, Aq=Aq, Ak=Ak, Av=Av)  # one layer dtype (each may differ from an fp32 x alike)
    keep = L.keep_mask(op, "dropout_mask", dropout_mask, dropout, (3, *x.shape), x, generator)
    if keep is not None and not keep.is_contiguous():
        keep = keep.contiguous()
    return _LoraQKV.apply(x, Wq, Aq, Bq, Wk, Ak, Bk, Wv, Av, Bv, bq, bk, bv, keep, float(scaling), float(dropout))


# --------------------------------------------------------------------------- reference
def lora_qkv_reference(x, Wq, Aq, Bq, Wk, Ak, Bk, Wv, Av, Bv, scaling, bq=None, bk=None, bv=None, dropout=0.0,
                       dropout_mask=None, generator=None, compute_dtype=torch.float32, numerics="folded"):
    """PEFT's q_proj(x), k_proj(x), v_proj(x) with LoRA, each as ``lora_o_reference``, and x's
    gradient rounded as the kernel rounds it (``_lora.linears_reference``): without a mask the
    three LoRA terms of dX summed before one rounding (the kernel's one GEMM)."""
    if dropout > 0 and dropout_mask is None:
        raise ValueError("lora_qkv_reference: pass the dropout_mask explicitly when dropout > 0")
    linears = [(W, A, B, b, dropout_mask[i] if dropout > 0 else None)
               for i, (W, A, B, b) in enumerate(((Wq, Aq, Bq, bq), (Wk, Ak, Bk, bk), (Wv, Av, Bv, bv)))]
    return L.linears_reference(x, linears, scaling, dropout, compute_dtype, numerics)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    block = draw(S.block(limits))
    cap = L.dim_cap(limits)
    d_in = draw(S.dim(1, cap))
    # GQA: q has kv_heads * group heads, k and v kv_heads, all of head_dim.
    head_dim = draw(S.dim(1, max(1, cap // 8)))
    kv_heads = draw(st.sampled_from([1, 1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    q_out, kv_out = kv_heads * group * head_dim, kv_heads * head_dim
    cfg = draw(L.lora_config([d_in, kv_out]))
    batch, tokens = draw(L.rows(limits, max(d_in, q_out), cap=limits.max_rows if cfg["dropout"] == 0 else 24))
    return {
        "batch": batch, "tokens": tokens, "d_in": d_in, "q_out": q_out, "kv_out": kv_out, **cfg,
        "bias": draw(st.booleans()),
        "scale": draw(S.scale()),
        "b_scale": draw(st.sampled_from(L.B_SCALES)),
        "x_fp32": draw(L.mixed_flag()),
        "strided": draw(st.booleans()),
        "layout": draw(st.sampled_from(L.LAYOUTS)),
        "grad_x": draw(L.grad_flag()),
        "grad_adapters": [draw(L.grad_flag()) for _ in range(6)],
        "_block": block,
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    x = L.activations(p, p["d_in"], dtype, device, gen)
    tensors = {"x": x}
    for n, out in zip(_NAMES, (p["q_out"], p["kv_out"], p["kv_out"])):
        tensors[f"W{n}"] = L.frozen_weight(out, p["d_in"], dtype, device, gen)
        tensors[f"A{n}"], tensors[f"B{n}"] = L.adapters(out, p["d_in"], p["r"], p["b_scale"], p["scaling"],
                                                         dtype, device, gen)
    for n, out in zip(_NAMES, (p["q_out"], p["kv_out"], p["kv_out"])):
        tensors[f"b{n}"] = randn((out,), dtype, device, gen) if p["bias"] else None
    L.lay_out(tensors, _NAMES, p.get("layout", "separate"))
    tensors["dropout_mask"] = (L.draw_keep((3, *x.shape), p["dropout"], device, gen)
                               if p["dropout"] > 0 else None)
    adapters = [f"{m}{n}" for n in _NAMES for m in "AB"]
    grads = (("x",) if p["grad_x"] else ()) + tuple(a for a, on in zip(adapters, p["grad_adapters"]) if on)
    return Inputs(tensors, {"scaling": p["scaling"], "dropout": p["dropout"]}, grads)


def _case(**over) -> dict:
    return {"batch": 2, "tokens": 5, "d_in": 12, "q_out": 8, "kv_out": 4, "r": 2, "alpha": 16.0, "rslora": False,
            "scaling": 8.0, "dropout": 0.0, "bias": True, "scale": 1.0, "b_scale": 2.0**-10, "x_fp32": True,
            "strided": False, "grad_x": True, "grad_adapters": [True] * 6, "_block": None, **over}


EXAMPLES = (
    Example(_case(), L.MIXED_SMALL_ADAPTER, dtypes=(torch.bfloat16,)),
    Example(_case(batch=1, tokens=256, d_in=8, x_fp32=False, b_scale=1.0), L.MANY_TOKENS, dtypes=(torch.bfloat16,)),
)


SPEC = KernelSpec(
    name="lora_qkv",
    fn=lora_qkv,
    reference=lora_qkv_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("q", "k", "v"),
    grads=("x", "Aq", "Bq", "Ak", "Bk", "Av", "Bv"),
    options=("scaling (alpha/r or rsLoRA alpha/sqrt(r))", "dropout p with a bool [3, ...] mask",
             "GQA-shaped k/v", "optional frozen q/k/v biases (Qwen2)",
             "fp32 x on a 16-bit layer (QLoRA under autocast)"),
    summary="PEFT LoRA q/k/v projections of one input in one Function: x saved once, and without dropout read "
            "once per pass (one xa, one dA, one dX LoRA GEMM for the three).",
    ablate=L.ablate_adapters("Bq", "Bk", "Bv"),
    examples=EXAMPLES,
)
