"""Bad input to any registered kernel gets a clear KernelInputError, never a Triton crash."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import find

from workbench.kernels import PROFILE_LIMITS, registry
from workbench.kernels._common import KernelInputError
from workbench.kernels._harness import BLOCK_KEY, ROWS_KEY, default_device

# Bad input is built where the kernels run (CUDA, or the CPU under the interpreter):
# otherwise the CPU-tensor check answers first and the test checks nothing else.
DEVICE = default_device()

SPECS = list(registry().values())


def smallest_inputs(spec, dtype=torch.float32):
    """The minimal case of the kernel's own strategy (hypothesis shrinks to it deterministically)."""
    params = dict(find(spec.params(PROFILE_LIMITS["ci"]), lambda _: True))
    params.pop(BLOCK_KEY, None)
    params.pop(ROWS_KEY, None)
    gen = torch.Generator().manual_seed(0)
    return spec.make_inputs(params, dtype, DEVICE, gen)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("bad", [torch.float64, torch.int32])
def test_wrong_dtype_is_a_clear_error(spec, bad):
    inputs = smallest_inputs(spec)
    floats = [n for n, t in inputs.tensors.items() if t is not None and t.is_floating_point()]
    for name in floats:
        tensors = dict(inputs.tensors)
        tensors[name] = tensors[name].to(bad)
        with pytest.raises(KernelInputError, match=r"dtype"):
            spec.fn(**tensors, **inputs.options)


def _float_names(spec):
    inputs = smallest_inputs(spec)
    return [n for n, t in inputs.tensors.items() if t is not None and t.is_floating_point()]


MULTI_FLOAT = [s for s in SPECS if len(_float_names(s)) >= 2]


@pytest.mark.parametrize("spec", MULTI_FLOAT, ids=[s.name for s in MULTI_FLOAT])
def test_mixed_dtypes_are_a_clear_error(spec):
    inputs = smallest_inputs(spec)
    floats = [n for n, t in inputs.tensors.items() if t is not None and t.is_floating_point()]
    assert len(floats) >= 2, f"{spec.name}: its smallest case has fewer than two float inputs: {floats}"
    tensors = dict(inputs.tensors)
    tensors[floats[-1]] = tensors[floats[-1]].to(torch.float16)
    with pytest.raises(KernelInputError):
        spec.fn(**tensors, **inputs.options)


def test_cpu_tensor_without_the_interpreter_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the message is about CPU tensors)")
    code = (
        "import torch\n"
        "from workbench.kernels import registry\n"
        "from workbench.kernels._common import KernelInputError\n"
        "from parity.test_bad_input import smallest_inputs\n"
        "for spec in registry().values():\n"
        "    inputs = smallest_inputs(spec)\n"
        "    try:\n"
        "        spec.fn(**inputs.tensors, **inputs.options)\n"
        "    except KernelInputError as err:\n"
        "        assert 'CUDA' in str(err) and 'TRITON_INTERPRET' in str(err), err\n"
        "        print('ok', spec.name)\n"
        "    else:\n"
        "        raise SystemExit(f'{spec.name}: no error for a CPU tensor without the interpreter')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == len(SPECS)


# Mismatched shapes, one realistic mistake per kernel, each a KernelInputError that names the tensor.
def _f(*shape):
    return torch.randn(*shape, device=DEVICE)


SHAPE_MISTAKES = {
    "rms_norm": (lambda: dict(x=_f(2, 8), weight=_f(7)), "weight"),
    "add_rms_norm": (lambda: dict(x=_f(2, 8), r=_f(2, 7), w=_f(8)), "r"),
    "layer_norm": (lambda: dict(x=_f(2, 8), weight=_f(8), bias=_f(9)), "bias"),
    "swiglu": (lambda: dict(gate=_f(2, 8), up=_f(2, 7)), "up"),
    "geglu": (lambda: dict(gate=_f(2, 8), up=_f(8, 2)), "up"),
    "cross_entropy": (lambda: dict(logits=_f(4, 10), target=torch.zeros(3, dtype=torch.long, device=DEVICE)), "target"),
    "rope": (lambda: dict(q=_f(1, 2, 5, 8), k=_f(1, 1, 4, 8), cos=_f(1, 5, 8), sin=_f(1, 5, 8)), "k"),
    "fused_linear_cross_entropy": (lambda: dict(hidden=_f(4, 8), weight=_f(10, 7),
                                                target=torch.zeros(4, dtype=torch.long, device=DEVICE)), "weight"),
    "fused_linear_preference": (lambda: dict(hidden=_f(2, 5, 8), weight=_f(10, 8),
                                             labels=torch.zeros(2, 4, dtype=torch.long, device=DEVICE),
                                             ref_chosen_logps=_f(1), ref_rejected_logps=_f(1)), "labels"),
    "lora_o": (lambda: dict(x=_f(2, 8), W=_f(6, 8), A=_f(4, 8), B=_f(6, 3), scaling=2.0), "B"),
    "lora_qkv": (lambda: dict(x=_f(2, 8), Wq=_f(8, 8), Aq=_f(2, 8), Bq=_f(8, 2), Wk=_f(4, 8), Ak=_f(2, 7),
                              Bk=_f(4, 2), Wv=_f(4, 8), Av=_f(2, 8), Bv=_f(4, 2), scaling=2.0), "Ak"),
    "lora_mlp": (lambda: dict(x=_f(2, 8), Wg=_f(6, 8), Ag=_f(2, 8), Bg=_f(6, 2), Wu=_f(6, 8), Au=_f(2, 8),
                              Bu=_f(6, 2), Wd=_f(8, 5), Ad=_f(2, 6), Bd=_f(8, 2), scaling=2.0), "Wd"),
    "nf4_dequant": (lambda: dict(packed=torch.zeros(4, 1, dtype=torch.uint8, device=DEVICE),
                                    absmax=torch.ones(1, device=DEVICE), shape=(2, 5)),
                    "packed"),
}


def test_every_kernel_has_a_shape_mistake_case():
    assert set(SHAPE_MISTAKES) == set(registry())


@pytest.mark.parametrize("name", sorted(SHAPE_MISTAKES))
def test_mismatched_shapes_are_a_clear_error(name):
    make, culprit = SHAPE_MISTAKES[name]
    with pytest.raises(KernelInputError, match=culprit) as info:
        registry()[name].fn(**make())
    assert "\n" not in str(info.value)
