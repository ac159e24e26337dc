"""NF4 dequantization of bitsandbytes 4-bit weights (QLoRA's frozen base weights).

Format (bitsandbytes 0.50, ``quantize_4bit(..., quant_type="nf4")``), verified
bit-exactly against bitsandbytes in parity/test_nf4_bitsandbytes.py:

  * the weight is flattened (row-major) and cut into blocks of ``blocksize``
    elements (64; the last block may be partial); each block is scaled by its
    absmax into [-1, 1] and every element is rounded to the nearest of the 16
    NF4 values (``NF4_CODE``);
  * two 4-bit indices per byte, the EVEN element in the HIGH nibble; an odd
    element count pads the last byte's low nibble. The packed tensor is uint8 of
    shape ``[ceil(numel / 2), 1]``;
  * absmax is fp32 per block, or, with double quantization
    (``compress_statistics=True``), ``offset = absmax.mean()`` is subtracted and
    the rest is 8-bit blockwise quantized with the signed dynamic code (256 fp32
    values) in nested blocks of 256 absmax values: the uint8 indices, the code and
    an fp32 nested absmax per nested block are stored, and dequantization computes,
    in fp32 and in this order, ``absmax = code[q] * nested_absmax[block // 256]``
    then ``absmax + offset``;
  * ``weight[i] = NF4_CODE[nibble_i] * absmax[i // blocksize]`` in fp32, rounded
    once to the output dtype.

There is no gradient: the weights are frozen (``SPEC.differentiable=False``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from hypothesis import strategies as st

from . import _common as C
from . import _strategies as S
from ._common import round_to
from ._harness import randn
from ._registry import Inputs, KernelSpec, Limits

#: bitsandbytes' NF4 code (functional.get_4bit_type("nf4")), as fp32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: bitsandbytes' CUDA quantizer decides NF4 indices with these thresholds
#: (kernels dQuantizeNF4, fp32 literals), not with the fp32 midpoints its CPU op uses.
_NF4_CUDA_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

_TABLES: dict[tuple, torch.Tensor] = {}


def _nf4_table(device, dtype=torch.float32) -> torch.Tensor:
    key = ("nf4", str(device), dtype)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(NF4_CODE, dtype=torch.float32).to(device=device, dtype=dtype)
    return _TABLES[key]


def dynamic_code(device="cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (functional.create_dynamic_map()), 256 fp32 values."""
    key = ("dynamic", str(device), torch.float32)
    if key not in _TABLES:
        data = []
        for i in range(7):
            bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
            means = (bounds[:-1] + bounds[1:]) / 2.0
            data += ((10 ** (-6 + i)) * means).tolist()
            data += (-(10 ** (-6 + i)) * means).tolist()
        data += [0, 1.0]
        data.sort()
        _TABLES[key] = torch.tensor(data, dtype=torch.float32).to(device)
    return _TABLES[key]


# --------------------------------------------------------------------------- Triton
@triton.jit
def _nf4_dequant_fwd(PACKED, ABSMAX, CODE, NESTED, OFFSET, NF4, OUT, n_elements,
                     BLOCKSIZE: tl.constexpr, NESTED_BLOCK: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_elements
    byte = tl.load(PACKED + (e >> 1), mask=mask, other=0).to(tl.int32)
    odd = (e & 1).to(tl.int32)
    # bitsandbytes packs the even element in the high nibble.
    nibble = (byte >> (4 - 4 * odd)) & 0xF
    value = tl.load(NF4 + nibble, mask=mask, other=0.0)
    blk = e // BLOCKSIZE
    if DOUBLE_QUANT:
        q = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        c = tl.load(CODE + q, mask=mask, other=0.0)
        s = tl.load(NESTED + blk // NESTED_BLOCK, mask=mask, other=0.0)
        # Two fp32 roundings (product, then + offset) as bitsandbytes does:
        # the launch disables FMA contraction.
        absmax = c * s + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    y = value * absmax
    if OUT.dtype.element_ty == tl.bfloat16:
        tl.store(OUT + e, round_to(y, tl.bfloat16), mask=mask)
    else:
        tl.store(OUT + e, y.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher
def _launch(packed, absmax, code, nested, offset, n, blocksize, nested_blocksize, dtype):
    out = C.empty((n,), dtype, packed.device)
    block = C.block_for(n, cap=1024, forced=C.forced())
    dq = code is not None
    if n:
        _nf4_dequant_fwd[(C.cdiv(n, block),)](
            packed, absmax, code if dq else absmax, nested if dq else absmax, offset if dq else absmax,
            _nf4_table(packed.device), out, n,
            BLOCKSIZE=blocksize, NESTED_BLOCK=nested_blocksize, DOUBLE_QUANT=dq, BLOCK=block,
            num_warps=4 if block >= 512 else 1, enable_fp_fusion=False)
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def nf4_dequant_tensors(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                        nested_absmax: torch.Tensor | None = None, offset: torch.Tensor | None = None, *,
                        shape, blocksize: int = 64, nested_blocksize: int = NESTED_BLOCKSIZE,
                        dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize an NF4 weight given as its pieces; returns a ``dtype`` tensor of ``shape``.

    ``packed``: uint8, ceil(numel/2) bytes (any shape, e.g. bitsandbytes' [n, 1]).
    ``absmax``: fp32 per block, or uint8 per block with double quantization, in which
    case ``code`` (fp32 [256]), ``nested_absmax`` (fp32 per ``nested_blocksize``
    blocks) and ``offset`` (fp32, one value) must all be given.
    """
    op = "nf4_dequant"
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise C.KernelInputError(f"{op}: shape must have non-negative sizes, got {shape}.")
    if dtype not in C.FLOAT_DTYPES:
        raise C.KernelInputError(f"{op}: output dtype {dtype} is not supported; use float32, float16 or bfloat16.")
    if not (isinstance(blocksize, int) and blocksize > 0 and blocksize % 2 == 0):
        raise C.KernelInputError(f"{op}: blocksize must be a positive even int, got {blocksize!r}.")
    if not (isinstance(nested_blocksize, int) and nested_blocksize > 0):
        raise C.KernelInputError(f"{op}: nested_blocksize must be a positive int, got {nested_blocksize!r}.")
    for name, t in (("packed", packed), ("absmax", absmax)):
        if not isinstance(t, torch.Tensor):
            raise C.KernelInputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if packed.dtype != torch.uint8:
        raise C.KernelInputError(f"{op}: packed has dtype {packed.dtype}; expected uint8 (view other "
                                 "quant_storage dtypes as uint8 first).")
    extras = {"code": code, "nested_absmax": nested_absmax, "offset": offset}
    dq = absmax.dtype == torch.uint8
    if dq:
        missing = [k for k, v in extras.items() if v is None]
        if missing:
            raise C.KernelInputError(f"{op}: absmax is uint8 (double-quantized), so {', '.join(missing)} "
                                     "must be given too.")
        for name, t in extras.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise C.KernelInputError(f"{op}: {name} has dtype {got}; expected float32.")
    else:
        if absmax.dtype != torch.float32:
            raise C.KernelInputError(f"{op}: absmax has dtype {absmax.dtype}; expected float32, or uint8 with "
                                     "double quantization.")
        given = [k for k, v in extras.items() if v is not None]
        if given:
            raise C.KernelInputError(f"{op}: {', '.join(given)} given but absmax is float32 (not "
                                     "double-quantized); pass the uint8 quantized absmax instead.")
    C.check_device(op, packed, absmax, code, nested_absmax, offset)
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    C.check_shape(op, "packed (flattened)", packed.reshape(-1), ((n + 1) // 2,))
    C.check_shape(op, "absmax (flattened)", absmax.reshape(-1), (n_blocks,))
    if dq:
        C.check_shape(op, "code", code.reshape(-1), (256,))
        C.check_shape(op, "nested_absmax (flattened)", nested_absmax.reshape(-1),
                      (-(-n_blocks // nested_blocksize),))
        C.check_shape(op, "offset (flattened)", offset.reshape(-1), (1,))
        code, nested_absmax, offset = _flat(code), _flat(nested_absmax), _flat(offset)
    out = _launch(_flat(packed), _flat(absmax), code, nested_absmax, offset, n, blocksize,
                  nested_blocksize, dtype)
    return out.view(shape)


def nf4_dequant(w: "NF4Weight", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight held by ``w`` as a ``dtype`` tensor (default: ``w.dtype``) of ``w.shape``."""
    return nf4_dequant_tensors(w.packed, w.absmax, w.code, w.nested_absmax, w.offset, shape=w.shape,
                               blocksize=w.blocksize, nested_blocksize=w.nested_blocksize,
                               dtype=dtype or w.dtype)


# --------------------------------------------------------------------------- the weight
@dataclass
class NF4Weight:
    """What NF4 dequantization needs, in bitsandbytes' layout (see the module docstring)."""

    packed: torch.Tensor                    # uint8 [ceil(numel/2), 1]
    absmax: torch.Tensor                    # uint8 [n_blocks] (double quant) or fp32 [n_blocks]
    code: torch.Tensor | None               # fp32 [256]: dynamic 8-bit code (double quant only)
    nested_absmax: torch.Tensor | None      # fp32 [ceil(n_blocks / nested_blocksize)]
    offset: torch.Tensor | None             # fp32 [] : mean absmax (double quant only)
    shape: tuple[int, ...]
    blocksize: int = 64
    dtype: torch.dtype = torch.bfloat16     # default output dtype (bitsandbytes' quant_state.dtype)
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.code is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_dequant(self, dtype)

    def to(self, device) -> "NF4Weight":
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax), offset=move(self.offset))

    @classmethod
    def from_bnb(cls, packed, quant_state=None) -> "NF4Weight":
        """From a bitsandbytes ``Params4bit`` (or its ``.data``) and its ``quant_state``."""
        if quant_state is None:
            quant_state = getattr(packed, "quant_state", None)
        if quant_state is None:
            raise C.KernelInputError("nf4_dequant: no quant_state given and the tensor carries none.")
        if quant_state.quant_type != "nf4":
            raise C.KernelInputError(f"nf4_dequant: quant_type is {quant_state.quant_type!r}; only nf4 is supported.")
        data = packed.data if isinstance(packed, torch.nn.Parameter) else packed
        if type(data) is not torch.Tensor:
            data = data.as_subclass(torch.Tensor)
        if data.dtype != torch.uint8:  # quant_storage (e.g. bf16 for FSDP) holds the same bytes
            data = data.contiguous().view(torch.uint8)
        shape = tuple(int(s) for s in quant_state.shape)
        common = dict(shape=shape, blocksize=int(quant_state.blocksize), dtype=quant_state.dtype)
        if getattr(quant_state, "nested", False) or quant_state.state2 is not None:
            s2 = quant_state.state2
            offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=data.device).reshape(())
            return cls(data, quant_state.absmax, s2.code.to(torch.float32), s2.absmax, offset,
                       nested_blocksize=int(s2.blocksize), **common)
        return cls(data, quant_state.absmax.to(torch.float32), None, None, None, **common)

    @classmethod
    def quantize(cls, weight: torch.Tensor, double_quant: bool = True, blocksize: int = 64,
                 nested_blocksize: int = NESTED_BLOCKSIZE, backend: str | None = None) -> "NF4Weight":
        """Pure-PyTorch NF4 quantization in bitsandbytes' layout, bit for bit.

        bitsandbytes rounds differently on its CPU and CUDA backends (NF4: fp32
        midpoints vs. its CUDA threshold tree; the nested 8-bit code: a 65536-entry
        lookup table vs. a binary search). ``backend`` ("cpu" or "cuda", default:
        the weight's device) picks which one to reproduce.
        """
        backend = backend or weight.device.type
        if backend not in ("cpu", "cuda"):
            raise C.KernelInputError(f"nf4 quantize: backend must be 'cpu' or 'cuda', got {backend!r}.")
        C.check_float("nf4 quantize", "weight", weight)
        shape = tuple(weight.shape)
        x = weight.detach().reshape(-1).float()
        packed, absmax = _quantize_nf4(x, blocksize, backend)
        common = dict(shape=shape, blocksize=blocksize, dtype=weight.dtype, nested_blocksize=nested_blocksize)
        if not double_quant:
            return cls(packed, absmax, None, None, None, **common)
        offset = absmax.mean()
        code = dynamic_code(x.device).clone()
        q, nested = _quantize_8bit(absmax - offset, code, nested_blocksize, backend)
        return cls(packed, q, code, nested, offset, **common)


def _quantize_nf4(x: torch.Tensor, blocksize: int, backend: str):
    n = x.numel()
    if backend == "cpu":  # bitsandbytes' default (CPU) op, line for line
        rem = n % blocksize
        full = n - rem
        com = x[:full].reshape(full // blocksize, blocksize)
        absmax = com.abs().max(dim=-1)[0] if full else x.new_zeros((0,))
        scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        if rem:
            am = x[full:].abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.unsqueeze(0)])
            scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        table = _nf4_table(x.device)
        q = torch.bucketize(scaled, (table[:-1] + table[1:]) / 2, out_int32=True)
    else:  # kQuantizeBlockwise<NF4>: x * (1 / absmax), zero-padded blocks, dQuantizeNF4
        n_blocks = -(-n // blocksize)
        xp = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
        absmax = xp.abs().amax(dim=1) if n else x.new_zeros((0,))
        scaled = (xp * (1.0 / absmax)[:, None]).reshape(-1)[: n + n % 2]
        thresholds = torch.tensor(_NF4_CUDA_THRESHOLDS, dtype=torch.float32, device=x.device)
        q = (scaled[:, None] > thresholds).sum(-1)  # NaN (an all-zero block) -> 0, as on the GPU
    q8 = q.to(torch.uint8)
    return ((q8[::2] << 4) | q8[1::2]).unsqueeze(1), absmax


def _quantize_8bit(a: torch.Tensor, code: torch.Tensor, blocksize: int, backend: str):
    """bitsandbytes' quantize_blockwise (signed dynamic code) of an fp32 vector."""
    n = a.numel()
    n_blocks = -(-n // blocksize)
    ap = torch.nn.functional.pad(a, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = ap.abs().amax(dim=1)
    inv = 1.0 / absmax
    x = ap * inv[:, None]
    if backend == "cpu":  # cpu_ops.cpp: quantize_cpu_impl with its 65536-entry lookup table
        mid = 0.5 * (code[:-1] + code[1:])
        grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=a.device)) / 65535.0
        lut = torch.searchsorted(mid, grid, side="left")
        idx = ((torch.clamp(x, -1.0, 1.0) + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
        q = lut[idx.clamp(0, 65535)]  # an all-zero block (x = 0 * inf = NaN) is all index 0
        q = torch.where(absmax[:, None] == 0, torch.zeros_like(q), q)
    else:  # dQuantize<0>: a 7-step binary search, then the nearer neighbour
        q = _cuda_dquantize(code, x)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def _cuda_dquantize(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    full = lambda v: torch.full_like(x, v, dtype=torch.int64)  # noqa: E731
    pivot, upper_p, lower_p = full(127), full(255), full(0)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        gt = x > val
        lower_p = torch.where(gt, pivot, lower_p)
        lower = torch.where(gt, val, lower)
        upper_p = torch.where(gt, upper_p, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    gt = x > val
    up = torch.where(x > (upper + val) * 0.5, upper_p, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_p, pivot)
    return torch.where(gt, up, down)


# --------------------------------------------------------------------------- reference
def nf4_dequant_tensors_reference(packed, absmax, code=None, nested_absmax=None, offset=None, *, shape,
                                  blocksize=64, nested_blocksize=NESTED_BLOCKSIZE, dtype=torch.bfloat16,
                                  compute_dtype=torch.float32):
    """bitsandbytes' dequantize_4bit, computed in ``compute_dtype`` (fp32 as bitsandbytes does: the
    nested absmax product, the offset sum and the final product each rounded to fp32).

    The result is ``dtype``, except that the parity suite's exact pass (float scales
    upcast to float64) gets the unrounded float64 values.
    """
    cd = compute_dtype
    n = math.prod(shape)
    p = packed.reshape(-1).to(torch.int64)
    nibbles = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]
    values = _nf4_table(packed.device, cd)[nibbles]
    if code is not None:
        n_blocks = absmax.numel()
        nested_idx = torch.arange(n_blocks, device=packed.device) // nested_blocksize
        scales = code.reshape(-1).to(cd)[absmax.reshape(-1).long()] * nested_absmax.reshape(-1).to(cd)[nested_idx]
        scales = scales + offset.reshape(()).to(cd)
        scale_dtype = nested_absmax.dtype
    else:
        scales = absmax.reshape(-1).to(cd)
        scale_dtype = absmax.dtype
    out = values * scales[torch.arange(n, device=packed.device) // blocksize]
    return out.reshape(tuple(shape)).to(torch.float64 if scale_dtype == torch.float64 else dtype)


# --------------------------------------------------------------------------- registry
@st.composite
def _params(draw, limits: Limits) -> dict:
    block = draw(S.block(limits))
    # The interpreter's cost is the number of programs: a forced (small) block gets fewer elements.
    cap = limits.max_elements if block is None else limits.max_elements // 16
    cols = draw(S.dim(1, min(cap, 8 * limits.max_hidden)))
    rows = draw(S.dim(1, max(1, cap // cols)))
    layout = draw(st.sampled_from(["2d", "2d", "1d", "3d"]))
    shape = {"2d": [rows, cols], "1d": [rows * cols], "3d": [1, rows, cols]}[layout]
    return {
        "shape": shape,
        "blocksize": draw(st.sampled_from([64, 64, 64, 32, 128])),
        "double_quant": draw(st.booleans()),
        # bitsandbytes nests 256 blocks; small nested blocks put several nested
        # absmax values into the small weights the interpreter can afford.
        "nested_blocksize": draw(st.sampled_from([256, 256, 1, 3, 16])),
        "scale": draw(S.scale()),
        "zero_block": draw(st.sampled_from([False, False, True])),
        "strided": draw(st.booleans()),
        "_block": block,
    }


def _strided_copy(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same values in a non-contiguous view (every other element of a wider buffer of junk)."""
    flat = t.reshape(-1)
    wide = torch.randint(0, 256, (flat.numel(), 2), generator=gen, dtype=torch.int64).to(t.dtype).to(t.device)
    if t.is_floating_point():
        wide.fill_(float("nan"))
    wide[:, 1] = flat
    return wide[:, 1].view(t.shape) if t.dim() <= 1 else wide[:, 1:].view(t.shape)


def _make_inputs(p: dict, dtype, device, gen) -> Inputs:
    shape = tuple(p["shape"])
    w = randn(shape, dtype, device, gen, p["scale"])
    if p["zero_block"]:
        flat = w.reshape(-1)
        start = int(torch.randint(0, max(1, flat.numel() // p["blocksize"]), (1,), generator=gen)) * p["blocksize"]
        flat[start:start + p["blocksize"]] = 0
    q = NF4Weight.quantize(w, double_quant=p["double_quant"], blocksize=p["blocksize"],
                           nested_blocksize=p["nested_blocksize"])
    packed, absmax = q.packed, q.absmax
    if p["strided"]:
        packed, absmax = _strided_copy(packed, gen), _strided_copy(absmax, gen)
    tensors = {"packed": packed, "absmax": absmax, "code": q.code, "nested_absmax": q.nested_absmax,
               "offset": q.offset}
    return Inputs(tensors, {"shape": shape, "blocksize": p["blocksize"],
                            "nested_blocksize": p["nested_blocksize"], "dtype": dtype})


SPEC = KernelSpec(
    name="nf4_dequant",
    fn=nf4_dequant_tensors,
    reference=nf4_dequant_tensors_reference,
    params=_params,
    make_inputs=_make_inputs,
    outputs=("weight",),
    grads=(),
    differentiable=False,
    options=("shape", "blocksize (64)", "nested_blocksize (256)", "dtype: output dtype"),
    summary="bitsandbytes NF4 dequantization (double-quantized absmax or fp32 absmax); frozen, no gradient.",
)
