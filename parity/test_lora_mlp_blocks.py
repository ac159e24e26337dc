"""lora_mlp's backward in row blocks (long sequences), for each gradient asked for alone.

The backward past down's weights is one loop over row blocks: one block at training
shapes, several at long context. The property suite draws forced row blocks (``_rows``)
among its other options, but which gradients are asked for is drawn too, and a
combination can go undrawn for a long time: the GPU profile found that dBu asked for
without dAu or dX (up's B is then not saved) crashed the blocked backward, where the CPU
budget never drew it. Here every gradient is asked for alone, and all together, in every
dtype, over several blocks, against the same reference and tolerances as the property."""
import pytest
import torch

from workbench.kernels._harness import default_device, run_case
from workbench.kernels.lora_mlp import SPEC

from ._support import DTYPES

ADAPTERS = ("Ag", "Bg", "Au", "Bu", "Ad", "Bd")
ALONE = [("x",)] + [(a,) for a in ADAPTERS]
CASES = ALONE + [("x", *ADAPTERS), ("Ag", "Bg", "Bu", "Ad", "Bd")]  # the last: the GPU's counterexample


def _params(grads: tuple[str, ...], dropout: float, rows: int | None = 3) -> dict:
    return {"batch": 2, "tokens": 5, "d_in": 6, "inter": 7, "d_out": 5, "r": 2, "alpha": 4.0, "rslora": False,
            "scaling": 2.0, "dropout": dropout, "activation": "swiglu", "approximate": "none", "scale": 1.0,
            "b_scale": 1.0, "x_fp32": False, "strided": False, "grad_x": "x" in grads,
            "grad_adapters": [a in grads for a in ADAPTERS], "_block": None, "_rows": rows}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("grads", CASES, ids=["+".join(g) for g in CASES])
def test_each_gradient_of_the_blocked_backward(grads, dtype):
    for dropout in (0.0, 0.25):
        report = run_case(SPEC, _params(grads, dropout), dtype, seed=1)
        assert report.ok, report.describe()
        assert any(c.name.startswith("grad:") for c in report.comparisons)


@pytest.mark.parametrize(("rows", "blocks"), [(3, [3, 3, 3, 1]), (None, [10])],
                         ids=["blocks_of_3", "training_shape"])
def test_the_blocks_taken(monkeypatch, rows, blocks):
    """Ten rows in blocks of three: four blocks; without a forced row block (the training
    shapes' case): one block of every row. Each in the case's run and again in its run
    without the adapters (the delta comparisons')."""
    from workbench.kernels import lora_mlp

    calls = []
    real = lora_mlp._act_backward

    def counted(dh, g, *args, **kwargs):
        calls.append(g.shape[0])
        return real(dh, g, *args, **kwargs)
    monkeypatch.setattr(lora_mlp, "_act_backward", counted)
    report = run_case(SPEC, _params(("x", *ADAPTERS), 0.0, rows), torch.float32, seed=1)
    assert report.ok and calls == blocks * 2


@pytest.mark.parametrize(("over", "dtype", "fused"), [
    ({}, torch.float32, True), ({}, torch.bfloat16, True), ({"activation": "geglu", "approximate": "tanh"},
                                                           torch.float16, True),
    ({"_rows": 3}, torch.float32, False), ({"dropout": 0.25}, torch.float32, False),
    ({"x_fp32": True}, torch.bfloat16, False)],
    ids=["one_block", "one_block_bf16", "one_block_geglu_fp16", "blocks_of_3", "dropout", "mixed_mode"])
def test_where_down_dA_takes_h(monkeypatch, over, dtype, fused):
    """dAd's h comes from the activation's backward, written over dh (issue #19: no separate
    recompute over g and u) where it applies: one block of rows, no dropout on down's input,
    dh in the layer's dtype. The blocked backward, a dropout mask and the mixed mode recompute
    it. Both give the same h bit for bit (``test_gated_h.py``), so only the calls tell them
    apart. Each case runs twice (with and without the adapters)."""
    from workbench.kernels import lora_mlp

    forwards, h_outs = [], []
    real_fwd, real_bwd = lora_mlp._act_forward, lora_mlp._act_backward

    def fwd(*args, **kwargs):
        forwards.append(1)
        return real_fwd(*args, **kwargs)

    def bwd(dh, *args, h_out=None, **kwargs):
        h_outs.append(h_out is not None and h_out.data_ptr() == dh.data_ptr())
        return real_bwd(dh, *args, h_out=h_out, **kwargs)
    monkeypatch.setattr(lora_mlp, "_act_forward", fwd)
    monkeypatch.setattr(lora_mlp, "_act_backward", bwd)
    report = run_case(SPEC, {**_params(("x", *ADAPTERS), 0.0, None), **over}, dtype, seed=1)
    assert report.ok, report.describe()
    assert len(forwards) == (2 if fused else 4)  # the forward's h, plus the backward's recompute unless fused
    assert all(h_outs) if fused else not any(h_outs)


def test_an_fp32_layers_dB_over_many_blocks_keeps_the_small_terms():
    """dB sums over every row; over several row blocks the blocks' products are added in an
    accumulator wider than the layer (``_block_sum_dtype``). In fp32 that sum once ran in
    fp32: a running sum of 1e4 swallows each 1e-3 term to about an ulp of 1e4, and when the
    big terms cancel, what is left is those ulps. Here, one row a block: 1e4, sixty-two of
    1e-3, -1e4 (gate at 0, up at 1, so each row's term of dB of gate is half its dy); dBg
    must be the exact sum of the kernel's own terms to fp32's precision."""
    from workbench.kernels import _common as C
    from workbench.kernels.lora_mlp import lora_mlp, lora_mlp_reference

    device = default_device()  # where the kernels run: CUDA, or the CPU under the interpreter
    n = 64
    dy = torch.full((n, 1), 2e-3)
    dy[0], dy[-1] = 2e4, -2e4
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    # x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd: g = 0 (sig 1/2, silu' 1/2), u = 1, dh = dy
    weights = dict(x=torch.ones(n, 1), Wg=zero, Ag=one, Bg=zero, Wu=one, Au=zero, Bu=zero, Wd=one, Ad=zero, Bd=zero)
    grads = {}
    for dtype, fn, extra in ((torch.float32, lora_mlp, {}),
                             (torch.float64, lora_mlp_reference, {"compute_dtype": torch.float64})):
        ts = {k: v.to(device, dtype).clone().requires_grad_(k == "Bg") for k, v in weights.items()}
        with C.forced_rows(1):
            fn(*ts.values(), 1.0, **extra).backward(dy.to(device, dtype))
        grads[dtype] = ts["Bg"].grad.double().cpu()
    exact = grads[torch.float64]
    assert float(exact) == pytest.approx(0.5 * float(dy[1:-1].double().sum()))
    assert float((grads[torch.float32] - exact).abs() / exact.abs()) < 1e-6, (grads, exact)
