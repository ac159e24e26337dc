"""Cross-entropy over a vocab: logits [N, V], integer targets [N].

Per row i whose target t is not ``ignore_index`` (with z = logits, or
z = c * tanh(logits / c) under a Gemma-2 style ``softcap`` c; all math in fp32):

    lse_i  = logsumexp_j z_ij
    loss_i = (1 - eps) * (lse_i - z_it) + eps * (lse_i - mean_j z_ij)   # PyTorch's label smoothing
           + z_loss * lse_i^2                                          # PaLM z-loss (when z_loss > 0)

Ignored rows contribute 0. ``reduction="mean"`` divides the sum by the number of
non-ignored rows and returns 0 -- deliberately NOT PyTorch's NaN -- when every row
is ignored: a fully masked micro-batch contributes nothing to training.

The forward is one pass over the logits per row (online max / sum-exp over vocab
blocks) and keeps only the per-row lse, saved split as (row max, log sum-exp
below it) so that the backward's softmax exp((z - max) - log s) is as precise
as PyTorch's log_softmax. The backward recomputes the gradient from those in one
more pass: the logits are never written (they may not require grad, and may be
used elsewhere).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _strategies as S
from ._harness import maybe_strided, randn
from ._registry import Example, Inputs, KernelSpec, Limits

REDUCTIONS = ("mean", "sum", "none")

#: Widest vocab block a program holds at once on the GPU; wider vocabs are looped
#: over (online softmax in the forward). 8192 fp32 per row block keeps the row in
#: registers without spilling at 16 warps, and the loop costs nothing: both
#: passes are bound by reading the logits.
MAX_BLOCK = 8192


# --------------------------------------------------------------------------- Triton
@triton.jit
def _tanh_sech2(y):
    """tanh(y) and 1 - tanh(y)^2, each within ~2 ulp of fp32 over the whole range
    (the naive 1 - 2/(exp(2y) + 1) loses all relative accuracy near 0, and
    1 - t*t loses it where tanh saturates). Odd Taylor series below |y| = 0.75,
    1 - 2 / (exp(2|y|) + 1) above; 1 - t^2 = (1 - |t|)(1 + |t|)."""
    a = tl.abs(y)
    y2 = y * y
    p = -3.927832388331683e-05 * y2 + 9.691537956929451e-05
    p = p * y2 - 0.00023912911424355248
    p = p * y2 + 0.000590027440945586
    p = p * y2 - 0.0014558343870513183
    p = p * y2 + 0.003592128036572481
    p = p * y2 - 0.008863235529902197
    p = p * y2 + 0.021869488536155203
    p = p * y2 - 0.05396825396825397
    p = p * y2 + 0.13333333333333333
    p = p * y2 - 0.3333333333333333
    p = p * y2 + 1.0
    small = a * p
    r = 2.0 / (tl.exp(2.0 * tl.minimum(a, 40.0)) + 1.0)  # 1 - tanh(|y|), no cancellation
    is_small = a < 0.75
    t_abs = tl.where(is_small, small, 1.0 - r)
    one_minus = tl.where(is_small, 1.0 - small, r)
    t = tl.where(y < 0, -t_abs, t_abs)
    return t, one_minus * (1.0 + t_abs)


# Both kernels launch with enable_fp_fusion=False: the backward recomputes z = c*tanh(x/c)
# and subtracts the forward's max m; with FMA contraction, fma(c, th, -m) keeps the
# product's rounding error, so z - m != 0 where the forward had z == m exactly and a
# V = 1 row got a non-zero gradient on an H100. Without fusion both kernels round z alike.
# 1/V comes from the host (inv_v) instead of an in-kernel division: Triton's fp32 `/`
# on the GPU is approximate (2 ulp), and eps/V must equal eps exactly when V = 1 so
# that the weights (p - eps/V) - (1 - eps) cancel to the exact 0 gradient (H100).
@triton.jit
def _ce_fwd(X, T, LOSS, ZROW, STATS, x_stride, n_cols, inv_v, ignore_index, eps, softcap, z_coef,
            SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, WRITE_Z: tl.constexpr,
            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_stride
    t = tl.load(T + row)
    if t == ignore_index:
        # Skip the row entirely: no bandwidth spent on masked tokens.
        tl.store(LOSS + row, 0.0)
        if WRITE_Z:
            tl.store(ZROW + row, 0.0)
        tl.store(STATS + 2 * row, 0.0)
        tl.store(STATS + 2 * row + 1, 0.0)
    else:
        m = float("-inf")   # running max
        s = 0.0             # running sum of exp(z - m)
        sum_z = 0.0         # sum_j z_j (label smoothing)
        z_t = 0.0           # the target's logit (gathered in the loop: no out-of-bounds read)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                th, _ = _tanh_sech2(x / softcap)
                z = softcap * th
            else:
                z = x
            z = tl.where(mask, z, float("-inf"))
            new_m = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
            m = new_m
            if SMOOTH:
                sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z_t += tl.sum(tl.where(cols == t, z, 0.0), axis=0)
        logs = tl.log(s)
        # (m - z_t) + log s, as PyTorch's log_softmax rounds it: no fp32 rounding of lse itself.
        loss = (m - z_t) + logs
        if SMOOTH:
            loss = (1.0 - eps) * loss + eps * ((m - sum_z * inv_v) + logs)
        if ZLOSS:
            lse = m + logs
            zt = z_coef * lse * lse
            loss += zt
            if WRITE_Z:
                tl.store(ZROW + row, zt)
        else:
            if WRITE_Z:
                tl.store(ZROW + row, 0.0)
        tl.store(LOSS + row, loss)
        tl.store(STATS + 2 * row, m)
        tl.store(STATS + 2 * row + 1, logs)


@triton.jit
def _ce_bwd(X, T, STATS, G, GZ, DX, x_stride, dx_stride, g_stride, gz_stride, n_cols, inv_v, ignore_index,
            eps, softcap, z_coef,
            SOFTCAP: tl.constexpr, ZLOSS: tl.constexpr, HAS_GZ: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_stride
    dx_row = DX + row * dx_stride
    t = tl.load(T + row)
    if t == ignore_index:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(dx_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(DX.dtype.element_ty),
                     mask=cols < n_cols)
    else:
        m = tl.load(STATS + 2 * row)
        logs = tl.load(STATS + 2 * row + 1)
        g = tl.load(G + row * g_stride)          # upstream of the loss (already / n_valid for mean)
        if ZLOSS:
            zg = g                               # the z-loss term is part of the loss ...
            if HAS_GZ:
                zg += tl.load(GZ + row * gz_stride)  # ... and its own output's upstream adds
            zc = 2.0 * z_coef * (m + logs) * zg      # d(z_coef * lse^2)/dz_j = zc * softmax_j
        eps_v = eps * inv_v                      # label smoothing: every class has weight eps / V,
        on = 1.0 - eps                           # the target (1 - eps) on top
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                th, sech2 = _tanh_sech2(x / softcap)
                z = softcap * th
            else:
                z = x
            p = tl.exp((z - m) - logs)
            # g * (p - weights): the weights sum to 1, so with V = 1 (p = 1) this is exactly 0.
            dz = g * ((p - eps_v) - tl.where(cols == t, on, 0.0))
            if ZLOSS:
                dz += zc * p
            if SOFTCAP:
                dz = dz * sech2
            tl.store(dx_row + cols, dz.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def _warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, loss_rows: torch.Tensor,
                          stats: torch.Tensor, ignore_index: int, eps: float = 0.0, softcap: float | None = None,
                          z_coef: float = 0.0, z_rows: torch.Tensor | None = None) -> None:
    """Per-row loss of ``logits`` [N, V] (unit last stride, any row stride) against int64
    ``target`` [N]: launches the forward kernel, no autograd, no input checks.

    Writes fp32 ``loss_rows`` [N] (0 for an ignored row; with ``eps = 0``, no softcap and no
    z-loss, ``-log_softmax(logits)[target]``), the rows' (max, log-sum-exp below it) into fp32
    ``stats`` [N, 2], which :func:`cross_entropy_backward` reads, and the z-loss term into
    ``z_rows`` [N] when given. The fused linear kernels call it on their chunks of logits."""
    n_rows, n_cols = logits.shape
    if not n_rows:
        return
    block = C.block_for(n_cols, cap=MAX_BLOCK, forced=C.forced())
    _ce_fwd[(n_rows,)](
        logits, target, loss_rows, loss_rows if z_rows is None else z_rows, stats,
        logits.stride(0), n_cols, 1.0 / n_cols, ignore_index, eps, softcap or 1.0, z_coef,
        SOFTCAP=softcap is not None, SMOOTH=eps > 0.0, ZLOSS=z_coef > 0.0, WRITE_Z=z_rows is not None,
        BLOCK=block, num_warps=_warps(block), enable_fp_fusion=False)


def cross_entropy_backward(logits: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, g: torch.Tensor,
                           dlogits: torch.Tensor, ignore_index: int, eps: float = 0.0, softcap: float | None = None,
                           z_coef: float = 0.0, gz: torch.Tensor | None = None) -> None:
    """dlogits = g_i * dloss_i/dlogits (+ gz_i * dz_i/dlogits) of :func:`cross_entropy_forward`'s
    rows: launches the backward kernel, no autograd, no input checks.

    ``g`` (and ``gz``, the upstream of a returned z-loss term) are fp32: 0-dim or [1], read by
    every row, or [N] with any stride. ``stats`` is the forward's. ``dlogits`` [N, V] (unit last
    stride, any float dtype; 0 on ignored rows) may be ``logits`` itself: each program reads a
    block of its row before it writes it, so the fused linear kernels overwrite a chunk of
    logits with its gradient in place."""
    n_rows, n_cols = logits.shape
    if not n_rows:
        return
    has_gz = gz is not None and z_coef > 0.0
    g, g_stride = _scalar_or_rows(g)
    gz, gz_stride = _scalar_or_rows(gz) if has_gz else (g, 0)
    block = C.block_for(n_cols, cap=MAX_BLOCK, forced=C.forced())
    _ce_bwd[(n_rows,)](
        logits, target, stats, g, gz, dlogits, logits.stride(0), dlogits.stride(0), g_stride,
        gz_stride, n_cols, 1.0 / n_cols, ignore_index, eps, softcap or 1.0, z_coef,
        SOFTCAP=softcap is not None, ZLOSS=z_coef > 0.0, HAS_GZ=has_gz,
        BLOCK=block, num_warps=_warps(block), enable_fp_fusion=False)


def _scalar_or_rows(g: torch.Tensor) -> tuple[torch.Tensor, int]:
    """An upstream gradient as (fp32 tensor, row stride): a scalar (0-dim, or one element) is
    read by every row."""
    g = g.float()
    if g.numel() == 1:
        g = g.reshape(())
    return g, (g.stride(0) if g.dim() else 0)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, eps, softcap, reduction, z_coef, return_z):
        n_rows, n_cols = logits.shape
        dev = logits.device
        loss_rows = C.empty((n_rows,), torch.float32, dev)
        z_rows = C.empty((n_rows,), torch.float32, dev) if return_z else None
        stats = C.empty((n_rows, 2), torch.float32, dev)
        cross_entropy_forward(logits, target, loss_rows, stats, ignore_index, eps, softcap, z_coef, z_rows)
        n_valid = (target != ignore_index).sum().clamp_(min=1).to(torch.float32)
        if reduction == "none":
            loss, z_out = loss_rows, z_rows
        elif reduction == "sum":
            loss, z_out = loss_rows.sum(), (z_rows.sum() if return_z else None)
        else:  # mean over non-ignored rows; 0 (not NaN) when all are ignored
            loss, z_out = loss_rows.sum() / n_valid, (z_rows.sum() / n_valid if return_z else None)
        ctx.save_for_backward(logits, target, stats, n_valid)
        ctx.meta = (ignore_index, eps, softcap, reduction, z_coef)
        ctx.set_materialize_grads(False)
        return (loss, z_out) if return_z else loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z=None):
        logits, target, stats, n_valid = ctx.saved_tensors
        ignore_index, eps, softcap, reduction, z_coef = ctx.meta
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        n_rows, n_cols = logits.shape
        dev = logits.device
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=dev)
        has_gz = grad_z is not None and z_coef > 0.0
        if reduction == "mean":
            grad_loss = grad_loss.float() / n_valid
            if has_gz:
                grad_z = grad_z.float() / n_valid
        dx = C.empty((n_rows, n_cols), logits.dtype, dev)
        cross_entropy_backward(logits, target, stats, grad_loss, dx, ignore_index, eps, softcap, z_coef,
                               grad_z if has_gz else None)
        return dx, None, None, None, None, None, None, None


def check_options(op: str, reduction, label_smoothing, softcap, z_loss) -> None:
    """The loss options shared with fused_linear_cross_entropy, each with one clear sentence."""
    if reduction not in REDUCTIONS:
        raise C.KernelInputError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise C.KernelInputError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}.")
    if softcap is not None and not softcap > 0.0:
        raise C.KernelInputError(f"{op}: softcap must be None or > 0, got {softcap}.")
    if not z_loss >= 0.0:
        raise C.KernelInputError(f"{op}: z_loss must be >= 0, got {z_loss}.")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, softcap: float | None = None, reduction: str = "mean",
                  z_loss: float = 0.0, return_z_loss: bool = False):
    """Cross-entropy of ``logits`` [N, V] (fp32/fp16/bf16, last dim unit stride; a
    strided one is copied) against int64 ``target`` [N].

    Options as ``torch.nn.functional.cross_entropy`` (``ignore_index``,
    ``label_smoothing``, ``reduction``), plus Gemma-2's logit ``softcap`` and PaLM's
    ``z_loss`` coefficient. The loss is float32. ``reduction="mean"`` with every
    row ignored gives 0, where PyTorch gives NaN. With ``return_z_loss=True``
    returns ``(loss, z_loss_term)``, the z-loss term reduced like the loss (and
    already included in it); both are differentiable.
    """
    op = "cross_entropy"
    C.check_float(op, "logits", logits)
    if not isinstance(target, torch.Tensor):
        raise C.KernelInputError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}.")
    if target.dtype != torch.int64:
        raise C.KernelInputError(f"{op}: target has dtype {target.dtype}; it must be int64 (use target.long()).")
    if logits.dim() != 2:
        raise C.KernelInputError(f"{op}: logits must be 2-D [N, V], got shape {tuple(logits.shape)}; "
                                 "flatten the leading dims with logits.view(-1, V) first.")
    C.check_shape(op, "target", target, (logits.shape[0],))
    C.check_device(op, logits, target)
    if logits.shape[1] < 1:
        raise C.KernelInputError(f"{op}: the vocab (logits.shape[1]) must be at least 1.")
    check_options(op, reduction, label_smoothing, softcap, z_loss)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
    if logits.device.type == "cuda":
        torch._assert_async(~bad.any())  # like PyTorch's device-side assert, without a host sync
    elif bool(bad.any()):
        raise C.KernelInputError(f"{op}: target holds class indices outside [0, {logits.shape[1]}) "
                                 f"that are not ignore_index ({ignore_index}).")
    return _CrossEntropy.apply(logits, target, int(ignore_index), float(label_smoothing),
                               None if softcap is None else float(softcap), reduction, float(z_loss),
                               bool(return_z_loss))


# --------------------------------------------------------------------------- reference
def cross_entropy_reference(logits, target, ignore_index=-100, label_smoothing=0.0, softcap=None,
                            reduction="mean", z_loss=0.0, return_z_loss=False, compute_dtype=torch.float32):
    """PyTorch's cross-entropy (log_softmax + nll with label smoothing) in ``compute_dtype``,
    plus softcap and z-loss, with the kernel's all-ignored mean convention (0, not NaN)."""
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(compute_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    n_cols = z.shape[-1]
    logp = torch.log_softmax(z, dim=-1)
    valid = target != ignore_index
    nll = -logp.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = nll
    if label_smoothing > 0.0:
        smooth = -logp.sum(-1)
        loss = (1.0 - label_smoothing) * nll + (label_smoothing / n_cols) * smooth
    zterm = torch.zeros_like(loss)
    if z_loss > 0.0:
        zterm = z_loss * torch.logsumexp(z, dim=-1).pow(2)
        loss = loss + zterm
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    zterm = torch.where(valid, zterm, torch.zeros_like(zterm))
    if reduction == "sum":
        loss, zterm = loss.sum(), zterm.sum()
    elif reduction == "mean":
        n_valid = valid.sum().clamp(min=1).to(compute_dtype)
        loss, zterm = loss.sum() / n_valid, zterm.sum() / n_valid
    loss, zterm = loss.to(out_dtype), zterm.to(out_dtype)
    return (loss, zterm) if return_z_loss else loss


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    vocab = draw(S.dim(1, limits.max_vocab))
    # Forced small blocks (the looped online-softmax path) drawn more often than S.block alone does:
    # the looped path is where the online rescale lives.
    block = draw(st.one_of(st.sampled_from(limits.forced_blocks), S.block(limits)))
    rows_cap = max(1, min(limits.max_rows, limits.max_elements // vocab))
    if block is not None and C.INTERPRET:
        # The interpreter's cost is programs x vocab blocks: keep the looped cases short.
        rows_cap = max(1, min(rows_cap, 64 // -(-vocab // block)))
    rows = draw(S.dim(1, rows_cap))
    ignore_index = draw(st.sampled_from([-100, -100, 0, vocab - 1, -1]))
    # Hypothesis favours the first entry of a sampled_from: the lists lead with the value
    # that exercises the most code (smoothing on, softcap on, some rows ignored, ...).
    return {
        "rows": rows, "vocab": vocab,
        "ignore_index": ignore_index,
        # Fraction of rows masked with ignore_index: none, some, all.
        "ignored": draw(st.sampled_from([0.3, 0.0, 0.7, 1.0, 0.5])),
        "label_smoothing": draw(st.sampled_from([0.1, 0.0, 0.25, 0.0])),
        "softcap": draw(st.sampled_from([30.0, None, 5.0])),
        "reduction": draw(st.sampled_from(["mean", "mean", "sum", "none"])),
        "z_loss": draw(st.sampled_from([0.1, 0.0, 1e-4, 0.1])),
        "return_z_loss": draw(st.sampled_from([True, False])),
        "scale": draw(S.scale()),
        "strided": draw(st.sampled_from([True, False])),
        "grad": draw(st.sampled_from([True, True, True, False])),
        "_block": block,
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    logits = randn((p["rows"], p["vocab"]), dtype, device, gen, p["scale"])
    target = torch.randint(0, p["vocab"], (p["rows"],), generator=gen)
    masked = torch.rand((p["rows"],), generator=gen) < p["ignored"]
    target = torch.where(masked, torch.full_like(target, p["ignore_index"]), target).to(device)
    options = {k: p[k] for k in ("ignore_index", "label_smoothing", "softcap", "reduction", "z_loss",
                                 "return_z_loss")}
    return Inputs({"logits": maybe_strided(logits, p["strided"], gen), "target": target}, options,
                  ("logits",) if p["grad"] else ())


def _case(**over) -> dict:
    return {"rows": 4, "vocab": 64, "ignore_index": -100, "ignored": 0.0, "label_smoothing": 0.1, "softcap": None,
            "reduction": "mean", "z_loss": 1e-4, "return_z_loss": False, "scale": 1.0, "strided": False,
            "grad": True, "_block": None, **over}


EXAMPLES = (
    # fp16 with a vocab past 65,536: softmax values of ~1/V sit in fp16's subnormal range (below
    # 2^-14), where a gradient formed for an upstream of 1 and rounded before GradScaler's scale
    # lifts it keeps a few bits, or none. The upstream is 2^16 (the loss scale), as in training.
    Example(_case(vocab=65537, rows=3, _dy="dense", _dy_scale=16), "fp16 and a vocab past 65,536 under "
            "GradScaler's 2^16: gradients that flush to zero if formed before the scale", dtypes=(torch.float16,)),
    # A row of 64 vocab blocks: the online softmax's running max / sum over many blocks (a 16-bit
    # accumulator there moves the fp32 loss, judged at fp32, from a few blocks on).
    Example(_case(vocab=1024, rows=2, _block=16, softcap=30.0), "a row of 64 vocab blocks: a 16-bit "
            "accumulator in the online softmax", dtypes=(torch.bfloat16,)),
    # reduction='none' hands back one upstream value per row: read with its own stride, a
    # strided one (every other element) and the stride-0 one of loss_rows.mean().
    Example(_case(reduction="none", rows=6, _dy="strided"), "reduction='none' with a strided per-row upstream"),
    Example(_case(reduction="none", rows=6, _dy="expanded"), "reduction='none' with the stride-0 upstream of "
            "loss_rows.mean()"),
    # Cases a mutant of the suite once survived random draws with (parity/README.md, "Mutation
    # self-test"): each is taken on every run.
    Example(_case(rows=8, ignored=0.5), "reduction='mean' with ignored rows: the mean's divisor is the valid "
            "rows, in the forward and the gradient", dtypes=(torch.float32,)),
    Example(_case(softcap=5.0, scale=4.0), "softcap where tanh saturates: its chain factor 1 - tanh^2 in the "
            "gradient", dtypes=(torch.float32,)),
)


SPEC = KernelSpec(
    name="cross_entropy",
    fn=cross_entropy,
    reference=cross_entropy_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("loss", "z_loss"),
    grads=("logits",),
    options=("ignore_index", "label_smoothing", "softcap (Gemma-2)", "reduction: mean|sum|none",
             "z_loss (PaLM)", "return_z_loss"),
    summary="Cross-entropy with ignore_index, label smoothing, logit softcap and z-loss; online softmax "
            "over vocab blocks, gradient recomputed in the backward from the saved lse.",
    examples=EXAMPLES,
)
