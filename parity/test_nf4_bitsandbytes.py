"""NF4 against bitsandbytes itself, bit for bit.

The registry's parity property judges ``nf4_dequant`` by the tolerance doctrine
against its own PyTorch reference; this file pins the format to bitsandbytes
(0.50.2, a ``test`` extra of the project, so this never skips silently):

  (a) ``NF4Weight.from_bnb(...).dequantize()`` equals
      ``bitsandbytes.functional.dequantize_4bit`` exactly (every bit), for odd and
      even element counts, bf16/fp16/fp32 and double quantization on and off;
  (b) the pure-PyTorch quantizer ``NF4Weight.quantize`` equals
      ``bitsandbytes.functional.quantize_4bit`` exactly: packed bytes, absmax and
      the nested state (offset, nested absmax, code).

The kernel runs on the CPU under Triton's interpreter (CI) and on CUDA when there
is a GPU. The quantizer is plain PyTorch and runs on every device there is.
"""
import math

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch

from workbench.kernels import _common as C
from workbench.kernels.nf4 import NF4Weight

KERNEL_DEVICES = (["cpu"] if C.INTERPRET else []) + (["cuda"] if torch.cuda.is_available() and not C.INTERPRET else [])
TORCH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Odd and even numel, a partial last block, 1-D and 3-D, and 605 blocks = 3 nested blocks of 256.
# (Shapes of 1 or 2 elements are left out: bitsandbytes returns a [1, n] weight transposed then.)
SHAPES = [(7, 13), (5,), (64, 64), (33, 65), (3, 4, 5), (129, 300)]


@pytest.fixture(autouse=True)
def _bnb_eager():
    """bitsandbytes torch.compile()s its generic dequantization (used on the CPU for an odd
    last dim); compiling every shape costs minutes on CI. Its eager path is the same formula
    (one fp32 product, one cast), and the compiled one gave the same bits when checked."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _weight(shape, dtype, device, seed=0, zero_block=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.7
    if zero_block:
        w.view(-1)[64:128] = 0
    return w.to(dtype).to(device)


def _assert_bits_equal(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != bitsandbytes {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != bitsandbytes {theirs.dtype}"
    assert ours.device == theirs.device, f"{what}: device {ours.device} != bitsandbytes {theirs.device}"
    same = torch.equal(ours, theirs) if not ours.is_floating_point() else torch.equal(
        ours.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8))
    if not same:
        diff = (ours.reshape(-1) != theirs.reshape(-1)).nonzero()
        i = int(diff[0]) if len(diff) else -1
        raise AssertionError(f"{what}: {len(diff)} element(s) differ from bitsandbytes, first at flat index {i}: "
                             f"{ours.reshape(-1)[i].item()!r} vs {theirs.reshape(-1)[i].item()!r}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequantize_equals_bitsandbytes(shape, dtype, double_quant, device):
    w = _weight(shape, dtype, device)
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    expected = BF.dequantize_4bit(packed, state)
    nf4 = NF4Weight.from_bnb(packed, state)
    assert nf4.double_quant == double_quant and nf4.shape == tuple(shape) and nf4.blocksize == 64
    _assert_bits_equal(nf4.dequantize(), expected, "dequantize")
    # Another output dtype than the stored one: bitsandbytes' formula, rounded once to it.
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    state.dtype = other
    _assert_bits_equal(nf4.dequantize(other), BF.dequantize_4bit(packed, state), f"dequantize to {other}")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_params4bit_and_quant_storage(device, double_quant):
    w = _weight((48, 40), torch.bfloat16, "cpu", seed=1)
    param = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant).to(device)
    expected = BF.dequantize_4bit(param.data, param.quant_state)
    _assert_bits_equal(NF4Weight.from_bnb(param).dequantize(), expected, "Params4bit")
    _assert_bits_equal(NF4Weight.from_bnb(param.data, param.quant_state).dequantize(), expected, "Params4bit.data")
    # FSDP-style quant_storage: the same bytes stored as bf16.
    packed, state = BF.quantize_4bit(w.to(device), blocksize=64, compress_statistics=double_quant,
                                     quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    _assert_bits_equal(NF4Weight.from_bnb(packed, state).dequantize(), BF.dequantize_4bit(packed, state),
                       "quant_storage=bf16")


@pytest.mark.parametrize("device", TORCH_DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES + [(100, 200)], ids=lambda s: "x".join(map(str, s)))
def test_quantize_equals_bitsandbytes(shape, dtype, double_quant, device):
    for seed, zero_block in ((0, False), (1, True), (2, False)):
        w = _weight(shape, dtype, device, seed=seed, zero_block=zero_block and math.prod(shape) >= 128)
        packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        ours = NF4Weight.quantize(w, double_quant=double_quant)
        _assert_bits_equal(ours.packed, packed, "packed")
        _assert_bits_equal(ours.absmax, state.absmax, "absmax")
        assert ours.shape == tuple(state.shape) and ours.dtype == state.dtype and ours.blocksize == state.blocksize
        if double_quant:
            _assert_bits_equal(ours.offset, state.offset, "offset")
            _assert_bits_equal(ours.nested_absmax, state.state2.absmax, "nested absmax")
            _assert_bits_equal(ours.code, state.state2.code, "nested code")
            assert ours.nested_blocksize == state.state2.blocksize
        else:
            assert ours.code is None and state.state2 is None


def test_to_moves_every_piece():
    nf4 = NF4Weight.quantize(_weight((7, 13), torch.float16, "cpu"), double_quant=True)
    moved = nf4.to("cpu")
    for name in ("packed", "absmax", "code", "nested_absmax", "offset"):
        assert torch.equal(getattr(moved, name), getattr(nf4, name)), name
    assert moved.shape == nf4.shape and moved.dtype == nf4.dtype
