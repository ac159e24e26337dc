"""Static reachability of @triton.jit functions from the registered kernels.

Every jit function in ``kernels/`` must be reachable from some registered
kernel's public function, through plain calls, autograd Functions (forward and
backward), module attributes (``C.tanh``) and jit-to-jit calls. Reachability is
computed from source (AST names resolved in each function's globals), so it is
the same on the CPU and on the GPU and needs no launch.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types
from pathlib import Path

import torch
from triton.runtime.jit import KernelInterface


def _unwrap_jit(obj):
    """The Python function behind a jit/autotune/heuristics wrapper."""
    while isinstance(obj, KernelInterface) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def jit_functions_in_file(path: Path) -> set[tuple[str, str]]:
    """(file stem, function name) of every def decorated with something ending in ``jit``."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                if name == "jit":
                    found.add((path.stem, node.name))
    return found


def _names(fn) -> list[list[str]]:
    """Dotted name chains referenced in ``fn``'s source: ``C.tanh`` -> ['C', 'tanh']."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return []
    chains = []
    for node in ast.walk(ast.parse(src)):
        chain = []
        cur = node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and (chain or isinstance(node, ast.Name)):
            chains.append([cur.id, *reversed(chain)])
    return chains


def reachable_jit(roots, package: str) -> set[tuple[str, str]]:
    """(module stem, name) of the jit functions reachable from ``roots``.
    Only objects defined inside ``package`` are followed."""
    seen_ids: set[int] = set()
    reached: set[tuple[str, str]] = set()
    stack = list(roots)

    def ours(obj) -> bool:
        mod = getattr(obj, "__module__", "") or ""
        return mod == package or mod.startswith(package + ".")

    while stack:
        obj = stack.pop()
        if id(obj) in seen_ids:
            continue
        seen_ids.add(id(obj))
        if isinstance(obj, KernelInterface):
            fn = _unwrap_jit(obj)
            reached.add((fn.__module__.rsplit(".", 1)[-1], fn.__name__))
            obj = fn
        elif isinstance(obj, type):
            if ours(obj):
                stack.extend(v for k, v in vars(obj).items() if isinstance(v, (staticmethod, classmethod, types.FunctionType)))
            continue
        elif isinstance(obj, (staticmethod, classmethod)):
            stack.append(obj.__func__)
            continue
        if not isinstance(obj, types.FunctionType) or not ours(obj):
            continue
        obj = inspect.unwrap(obj)   # a decorated backward: its own globals, not the decorator's
        globs = obj.__globals__
        for chain in _names(obj):
            target = globs.get(chain[0], None)
            for attr in chain[1:]:
                if isinstance(target, type) and issubclass(target, torch.autograd.Function) and attr == "apply":
                    break
                if isinstance(target, (types.ModuleType, type)):
                    target = getattr(target, attr, None)
                else:
                    break
            if target is not None:
                stack.append(target)
    return reached
