"""Residual add fused into RMSNorm: s = x + r, y = rms_norm(s), over the last dim.

The middle of a Llama-family decoder layer is ``hidden = residual + attn_out`` and then
``post_attention_layernorm(hidden)``: an add that writes s, and a norm that reads it
again. Here one pass reads x, r and w once and writes s, y and the saved rstd; s is
rounded to the input dtype exactly as torch's add rounds, and y is ``rms_norm``'s
numerics on that s (same casting modes, same offset, same kernels: rms_norm.py's
forward and backward run their HAS_R / HAS_DS paths, launched through its public
``rms_norm_forward`` / ``rms_norm_backward``).

Backward: s feeds both the norm and, in the layer, the next residual add, so its
gradient is the norm's backward of dy plus s's own upstream gradient ds. One kernel
reads dy, ds, s, w and rstd and writes that sum (formed in fp32, rounded once) and
rms_norm's fp32 dW partials. dx and dr are the same gradient (the add's), returned as
the same tensor for both.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from . import _common as C
from ._harness import maybe_strided, randn, shifted_rows
from ._registry import Example, Inputs, KernelSpec, Limits
from .rms_norm import CASTING_MODES, norm_params, rms_norm_backward, rms_norm_forward, rms_norm_reference

OP = "add_rms_norm"


# --------------------------------------------------------------------------- autograd
class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, w, eps, offset, casting):
        shape = x.shape
        x2 = C.rows_view(OP, "x", x)
        r2 = C.rows_view(OP, "r", r)
        y, rstd, s = rms_norm_forward(x2, w, eps, offset, casting, residual=r2)
        ctx.save_for_backward(s, w, rstd)
        ctx.meta = (shape, offset, casting)
        # An unused output's gradient stays None: no zeros to allocate and read.
        ctx.set_materialize_grads(False)
        return s.view(shape), y.view(shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s2, w, rstd = ctx.saved_tensors
        shape, offset, casting = ctx.meta
        need_x, need_r, need_w = ctx.needs_input_grad[:3]
        need_dx = need_x or need_r
        if dy is None:  # y unused: s's gradient passes the add unchanged, and w gets none
            dx = ds if need_dx else None
            return (dx if need_x else None), (dx if need_r else None), None, None, None, None
        dy2 = C.rows_view(OP, "dy", dy)
        ds2 = C.rows_view(OP, "ds", ds) if ds is not None and need_dx else None
        dx, dw = rms_norm_backward(dy2, s2, w, rstd, offset, casting, need_dx, need_w, ds2)
        if dx is not None:
            dx = dx.view(shape)
        return (dx if need_x else None), (dx if need_r else None), dw, None, None, None


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
                 casting: str = "llama") -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = x + r in x's dtype, y = RMSNorm(s) with weight ``w`` [hidden], as
    ``rms_norm(x + r, w, eps, offset, casting)`` computes them, in one pass.

    ``x`` and ``r`` share one shape (no broadcasting) and dtype."""
    C.check_float(OP, "x", x)
    C.check_float(OP, "r", r)
    C.check_float(OP, "w", w)
    C.check_same_dtype(OP, x=x, r=r, w=w)
    C.check_device(OP, x, r, w)
    C.check_shape(OP, "r", r, tuple(x.shape))
    C.check_shape(OP, "w", w, (x.shape[-1],) if x.dim() else (-1,))
    if casting not in CASTING_MODES:
        raise C.KernelInputError(f"{OP}: casting must be one of {CASTING_MODES}, got {casting!r}.")
    if not eps >= 0:
        raise C.KernelInputError(f"{OP}: eps must be >= 0, got {eps}.")
    return _AddRMSNorm.apply(x, r, w, float(eps), float(offset), casting)


# --------------------------------------------------------------------------- reference
def add_rms_norm_reference(x, r, w, eps=1e-6, offset=0.0, casting="llama", compute_dtype=torch.float32):
    """HF's ``hidden = residual + attn_out`` in the inputs' dtype, then HF's RMSNorm of it."""
    s = x + r
    return s, rms_norm_reference(s, w, eps, offset, casting, compute_dtype)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    return {
        **draw(norm_params(limits)),
        # r's size against x's: an attention output much smaller than the residual stream,
        # alike, or larger.
        "r_scale": draw(st.sampled_from([1.0, 0.01, 0.3, 3.0])),
        "r_strided": draw(st.booleans()),
        "grad_r": draw(st.sampled_from([True, True, False])),
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    shape = (p["batch"], p["rows"], p["hidden"])
    x = shifted_rows(shape, dtype, device, gen, p["scale"], p.get("shift", 0.0))
    # r's rows have a mean and spread of their own, of the shift's kind (with "constant" the
    # same rows of x and r are constant, so those of s are too).
    r = shifted_rows(shape, dtype, device, gen, p["scale"] * p["r_scale"], p.get("shift", 0.0))
    # Gemma stores w - 1 (near 0); Llama stores w near 1.
    w = (randn((p["hidden"],), torch.float32, device, gen, 0.5) + (1.0 - p["offset"])).to(dtype)
    grads = tuple(n for n, on in (("x", p["grad_x"]), ("r", p["grad_r"]), ("w", p["grad_w"])) if on)
    return Inputs({"x": maybe_strided(x, p["strided"], gen), "r": maybe_strided(r, p["r_strided"], gen), "w": w},
                  {"eps": p["eps"], "offset": p["offset"], "casting": p["casting"]}, grads)


def _case(**over) -> dict:
    return {"batch": 1, "rows": 2, "hidden": 8, "_block": None, "eps": 1e-6, "casting": "llama", "offset": 0.0,
            "scale": 1.0, "shift": 0.0, "strided": False, "grad_x": True, "grad_w": True, "r_scale": 1.0,
            "r_strided": False, "grad_r": True, **over}


#: rms_norm's two 16-bit accumulator cases (its EXAMPLES say why they must be targeted), on the
#: add's path, and upstream gradients of s and y that are strided slices of differently padded
#: buffers (seed 3 draws rows 37 and 36 elements apart), so that ds read with dy's stride shows.
EXAMPLES = (
    Example(_case(rows=256), "dW summed over 64 rows a program: a 16-bit dW accumulator", dtypes=(torch.bfloat16,)),
    Example(_case(hidden=4096, _block=4), "a row of 1024 blocks: a 16-bit accumulator of the looped path's sums",
            dtypes=(torch.bfloat16,)),
    Example(_case(rows=5, hidden=33, _dy="strided", strided=True, r_strided=True), "ds and dy of different row "
            "strides, x and r too: a stride taken from the wrong tensor", seed=3),
    # A case two mutants once survived random draws with: taken on every run.
    Example(_case(hidden=33, _block=8, grad_x=False), "the looped path (both passes read s = x + r), and r "
            "differentiated without x", dtypes=(torch.float32,)),
)


SPEC = KernelSpec(
    name="add_rms_norm",
    fn=add_rms_norm,
    reference=add_rms_norm_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("s", "y"),
    grads=("x", "r", "w"),
    options=("eps", "offset (Gemma 1+w)", "casting: llama|gemma"),
    summary="s = x + r (rounded as torch's add) and RMSNorm(s) in one pass; dx = dr = norm's dX + ds; dW in fp32.",
    examples=EXAMPLES,
)
