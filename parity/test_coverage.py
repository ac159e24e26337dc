"""Meta-tests: no Triton code escapes pairing with a reference and parity tests."""
import importlib.util
import sys
from pathlib import Path

import workbench.kernels as K

from .coverage import jit_functions_in_file, reachable_jit

KERNELS_DIR = Path(K.__file__).parent


def _all_jit() -> set:
    found = set()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        found |= jit_functions_in_file(path)
    return found


def test_every_jit_function_is_reachable_from_a_registered_kernel():
    specs = K.registry()
    reached = reachable_jit([spec.fn for spec in specs.values()], "workbench.kernels")
    orphans = sorted(_all_jit() - reached)
    assert _all_jit(), "found no @triton.jit function at all: the scan is broken"
    assert not orphans, ("these @triton.jit functions are not reachable from any registered kernel, so no "
                         f"parity test exercises them: {orphans}. Register the kernel (SPEC) or delete them.")


def test_every_kernel_module_registers_exactly_one_spec():
    for modname in K.kernel_modules():
        module = sys.modules[modname] if modname in sys.modules else importlib.import_module(modname)
        assert isinstance(getattr(module, "SPEC", None), K.KernelSpec), modname


def test_every_spec_has_reference_outputs_and_grads():
    for name, spec in K.registry().items():
        assert spec.reference is not spec.fn, name
        assert spec.outputs, f"{name} compares no output"
        assert bool(spec.grads) == spec.differentiable, (
            f"{name}: a differentiable kernel must compare its gradients (and only such a kernel may list them)")


def test_the_scan_catches_an_orphan(tmp_path):
    # The meta-test must be able to fail: an unregistered jit function is reported.
    src = (
        "import triton\nimport triton.language as tl\nimport torch\n"
        "@triton.jit\ndef _used(X):\n    tl.store(X, 1.0)\n"
        "@triton.jit\ndef _helper(x):\n    return x\n"
        "@triton.jit\ndef _orphan(X):\n    tl.store(X, _helper(2.0))\n"
        "class _F(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n"
        "        _used[(1,)](x)\n        return x\n"
        "def public(x):\n    return _F.apply(x)\n"
    )
    path = tmp_path / "fake_kernel.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("workbench.kernels._fake_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reached = reachable_jit([module.public], "workbench.kernels")
    declared = {("_fake_kernel", n) for _, n in jit_functions_in_file(path)}
    assert ("_fake_kernel", "_used") in reached
    assert declared - reached == {("_fake_kernel", "_orphan"), ("_fake_kernel", "_helper")}
