"""The one registry of kernels.

Every kernel file defines exactly one module-level ``SPEC = KernelSpec(...)``.
``workbench.kernels`` discovers those files, and ``parity/`` generates its
property tests from the specs: nothing else needs to know a kernel exists.

A spec says:
  * ``fn``         the public function (Triton);
  * ``reference``  the plain-PyTorch twin. It takes the same arguments as ``fn``
                   plus ``compute_dtype``: it upcasts to that dtype, computes, and
                   casts results back to the input dtype, exactly as the framework
                   code it replaces does in that dtype;
  * ``params``     ``params(limits) -> SearchStrategy[dict]``: shapes and options
                   as plain JSON-able data (so a failing case prints reproducibly);
  * ``make_inputs``  ``make_inputs(params, dtype, device, gen) -> Inputs``: builds
                   the tensors from the drawn params with a seeded generator;
  * ``outputs``    names of the outputs ``fn`` returns, in order;
  * ``grads``      names of the inputs whose gradients are compared (dX, dW, ...);
  * ``ablate``     optional, ``ablate(tensors) -> {name: tensor}``: replacements for
                   some inputs that remove one term of the outputs (LoRA: B = 0). The
                   harness then also compares the change of each output and of each
                   gradient between the two input sets (``delta:<output>``,
                   ``delta:grad:<input>``), by the same doctrine: a small term that
                   PyTorch's own arithmetic keeps must survive the kernel's too, which
                   the outputs alone cannot show when the term sits below their
                   rounding (a sum in too narrow a dtype);
  * ``examples``   targeted cases (:class:`Example`) the property runs first in every
                   profile, each with the reason it is there: shapes a profile's random
                   draws reach too rarely (a 16-bit accumulator needs a hundred rows a
                   program to show in bf16; fp16's flush to zero needs a large vocab).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Limits:
    """Shape budget of a hypothesis profile. Strategies draw within these."""

    name: str
    max_rows: int          # rows (tokens) of a 2-D activation
    max_hidden: int        # hidden / last dim
    max_vocab: int         # vocab of cross-entropy
    max_elements: int      # cap on rows * last_dim of the largest tensor in a case
    max_batch: int         # batch dim where a kernel has one (RoPE)
    max_heads: int
    max_seq: int
    max_head_dim: int
    forced_blocks: tuple[int, ...]  # small block widths to force the looped path


PROFILE_LIMITS: dict[str, Limits] = {
    # CPU interpreter: cost is programs x loop iterations, so shapes stay tiny.
    "ci": Limits("ci", max_rows=48, max_hidden=320, max_vocab=600, max_elements=24_000,
                 max_batch=3, max_heads=4, max_seq=12, max_head_dim=64, forced_blocks=(16, 32)),
    # Real shapes: hidden up to 8192, vocab up to 256k, rows up to 16k (not all at once).
    "gpu": Limits("gpu", max_rows=16_384, max_hidden=8192, max_vocab=262_144, max_elements=1 << 25,
                  max_batch=4, max_heads=32, max_seq=2048, max_head_dim=256, forced_blocks=(64, 256)),
    "nightly": Limits("nightly", max_rows=16_384, max_hidden=8192, max_vocab=262_144,
                      max_elements=1 << 26, max_batch=8, max_heads=64, max_seq=4096,
                      max_head_dim=256, forced_blocks=(64, 256, 1024)),
}


@dataclass
class Inputs:
    """Tensors and options for one call. ``tensors`` are passed by keyword in the
    order given; ``requires_grad`` names the float tensors that get gradients.
    A tensor may be a non-contiguous view: the harness never copies it."""

    tensors: dict[str, torch.Tensor | None]
    options: dict[str, Any] = field(default_factory=dict)
    requires_grad: tuple[str, ...] = ()


@dataclass(frozen=True)
class Example:
    """One targeted case of a kernel's property (a hypothesis ``@example``): ``params`` as
    the kernel's strategy draws them (harness keys included), run in ``dtypes`` (None:
    every dtype of the spec) with ``seed``. ``why`` says which bug it is there to catch."""

    params: dict[str, Any]
    why: str
    dtypes: tuple[torch.dtype, ...] | None = None
    seed: int = 0


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Callable[..., Any]
    reference: Callable[..., Any]
    params: Callable[[Limits], Any]
    make_inputs: Callable[[dict, torch.dtype, torch.device, torch.Generator], Inputs]
    outputs: tuple[str, ...]
    grads: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    options: tuple[str, ...] = ()
    summary: str = ""
    #: False for kernels with no differentiable input (NF4 dequantization of frozen
    #: weights); every other kernel must compare at least one gradient.
    differentiable: bool = True
    ablate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    examples: tuple[Example, ...] = ()

    def examples_for(self, dtype: torch.dtype) -> list[Example]:
        return [e for e in self.examples if e.dtypes is None or dtype in e.dtypes]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "function": f"{self.fn.__module__}.{self.fn.__qualname__}",
            "reference": f"{self.reference.__module__}.{self.reference.__qualname__}",
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "outputs": list(self.outputs),
            "grads": list(self.grads),
            "deltas": ([*self.outputs, *(f"grad:{g}" for g in self.grads)] if self.ablate is not None else []),
            "options": list(self.options),
            "summary": self.summary,
        }
