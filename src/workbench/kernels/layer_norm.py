"""LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * w + b, over the last dim.

Semantics are ``torch.nn.functional.layer_norm`` computed in fp32 and rounded once
to the input dtype (what HF's fp32-upcasting LayerNorms do). The bias is optional.
The forward saves the per-row mean and rstd (fp32). The variance is the biased
one, computed two-pass (mean first, then the centred sum of squares) so rows
with a large mean do not cancel.

Backward returns dX, dW and dB (only those requested); dW and dB are accumulated
in fp32 per program across its rows, then the per-program partials are summed
in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _strategies as S
from ._harness import maybe_strided, randn, shifted_rows
from ._registry import Example, Inputs, KernelSpec, Limits


# --------------------------------------------------------------------------- Triton
# Means multiply by inv_n = 1/n computed on the host rather than dividing: Triton's
# fp32 `/` on the GPU is an approximate (2 ulp) division, so sum(g)/1 need not equal g
# and g - mean(g) would not cancel to the exact 0 of a one-column row (seen on an H100).
@triton.jit
def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, x_stride, y_stride, n_cols, inv_n, eps,
                    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_stride
    y_row = Y + row * y_stride
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) * inv_n
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) * inv_n
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd * w
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            acc += tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) * inv_n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        var = tl.sum(acc, axis=0) * inv_n
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, dy_stride, x_stride, dx_stride,
                    n_rows, n_cols, inv_n, rows_per_prog,
                    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # every product below in int64 (parity/int64_offsets.py)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    dw_row = DW_PART + pid * n_cols
    db_row = DB_PART + pid * n_cols
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in range(row_start, row_end):
            r64 = tl.cast(r, tl.int64)
            x = tl.load(X + r64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + r64)
            rstd = tl.load(RSTD + r64)
            x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
            if COMPUTE_DX:
                g = w * dy
                c1 = tl.sum(g, axis=0) * inv_n
                c2 = tl.sum(x_hat * g, axis=0) * inv_n
                dx = (g - c1 - x_hat * c2) * rstd
                tl.store(DX + r64 * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * x_hat
            if COMPUTE_DB:
                db_acc += dy
        if COMPUTE_DW:
            tl.store(dw_row + cols, dw_acc, mask=mask)
        if COMPUTE_DB:
            tl.store(db_row + cols, db_acc, mask=mask)
    else:
        for r in range(row_start, row_end):
            r64 = tl.cast(r, tl.int64)
            mean = tl.load(MEAN + r64)
            rstd = tl.load(RSTD + r64)
            c1_acc = tl.zeros([BLOCK], dtype=tl.float32)
            c2_acc = tl.zeros([BLOCK], dtype=tl.float32)
            if COMPUTE_DX:
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + r64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + r64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    g = w * dy
                    c1_acc += g
                    c2_acc += tl.where(mask, (x - mean) * rstd, 0.0) * g
            c1 = tl.sum(c1_acc, axis=0) * inv_n
            c2 = tl.sum(c2_acc, axis=0) * inv_n
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(X + r64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
                if COMPUTE_DX:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(DX + r64 * dx_stride + cols, ((w * dy - c1 - x_hat * c2) * rstd).to(DX.dtype.element_ty),
                             mask=mask)
                # This program owns row `pid` of the partials: read-modify-write, no atomics.
                if COMPUTE_DW:
                    part = tl.load(dw_row + cols, mask=mask, other=0.0)
                    tl.store(dw_row + cols, part + dy * x_hat, mask=mask)
                if COMPUTE_DB:
                    part = tl.load(db_row + cols, mask=mask, other=0.0)
                    tl.store(db_row + cols, part + dy, mask=mask)


# --------------------------------------------------------------------------- launchers
class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = C.rows_view("layer_norm", "x", x)
        n_rows, n_cols = x2.shape
        y = C.empty((n_rows, n_cols), x.dtype, x.device)
        mean = C.empty((n_rows,), torch.float32, x.device)
        rstd = C.empty((n_rows,), torch.float32, x.device)
        block = C.block_for(n_cols, forced=C.forced())
        if n_rows:
            _layer_norm_fwd[(n_rows,)](x2, weight, bias if bias is not None else weight, y, mean, rstd,
                                       x2.stride(0), y.stride(0), n_cols, 1.0 / n_cols, eps,
                                       HAS_BIAS=bias is not None, BLOCK=block, ONE_BLOCK=block >= n_cols,
                                       num_warps=C.num_warps(block))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.meta = (shape, bias is not None)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        shape, has_bias = ctx.meta
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = has_bias and ctx.needs_input_grad[2]
        n_rows, n_cols = x2.shape
        dy2 = C.rows_view("layer_norm", "dy", dy)
        dx = C.empty((n_rows, n_cols), x2.dtype, x2.device) if need_dx else None
        progs = C.row_programs(n_rows, x2.device)
        rows_per = C.cdiv(max(n_rows, 1), progs)
        progs = C.cdiv(max(n_rows, 1), rows_per)
        dw_part = torch.zeros((progs, n_cols), dtype=torch.float32, device=x2.device) if need_dw else None
        db_part = torch.zeros((progs, n_cols), dtype=torch.float32, device=x2.device) if need_db else None
        block = C.block_for(n_cols, forced=C.forced())
        if n_rows and (need_dx or need_dw or need_db):
            _layer_norm_bwd[(progs,)](
                dy2, x2, weight, mean, rstd, dx if need_dx else dy2,
                dw_part if need_dw else rstd, db_part if need_db else rstd,
                dy2.stride(0), x2.stride(0), dx.stride(0) if need_dx else 0,
                n_rows, n_cols, 1.0 / n_cols, rows_per,
                COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                BLOCK=block, ONE_BLOCK=block >= n_cols, num_warps=C.num_warps(block))
        dw = db = None
        if need_dw:
            dw = dw_part.sum(0).to(weight.dtype) if n_rows else torch.zeros_like(weight)
        if need_db:
            db = db_part.sum(0).to(weight.dtype) if n_rows else torch.zeros_like(weight)
        return (dx.view(shape) if need_dx else None), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (any leading shape) with weight [hidden]
    and an optional bias [hidden]; computed in fp32, rounded once to ``x.dtype``."""
    op = "layer_norm"
    C.check_float(op, "x", x)
    C.check_float(op, "weight", weight)
    if bias is not None:
        C.check_float(op, "bias", bias)
    C.check_same_dtype(op, x=x, weight=weight, bias=bias)
    C.check_device(op, x, weight, bias)
    hidden = (x.shape[-1],) if x.dim() else (-1,)
    C.check_shape(op, "weight", weight, hidden)
    if bias is not None:
        C.check_shape(op, "bias", bias, hidden)
    if not eps >= 0:
        raise C.KernelInputError(f"{op}: eps must be >= 0, got {eps}.")
    return _LayerNorm.apply(x, weight, bias, float(eps))


# --------------------------------------------------------------------------- reference
def layer_norm_reference(x, weight, bias=None, eps=1e-5, compute_dtype=torch.float32):
    """``F.layer_norm`` computed in ``compute_dtype`` (fp32 as HF does; fp64 for the exact pass)."""
    h = F.layer_norm(x.to(compute_dtype), (x.shape[-1],), weight.to(compute_dtype),
                     bias.to(compute_dtype) if bias is not None else None, eps)
    return h.to(x.dtype)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    shape = draw(S.norm_rows(limits))
    return {
        **shape,
        "eps": draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        "scale": draw(S.scale()),
        # Per-row mean in units of the row's spread, up to 10^3, and constant rows: a kernel that
        # skips the mean fails, and so does a variance formed as E[x^2] - mean^2 (it cancels).
        "shift": draw(S.row_shift()),
        "bias": draw(st.booleans()),
        "strided": draw(st.booleans()),
        "grad_x": draw(st.sampled_from([True, True, False])),
        "grad_w": draw(st.sampled_from([True, True, False])),
        "grad_b": draw(st.sampled_from([True, True, False])),
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    x = shifted_rows((p["batch"], p["rows"], p["hidden"]), dtype, device, gen, p["scale"], p["shift"])
    weight = (randn((p["hidden"],), torch.float32, device, gen, 0.5) + 1.0).to(dtype)
    bias = randn((p["hidden"],), dtype, device, gen, 0.5) if p["bias"] else None
    wanted = (("x", p["grad_x"]), ("weight", p["grad_w"]), ("bias", p["bias"] and p["grad_b"]))
    grads = tuple(n for n, on in wanted if on)
    return Inputs({"x": maybe_strided(x, p["strided"], gen), "weight": weight, "bias": bias},
                  {"eps": p["eps"]}, grads)


def _case(**over) -> dict:
    return {"batch": 1, "rows": 2, "hidden": 8, "_block": None, "eps": 1e-5, "scale": 1.0, "shift": 3.0,
            "bias": True, "strided": False, "grad_x": True, "grad_w": True, "grad_b": True, **over}


#: As rms_norm's: a 16-bit accumulator shows from some tens of additions in bf16, which the
#: ci profile's random shapes reach rarely; these run in bf16 in every profile.
EXAMPLES = (
    Example(_case(rows=256), "dW and dB summed over 64 rows a program: a 16-bit accumulator",
            dtypes=(torch.bfloat16,)),
    # 256 blocks, not 64: the GPU rounds to nearest (unbiased), so a 16-bit sum's error grows as the
    # square root of its additions and needs some hundreds to pass 4x bf16's own; the CPU
    # interpreter truncates, which shows it far sooner.
    Example(_case(hidden=4096, _block=16), "a row of 256 blocks: a 16-bit accumulator of the looped path's "
            "mean, variance and dX sums", dtypes=(torch.bfloat16,)),
    Example(_case(rows=6, hidden=33, shift=1e3, bias=False, scale=4.0), "rows whose mean is 10^3 their spread: "
            "a variance formed as E[x^2] - mean^2 cancels", dtypes=(torch.float32,)),
    # Cases a mutant once survived random draws with: taken on every run.
    Example(_case(rows=600), "more rows than the GPU's 2 x SMs programs: dB summed over a program's rows",
            dtypes=(torch.float32,)),
    Example(_case(hidden=33, _block=8), "the looped path with a partial last block: its mask",
            dtypes=(torch.float32,)),
)


SPEC = KernelSpec(
    name="layer_norm",
    fn=layer_norm,
    reference=layer_norm_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("y",),
    grads=("x", "weight", "bias"),
    options=("eps", "bias optional (None)"),
    summary="LayerNorm in fp32 with optional bias; saves mean/rstd; dW and dB accumulated in fp32.",
    examples=EXAMPLES,
)
