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
