"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` against
integer targets, WITHOUT materialising the [N, V] logits.

    logits = hidden @ weight.T + bias          # [N, V], in the activation dtype (HF's lm_head)
    loss   = cross_entropy(logits, target, ...) # every option of kernels/cross_entropy.py

The N tokens are processed in chunks of ``chunk_size`` rows. Per chunk: one torch
matmul (cuBLAS) writes that chunk's logits into a buffer in the activation dtype
(rounded like HF's lm_head output), the cross-entropy forward kernel (launched by
``cross_entropy_forward`` of kernels/cross_entropy.py) reduces each row to its loss and
its (max, log-sum-exp) statistics, and, when a gradient is needed, the cross-entropy
backward kernel (``cross_entropy_backward``) overwrites the chunk's logits IN PLACE with
dLoss/dlogits, which two more matmuls turn into the chunk's rows of dHidden and its
contribution to dWeight (and a column sum to dBias).

Memory model. Peak extra memory is ONE chunk of logits ([chunk, V] in the
activation dtype, reused as its own gradient) plus, when the weight (bias) needs a
gradient, the fp32 [V, H] ([V]) accumulator of dWeight (dBias), plus dHidden
([N, H], the size of hidden) and O(N) fp32 row statistics -- instead of the [N, V]
logits, their fp32 upcast and their gradient that the unfused HF path holds (tens
of GB at V = 128k-256k). (Off CUDA, or on a torch without ``addmm(out_dtype=)``, the
dWeight GEMM upcasts its two chunk operands to fp32: one more [chunk, V] fp32 copy.)

Default chunk size (``chunk_size=None``):
    rows = next_pow2(ceil(N / ceil(V / H)))    # Liger's rule: a chunk of logits about the size of hidden
    rows = max(rows, MIN_CHUNK_ROWS)           # 2048: fewer rows and the dWeight accumulator's traffic dominates
    rows = min(rows, CHUNK_BYTES // (V * elem))  # at most 512 MB of logits per chunk (at least 1 row)
    rows = min(rows, N)

Gradients. dWeight and dBias are accumulated across chunks in fp32 and cast to the
weight's dtype once at the end; dHidden rows come straight out of one matmul per
chunk (fp32 accumulation inside the GEMM, one rounding). Only the gradients of
inputs that require grad are computed.
  * ``reduction`` "mean" / "sum" (the training case), when the loss is the only
    differentiable output: the gradients are computed DURING the forward, chunk by
    chunk, for an upstream gradient of 1, and the backward only scales them by the
    upstream scalar (Liger's approach: no second pass of matmuls; the [N, H] dHidden
    and the fp32 dWeight accumulator are held from the forward to the backward).
  * ``reduction="none"`` (a per-row upstream gradient), ``return_z_loss=True`` with
    ``z_loss > 0`` (a second differentiable output whose upstream is unknown in the
    forward), and float16 inputs (fp16's 5-bit exponent flushes small dlogits formed
    for an upstream of 1 into its subnormal range, where rounding is absolute, not
    relative; the true upstream -- under mixed precision, GradScaler's loss scale --
    must be applied before dlogits are rounded to fp16): the backward recomputes each
    chunk's logits (one more matmul per chunk) from the saved inputs (bitwise the
    forward's: same GEMM, same shapes), takes the softmax from the saved per-row
    (max, log-sum-exp) statistics ([N, 2] fp32, the only tensor saved besides the
    inputs) and runs the same per-chunk gradient pass with the true upstream
    gradients.
  * Under ``torch.no_grad()`` (evaluation) no gradient work is done at all.

``num_items_in_batch`` (HF / TRL gradient accumulation): when given (an int, a float
or a 0-dim tensor; a tensor stays on the device, no host sync), the loss is the SUM
over non-ignored rows divided by ``num_items_in_batch`` -- exactly transformers'
``fixed_cross_entropy`` (``reduction="sum"`` then ``/ num_items_in_batch``). It
replaces the mean's divisor (the count of non-ignored rows): ``reduction`` must be
"mean" (HF's default) or "sum", which give the same result with it; "none" raises.
The z-loss term (included in the loss, and the returned one) is divided likewise.

The caller shifts labels (HF's ForCausalLMLoss shifts before the loss); ``target``
holds one class index (or ``ignore_index``) per row of ``hidden``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from . import _common as C
from . import _strategies as S
from ._harness import maybe_strided, randn
from ._registry import Example, Inputs, KernelSpec, Limits
from .cross_entropy import check_options, cross_entropy_backward, cross_entropy_forward, cross_entropy_reference

#: At most this many bytes of logits in one chunk (the default chunk size).
CHUNK_BYTES = 512 << 20
#: The default chunk has at least this many rows (when there are that many, and the
#: bytes cap allows). Every chunk reads and writes the whole fp32 [V, H] dWeight
#: accumulator (8 V H bytes) next to 6 rows V H matmul FLOPs, and re-reads the [V, H]
#: weight: below ~1k rows that traffic, not the math, sets the time. Measured on an
#: H100 (bf16, 8192 x 4096 @ 128256 x 4096, forward + backward): 97 ms at 256 rows,
#: 49 ms at 1024, 44 ms at 2048 and at 4096 (Liger 0.8.5: 65 ms) --
#: reports/kernels/2026-11-23-nvidia-h100-80gb-hbm3.md.
MIN_CHUNK_ROWS = 2048


# --------------------------------------------------------------------------- launchers
def default_chunk_size(n_rows: int, hidden: int, vocab: int, elem_size: int) -> int:
    """The default number of rows per chunk (see the module docstring)."""
    rows = C.next_pow2(max(1, C.cdiv(n_rows, C.cdiv(vocab, hidden))))
    rows = max(rows, MIN_CHUNK_ROWS)
    rows = min(rows, max(1, CHUNK_BYTES // (vocab * elem_size)))
    return max(1, min(rows, n_rows))


def _chunks(n_rows: int, chunk: int):
    """(start, end) of each chunk of rows; the last one may be partial."""
    for start in range(0, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


_OUT_DTYPE_MM: bool | None = None  # does this torch build have addmm(..., out_dtype=fp32) on CUDA?


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b in the activation dtype: the products are
    accumulated in fp32 and never rounded to a 16-bit dtype (not even per chunk). Public:
    fused_linear_preference accumulates its dWeight with it too."""
    global _OUT_DTYPE_MM
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE_MM is not False:
        try:  # cuBLAS: 16-bit operands, fp32 accumulation and output, beta = 1 (torch >= 2.8)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _OUT_DTYPE_MM = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM = False
    # Fallback (CPU, older torch): upcast the operands; exact products, fp32 accumulation.
    acc.addmm_(a.float(), b.float())


class _Opts:
    """The cross-entropy options, as the launches need them."""

    def __init__(self, vocab, ignore_index, eps, softcap, z_coef):
        self.vocab, self.ignore_index, self.eps, self.softcap, self.z_coef = vocab, ignore_index, eps, softcap, z_coef


def _fwd_chunk(o: _Opts, logits, target, loss_rows, z_rows, stats) -> None:
    cross_entropy_forward(logits, target, loss_rows, stats, o.ignore_index, o.eps, o.softcap, o.z_coef, z_rows)


def _grad_chunk(o: _Opts, logits, target, stats, g, gz) -> None:
    """Overwrite ``logits`` (this chunk's internal buffer) with dLoss/dlogits (``g``: one fp32
    upstream for every row, or the chunk's rows'; ``gz``: the z-loss output's, or None)."""
    cross_entropy_backward(logits, target, stats, g, logits, o.ignore_index, o.eps, o.softcap, o.z_coef, gz)


def _accumulate(dlogits, h_c, weight, start, end, dh, dw_acc, db_acc) -> None:
    """A chunk's gradients from its dlogits [rows, V]: rows of dHidden, and dW / dB added in fp32."""
    if dh is not None:
        torch.mm(dlogits, weight, out=dh[start:end])
    if dw_acc is not None:
        addmm_fp32(dw_acc, dlogits.t(), h_c)
    if db_acc is not None:
        db_acc += dlogits.sum(0, dtype=torch.float32)


def _scaled(t: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t * s (s a 0-dim fp32 upstream gradient) written straight into a new ``dtype`` tensor."""
    return torch.mul(t, s, out=C.empty(t.shape, dtype, t.device))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, num_items, ignore_index, eps, softcap, reduction, z_coef,
                return_z, chunk, grad_enabled):
        # needs_input_grad is set even under torch.no_grad() (evaluation): no gradient work then.
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        n_rows, n_hidden = hidden.shape
        vocab = weight.shape[0]
        dev = hidden.device
        o = _Opts(vocab, ignore_index, eps, softcap, z_coef)
        loss_rows = C.empty((n_rows,), torch.float32, dev)
        z_rows = C.empty((n_rows,), torch.float32, dev) if return_z else None
        stats = C.empty((n_rows, 2), torch.float32, dev)

        if num_items is not None:
            denom = num_items                       # HF fixed_cross_entropy: sum / num_items_in_batch
        elif reduction == "mean":
            denom = (target != ignore_index).sum().clamp_(min=1).to(torch.float32)
        else:
            denom = None
        # Gradients during the forward, for an upstream of 1 (scaled in the backward), when the
        # upstream is one scalar and the loss the only differentiable output -- and not in fp16,
        # whose narrow exponent range would flush small dlogits to (sub)normal garbage before the
        # upstream (e.g. GradScaler's loss scale) could lift them: fp16 forms dlogits in the backward.
        eager = ((need_h or need_w or need_b) and reduction != "none" and not (return_z and z_coef > 0.0)
                 and hidden.dtype != torch.float16)
        dh = dw_acc = db_acc = g = None
        if eager:
            g = (1.0 / denom).reshape(1) if denom is not None else torch.ones((1,), dtype=torch.float32, device=dev)
            dh = C.empty((n_rows, n_hidden), hidden.dtype, dev) if need_h else None
            dw_acc = torch.zeros((vocab, n_hidden), dtype=torch.float32, device=dev) if need_w else None
            db_acc = torch.zeros((vocab,), dtype=torch.float32, device=dev) if need_b else None

        for start, end in _chunks(n_rows, chunk):
            h_c = hidden[start:end]
            logits = F.linear(h_c, weight, bias)    # [rows, V] in the activation dtype, as HF's lm_head
            _fwd_chunk(o, logits, target[start:end], loss_rows[start:end],
                       None if z_rows is None else z_rows[start:end], stats[start:end])
            if eager:
                _grad_chunk(o, logits, target[start:end], stats[start:end], g, None)
                _accumulate(logits, h_c, weight, start, end, dh, dw_acc, db_acc)
            del logits

        if reduction == "none":
            loss, z_out = loss_rows, z_rows
        elif denom is None:  # sum
            loss, z_out = loss_rows.sum(), (z_rows.sum() if return_z else None)
        else:  # mean over non-ignored rows (0, not NaN, when all are ignored), or sum / num_items
            loss, z_out = loss_rows.sum() / denom, (z_rows.sum() / denom if return_z else None)

        if eager:
            ctx.save_for_backward(dh, dw_acc, db_acc)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, stats, denom)
        ctx.meta = (eager, o, reduction, chunk, weight.dtype, bias.dtype if bias is not None else None)
        ctx.set_materialize_grads(False)
        return (loss, z_out) if return_z else loss

    @staticmethod
    def backward(ctx, grad_loss, grad_z=None):
        eager, o, reduction, chunk, w_dtype, b_dtype = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        none = (None,) * 10
        if not (need_h or need_w or need_b):
            return (None, None, None) + none
        if eager:
            dh, dw_acc, db_acc = ctx.saved_tensors
            dev = (dh if dh is not None else dw_acc if dw_acc is not None else db_acc).device
            s = grad_loss.float() if grad_loss is not None else torch.zeros((), dtype=torch.float32, device=dev)
            # One fused multiply-and-cast each (fp32 math, one rounding, no fp32 [V, H] temporary).
            return (_scaled(dh, s, dh.dtype) if need_h else None,
                    _scaled(dw_acc, s, w_dtype) if need_w else None,
                    _scaled(db_acc, s, b_dtype) if need_b else None) + none

        hidden, weight, bias, target, stats, denom = ctx.saved_tensors
        n_rows, n_hidden = hidden.shape
        dev = hidden.device
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=dev)
        has_gz = grad_z is not None and o.z_coef > 0.0
        g = grad_loss.float()
        gz = grad_z.float() if has_gz else None
        if denom is not None:
            g = g / denom
            gz = gz / denom if has_gz else None
        g = g.reshape(1) if g.dim() == 0 else g.reshape(-1).contiguous()
        gz = (gz.reshape(1) if gz.dim() == 0 else gz.reshape(-1).contiguous()) if has_gz else g
        dh = C.empty((n_rows, n_hidden), hidden.dtype, dev) if need_h else None
        dw_acc = torch.zeros((weight.shape[0], n_hidden), dtype=torch.float32, device=dev) if need_w else None
        db_acc = torch.zeros((weight.shape[0],), dtype=torch.float32, device=dev) if need_b else None
        for start, end in _chunks(n_rows, chunk):
            h_c = hidden[start:end]
            logits = F.linear(h_c, weight, bias)    # recomputed: bitwise the forward's chunk
            g_c = g if g.numel() == 1 and reduction != "none" else g[start:end]
            gz_c = gz if gz.numel() == 1 and reduction != "none" else gz[start:end]
            _grad_chunk(o, logits, target[start:end], stats[start:end], g_c, gz_c if has_gz else None)
            _accumulate(logits, h_c, weight, start, end, dh, dw_acc, db_acc)
            del logits
        return (dh, dw_acc.to(w_dtype) if need_w else None, db_acc.to(b_dtype) if need_b else None) + none


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, softcap: float | None = None,
                               reduction: str = "mean", z_loss: float = 0.0, return_z_loss: bool = False,
                               num_items_in_batch=None, chunk_size: int | None = None):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target``, chunk by chunk.

    ``hidden`` [..., H] (flattened to [N, H]), ``weight`` [V, H] (the lm_head),
    optional ``bias`` [V], all of one float dtype; ``target`` int64 of shape
    ``hidden.shape[:-1]``. Options as :func:`workbench.kernels.cross_entropy.cross_entropy`
    (``ignore_index``, ``label_smoothing``, Gemma-2 ``softcap``, ``reduction``, PaLM
    ``z_loss``, ``return_z_loss``), plus ``num_items_in_batch`` (HF's gradient
    accumulation divisor: sum over non-ignored rows / num_items_in_batch; needs
    ``reduction`` "mean" or "sum") and ``chunk_size`` (rows per chunk; None picks
    the default rule of the module docstring). The loss is float32; with
    ``reduction="none"`` it has shape ``hidden.shape[:-1]``. With
    ``return_z_loss=True`` returns ``(loss, z_loss_term)``.
    """
    op = "fused_linear_cross_entropy"
    C.check_float(op, "hidden", hidden)
    C.check_float(op, "weight", weight)
    if bias is not None:
        C.check_float(op, "bias", bias)
    C.check_same_dtype(op, hidden=hidden, weight=weight, bias=bias)
    if not isinstance(target, torch.Tensor):
        raise C.KernelInputError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}.")
    if target.dtype != torch.int64:
        raise C.KernelInputError(f"{op}: target has dtype {target.dtype}; it must be int64 (use target.long()).")
    if hidden.dim() < 2:
        raise C.KernelInputError(f"{op}: hidden must be [..., H] with at least 2 dims, got shape "
                                 f"{tuple(hidden.shape)}.")
    if weight.dim() != 2:
        raise C.KernelInputError(f"{op}: weight must be 2-D [V, H], got shape {tuple(weight.shape)}.")
    n_hidden, vocab = hidden.shape[-1], weight.shape[0]
    C.check_shape(op, "weight", weight, (vocab, n_hidden))
    if bias is not None:
        C.check_shape(op, "bias", bias, (vocab,))
    C.check_shape(op, "target", target, tuple(hidden.shape[:-1]))
    C.check_device(op, hidden, weight, bias, target,
                   num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None)
    if vocab < 1:
        raise C.KernelInputError(f"{op}: the vocab (weight.shape[0]) must be at least 1.")
    check_options(op, reduction, label_smoothing, softcap, z_loss)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise C.KernelInputError(f"{op}: chunk_size must be None or an int >= 1, got {chunk_size!r}.")
    denom = None
    if num_items_in_batch is not None:
        if reduction == "none":
            raise C.KernelInputError(f"{op}: num_items_in_batch divides the summed loss; it needs reduction "
                                     "'mean' or 'sum', not 'none'.")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise C.KernelInputError(f"{op}: num_items_in_batch must be a number or a 1-element tensor, "
                                         f"got shape {tuple(num_items_in_batch.shape)}.")
            denom = num_items_in_batch.detach().reshape(()).to(device=hidden.device, dtype=torch.float32)
        else:
            if not float(num_items_in_batch) > 0:
                raise C.KernelInputError(f"{op}: num_items_in_batch must be > 0, got {num_items_in_batch}.")
            denom = torch.tensor(float(num_items_in_batch), dtype=torch.float32, device=hidden.device)

    lead = tuple(hidden.shape[:-1])
    h2 = C.rows_view(op, "hidden", hidden)
    t2 = target.reshape(-1).contiguous()
    bad = (t2 != ignore_index) & ((t2 < 0) | (t2 >= vocab))
    if hidden.device.type == "cuda":
        torch._assert_async(~bad.any())  # like PyTorch's device-side assert, without a host sync
    elif bool(bad.any()):
        raise C.KernelInputError(f"{op}: target holds class indices outside [0, {vocab}) "
                                 f"that are not ignore_index ({ignore_index}).")
    n_rows = h2.shape[0]
    chunk = chunk_size or default_chunk_size(n_rows, n_hidden, vocab, hidden.element_size())
    out = _FusedLinearCrossEntropy.apply(
        h2, weight, bias, t2, denom, int(ignore_index), float(label_smoothing),
        None if softcap is None else float(softcap), reduction, float(z_loss), bool(return_z_loss),
        max(1, min(int(chunk), max(n_rows, 1))), torch.is_grad_enabled())
    if reduction == "none":
        out = tuple(o.view(lead) if o is not None else None for o in out) if return_z_loss else out.view(lead)
    return out


# --------------------------------------------------------------------------- reference
def fused_linear_cross_entropy_reference(hidden, weight, target, bias=None, ignore_index=-100,
                                         label_smoothing=0.0, softcap=None, reduction="mean", z_loss=0.0,
                                         return_z_loss=False, num_items_in_batch=None, chunk_size=None,
                                         compute_dtype=torch.float32):
    """HF's lm_head + loss: logits in the activation dtype (``F.linear``, fp32 accumulation,
    one rounding; unrounded fp64 in the exact pass), then PyTorch's cross-entropy in
    ``compute_dtype``, then transformers' ``fixed_cross_entropy`` rule for num_items_in_batch.

    Outside the exact pass the logits' VALUES come from ``F.linear`` on the same row chunks
    as the kernel's (``chunk_size``, or the default rule): the rounding of a logit to bf16
    depends on the GEMM's shape (cuBLAS picks its summation order by shape), and a logit
    whose fp32 sum sits at a rounding boundary would otherwise flip one bf16 ulp between
    two equally valid orders -- noise larger than everything the test is about (seen on an
    H100: 2.5e-6 relative on an fp32 loss). The GRADIENT flows through the unchunked
    product in ``compute_dtype``, with dlogits rounded to the activation dtype as in HF."""
    cd = compute_dtype
    if cd == torch.float64:
        logits = F.linear(hidden.to(cd), weight.to(cd), None if bias is None else bias.to(cd))
    else:
        # HF's backward rounds dlogits to the activation dtype (the backward of the cast
        # to it) before the dHidden/dWeight/dBias matmuls and sums; so does the kernel.
        full = F.linear(hidden.to(cd), weight.to(cd), None if bias is None else bias.to(cd)).to(hidden.dtype).to(cd)
        with torch.no_grad():
            h2 = hidden.reshape(-1, hidden.shape[-1])
            n = h2.shape[0]
            chunk = chunk_size or default_chunk_size(n, h2.shape[1], weight.shape[0], hidden.element_size())
            chunk = max(1, min(int(chunk), max(n, 1)))
            # Its own loop, not the kernel's _chunks: a reference shares no code a bug could hide in.
            rounded = torch.cat([F.linear(h2[a:a + chunk], weight, bias) for a in range(0, n, chunk)])
            rounded = rounded.reshape(full.shape).to(cd)
        logits = full + (rounded - full).detach()
    out = cross_entropy_reference(logits, target, ignore_index, label_smoothing, softcap,
                                  "sum" if num_items_in_batch is not None else reduction, z_loss, return_z_loss,
                                  compute_dtype=cd)
    if num_items_in_batch is not None:
        out = tuple(o / num_items_in_batch for o in out) if return_z_loss else out / num_items_in_batch
    return out


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    block = draw(S.block(limits))
    vocab = draw(S.dim(1, limits.max_vocab))
    hidden_cap = 64 if limits.name == "ci" else limits.max_hidden
    # The weight (and its fp64 copies in the exact pass) stays within 4x the element budget.
    hidden = draw(S.dim(1, max(1, min(hidden_cap, 4 * limits.max_elements // vocab))))
    batch = draw(st.sampled_from([1, 1, 2]))
    rows_cap = max(1, min(limits.max_rows, limits.max_elements // vocab) // batch)
    if block is not None and C.INTERPRET:
        # The interpreter's cost is programs x vocab blocks (twice: loss and gradient).
        rows_cap = max(1, min(rows_cap, 96 // (batch * -(-vocab // block))))
    rows = draw(S.dim(1, rows_cap))
    n = batch * rows
    # Several chunks with a partial last one (n // 2 + 1), many (3, 1), the default rule (one chunk here).
    chunk = draw(st.sampled_from(["half", 3, 1, "half", None]))
    chunk = n // 2 + 1 if chunk == "half" else chunk
    reduction = draw(st.sampled_from(["mean", "none", "sum", "mean"]))
    # num_items_in_batch = factor x (number of non-ignored rows), as an int or a 0-dim tensor.
    items = draw(st.sampled_from([2.5, None, 1.0])) if reduction != "none" else None
    return {
        "batch": batch, "rows": rows, "hidden": hidden, "vocab": vocab, "chunk_size": chunk,
        "bias": draw(st.sampled_from([True, False])),
        "ignore_index": draw(st.sampled_from([-100, -100, 0, vocab - 1, -1])),
        "ignored": draw(st.sampled_from([0.3, 0.0, 0.7, 1.0, 0.5])),
        "label_smoothing": draw(st.sampled_from([0.1, 0.0, 0.25, 0.0])),
        "softcap": draw(st.sampled_from([30.0, None, 5.0])),
        "reduction": reduction,
        "z_loss": draw(st.sampled_from([0.1, 0.0, 1e-4, 0.1])),
        "return_z_loss": draw(st.sampled_from([False, True])),
        "items_factor": items,
        "items_tensor": draw(st.booleans()),
        "scale": draw(S.scale()),
        "strided": draw(st.sampled_from([True, False])),
        "grad_h": draw(st.sampled_from([True, True, False])),
        "grad_w": draw(st.sampled_from([True, True, False])),
        "grad_b": draw(st.sampled_from([True, False])),
        "_block": block,
    }


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    lead = (p["rows"],) if p["batch"] == 1 else (p["batch"], p["rows"])
    h = p["hidden"]
    hidden = randn((*lead, h), dtype, device, gen, p["scale"])
    # An lm_head's scale: logits ~ scale * N(0, 1).
    weight = randn((p["vocab"], h), dtype, device, gen, h ** -0.5)
    bias = randn((p["vocab"],), dtype, device, gen, p["scale"]) if p["bias"] else None
    target = torch.randint(0, p["vocab"], lead, generator=gen)
    masked = torch.rand(lead, generator=gen) < p["ignored"]
    target = torch.where(masked, torch.full_like(target, p["ignore_index"]), target)
    items = None
    if p["items_factor"] is not None:
        items = max(1, round(p["items_factor"] * int((target != p["ignore_index"]).sum())))
        if p["items_tensor"]:
            items = torch.tensor(items, dtype=torch.int64, device=device)
    options = {k: p[k] for k in ("ignore_index", "label_smoothing", "softcap", "reduction", "z_loss",
                                 "return_z_loss", "chunk_size")}
    if not isinstance(items, torch.Tensor):  # a plain number is an option, a tensor an input
        options["num_items_in_batch"], items = items, None
    grads = tuple(n for n, on in (("hidden", p["grad_h"]), ("weight", p["grad_w"]),
                                  ("bias", p["grad_b"] and p["bias"])) if on)
    return Inputs({"hidden": maybe_strided(hidden, p["strided"], gen), "weight": weight,
                   "target": target.to(device), "bias": bias,
                   **({"num_items_in_batch": items} if items is not None else {})}, options, grads)


def _case(**over) -> dict:
    return {"batch": 1, "rows": 8, "hidden": 16, "vocab": 64, "chunk_size": None, "bias": False,
            "ignore_index": -100, "ignored": 0.0, "label_smoothing": 0.0, "softcap": None, "reduction": "mean",
            "z_loss": 0.0, "return_z_loss": False, "items_factor": None, "items_tensor": False, "scale": 1.0,
            "strided": False, "grad_h": True, "grad_w": True, "grad_b": False, "_block": None, **over}


EXAMPLES = (
    # HF's num_items_in_batch counts the tokens of every accumulated micro-batch: the loss is
    # divided by thousands, so every dlogit formed for an upstream of 1 sits in fp16's
    # subnormal range (below 2^-14) and keeps a few bits; GradScaler's 2^16 (the upstream
    # here) lifts PyTorch's back to full precision. The reason fp16 forms dlogits in the backward.
    Example(_case(reduction="sum", items_factor=4096.0, _dy="dense", _dy_scale=16), "fp16, num_items_in_batch "
            "in the thousands, GradScaler's 2^16: dlogits formed for an upstream of 1 flush",
            dtypes=(torch.float16,)),
    Example(_case(vocab=32768, rows=4, _dy="dense", _dy_scale=16), "fp16 and a 32k vocab under GradScaler's "
            "2^16: softmax values of 1/V are fp16 subnormals", dtypes=(torch.float16,)),
    # dW accumulated over 96 chunks (one row each): a 16-bit accumulator shows from about a hundred
    # additions, which the ci profile's random draws (<= 48 rows) reach rarely.
    Example(_case(rows=96, chunk_size=1, vocab=16, hidden=8), "dW summed over 96 chunks: a 16-bit "
            "accumulator across chunks", dtypes=(torch.bfloat16,)),
    # Cases a mutant once survived random draws with: taken on every run.
    Example(_case(reduction="none", chunk_size=2, bias=True, grad_b=True, _dy="dense"), "reduction='none' over "
            "four chunks, with a bias: each chunk reads its own rows' upstream, and recomputes its logits with the "
            "bias", dtypes=(torch.float32,)),
)


SPEC = KernelSpec(
    name="fused_linear_cross_entropy",
    fn=fused_linear_cross_entropy,
    reference=fused_linear_cross_entropy_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("loss", "z_loss"),
    grads=("hidden", "weight", "bias"),
    options=("ignore_index", "label_smoothing", "softcap (Gemma-2)", "reduction: mean|sum|none",
             "z_loss (PaLM)", "return_z_loss", "num_items_in_batch (HF gradient accumulation)", "chunk_size"),
    summary="lm_head matmul + cross-entropy chunk by chunk: never materialises the [N, V] logits; dW/dB "
            "accumulated in fp32; gradients computed in the forward for mean/sum.",
    examples=EXAMPLES,
)
