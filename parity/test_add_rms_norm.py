"""add_rms_norm's gradients where one output is unused, which the property never draws (the
harness gives every output an upstream gradient): in a decoder layer s always feeds the next
residual add, but a caller may keep only y (or only s)."""
import torch

from workbench.kernels import _common
from workbench.kernels._harness import default_device
from workbench.kernels.add_rms_norm import add_rms_norm
from workbench.kernels.rms_norm import rms_norm

DEVICE = default_device()


def _inputs(dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(2, 5, 33, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    w = (torch.randn(33, generator=gen) * 0.5 + 1).to(DEVICE, dtype).requires_grad_()
    return x, r, w


def test_only_s_used_passes_its_gradient_through_the_add():
    x, r, w = _inputs()
    s, _ = add_rms_norm(x, r, w)
    ds = torch.randn(s.shape, generator=torch.Generator().manual_seed(1)).to(s)
    s.backward(ds)
    assert torch.equal(x.grad, ds) and torch.equal(r.grad, ds)
    assert w.grad is None or not w.grad.any()


def test_only_y_used_gives_rms_norms_gradients_of_s():
    x, r, w = _inputs()
    s, y = add_rms_norm(x, r, w)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    y.backward(dy)
    s_leaf, w_leaf = s.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_alone = rms_norm(s_leaf, w_leaf)
    y_alone.backward(dy)
    # The same kernels on the same s: bit for bit, with no ds term.
    assert torch.equal(y, y_alone)
    assert torch.equal(x.grad, s_leaf.grad) and torch.equal(r.grad, s_leaf.grad)
    assert torch.equal(w.grad, w_leaf.grad)


def test_x_and_r_get_gradients_of_their_own():
    # dx and dr are one tensor in the backward; the leaves' .grad must not share it, or an
    # accumulation into one (a second backward) would change the other.
    x, r, w = _inputs()
    s, y = add_rms_norm(x, r, w)
    (s.float().sum() + y.float().pow(2).sum()).backward()
    assert torch.equal(x.grad, r.grad) and x.grad.data_ptr() != r.grad.data_ptr()
    before = r.grad.clone()
    s, y = add_rms_norm(x, r, w)
    y.float().sum().backward()
    assert not torch.equal(r.grad, before) and torch.equal(x.grad, r.grad)


def test_s_is_torchs_add_bit_for_bit():
    # The doctrine's bound would let a truncated or double-rounded s through (an ulp is within 4x
    # torch's half ulp); the layer's residual stream must be torch's add exactly, as HF's is.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, r, w = _inputs(dtype, seed=3)
        for looped in (None, 16):  # the one-block path and the looped one (rows of 33 over blocks of 16)
            with _common.forced_block(looped), torch.no_grad():
                s, _ = add_rms_norm(x * 37, r, w)
            assert torch.equal(s, x * 37 + r), f"{dtype}, block {looped}"
