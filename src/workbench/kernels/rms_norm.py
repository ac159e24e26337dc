"""RMSNorm: y = (w + offset) * x / sqrt(mean(x^2) + eps), over the last dim.

Casting modes follow the HF families:
  * ``llama``: normalise in fp32, round x_hat to the input dtype, then multiply by
    the weight (HF LlamaRMSNorm: ``weight * hidden.to(input_dtype)``);
  * ``gemma``: everything in fp32, one rounding at the end (HF GemmaRMSNorm,
    which also uses ``offset=1``: the stored weight is w - 1).

Backward returns dX and dW; dW is accumulated in fp32 per program across its
rows, then the per-program partials are summed in fp32.

``rms_norm_forward`` / ``rms_norm_backward`` launch the kernels on [rows, hidden]
views, with no autograd: the Function here calls them, and so does ``add_rms_norm``
(the decoder layer's residual add fused into the norm that follows it), through
the kernels' HAS_R / HAS_DS paths: the same numerics, one pass fewer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _strategies as S
from ._common import round_to
from ._harness import maybe_strided, randn, shifted_rows
from ._registry import Example, Inputs, KernelSpec, Limits

CASTING_MODES = ("llama", "gemma")


# --------------------------------------------------------------------------- Triton
@triton.jit
def _row_input(x_row, r_row, s_row, cols, mask, HAS_R: tl.constexpr, STORE_S: tl.constexpr):
    """One block of the row the norm normalises, in fp32: x, or (add_rms_norm) the sum
    s = x + r rounded to x's dtype, which is torch's 16-bit add (fp32 holds the sum of two
    bf16/fp16 values to more than 2p + 2 bits, so rounding it once more is correct
    rounding), written to S when STORE_S (the first pass over the row)."""
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    if HAS_R:
        r = tl.load(r_row + cols, mask=mask, other=0.0)
        x = round_to(x.to(tl.float32) + r.to(tl.float32), x_row.dtype.element_ty)
        if STORE_S:
            tl.store(s_row + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _rms_norm_fwd(X, R, S, W, Y, RSTD, x_stride, r_stride, s_stride, y_stride, n_cols, eps, offset,
                  GEMMA: tl.constexpr, HAS_R: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_stride
    r_row = R + row * r_stride
    s_row = S + row * s_stride
    y_row = Y + row * y_stride
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = _row_input(x_row, r_row, s_row, cols, mask, HAS_R, True)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        x_hat = x * rstd
        if not GEMMA:
            x_hat = x_hat.to(Y.dtype.element_ty).to(tl.float32)
        tl.store(y_row + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _row_input(x_row, r_row, s_row, cols, cols < n_cols, HAS_R, True)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            # s again from x and r (not read back from S: no store-then-load of one address
            # within a program, whose ordering across threads Triton does not promise).
            x = _row_input(x_row, r_row, s_row, cols, mask, HAS_R, False)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
            x_hat = x * rstd
            if not GEMMA:
                x_hat = x_hat.to(Y.dtype.element_ty).to(tl.float32)
            tl.store(y_row + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DS, DX, DW_PART, dy_stride, x_stride, ds_stride, dx_stride,
                  n_rows, n_cols, rows_per_prog, offset,
                  GEMMA: tl.constexpr, HAS_DS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
                  BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # every product below in int64 (parity/int64_offsets.py)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    dw_row = DW_PART + pid * n_cols
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in range(row_start, row_end):
            r64 = tl.cast(r, tl.int64)
            x = tl.load(X + r64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + r64)
            x_hat = x * rstd
            if COMPUTE_DX:
                wdy = w * dy
                c = tl.sum(x_hat * wdy, axis=0) / n_cols
                dx = (wdy - x_hat * c) * rstd
                if HAS_DS:  # add_rms_norm: s's own upstream gradient joins, one rounding for both
                    dx += tl.load(DS + r64 * ds_stride + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + r64 * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                if not GEMMA:
                    x_hat = x_hat.to(X.dtype.element_ty).to(tl.float32)
                dw_acc += dy * x_hat
        if COMPUTE_DW:
            tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        for r in range(row_start, row_end):
            r64 = tl.cast(r, tl.int64)
            rstd = tl.load(RSTD + r64)
            c_acc = tl.zeros([BLOCK], dtype=tl.float32)
            if COMPUTE_DX:
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    x = tl.load(X + r64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + r64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                    c_acc += x * rstd * w * dy
            c = tl.sum(c_acc, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(X + r64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = x * rstd
                if COMPUTE_DX:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
                    dx = (w * dy - x_hat * c) * rstd
                    if HAS_DS:
                        dx += tl.load(DS + r64 * ds_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(DX + r64 * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    if not GEMMA:
                        x_hat = x_hat.to(X.dtype.element_ty).to(tl.float32)
                    # This program owns row `pid` of the partials: read-modify-write, no atomics.
                    part = tl.load(dw_row + cols, mask=mask, other=0.0)
                    tl.store(dw_row + cols, part + dy * x_hat, mask=mask)


# --------------------------------------------------------------------------- launchers
def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str,
                     residual: torch.Tensor | None = None):
    """(y, rstd, s) of the norm of the [rows, hidden] view ``x2`` (unit last stride), no
    autograd. With ``residual`` (a view of x2's shape and dtype) it normalises s = x2 +
    residual, rounded to the dtype as torch's add rounds, and returns s too (else None):
    add_rms_norm's one pass over x, r and w."""
    n_rows, n_cols = x2.shape
    y = C.empty((n_rows, n_cols), x2.dtype, x2.device)
    rstd = C.empty((n_rows,), torch.float32, x2.device)
    s = C.empty((n_rows, n_cols), x2.dtype, x2.device) if residual is not None else None
    block = C.block_for(n_cols, forced=C.forced())
    if n_rows:
        r_arg, s_arg = (residual, s) if residual is not None else (x2, y)  # unread without HAS_R
        _rms_norm_fwd[(n_rows,)](x2, r_arg, s_arg, weight, y, rstd, x2.stride(0), r_arg.stride(0),
                                 s_arg.stride(0), y.stride(0), n_cols, eps, offset,
                                 GEMMA=casting == "gemma", HAS_R=residual is not None, BLOCK=block,
                                 ONE_BLOCK=block >= n_cols)
    return y, rstd, s


def rms_norm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float, casting: str, need_dx: bool, need_dw: bool,
                      ds2: torch.Tensor | None = None):
    """(dx, dw) of the norm of ``x2`` for upstream ``dy2`` ([rows, hidden] views, unit last
    stride), no autograd; None for what is not asked. With ``ds2`` (add_rms_norm's upstream
    gradient of s = x2), dx is the norm's gradient plus ds2, summed in fp32, rounded once."""
    n_rows, n_cols = x2.shape
    dx = C.empty((n_rows, n_cols), x2.dtype, x2.device) if need_dx else None
    progs = C.row_programs(n_rows, x2.device)
    rows_per = C.cdiv(max(n_rows, 1), progs)
    progs = C.cdiv(max(n_rows, 1), rows_per)
    dw_part = torch.zeros((progs, n_cols), dtype=torch.float32, device=x2.device) if need_dw else None
    block = C.block_for(n_cols, forced=C.forced())
    has_ds = need_dx and ds2 is not None
    if n_rows and (need_dx or need_dw):
        _rms_norm_bwd[(progs,)](
            dy2, x2, weight, rstd, ds2 if has_ds else dy2, dx if need_dx else dy2, dw_part if need_dw else rstd,
            dy2.stride(0), x2.stride(0), ds2.stride(0) if has_ds else 0, dx.stride(0) if need_dx else 0,
            n_rows, n_cols, rows_per, offset,
            GEMMA=casting == "gemma", HAS_DS=has_ds, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw,
            BLOCK=block, ONE_BLOCK=block >= n_cols)
    dw = None
    if need_dw:
        dw = dw_part.sum(0).to(weight.dtype) if n_rows else torch.zeros_like(weight)
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        shape = x.shape
        x2 = C.rows_view("rms_norm", "x", x)
        y, rstd, _ = rms_norm_forward(x2, weight, eps, offset, casting)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.meta = (shape, offset, casting)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        shape, offset, casting = ctx.meta
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2 = C.rows_view("rms_norm", "dy", dy)
        dx, dw = rms_norm_backward(dy2, x2, weight, rstd, offset, casting, need_dx, need_dw)
        return (dx.view(shape) if need_dx else None), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             casting: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape) with weight [hidden].

    ``offset=1.0`` with ``casting="gemma"`` is Gemma's ``(1 + w)``.
    """
    op = "rms_norm"
    C.check_float(op, "x", x)
    C.check_float(op, "weight", weight)
    C.check_same_dtype(op, x=x, weight=weight)
    C.check_device(op, x, weight)
    C.check_shape(op, "weight", weight, (x.shape[-1],) if x.dim() else (-1,))
    if casting not in CASTING_MODES:
        raise C.KernelInputError(f"{op}: casting must be one of {CASTING_MODES}, got {casting!r}.")
    if not eps >= 0:
        raise C.KernelInputError(f"{op}: eps must be >= 0, got {eps}.")
    return _RMSNorm.apply(x, weight, float(eps), float(offset), casting)


# --------------------------------------------------------------------------- reference
def rms_norm_reference(x, weight, eps=1e-6, offset=0.0, casting="llama", compute_dtype=torch.float32):
    """HF's RMSNorm, computed in ``compute_dtype`` (fp32 as HF does; fp64 for the exact pass)."""
    h = x.to(compute_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(compute_dtype) + offset
    if casting == "llama":
        h = h.to(x.dtype).to(compute_dtype)
    return (w * h).to(x.dtype)


# --------------------------------------------------------------------------- registry
@st.composite
def norm_params(draw, limits: Limits) -> dict:
    """The norm's draws that rms_norm and add_rms_norm share: rows, eps, casting, offset, the
    input's scale and row shift, a strided input, and which of x and w need a gradient."""
    shape = draw(S.norm_rows(limits))
    return {
        **shape,
        "eps": draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        "casting": draw(st.sampled_from(CASTING_MODES)),
        "offset": draw(st.sampled_from([0.0, 1.0])),
        "scale": draw(S.scale()),
        # Per-row mean in units of the row's spread, up to 10^3, and constant rows (x_hat = +-1).
        "shift": draw(S.row_shift()),
        "strided": draw(st.booleans()),
        "grad_x": draw(st.sampled_from([True, True, False])),
        "grad_w": draw(st.sampled_from([True, True, False])),
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    x = shifted_rows((p["batch"], p["rows"], p["hidden"]), dtype, device, gen, p["scale"], p.get("shift", 0.0))
    # Gemma stores w - 1 (near 0); Llama stores w near 1.
    weight = (randn((p["hidden"],), torch.float32, device, gen, 0.5) + (1.0 - p["offset"])).to(dtype)
    grads = tuple(n for n, on in (("x", p["grad_x"]), ("weight", p["grad_w"])) if on)
    return Inputs({"x": maybe_strided(x, p["strided"], gen), "weight": weight},
                  {"eps": p["eps"], "offset": p["offset"], "casting": p["casting"]}, grads)


def _case(**over) -> dict:
    return {"batch": 1, "rows": 2, "hidden": 8, "_block": None, "eps": 1e-6, "casting": "gemma", "offset": 0.0,
            "scale": 1.0, "shift": 0.0, "strided": False, "grad_x": True, "grad_w": True, **over}


#: A 16-bit accumulator loses about sqrt(n) roundoffs over n additions: against the bound
#: (4x PyTorch's one rounding + 2 units) it shows from some tens of additions in bf16, which
#: the ci profile's random shapes (<= 48 rows x 3, over 4 programs; <= 20 blocks a row) reach
#: rarely (fp16's 3 more bits show it sooner). So these two run in bf16 in every profile: 256
#: rows (64 a program of the backward, summed into dW), and a row of 1024 forced blocks (the
#: looped path's sum of x^2 and dX's c). (A bf16 dW accumulator errs 10x past the bound at
#: 128 rows a program.)
EXAMPLES = (
    Example(_case(rows=256), "dW summed over 64 rows a program: a 16-bit dW accumulator", dtypes=(torch.bfloat16,)),
    # 1024 blocks of 4: the GPU rounds to nearest, so a 16-bit sum of squares errs little until its
    # ulp outgrows the terms, and then stalls. Over 256 additions a lane that costs about 1.5 % of y
    # (inside bf16's bound: an H200 let such an accumulator through), over 1024 about 9 %.
    Example(_case(hidden=4096, _block=4, casting="llama"), "a row of 1024 blocks: a 16-bit accumulator of the "
            "looped path's sums", dtypes=(torch.bfloat16,)),
    # A case a mutant once survived random draws with: taken on every run.
    Example(_case(hidden=33, _block=8, casting="llama"), "the looped path with a partial last block: its mask",
            dtypes=(torch.float32,)),
)


SPEC = KernelSpec(
    name="rms_norm",
    fn=rms_norm,
    reference=rms_norm_reference,
    params=norm_params,
    make_inputs=_make_inputs,
    outputs=("y",),
    grads=("x", "weight"),
    options=("eps", "offset (Gemma 1+w)", "casting: llama|gemma"),
    summary="RMSNorm with Llama/Gemma casting and Gemma's (1 + w) offset; dW in fp32.",
    examples=EXAMPLES,
)
