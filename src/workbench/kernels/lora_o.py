"""LoRA linear (PEFT-equivalent) on a frozen base weight: the o_proj / down_proj shape.

    y = x W^T + s * (dropout(x) A^T) B^T

W [out, in] frozen (a tensor that does not require grad, or an object with
``.dequantize()``, e.g. NF4), A [r, in], B [out, r], ``scaling`` s = alpha / r
(LoRA) or alpha / sqrt(r) (rsLoRA). See ``_lora.py`` for the dropout-mask and
frozen-weight conventions shared by ``lora_o``, ``lora_qkv`` and ``lora_mlp``.

The forward and backward of one LoRA linear (cuBLAS GEMMs with the scaling and
the LoRA sum in their epilogues; Triton kernels for the dropout and the mixed
mode's fp32 sums) are the building blocks of ``_lora_ops.py``, which ``lora_qkv`` and ``lora_mlp`` run too; this file is
their simplest kernel: one linear, one autograd Function.

Saved for backward: x (only if dA is needed), the bool keep-mask (with dropout),
xa [N, r] (only if dB is needed), A (if dx), B (if dA or dx), W (if dx: the
parameter itself, or the quantized object -- never a dequantised copy). Nothing
of size [N, out] is kept and xd is recomputed from x and the 1-byte mask.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from . import _common as C
from . import _lora as L
from . import _strategies as S
from ._lora_ops import add_input_grad, branch_input, layer_inputs, lora_backward, lora_forward, saved_input
from ._registry import Example, Inputs, KernelSpec, Limits


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
    @C.full_precision_reductions()
    def backward(ctx, dy):
        op = "lora_o"
        xs, keep2, A, B, xa, w_saved = ctx.saved_tensors
        shape, out, scaling, inv, x_dtype, lo = ctx.meta
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dy2 = C.rows_view(op, "dy", dy).to(lo)
        xd2 = branch_input(xs, keep2, inv, lo) if need_a else None
        dA, dB, dxaT = lora_backward(dy2, xd2, xa, B, scaling, need_a, need_b, need_x)
        del xd2
        dx = None
        if need_x:
            w = L.dense(op, "W", w_saved if w_saved is not None else ctx.quantized, lo, (out, shape[-1]))
            dx = add_input_grad(None, dy2, w, dxaT, A, keep2, inv, x_dtype).view(shape)
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
                     compute_dtype=torch.float32, numerics="folded"):
    """PEFT's ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` in ``compute_dtype``,
    rounded to x's dtype where the kernel rounds (``numerics="folded"``; ``"peft"``: where
    PEFT rounds; ``_lora.linear_reference``)."""
    if dropout > 0 and dropout_mask is None:
        raise ValueError("lora_o_reference: pass the dropout_mask explicitly when dropout > 0")
    return L.linear_reference(x, W, A, B, scaling, None, dropout_mask if dropout > 0 else None, dropout,
                              compute_dtype, numerics)


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
    # A case two mutants once survived random draws with: taken on every run.
    Example(_case(dropout=0.25, strided=True, x_fp32=False), "dropout on a row-strided x: the mask's kernel reads "
            "x's rows by their stride, and dA takes the dropped-out x", dtypes=(torch.float32,)),
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
