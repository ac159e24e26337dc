"""The LoRA kernels' chain of roundings against PEFT's, both against fp64.

The LoRA kernels fold the scaling into their GEMMs' alpha and each sum with an earlier
term into the epilogue's beta (``kernels/_lora_ops.py``): every output and gradient is
rounded once where PEFT rounds the same quantity two or three times. Their reference
twin computes that chain (``_lora.linear_reference`` and, for the projections of one
input whose LoRA terms of dx one GEMM sums, ``linears_reference``; ``numerics="folded"``), so the
parity property holds the kernels to PyTorch's own error on the roundings they make.
That yardstick alone would accept a chain less accurate than PEFT's; this test closes
the gap. On the kernels' own draws (their strategies, 16-bit dtypes, the mixed mode
included), both chains run in the tested dtype (references only, no kernel) and are
measured against the fp64 pass, in the doctrine's two norms; the folded chain must err
no more than PEFT's.

Pooled, not case by case: neither chain wins every case. Where a gradient cancels over
tokens (lora_mlp's dA or dB with one intermediate unit and 2-5 tokens) either chain lands
past 4x the other's error in about one seed in a hundred, in both directions alike (400
seeds of such a case: 15 times the folded chain, 18 times PEFT's). The DEVELOPERS
contract asks for a formulation at least as accurate against fp64, which is a statement
about the distribution: over every (draw, compared tensor) pair, the folded chain errs
more than PEFT's no more often than PEFT's errs more than it, and the geometric mean of
the ratio of their errors (each plus the doctrine's floor) is at most 1.
"""
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

from workbench.kernels import PROFILE_LIMITS, registry
from workbench.kernels import _strategies as S
from workbench.kernels._harness import HARNESS_KEYS, _forward_backward, _leaves, default_device, upstream_layout
from workbench.kernels._tolerance import ATOL_ULPS, COMPUTE_ULPS_FP32, UNIT_ROUNDOFF, _errors

from ._support import dtype_name

KERNELS = ("lora_o", "lora_qkv", "lora_mlp")
DTYPES16 = (torch.bfloat16, torch.float16)
#: Draws per kernel and dtype: references only (three passes each), a few seconds.
DRAWS = 40
#: The ci profile's shapes in every profile, on the CPU: the comparison is of two formulas,
#: not of a kernel, and small shapes are where sums over few tokens cancel.
LIMITS = PROFILE_LIMITS["ci"]


def _passes(spec, params: dict, dtype: torch.dtype, seed: int) -> dict:
    """{numerics: {name: tensor}} for the exact pass and both chains in ``dtype``."""
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    inputs = spec.make_inputs({k: v for k, v in params.items() if k not in HARNESS_KEYS}, dtype, device, gen)
    names = tuple(inputs.requires_grad)
    with torch.no_grad():
        probe = spec.reference(**_leaves(inputs.tensors, (), None), **inputs.options, compute_dtype=torch.float32)
    probe = probe if isinstance(probe, tuple) else (probe,)
    ups = [upstream_layout(o.shape, "dense", gen) for o in probe]
    found = {}
    for key, numerics, cast, cd in (("exact", "folded", torch.float64, torch.float64),
                                    ("folded", "folded", None, torch.float32),
                                    ("peft", "peft", None, torch.float32)):
        leaves = _leaves(inputs.tensors, names, cast)
        ref = functools.partial(spec.reference, numerics=numerics)
        outs = _forward_backward(ref, leaves, inputs.options, ups, 1.0, dtype, device, compute_dtype=cd)
        found[key] = {**{f"out:{n}": o for n, o in zip(spec.outputs, outs)},
                      **{f"grad:{n}": leaves[n].grad for n in names}}
    return found


@pytest.mark.parametrize("dtype", DTYPES16, ids=[dtype_name(d) for d in DTYPES16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_folded_chain_is_at_least_as_accurate_as_peft(kernel, dtype):
    spec = registry()[kernel]
    pairs = []  # (name, folded error, PEFT error), each plus the floor, both norms

    @settings(max_examples=DRAWS, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(params=spec.params(LIMITS), seed=S.seed())
    def draw(params, seed):
        found = _passes(spec, params, dtype, seed)
        for name, exact in found["exact"].items():
            if exact is None:
                continue
            mask = torch.isfinite(exact)
            f, p = found["folded"][name], found["peft"][name]
            floor = ATOL_ULPS * UNIT_ROUNDOFF[f.dtype] + COMPUTE_ULPS_FP32 * UNIT_ROUNDOFF[torch.float32]
            for fe, pe in zip(_errors(f, exact, mask), _errors(p, exact, mask)):
                pairs.append((name, fe + floor, pe + floor))

    draw()
    worse = sum(f > p for _, f, p in pairs)
    better = sum(f < p for _, f, p in pairs)
    log_ratio = sum(math.log(f / p) for _, f, p in pairs) / len(pairs)
    detail = (f"{kernel} {dtype_name(dtype)}: over {len(pairs)} (draw, tensor, norm) errors the folded chain erred "
              f"more than PEFT's {worse} times and less {better} times; geometric mean ratio "
              f"{math.exp(log_ratio):.4f}")
    print(detail)
    assert worse <= better and log_ratio <= 0.0, detail


@pytest.mark.parametrize("name", KERNELS)
def test_the_backward_gemms_reduce_in_full_precision(name, monkeypatch):
    """A weight gradient sums over every token: cuBLAS's reduced-precision (16-bit) split-K
    reductions, which PyTorch allows by default, lost fp16 dB on an H100 (NaN, and 140x the
    fp32-summed error). Every GEMM of the LoRA kernels' backward runs with them off, and the
    flags are as they were afterwards."""
    m = torch.backends.cuda.matmul
    seen = []
    for fn in ("mm", "addmm"):
        real = getattr(torch, fn)

        def spy(*args, _real=real, **kwargs):
            seen.append((m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction))
            return _real(*args, **kwargs)
        monkeypatch.setattr(torch, fn, spy)
    spec = registry()[name]
    params = next(iter(spec.examples)).params if spec.examples else None
    gen = torch.Generator().manual_seed(0)
    from hypothesis import find

    params = params or find(spec.params(PROFILE_LIMITS["ci"]), lambda p: True)
    params = {k: v for k, v in params.items() if k not in HARNESS_KEYS}
    inputs = spec.make_inputs(params, torch.float32, default_device(), gen)  # CUDA on a GPU host
    leaves = _leaves(inputs.tensors, tuple(inputs.requires_grad), None)
    outs = spec.fn(**leaves, **inputs.options)
    outs = outs if isinstance(outs, tuple) else (outs,)
    before = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    seen.clear()
    torch.autograd.backward([o for o in outs if o.requires_grad], [torch.ones_like(o) for o in outs if o.requires_grad])
    assert seen and all(s == (False, False) for s in seen), seen
    assert (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction) == before
