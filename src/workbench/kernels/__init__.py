"""Triton training kernels, each paired with its PyTorch reference.

Import as ``workbench.kernels``. Every public module here defines one ``SPEC``;
:func:`registry` discovers them, so registering a kernel means writing its file.
"""
from __future__ import annotations

import importlib
import pkgutil

from ._registry import PROFILE_LIMITS, Example, Inputs, KernelSpec, Limits

__all__ = ["KernelSpec", "Example", "Inputs", "Limits", "PROFILE_LIMITS", "registry", "get", "kernel_modules"]

_REGISTRY: dict[str, KernelSpec] | None = None


def kernel_modules() -> list[str]:
    """Fully qualified names of the kernel modules (public files of this package)."""
    return sorted(
        f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
    )


def registry() -> dict[str, KernelSpec]:
    """Every registered kernel, by name, in a stable order."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, KernelSpec] = {}
        for modname in kernel_modules():
            module = importlib.import_module(modname)
            spec = getattr(module, "SPEC", None)
            if not isinstance(spec, KernelSpec):
                raise ImportError(f"{modname} defines no SPEC = KernelSpec(...); every kernel file registers itself.")
            if spec.name in found:
                raise ImportError(f"kernel {spec.name!r} is registered twice ({modname}).")
            found[spec.name] = spec
        _REGISTRY = found
    return _REGISTRY


def get(name: str) -> KernelSpec:
    specs = registry()
    if name not in specs:
        raise KeyError(f"no kernel named {name!r}; registered: {', '.join(specs)}")
    return specs[name]
