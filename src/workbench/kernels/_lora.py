"""Shared host code of the LoRA kernels (``lora_o``, ``lora_qkv``, ``lora_mlp``).

Not a kernel module (the underscore keeps it out of the registry). It holds what
the three kernels share and what no planted bug needs to reach: the frozen-weight
protocol, input validation, the dropout-mask plumbing, the reference of one
LoRA linear (PEFT's semantics, rounded where the kernels round), and the strategy /
input builders.

The LoRA math itself (the forward and backward building blocks of one LoRA
linear, and their Triton kernels) lives in ``_lora_ops.py``, which the three
kernels import; planted bugs reach it there (a mutant may name the module it
patches, ``parity/mutants/__init__.py``).

Semantics (PEFT's ``LoraLayer`` on a frozen ``nn.Linear``)::

    y = x W^T (+ b) + s * (dropout(x) A^T) B^T

W [out, in] frozen, b [out] frozen (optional; Qwen2's q/k/v), A [r, in] and
B [out, r] trainable, ``s = alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA):
the kernels take ``scaling`` as a float and do not care which.

Frozen weights: ``W`` is either a tensor (which must not require grad) or any
object with a ``.dequantize() -> Tensor`` method (an NF4-quantised weight). A
dequantised copy is made in the forward and again in the backward (only when dX
is needed) and is dropped right after use: it is never kept alive in between.

Dropout: ``dropout`` is p; PEFT's ``nn.Dropout`` keeps an element with
probability 1 - p and scales kept ones by 1 / (1 - p). The mask is explicit: a
bool ``keep`` tensor per LoRA linear (True = kept), passed in by the caller so
that a kernel and its reference see the same mask; when it is not passed, the
public functions draw it with ``torch.rand(..., generator=generator) >= p``.
Each LoRA linear draws its own mask, as PEFT's separate dropout modules do.
With ``dropout=0`` no mask exists and the LoRA branch reads x itself.

Mixed precision (QLoRA under autocast): x may be float32 while the layer (W, A, B
and bias) is bf16 or fp16. This is PEFT's 4-bit LoRA linear under the Trainer's
autocast after ``prepare_model_for_kbit_training``, which leaves the residual
stream and the norms' outputs in fp32. There bitsandbytes casts x (and its bias)
to the compute dtype for the base product and returns that product upcast to
x's fp32; PEFT's dropout runs on the fp32 x, autocast casts its result (and A,
B) for lora_A and lora_B, and PEFT adds the 16-bit LoRA term to the fp32 base
output IN FP32. The kernels then do the same: every product in the layer's
dtype (the scaling folded into its GEMM, ``_lora_ops.py``), the two terms summed
in fp32 and returned as fp32, and the input gradient (each branch's 16-bit
gradient, upcast; the LoRA branches of several projections of one input as one
term, their sum rounded once, ``_lora_ops.py``) summed in fp32. Summing in the
layer's dtype instead would round away an adapter's first small updates: a term
below half an ulp of the base output is lost exactly, where PEFT's fp32 sum keeps
it (measured on an H200 in QLoRA training; the parity harness's ``delta``
comparison checks it, see ``ablate_adapters``).
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from . import _common as C
from . import _strategies as S
from ._harness import maybe_strided, randn
from ._lora_ops import packed
from ._registry import Limits

RANKS = (1, 2, 8, 16)
ALPHAS = (1.0, 8.0, 16.0, 32.0)
DROPOUTS = (0.0, 0.0, 0.0, 0.1, 0.5)


#: The layer dtypes an fp32 x may meet (the mixed-precision mode above).
MIXED_LAYER_DTYPES = (torch.bfloat16, torch.float16)


def layer_dtype(op: str, x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in (the adapter's): x's own, or a 16-bit one under
    an fp32 x (the mixed-precision mode, module docstring)."""
    if x.dtype == A.dtype or (x.dtype == torch.float32 and A.dtype in MIXED_LAYER_DTYPES):
        return A.dtype
    raise C.KernelInputError(f"{op}: x is {x.dtype} but the layer (A, B, W) is {A.dtype}; they must share one "
                             "dtype, or x be float32 with a bfloat16/float16 layer (QLoRA under autocast). "
                             "Cast them first.")


# --------------------------------------------------------------------------- frozen weights
def is_dense(W) -> bool:
    return isinstance(W, torch.Tensor)


def dense(op: str, name: str, W, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """The frozen weight as a tensor: ``W`` itself, or a fresh ``W.dequantize()``
    (the caller drops it after its matmul)."""
    if isinstance(W, torch.Tensor):
        return W
    w = W.dequantize()
    if not isinstance(w, torch.Tensor):
        raise C.KernelInputError(f"{op}: {name}.dequantize() returned {type(w).__name__}, not a tensor.")
    if w.dtype != dtype:
        raise C.KernelInputError(f"{op}: {name}.dequantize() gives dtype {w.dtype}, but the activations are "
                                 f"{dtype}; dequantize to the activation dtype.")
    C.check_shape(op, f"{name}.dequantize()", w, shape)
    return w


def inverse_keep(p: float) -> float:
    """The scale of kept elements, 1 / (1 - p)."""
    return 1.0 / (1.0 - p)


# --------------------------------------------------------------------------- validation
def check_frozen_weight(op: str, name: str, W, x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``dtype``: the layer's (defaults to x's), which a quantized W must dequantize to."""
    dtype = dtype or x.dtype
    if isinstance(W, torch.Tensor):
        C.check_float(op, name, W)
        if W.requires_grad:
            raise C.KernelInputError(
                f"{op}: the base weight {name} requires grad, but LoRA keeps it frozen and never computes its "
                f"gradient; call {name}.requires_grad_(False) (train A and B only).")
        return
    if not callable(getattr(W, "dequantize", None)):
        raise C.KernelInputError(f"{op}: {name} must be a tensor or an object with a .dequantize() method "
                                 f"(a quantized weight), got {type(W).__name__}.")
    w_dtype = getattr(W, "dtype", None)
    if isinstance(w_dtype, torch.dtype) and w_dtype != dtype:
        raise C.KernelInputError(f"{op}: {name} dequantizes to dtype {w_dtype}, but the layer computes in {dtype}; "
                                 "quantize the weight from the activation dtype.")
    device = getattr(W, "device", None)
    if isinstance(device, torch.device) and device != x.device:
        raise C.KernelInputError(f"{op}: {name} is on {device} but x is on {x.device}; use one device.")


def check_linear(op: str, x: torch.Tensor, names: tuple[str, str, str], W, A, B,
                 bias_name: str | None = None, bias=None, x_name: str = "x") -> tuple[int, int]:
    """Validate one LoRA linear on input x (``x_name`` in messages); returns (out_features, rank)."""
    w_name, a_name, b_name = names
    if x.dim() == 0:
        raise C.KernelInputError(f"{op}: x must have at least one dimension ([..., in]).")
    C.check_float(op, a_name, A)
    C.check_float(op, b_name, B)
    if bias is not None:
        C.check_float(op, bias_name, bias)
    dense_w = W if isinstance(W, torch.Tensor) else None
    if dense_w is not None:
        C.check_float(op, w_name, dense_w)
    C.check_same_dtype(op, **{w_name: dense_w, a_name: A, b_name: B, (bias_name or "bias"): bias})
    check_frozen_weight(op, w_name, W, x, layer_dtype(op, x, A))
    C.check_device(op, x, dense_w, A, B, bias)
    if A.dim() != 2 or B.dim() != 2:
        raise C.KernelInputError(f"{op}: {a_name} and {b_name} must be 2-D ([r, in] and [out, r]), got "
                                 f"{tuple(A.shape)} and {tuple(B.shape)}.")
    d_in = x.shape[-1]
    r, out = A.shape[0], B.shape[0]
    C.check_shape(op, a_name, A, (r, d_in))
    C.check_shape(op, b_name, B, (out, r))
    w_shape = getattr(W, "shape", None)
    if w_shape is not None and tuple(w_shape) != (out, d_in):
        raise C.KernelInputError(f"{op}: {w_name} has shape {tuple(w_shape)}, expected {(out, d_in)} "
                                 f"(out from {b_name}, in from {x_name}).")
    if bias is not None:
        C.check_shape(op, bias_name, bias, (out,))
        if bias.requires_grad:
            raise C.KernelInputError(f"{op}: the base bias {bias_name} requires grad, but it is frozen with the "
                                     f"base weight; call {bias_name}.requires_grad_(False).")
    return out, r


def check_options(op: str, scaling, dropout) -> None:
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise C.KernelInputError(f"{op}: scaling must be a finite float (alpha / r, or alpha / sqrt(r) for "
                                 f"rsLoRA), got {scaling!r}.")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise C.KernelInputError(f"{op}: dropout must be a probability in [0, 1), got {dropout!r}.")


def keep_mask(op: str, name: str, mask, dropout: float, shape: tuple[int, ...], x: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor | None:
    """The bool keep-mask of one or several LoRA linears (``shape``), or None
    when dropout is off. Drawn here when the caller passes none."""
    if dropout == 0.0:
        if mask is not None:
            raise C.KernelInputError(f"{op}: {name} was given but dropout is 0; pass dropout=p > 0 with it.")
        return None
    if mask is None:
        return torch.rand(shape, generator=generator, device=x.device) >= dropout
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise C.KernelInputError(f"{op}: {name} must be a bool tensor (True = kept), got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)}.")
    C.check_device(op, x, mask)
    C.check_shape(op, name, mask, shape)
    return mask


def rows2(keep: torch.Tensor | None, n_cols: int) -> torch.Tensor | None:
    """A mask as [rows, n_cols] with a unit last stride (bool, as stored)."""
    if keep is None:
        return None
    keep = keep if keep.is_contiguous() else keep.contiguous()
    return keep.view(-1, n_cols)


# --------------------------------------------------------------------------- reference
#: The chains of roundings the reference can follow (``linear_reference``'s ``numerics``).
#: "folded" is the kernels' (``_lora_ops.py``), "peft" is PEFT's own, kept to show that
#: the kernels' chain is at least as accurate against fp64 (``parity/test_lora_numerics.py``).
NUMERICS = ("folded", "peft")


def linear_reference(h: torch.Tensor, W, A, B, scaling: float, bias, keep, dropout: float,
                     cd: torch.dtype, numerics: str = "folded") -> torch.Tensor:
    """One PEFT LoRA linear, ``base_layer(h) + lora_B(lora_A(dropout(h))) * scaling``,
    on ``h`` in the activation dtype dt, computed in ``cd`` and rounded to the layer
    dtype lo (A's; dt itself unless h is fp32 under a 16-bit layer) where the kernels
    round: differentiable by autograd, whose backward then rounds where the kernels'
    backward does. Returns the output in dt. In the exact pass dt == lo == cd == fp64
    and no step rounds.

    ``numerics="folded"`` (the kernels', ``_lora_ops.py``): the scaling is the GEMM's
    alpha and a sum with an earlier term its beta, so the base output plus the scaled
    LoRA term rounds once, and so do dB = s dy^T xa, dxa = s dy B and the input
    gradient's sum of its two terms (round(dy W) + dxa A). Exceptions: the dropout's
    backward rounds its masked gradient before the sum, and in the mixed mode (module
    docstring) the scaled term and each branch's input gradient round to lo, then sum
    in cd (fp32), rounded once to dt.

    ``numerics="peft"``: PEFT's chain, every nn.Linear output, the scaling, the dropout
    and the sum rounded, and in the backward every input gradient of those ops (each
    branch's gradient of h rounded before autograd sums them).

    Both: the base reads h cast to lo (bitsandbytes, in the mixed mode), the dropout
    runs on h in dt and its result is cast to lo (autocast, for lora_A)."""
    return linears_reference(h, ((W, A, B, bias, keep),), scaling, dropout, cd, numerics)[0]


def linears_reference(h: torch.Tensor, linears, scaling: float, dropout: float, cd: torch.dtype,
                      numerics: str = "folded") -> tuple[torch.Tensor, ...]:
    """Several PEFT LoRA linears of one input h (q/k/v, gate/up), ``linears`` a sequence of
    (W, A, B, bias, keep): each output as ``linear_reference``'s, and h's gradient as the
    kernels form it.

    Folded numerics without a dropout mask (the kernels' fused path): one node reads h for
    every branch, so autograd sums the branches' gradients in cd and rounds once to dt.
    The LoRA branches share their input too (h itself, or its cast to lo in the mixed
    mode), so their terms sum in cd before any rounding, as the kernels' single GEMM
    dx += dxaT_all^T cat(A) sums them in its fp32 accumulator: in a 16-bit dx one
    rounding, dx = round(round(dy_1 W_1) + ... + round(dy_n W_n) + sum_i dxa_i A_i); in
    the mixed mode's fp32 dx the fp32 sum of the 16-bit base terms and the LoRA terms'
    sum rounded once to lo. The kernels add the base terms one GEMM epilogue after another
    (dx = round(round(dy_1 W_1) + dy_2 W_2), ...): each partial sum rounded where the
    reference rounds each term, the same number of roundings of terms of the same size.

    With a mask (each branch its own dropped-out input), or PEFT's numerics, each linear
    reads h through its own node: its input gradient (both terms) is rounded to dt, and
    autograd sums the linears' gradients in dt, as the kernels add each projection's terms
    into dx in turn (PEFT: as autograd sums its modules' gradients)."""
    if numerics not in NUMERICS:
        raise ValueError(f"linear_reference: numerics must be one of {NUMERICS}, got {numerics!r}")
    shared = numerics == "folded" and all(lin[4] is None for lin in linears)
    if not shared and len(linears) > 1:
        return tuple(linears_reference(h, (lin,), scaling, dropout, cd, numerics)[0] for lin in linears)
    dt, lo = h.dtype, linears[0][1].dtype
    # One node for every branch's input gradient: they sum in cd and round once to dt.
    # A branch whose gradient the kernels round first reads it through .to(lo/dt).to(cd),
    # an exact cast forward whose backward rounds the gradient.
    hc = h.to(cd)
    hl = _lora_input(hc, None, dropout, dt, lo, cd, numerics) if shared else None
    return tuple(_linear(hc, hl if shared else _lora_input(hc, keep, dropout, dt, lo, cd, numerics),
                         W, A, B, scaling, bias, cd, numerics, dt, lo)
                 for W, A, B, bias, keep in linears)


def _lora_input(hc, keep, dropout: float, dt, lo, cd, numerics: str):
    """The LoRA branch's input hd (lora_A's), from hc = h in cd."""
    hd = hc if (numerics == "folded" and keep is None) else hc.to(dt).to(cd)
    if keep is not None:
        hd = (hd * keep.to(cd) * inverse_keep(dropout)).to(dt).to(cd)
    if lo != dt:
        hd = hd.to(lo).to(cd)  # autocast's cast of lora_A's input
    return hd


def _linear(hc, hd, W, A, B, scaling: float, bias, cd, numerics: str, dt, lo):
    """One linear's output in dt, its base on hc (h in cd), its LoRA branch on hd."""
    w = W if is_dense(W) else W.dequantize()
    base = hc.to(lo).to(cd) @ w.to(cd).T
    if bias is not None:
        base = base + bias.to(cd)  # F.linear(x, W, b): one addmm, one rounding
    base = base.to(lo).to(cd)
    xa = (hd @ A.to(cd).T).to(lo).to(cd)
    if numerics == "peft":
        lora = (xa @ B.to(cd).T).to(lo).to(cd)
        lora = (lora * scaling).to(lo).to(cd)
    else:
        lora = scaling * (xa @ B.to(cd).T)
        if lo != dt:
            lora = lora.to(lo).to(cd)  # the mixed mode sums two 16-bit terms in fp32
    return (base + lora).to(dt)


# --------------------------------------------------------------------------- strategies
def dim_cap(limits: Limits) -> int:
    """Feature dims of the LoRA cases: 64 under ci (the matmuls are torch's, but
    the elementwise Triton kernels run in the interpreter), larger on a GPU."""
    return max(16, limits.max_hidden // 5)


@st.composite
def lora_config(draw, dims: list[int]) -> dict:
    """Rank (<= every dim), scaling alpha / r or rsLoRA's alpha / sqrt(r), dropout p."""
    r = draw(st.sampled_from([r for r in RANKS if r <= min(dims)]))
    alpha = draw(st.sampled_from(ALPHAS))
    rslora = draw(st.booleans())
    return {"r": r, "alpha": alpha, "rslora": rslora,
            "scaling": alpha / (math.sqrt(r) if rslora else r),
            "dropout": draw(st.sampled_from(DROPOUTS))}


@st.composite
def rows(draw, limits: Limits, widest: int, cap: int | None = None) -> tuple[int, int]:
    """(batch, tokens per batch): tokens incl. 1 and odd counts, within the budget."""
    batch = draw(st.sampled_from([1, 1, 2, 3]))
    hi = min(limits.max_rows, cap or limits.max_rows, limits.max_elements // max(1, widest)) // batch
    return batch, draw(S.dim(1, max(1, hi)))


def grad_flag() -> st.SearchStrategy[bool]:
    return st.sampled_from([True, True, False])


def frozen_weight(out: int, d_in: int, dtype, device, gen) -> torch.Tensor:
    return randn((out, d_in), dtype, device, gen, 1.0 / math.sqrt(d_in))


def adapters(out: int, d_in: int, r: int, b_scale: float, scaling: float, dtype, device, gen
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ kaiming-like, B non-zero (a trained adapter; PEFT's zero init would hide
    every LoRA bug), sized so that the LoRA branch is ``b_scale`` times the base's
    magnitude whatever the scaling (a large scaling must not overflow fp16)."""
    A = randn((r, d_in), dtype, device, gen, 1.0 / math.sqrt(d_in))
    B = randn((out, r), dtype, device, gen, b_scale / (math.sqrt(r) * scaling))
    return A, B


#: How a case's adapters lie in memory: each in its own buffer; back to back in one buffer, all
#: A's then all B's, as the patcher's adapter cast hands a decoder layer's adapters to the kernels
#: (workbench.patch._CastAdapters; stacking the A's is then a view, ``_lora_ops.stack_rows``); or
#: in one buffer interleaved (A, B, A, B, ...), where the A's are not neighbours.
LAYOUTS = ("separate", "a_then_b", "interleaved")


def lay_out(tensors: dict, names: str, layout: str) -> None:
    """Replace the adapters ``A{n}``, ``B{n}`` (n in ``names``, in order) by views of one buffer
    holding the same values, laid out as ``layout`` says (``LAYOUTS``; ``_lora_ops.packed``)."""
    if layout == "separate":
        return
    keys = ([f"A{n}" for n in names] + [f"B{n}" for n in names] if layout == "a_then_b"
            else [f"{m}{n}" for n in names for m in "AB"])
    tensors.update(zip(keys, packed(tensors[k] for k in keys)))


def mixed_flag() -> st.SearchStrategy[bool]:
    """Whether x is fp32 under the drawn 16-bit layer dtype (the mixed mode; a no-op
    when the tested dtype is fp32): one case in three."""
    return st.sampled_from([False, False, True])


#: Sizes of the LoRA branch against the base output (``adapters``' b_scale). 2^-10 is an
#: adapter after its first optimizer steps (PEFT inits B at 0; Adam's first update moves
#: it by about lr): its term sits below half a bf16 ulp of the base output, which is
#: where a sum in the layer's dtype loses it and PEFT's fp32 sum (mixed mode) does not.
B_SCALES = (2.0**-10, 0.1, 1.0)


def activations(p: dict, d_in: int, dtype, device, gen) -> torch.Tensor:
    """x [batch, tokens, d_in] in ``dtype``, or in fp32 when the case is mixed
    (``p["x_fp32"]``): then its values are not rounded to the layer's dtype, so the
    layer's own cast of x is exercised."""
    x = randn((p["batch"], p["tokens"], d_in), torch.float32 if p.get("x_fp32") else dtype, device, gen,
              p["scale"])
    return maybe_strided(x, p["strided"], gen)


def ablate_adapters(*names: str):
    """The spec's ``ablate`` for LoRA kernels: the same inputs with every B in ``names``
    zeroed, so the harness compares the adapter's contribution to the outputs (the
    ``delta`` comparisons) and not only the outputs, which a small LoRA term hides."""
    def ablate(tensors: dict) -> dict:
        return {n: torch.zeros_like(tensors[n]) for n in names}
    return ablate


#: Why the LoRA kernels' targeted examples (``EXAMPLES`` of lora_o, lora_qkv, lora_mlp) exist.
MIXED_SMALL_ADAPTER = ("the mixed mode (fp32 x, bf16 layer) with an adapter 2^-10 the base's size: its terms of "
                       "the output and of dX sit below half a bf16 ulp of the base's, which autograd's fp32 sums "
                       "keep and a sum in the layer's dtype loses (delta:y, delta:grad:x); the ci profile's draws "
                       "meet the three flags together in one example in 13")
MANY_TOKENS = ("256 tokens in bf16: dA and dB are sums over every token, where a 16-bit accumulator shows "
               "(ci's random draws have at most 48 x 3); the sums are torch's GEMMs today, the example is "
               "there for any reduction the kernel takes over")


def draw_keep(shape: tuple[int, ...], dropout: float, device, gen) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) >= dropout).to(device)
