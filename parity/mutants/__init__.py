"""Mutation self-test support: planted bugs that the parity suite must catch.

Each kernel's mutants live in ``parity/mutants/<kernel>.py`` as a list
``MUTANTS``. A mutant is a textual patch of the kernel's source file: the patched
file is imported as a separate module (the real kernel is untouched) and its
``SPEC`` is run through the same property the suite runs (``runner.py``, in a worker
process, so that a crash counts as a kill without taking the suite down). A mutant that
passes is a hole in the suite: close the hole, never drop the mutant.
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
    #: The dedicated >2^31-element case (``parity/large.py``) that kills it on the GPU, for a
    #: bug no CPU-sized shape can show (an int32 offset); on the CPU the static check does.
    large: str | None = None

    @property
    def id(self) -> str:
        return f"{self.kernel}:{self.name}"


_TMP = Path(tempfile.mkdtemp(prefix="parity-mutants-"))


class StaleMutant(Exception):
    """The mutant's text no longer occurs in the kernel's source: the mutant needs updating
    (an error of the suite, never a kill)."""


def mutated_source(mutant: Mutant) -> str:
    """The kernel file's source with the mutant's patch applied."""
    original = sys.modules[get(mutant.kernel).fn.__module__]
    source = Path(original.__file__).read_text()
    found = source.count(mutant.old)
    if found != mutant.count:
        raise StaleMutant(f"mutant {mutant.id}: expected {mutant.count} occurrence(s) of the patched text, "
                          f"found {found}; update the mutant to the kernel's current source")
    return source.replace(mutant.old, mutant.new)


def load(mutant: Mutant) -> KernelSpec:
    """Import the mutated kernel file as its own module and return its SPEC."""
    modname = f"workbench.kernels._mutant_{mutant.kernel}_{mutant.name}"
    path = _TMP / f"{modname.rsplit('.', 1)[1]}.py"
    path.write_text(mutated_source(mutant))
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module.SPEC


def all_mutants() -> list[Mutant]:
    found: list[Mutant] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "runner":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(module.MUTANTS)
    return found
