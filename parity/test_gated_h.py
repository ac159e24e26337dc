"""The h that swiglu_backward / geglu_backward write (``h_out``) is the forward's, bit for bit.

lora_mlp's backward takes h for down_proj's dA from the activation's backward (written over
dh in place) instead of recomputing it with swiglu_forward / geglu_forward. That is only
sound if the two kernels form and round h identically: a h one ulp off moves an
ill-conditioned dAd (a sum over tokens that cancels) past the parity bound. So: on random
inputs, every activation (silu, exact and tanh GELU), every dtype, gate and up as the
strided halves of one fused gate_up output (and dense), h from the backward equals the
forward's h in every bit (compared as integers: -0 is not 0, NaN would not equal itself);
and asking for h changes neither gradient, in place over dh or into a buffer of its own.
On the GPU this compares two compiled kernels (the forward's and the backward's), which is
where a compiler could contract the same expression differently; under the interpreter the
same numpy operations."""
import pytest
import torch

from workbench.kernels import _common as C
from workbench.kernels._harness import default_device
from workbench.kernels.geglu import geglu_backward, geglu_forward
from workbench.kernels.swiglu import swiglu_backward, swiglu_forward

from ._support import DTYPES

ACTS = [("swiglu", None), ("geglu", "none"), ("geglu", "tanh")]
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _forward(act, approximate, g, u, out):
    return swiglu_forward(g, u, out=out) if act == "swiglu" else geglu_forward(g, u, approximate, out=out)


def _backward(act, approximate, dh, g, u, need_dg, need_du, h_out=None):
    if act == "swiglu":
        return swiglu_backward(dh, g, u, need_dg, need_du, h_out=h_out)
    return geglu_backward(dh, g, u, approximate, need_dg, need_du, h_out=h_out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT[t.dtype])


def _inputs(layout: str, rows: int, cols: int, dtype, gen):
    # Scales up to 12: silu's exp(-g) overflowing, tanh-GELU's flush to 0 (z < -15), erf saturating.
    scale = torch.tensor([0.5, 3.0, 12.0])[torch.randint(0, 3, (rows, 1), generator=gen)]
    gu = (torch.randn(rows, 2 * cols, generator=gen) * scale).to(dtype).to(default_device())
    if layout == "gate_up_halves":  # the two halves of a fused gate_up projection: row stride 2 * cols
        return gu[:, :cols], gu[:, cols:]
    return gu[:, :cols].contiguous(), gu[:, cols:].contiguous()


@pytest.mark.parametrize("layout", ["gate_up_halves", "dense"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("act", "approximate"), ACTS, ids=["swiglu", "geglu_exact", "geglu_tanh"])
def test_h_from_the_backward_is_the_forwards(act, approximate, dtype, layout):
    gen = torch.Generator().manual_seed(19)
    for rows, cols, block in ((37, 129, None), (5, 33, 16), (1, 7, None)):
        g, u = _inputs(layout, rows, cols, dtype, gen)
        with C.forced_block(block):
            h_fwd = _forward(act, approximate, g, u, C.empty((rows, cols), dtype, g.device))
            dh = torch.randn(rows, cols, generator=gen).to(dtype).to(g.device)
            dg, du = _backward(act, approximate, dh, g, u, True, True)
            for need_dg, need_du in ((True, True), (True, False), (False, True)):
                # In place over dh (lora_mlp's way) ...
                h_in_place = dh.clone()
                dg2, du2 = _backward(act, approximate, h_in_place, g, u, need_dg, need_du, h_out=h_in_place)
                assert torch.equal(_bits(h_in_place), _bits(h_fwd)), (rows, cols, need_dg, need_du)
                # ... and into a buffer of its own.
                h_own = C.empty((rows, cols), dtype, g.device)
                dg3, du3 = _backward(act, approximate, dh, g, u, need_dg, need_du, h_out=h_own)
                assert torch.equal(_bits(h_own), _bits(h_fwd))
                for want, ref, *got in ((need_dg, dg, dg2, dg3), (need_du, du, du2, du3)):
                    for t in got:  # the gradients read dh before h replaced it
                        assert (t is None) if not want else torch.equal(_bits(t), _bits(ref))


@pytest.mark.parametrize(("act", "approximate"), ACTS, ids=["swiglu", "geglu_exact", "geglu_tanh"])
def test_h_in_another_dtype_is_the_forwards(act, approximate):
    """h_out of another dtype than the inputs (fp32 h of bf16 gate and up) rounds as the
    forward's ``out`` of that dtype does."""
    gen = torch.Generator().manual_seed(7)
    g, u = _inputs("gate_up_halves", 9, 65, torch.bfloat16, gen)
    dh = torch.randn(9, 65, generator=gen).to(torch.bfloat16).to(g.device)
    for out_dtype in (torch.float32, torch.float16):
        h_fwd = _forward(act, approximate, g, u, C.empty((9, 65), out_dtype, g.device))
        h = C.empty((9, 65), out_dtype, g.device)
        _backward(act, approximate, dh, g, u, True, True, h_out=h)
        assert torch.equal(_bits(h), _bits(h_fwd))


def test_h_in_place_needs_a_dense_dh_of_hs_dtype():
    gen = torch.Generator().manual_seed(3)
    g, u = _inputs("dense", 4, 8, torch.float32, gen)
    wide = torch.randn(4, 12, generator=gen).to(g.device)
    with pytest.raises(ValueError, match="dense dh"):
        swiglu_backward(wide[:, :8], g, u, h_out=wide[:, :8])
