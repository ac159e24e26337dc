"""Shared plumbing for the Triton kernels: input validation, output allocation
(with optional poisoning for the parity suite) and block sizes.

Math helpers live next to the kernels that need them: an accurate tanh/sech^2
(cross_entropy.py) and sigmoid pair (geglu.py). libdevice is unavailable in the
interpreter, so they are written with tl.exp.

Nothing here launches a kernel; every kernel file imports what it needs from here, the one
rounding helper of the Triton kernels (``round_to``) included.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).
#: Must be read from the environment at import time: triton reads it then too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")

#: The float dtypes every kernel accepts for activations and weights.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------
# Poisoned allocation. The parity harness turns this on so that an output
# element a kernel forgets to write is NaN (or a sentinel for integers), which
# the comparison always rejects. In normal use `empty` is plain torch.empty.
# ---------------------------------------------------------------------------
_POISON = False


@contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within this block, every buffer allocated through :func:`empty` is filled
    with NaN (floats) or the most negative value (integers) before a kernel runs."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(t.shape, dtype or t.dtype, t.device)


# ---------------------------------------------------------------------------
# Validation: a clear sentence instead of a Triton crash.
# ---------------------------------------------------------------------------
class KernelInputError(ValueError):
    """Raised when a kernel is called with inputs it cannot take."""


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise KernelInputError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}.")
    for device in devices:
        if device.type == "cpu" and not INTERPRET:
            raise KernelInputError(
                f"{op}: got a CPU tensor, but Triton kernels need a CUDA device. Move the "
                "tensors to the GPU, or set TRITON_INTERPRET=1 before anything imports triton "
                "to run the kernels in Triton's (slow) CPU interpreter."
            )
        if device.type not in ("cpu", "cuda"):
            raise KernelInputError(f"{op}: unsupported device {device}; use a CUDA tensor.")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dtype not in FLOAT_DTYPES:
        raise KernelInputError(
            f"{op}: {name} has dtype {t.dtype}; supported dtypes are float32, float16 and bfloat16."
        )


def check_same_dtype(op: str, **tensors: torch.Tensor | None) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise KernelInputError(f"{op}: inputs must share one dtype, got {listed}. Cast them first.")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise KernelInputError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(expected)}.")


def rows_view(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as a 2-D [rows, last_dim] tensor with a unit stride on the last
    dim, copying only when no such view exists (e.g. a strided last dim)."""
    if t.dim() == 0:
        raise KernelInputError(f"{op}: {name} must have at least one dimension.")
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


# Host-side integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are
# constexpr functions, whose host calls go through Triton's argument unwrapping, and every
# launch makes several of them.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def block_for(n: int, cap: int = 65536, forced: int | None = None) -> int:
    """The block width for a row of ``n`` elements: the whole row when it fits
    under ``cap`` (one loop iteration), else ``cap``. ``forced`` (a power of two,
    used by the parity suite) makes the looped path run on small rows."""
    if forced is not None:
        return int(forced)
    return min(next_pow2(n), cap)


def row_programs(n_rows: int, device: torch.device) -> int:
    """Programs for a backward that accumulates weight gradients over rows: two per
    SM on a GPU; a few in the interpreter, so each program still sums several rows."""
    if device.type == "cuda":
        return max(1, min(n_rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


def num_warps(block: int) -> int:
    """Warps for a row-wise kernel holding one ``block`` of fp32 values per program:
    about 8 elements per thread, between 4 and 16 warps (no register spills at
    hidden 8192; the interpreter ignores it)."""
    return max(4, min(16, block // 256))


# Overrides for the parity suite, so that the looped and blocked code paths run on the
# tiny shapes the CPU interpreter can afford: "block", a small forced block width for
# the row-wise kernels; "rows", a forced row block for kernels that form a large buffer
# a block of rows at a time at real sizes (lora_mlp's backward).
_FORCED: dict[str, int | None] = {"block": None, "rows": None}


@contextmanager
def _forcing(key: str, value: int | None):
    previous, _FORCED[key] = _FORCED[key], value
    try:
        yield
    finally:
        _FORCED[key] = previous


def forced_block(block: int | None):
    return _forcing("block", block)


def forced() -> int | None:
    return _FORCED["block"]


def forced_rows(rows: int | None):
    return _forcing("rows", rows)


def forced_row_block() -> int | None:
    return _FORCED["rows"]


@contextmanager
def full_precision_reductions():
    """cuBLAS without its reduced-precision reductions for fp16/bf16 GEMMs (PyTorch allows them by
    default): a weight gradient sums over every token of the batch, and a split-K reduction in
    16 bits is the 16-bit accumulator the parity doctrine rules out (the likely cause of the fp16
    LoRA dB failures in reports/parity/2026-12-07-nvidia-h100-80gb-hbm3.notes.md). The flags are
    process-wide; they are restored on leaving."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 -> DT rounded to nearest even, as torch rounds its 16-bit results. For bf16
    spelled out in integer ops: Triton 3.6's interpreter truncates on ``.to(tl.bfloat16)``
    (its "rtne" mode rounds ties up without a carry), and the kernels round where their
    reference twins (and bitsandbytes, for NF4) round, so a truncated value would drift
    from them. On the GPU this equals cvt.rn.bf16.f32 (NaN kept quiet)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x == x, r, 0x7FC0)
        y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DT)
    return y
