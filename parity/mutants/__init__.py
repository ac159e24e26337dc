"""Mutation self-test support: planted bugs that the parity suite must catch.

Each kernel's mutants live in ``parity/mutants/<kernel>.py`` as a list
``MUTANTS``. A mutant is a textual patch of a kernel's source: of the kernel's own
file, or of a shared module it imports (``module``, e.g. ``"_lora_ops"``, whose
building blocks several kernels run). The patched file is imported as a separate
module (the real one is untouched) and the kernel's ``SPEC`` is run through the same
property the suite runs (in a worker process, ``mutant_worker.py``, so that a crash
counts as a kill without taking the suite down). For a shared module, a fresh copy of
the kernel's own file is imported too, and its references to the shared module (the
module itself, or names imported from it) are rebound to the patched copy, so the
kernel under test calls the planted bug. A mutant that passes is a hole in the
suite: close the hole, never drop the mutant.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.kernels import KernelSpec, get


@dataclass(frozen=True)
class Mutant:
    kernel: str          # registered kernel name
    name: str            # short id
    why: str             # the bug it models
    old: str             # exact source text to replace ...
    new: str             # ... with this
    count: int = 1       # how many times ``old`` must occur (all are replaced)
    dtypes: tuple[torch.dtype, ...] = field(default=(torch.float32,))
    #: The dedicated >2^31-element case (``parity/large.py``) that kills it on the GPU, for a
    #: bug no CPU-sized shape can show (an int32 offset); on the CPU the static check does.
    large: str | None = None
    #: The module the patch applies to, under ``workbench.kernels`` (``"_lora_ops"``): a shared module
    #: the kernel imports. None: the kernel's own file.
    module: str | None = None
    #: Where the patched line runs: "cpu" for a line of a CPU-only path (a fallback the GPU never
    #: takes, which a GPU run could not kill); its GPU twin plants the same bug in the GPU's line.
    devices: tuple[str, ...] = ("cpu", "cuda")

    @property
    def id(self) -> str:
        return f"{self.kernel}:{self.name}"


_TMP = Path(tempfile.mkdtemp(prefix="parity-mutants-"))


class StaleMutant(Exception):
    """The mutant's text no longer occurs in the kernel's source: the mutant needs updating
    (an error of the suite, never a kill)."""


def _kernel_module(mutant: Mutant) -> types.ModuleType:
    return sys.modules[get(mutant.kernel).fn.__module__]


def target_module(mutant: Mutant) -> types.ModuleType:
    """The module whose source the mutant patches: the kernel's own, or ``mutant.module``."""
    if mutant.module is None:
        return _kernel_module(mutant)
    return importlib.import_module(f"workbench.kernels.{mutant.module}")


def mutated_source(mutant: Mutant) -> str:
    """The patched module's source with the mutant's patch applied."""
    source = Path(target_module(mutant).__file__).read_text()
    found = source.count(mutant.old)
    if found != mutant.count:
        raise StaleMutant(f"mutant {mutant.id}: expected {mutant.count} occurrence(s) of the patched text in "
                          f"{Path(target_module(mutant).__file__).name}, found {found}; update the mutant to "
                          "the current source")
    return source.replace(mutant.old, mutant.new)


def _exec(modname: str, source: str) -> types.ModuleType:
    """``source`` imported as the module ``modname`` (a file of its own, so tracebacks and
    ``inspect`` see it; relative imports resolve in ``workbench.kernels``)."""
    path = _TMP / f"{modname.rsplit('.', 1)[1]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module


def _rebind(module: types.ModuleType, original: types.ModuleType, patched: types.ModuleType) -> list[str]:
    """Point ``module``'s references to ``original`` at ``patched``: the module itself
    (``from . import _lora_ops as O``) and every name imported from it (``from ._lora_ops
    import lora_forward``, also under another name). Functions read their globals when
    called, so the kernel's Functions and jit kernels then run the patched code. Returns
    the names rebound."""
    defined = {id(v): k for k, v in vars(original).items()  # (a jit function's own module is its .fn's)
               if getattr(getattr(v, "fn", v), "__module__", None) == original.__name__}
    rebound = []
    for name, value in list(vars(module).items()):
        if value is original:
            new = patched
        elif vars(original).get(name, object()) is value and not isinstance(value, types.ModuleType):
            if name not in vars(patched):  # planted at run time, not by the source: Triton's interpreter
                continue                   # copies its own globals (``dataclass``...) into a kernel's module
            new = getattr(patched, name)
        elif id(value) in defined:
            new = getattr(patched, defined[id(value)])
        else:
            continue
        if new is value:  # a constant or a name both import (``annotations``): nothing to rebind
            continue
        setattr(module, name, new)
        rebound.append(name)
    return rebound


def load(mutant: Mutant) -> KernelSpec:
    """Import the mutated source as its own module and return the SPEC of the mutant's
    kernel that runs it: the mutated kernel file's own, or, for a shared module, that of a
    fresh copy of the kernel file bound to the mutated module."""
    modname = f"workbench.kernels._mutant_{mutant.kernel}_{mutant.name}"
    if mutant.module is None:
        return _exec(modname, mutated_source(mutant)).SPEC
    original = target_module(mutant)
    patched = _exec(f"{modname}_{mutant.module.lstrip('_')}", mutated_source(mutant))
    kernel_file = Path(_kernel_module(mutant).__file__)
    kernel = _exec(modname, kernel_file.read_text())
    rebound = _rebind(kernel, original, patched)
    if not rebound:
        raise StaleMutant(f"mutant {mutant.id}: {kernel_file.name} does not import {mutant.module}, so the "
                          "patch cannot reach the kernel; name the kernel that runs it")
    return kernel.SPEC


def all_mutants() -> list[Mutant]:
    found: list[Mutant] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "runner":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(module.MUTANTS)
    return found
