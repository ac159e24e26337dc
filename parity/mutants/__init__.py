"""Mutation self-test support: planted bugs that the parity suite must catch.

Each kernel's mutants live in ``parity/mutants/<kernel>.py`` as a list
``MUTANTS``. A mutant is a textual patch of the kernel's source file: the patched
file is imported as a separate module (the real kernel is untouched) and its
``SPEC`` is run through the same property the suite runs. A mutant that passes
is a hole in the suite: close the hole, never drop the mutant.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import tempfile
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

    @property
    def id(self) -> str:
        return f"{self.kernel}:{self.name}"


_TMP = Path(tempfile.mkdtemp(prefix="parity-mutants-"))


def load(mutant: Mutant) -> KernelSpec:
    """Import the mutated kernel file as its own module and return its SPEC."""
    original = sys.modules[get(mutant.kernel).fn.__module__]
    source = Path(original.__file__).read_text()
    found = source.count(mutant.old)
    if found != mutant.count:
        raise AssertionError(f"mutant {mutant.id}: expected {mutant.count} occurrence(s) of the patched text, "
                             f"found {found}; update the mutant to the kernel's current source")
    modname = f"workbench.kernels._mutant_{mutant.kernel}_{mutant.name}"
    path = _TMP / f"{modname.rsplit('.', 1)[1]}.py"
    path.write_text(source.replace(mutant.old, mutant.new))
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module.SPEC


def all_mutants() -> list[Mutant]:
    found: list[Mutant] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(module.MUTANTS)
    return found
