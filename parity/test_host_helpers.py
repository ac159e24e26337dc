"""The launchers' host-side integer helpers (``_common.cdiv``, ``_common.next_pow2``) give
Triton's own answers (``triton.cdiv``, ``triton.next_power_of_2``), which they replace on the
host for speed: every grid and block size depends on them."""
import triton

from workbench.kernels import _common as C


def test_cdiv_and_next_pow2_agree_with_tritons():
    for n in range(0, 3000):
        for d in (1, 2, 3, 7, 16, 64, 1000):
            assert C.cdiv(n, d) == triton.cdiv(n, d), (n, d)
        assert C.next_pow2(max(n, 1)) == triton.next_power_of_2(max(n, 1)), n
    for n in (2**31 - 1, 2**31, 2**31 + 1, 2**40 + 3):  # past int32, where grids of large tensors go
        assert C.cdiv(n, 1024) == triton.cdiv(n, 1024) and C.next_pow2(n) == triton.next_power_of_2(n)
    assert C.next_pow2(0) == 1  # an empty dimension still gets a block of one


def test_stack_rows_is_a_view_only_where_the_rows_lie_back_to_back():
    """``_lora_ops.stack_rows`` stacks q/k/v's (or gate/up's) A's: a view of their buffer where
    the patcher's adapter cast laid them out in order, else a copy; the values are cat's."""
    import torch

    from workbench.kernels._lora_ops import stack_rows

    flat = torch.arange(2 * 8 + 3 * 8 + 1 * 8 + 4, dtype=torch.float32)
    a, b, c = flat[:16].view(2, 8), flat[16:40].view(3, 8), flat[40:48].view(1, 8)
    stacked = stack_rows((a, b, c))
    assert torch.equal(stacked, torch.cat((a, b, c))) and stacked.shape == (6, 8)
    assert stacked.data_ptr() == a.data_ptr() and stacked.untyped_storage().data_ptr() == flat.data_ptr()
    # out of order; a gap; another buffer; shifted by one element
    for ts in ((b, a), (a, c), (a, b.clone(), c), (a, flat[17:41].view(3, 8), c)):
        out = stack_rows(ts)
        assert torch.equal(out, torch.cat(ts)), "not back to back: cat's values"
        assert out.untyped_storage().data_ptr() != flat.data_ptr(), "not back to back: a copy, not a view"
    assert stack_rows((b,)) is b
