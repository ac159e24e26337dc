"""Forward and gradient parity of every registered kernel, generated from the registry.

One test per (kernel, dtype). Each hypothesis example builds inputs from drawn
shapes/options/seed and compares every output and every gradient of the Triton
kernel against the fp64 reference, with PyTorch's own error in that dtype as the
yardstick (workbench.kernels._tolerance).
"""
import pytest

from workbench.kernels import registry

from ._support import check_property, dtype_name

CASES = [pytest.param(spec, dtype, id=f"{name}-{dtype_name(dtype)}")
         for name, spec in registry().items() for dtype in spec.dtypes]


@pytest.mark.parametrize(("spec", "dtype"), CASES)
def test_parity(spec, dtype):
    check_property(spec, dtype)
