"""Static check: no ``tl.program_id`` product is formed in int32.

``tl.program_id`` is an int32. A kernel that multiplies it (or anything computed from it)
by a stride, a row size or a block before casting to int64 forms the memory offset in
int32, which wraps past 2^31 elements: a [16k, 131k] bf16 logits tensor is already past
it. No test shape the CPU can afford comes near 2^31, so this check reads the source
instead: in every ``@triton.jit`` function, a value derived from ``tl.program_id`` that
has not gone through ``.to(tl.int64)`` / ``tl.cast(..., tl.int64)`` must not be an
operand of ``*``. Strict on purpose: even a head index times a constexpr block is cast
first, so that the rule needs no judgement of which products can grow.

Taint follows assignments in statement order (both branches of an ``if``, loop bodies
twice), ``range`` bounds into the loop variable, arithmetic, ``tl.minimum``/``maximum``/
``where``, subscripts, and calls of other jit functions (into their parameters, until
nothing changes): of the same file, and of the sibling modules it imports them from
(``from ._elementwise import offset``, or ``from . import _elementwise as E`` and
``E.offset(...)``), whose shared helpers several kernels call. The GPU profile's dedicated >2^31-element cases
(``parity/large.py``) are the dynamic counterpart.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: Calls whose result carries the taint of their arguments (index arithmetic).
_PROPAGATING = {"minimum", "maximum", "where", "multiple_of", "max_contiguous", "abs", "cdiv"}
_INT64 = {"int64", "uint64"}


@dataclass(frozen=True)
class Finding:
    file: str
    function: str
    line: int
    expr: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}: {self.expr} (a program_id product in int32)"


def _is_jit(node: ast.FunctionDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "jit":
            return True
    return False


def _is_int64(node: ast.AST) -> bool:
    """``tl.int64`` (or a bare ``int64``)."""
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return name in _INT64


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


#: A jit function: (file, name).
_Key = tuple[str, str]


class _Function:
    """One pass over a jit function with a given set of tainted parameters. ``scope`` maps
    the callable names of its file (``"_to"``, or ``("E", "offset")`` for a module alias)
    to the jit functions they are."""

    def __init__(self, node: ast.FunctionDef, source: str, file: str, tainted_params: set[str],
                 scope: dict[str | tuple[str, str], _Key]):
        self.node, self.source, self.file = node, source, file
        self.tainted = set(tainted_params)
        self.scope = scope
        self.findings: dict[tuple[int, int], Finding] = {}
        self.calls: list[tuple[_Key, int | str]] = []  # (callee, positional index or keyword) of tainted arguments

    def run(self) -> None:
        self._block(self.node.body)

    # ----------------------------------------------------------------- statements
    def _block(self, body) -> None:
        for stmt in body:
            self._stmt(stmt)

    def _stmt(self, stmt) -> None:
        if isinstance(stmt, ast.Assign):
            t = self._taint(stmt.value)
            for target in stmt.targets:
                self._assign(target, t)
        elif isinstance(stmt, ast.AugAssign):
            t = self._taint(stmt.target) | self._taint(stmt.value)
            if isinstance(stmt.op, ast.Mult) and t:
                self._found(stmt)
            self._assign(stmt.target, t)
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            self._assign(stmt.target, self._taint(stmt.value))
        elif isinstance(stmt, ast.If):
            self._taint(stmt.test)
            before = set(self.tainted)
            self._block(stmt.body)
            after_body = self.tainted
            self.tainted = set(before)
            self._block(stmt.orelse)
            self.tainted |= after_body
        elif isinstance(stmt, (ast.For, ast.While)):
            if isinstance(stmt, ast.For):
                self._assign(stmt.target, self._taint(stmt.iter))
            else:
                self._taint(stmt.test)
            for _ in range(2):  # loop-carried taint
                self._block(stmt.body)
            self._block(stmt.orelse)
        elif isinstance(stmt, ast.Return) and stmt.value is not None:
            self._taint(stmt.value)
        elif isinstance(stmt, ast.Expr):
            self._taint(stmt.value)
        elif isinstance(stmt, (ast.With,)):
            self._block(stmt.body)
        else:
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.expr):
                    self._taint(child)

    def _found(self, node) -> None:
        self.findings.setdefault((node.lineno, node.col_offset), Finding(
            self.file, self.node.name, node.lineno, ast.get_source_segment(self.source, node) or ast.unparse(node)))

    def _assign(self, target, tainted: bool) -> None:
        if isinstance(target, ast.Name):
            (self.tainted.add if tainted else self.tainted.discard)(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self._assign(elt, tainted)

    # ----------------------------------------------------------------- expressions
    def _taint(self, node) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.tainted
        if isinstance(node, ast.Constant):
            return False
        if isinstance(node, ast.BinOp):
            left, right = self._taint(node.left), self._taint(node.right)
            if isinstance(node.op, ast.Mult) and (left or right):
                self._found(node)
            return left or right
        if isinstance(node, ast.UnaryOp):
            return self._taint(node.operand)
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self._taint(child)
            return False
        if isinstance(node, ast.Subscript):
            self._taint(node.slice)
            return self._taint(node.value)
        if isinstance(node, ast.IfExp):
            self._taint(node.test)
            return self._taint(node.body) | self._taint(node.orelse)
        if isinstance(node, (ast.Tuple, ast.List)):
            return any([self._taint(e) for e in node.elts])
        if isinstance(node, ast.Attribute):
            self._taint(node.value)
            return False
        if isinstance(node, ast.Call):
            return self._call(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._taint(child)
        return False

    def _call(self, node: ast.Call) -> bool:
        name = _call_name(node)
        args = [self._taint(a) for a in node.args]
        kwargs = {k.arg: self._taint(k.value) for k in node.keywords}
        if name == "program_id":
            return True
        if name == "to" and isinstance(node.func, ast.Attribute):  # x.to(dtype)
            inner = self._taint(node.func.value)
            dtype = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "dtype"), None)
            return inner and not (dtype is not None and _is_int64(dtype))
        if isinstance(node.func, ast.Attribute):
            self._taint(node.func.value)
        if name == "cast":  # tl.cast(x, dtype)
            dtype = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "dtype"),
                                                                None)
            return bool(args and args[0]) and not (dtype is not None and _is_int64(dtype))
        if name == "range" or name == "static_range":
            return any(args)
        callee = self._callee(node.func)
        if callee is not None:
            for i, t in enumerate(args):
                if t:
                    self.calls.append((callee, i))
            for k, t in kwargs.items():
                if t and k:
                    self.calls.append((callee, k))
            return any(args) or any(kwargs.values())
        if name in _PROPAGATING:
            return any(args) or any(kwargs.values())
        return False


    def _callee(self, func) -> _Key | None:
        if isinstance(func, ast.Name):
            return self.scope.get(func.id)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return self.scope.get((func.value.id, func.attr))
        return None


#: The source of a sibling module by name (``"_elementwise"``), or None when there is none.
Resolve = Callable[[str], "str | None"]


@dataclass
class _Module:
    file: str
    source: str
    funcs: dict[str, ast.FunctionDef]
    scope: dict[str | tuple[str, str], _Key]


def _modules(source: str, file: str, resolve: Resolve | None) -> dict[str, _Module]:
    """The file and the sibling modules whose jit functions it calls, transitively, by file."""
    found: dict[str, _Module] = {}
    pending = [(file, source)]
    while pending:
        file, source = pending.pop()
        if file in found:
            continue
        tree = ast.parse(source)
        funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and _is_jit(n)}
        scope: dict[str | tuple[str, str], _Key] = {name: (file, name) for name in funcs}
        found[file] = _Module(file, source, funcs, scope)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level == 1 and resolve is not None):
                continue
            for alias in node.names:
                module = node.module or alias.name  # from .m import f / from . import m
                text = resolve(module)
                if text is None:
                    continue
                other = f"{module}.py"
                pending.append((other, text))
                local = alias.asname or alias.name
                if node.module:
                    scope.setdefault(local, (other, alias.name))
                else:
                    found[file].scope.update({(local, name): (other, name) for name in _jit_names(text)})
    # an import names a function, which may not be jit: keep only the jit ones
    for module in found.values():
        module.scope = {k: v for k, v in module.scope.items() if v[0] in found and v[1] in found[v[0]].funcs}
    return found


def _jit_names(source: str) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and _is_jit(n)}


def findings_in_source(source: str, file: str = "<source>", resolve: Resolve | None = None) -> list[Finding]:
    """Every int32 program_id product in the ``@triton.jit`` functions of ``source``, and in
    the jit functions it calls from the sibling modules ``resolve`` finds when taint flows into
    them (their own findings are their own file's)."""
    modules = _modules(source, file, resolve)
    funcs = {(m.file, name): (node, m) for m in modules.values() for name, node in m.funcs.items()}
    params = {key: [a.arg for a in (*node.args.posonlyargs, *node.args.args)] for key, (node, _) in funcs.items()}
    tainted: dict[_Key, set[str]] = {key: set() for key in funcs}
    results: dict[_Key, list[Finding]] = {}
    changed = True
    while changed:
        changed = False
        for key, (node, module) in funcs.items():
            if key[0] != file and not tainted[key]:
                continue
            fn = _Function(node, module.source, module.file, tainted[key], module.scope)
            fn.run()
            results[key] = list(fn.findings.values())
            for callee, where in fn.calls:
                names = params[callee]
                param = names[where] if isinstance(where, int) and where < len(names) else where
                if isinstance(param, str) and param not in tainted[callee]:
                    tainted[callee].add(param)
                    changed = True
    return sorted((f for fs in results.values() for f in fs), key=lambda f: (f.file, f.line))


def siblings(directory: Path) -> Resolve:
    """Resolve the sibling modules of the files in ``directory``."""
    def resolve(module: str) -> str | None:
        path = directory / f"{module}.py"
        return path.read_text() if path.is_file() else None
    return resolve


def findings_in_file(path: Path) -> list[Finding]:
    return findings_in_source(path.read_text(), path.name, siblings(path.parent))
