"""LoRA on an NF4-quantised base weight: ``lora_o`` given an ``NF4Weight`` (it calls
``.dequantize()`` in the forward and again in the backward) against the reference
run on the dequantised weight, under the tolerance doctrine (the harness's
``compare``). Same strategy and inputs as the registered ``lora_o`` property; the
NF4 weight is quantised from the drawn W, in the tested dtype.
"""
import pytest
import torch
from hypothesis import given

from workbench.kernels import PROFILE_LIMITS
from workbench.kernels import _common
from workbench.kernels import _strategies as S
from workbench.kernels import nf4
from workbench.kernels._harness import BLOCK_KEY, _forward_backward, _leaves, default_device, upstream_layout
from workbench.kernels._tolerance import compare
from workbench.kernels.lora_o import SPEC

from ._support import DTYPES, profile



def _run(params: dict, dtype: torch.dtype, seed: int) -> list:
    device = default_device()
    params = dict(params)
    block = params.pop(BLOCK_KEY, None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs = SPEC.make_inputs(params, dtype, device, gen)
    quantized = nf4.NF4Weight.quantize(inputs.tensors["W"])
    tensors = {**inputs.tensors, "W": quantized.dequantize()}
    names = tuple(inputs.requires_grad)
    # A dense upstream at scale 1: layouts and scales are the registered property's business.
    up = [upstream_layout((*tensors["x"].shape[:-1], params["d_out"]), "dense", gen)]

    base = _leaves(tensors, names, None)
    base_out = _forward_backward(SPEC.reference, base, inputs.options, up, 1.0, dtype, device,
                                 compute_dtype=torch.float32)
    exact = _leaves(tensors, names, torch.float64)
    exact_out = _forward_backward(SPEC.reference, exact, inputs.options, up, 1.0, dtype, device,
                                  compute_dtype=torch.float64)
    kern = _leaves(tensors, names, None)
    kern["W"] = quantized
    with _common.poisoned_outputs(), _common.forced_block(block):
        kern_out = _forward_backward(SPEC.fn, kern, inputs.options, up, 1.0, dtype, device)

    results = [compare("out:y", kern_out[0], base_out[0], exact_out[0], dtype)]
    results += [compare(f"grad:{n}", kern[n].grad, base[n].grad, exact[n].grad, dtype) for n in names]
    return results


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_lora_o_with_nf4_base(dtype):
    @given(params=SPEC.params(PROFILE_LIMITS[profile()]), seed=S.seed())
    def prop(params, seed):
        results = _run(params, dtype, seed)
        bad = [c.line() for c in results if not c.ok]
        assert not bad, f"params={params!r} seed={seed}\n" + "\n".join(bad)

    prop()


def test_nf4_weight_is_dequantized_per_use_and_never_gets_a_grad():
    from workbench.kernels.lora_o import lora_o

    calls = []

    class Counting:
        def __init__(self, q):
            self.q, self.shape, self.dtype, self.device = q, q.shape, q.dtype, q.device

        def dequantize(self):
            calls.append(1)
            return self.q.dequantize()

    gen = torch.Generator().manual_seed(0)
    dev = default_device()
    W = torch.randn(12, 20, generator=gen).to(dev)
    q = Counting(nf4.NF4Weight.quantize(W))
    x = torch.randn(5, 20, generator=gen).to(dev).requires_grad_()
    A = (torch.randn(4, 20, generator=gen) * 0.1).to(dev).requires_grad_()
    B = (torch.randn(12, 4, generator=gen) * 0.1).to(dev).requires_grad_()
    lora_o(x, q, A, B, 2.0).sum().backward()
    assert len(calls) == 2  # once in the forward, once in the backward (for dx)
    assert x.grad is not None and A.grad is not None and B.grad is not None
