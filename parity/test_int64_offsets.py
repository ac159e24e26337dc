"""No kernel forms a program_id product in int32 (``parity/int64_offsets.py``): the CPU's guard
against offsets that wrap past 2^31 elements, which no CPU-sized shape reaches."""
import ast
from pathlib import Path

import pytest

import workbench.kernels as K

from .int64_offsets import findings_in_file, findings_in_source

KERNELS_DIR = Path(K.__file__).parent
FILES = sorted(p for p in KERNELS_DIR.glob("*.py"))


def _jit_count(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
               and any("jit" in ast.unparse(d) for d in n.decorator_list))


def test_the_tree_forms_no_int32_program_id_product():
    assert sum(_jit_count(p) for p in FILES) >= 10, "found almost no @triton.jit function: the scan is broken"
    found = [str(f) for p in FILES for f in findings_in_file(p)]
    assert not found, ("cast tl.program_id (or what is computed from it) to int64 before multiplying it by a "
                       "stride, a row size or a block, or the offset wraps past 2^31 elements:\n  "
                       + "\n  ".join(found))


_HEAD = "import triton\nimport triton.language as tl\n\n"


def _findings(body: str) -> list[str]:
    return [f.expr for f in findings_in_source(_HEAD + body)]


def test_a_planted_int32_product_fails():
    # The bug of a row kernel over [16k, 131k] logits: row * stride wraps at 2^31.
    src = ("@triton.jit\n"
           "def _fwd(X, Y, stride, n_cols, BLOCK: tl.constexpr):\n"
           "    row = tl.program_id(0)\n"
           "    cols = tl.arange(0, BLOCK)\n"
           "    x = tl.load(X + row * stride + cols, mask=cols < n_cols)\n"
           "    tl.store(Y + row * stride + cols, x, mask=cols < n_cols)\n")
    assert _findings(src) == ["row * stride", "row * stride"]


@pytest.mark.parametrize(("body", "expected"), [
    # cast first: clean
    ("    row = tl.program_id(0).to(tl.int64)\n    p = X + row * stride\n", []),
    ("    row = tl.cast(tl.program_id(0), tl.int64)\n    p = X + row * stride\n", []),
    ("    row = tl.program_id(0)\n    r64 = row.to(tl.int64)\n    p = X + r64 * stride\n", []),
    # a cast after the product is too late
    ("    p = X + (tl.program_id(0) * stride).to(tl.int64)\n", ["tl.program_id(0) * stride"]),
    # a cast to int32 keeps it int32
    ("    row = tl.program_id(0).to(tl.int32)\n    p = X + row * stride\n", ["row * stride"]),
    # through arithmetic, tl.minimum and a range loop
    ("    start = tl.program_id(0) + 1\n    end = tl.minimum(start, n)\n"
     "    for r in range(start, end):\n        p = X + r * stride\n", ["r * stride"]),
    # a block index times a constexpr block: also int32
    ("    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n", ["tl.program_id(0) * BLOCK"]),
    # the product on the other side, and in an augmented assignment
    ("    row = tl.program_id(1)\n    off = stride * row\n", ["stride * row"]),
    ("    off = tl.program_id(0)\n    off *= stride\n", ["off *= stride"]),
])
def test_what_the_check_follows(body, expected):
    src = "@triton.jit\ndef _k(X, stride, n, BLOCK: tl.constexpr):\n" + body
    assert _findings(src) == expected


def test_taint_follows_calls_of_other_jit_functions():
    src = ("@triton.jit\n"
           "def _offset(i, stride):\n"
           "    return i * stride\n"
           "@triton.jit\n"
           "def _k(X, stride):\n"
           "    p = X + _offset(tl.program_id(0), stride)\n"
           "@triton.jit\n"
           "def _ok(X, stride):\n"
           "    p = X + _offset(tl.program_id(0).to(tl.int64), stride)\n")
    found = findings_in_source(_HEAD + src)
    assert [(f.function, f.expr) for f in found] == [("_offset", "i * stride")]


def test_taint_follows_calls_into_sibling_modules(tmp_path):
    # A shared helper in another file (``_elementwise.offset``), called by name or through a module alias.
    (tmp_path / "_shared.py").write_text(_HEAD + "@triton.jit\ndef offset(i, stride):\n    return i * stride\n")
    (tmp_path / "by_name.py").write_text(_HEAD + "from ._shared import offset\n\n"
                                         "@triton.jit\ndef _k(X, stride):\n"
                                         "    p = X + offset(tl.program_id(0), stride)\n")
    (tmp_path / "by_alias.py").write_text(_HEAD + "from . import _shared as E\n\n"
                                          "@triton.jit\ndef _k(X, stride):\n"
                                          "    p = X + E.offset(tl.program_id(0), stride)\n")
    (tmp_path / "cast.py").write_text(_HEAD + "from ._shared import offset\n\n"
                                      "@triton.jit\ndef _k(X, stride):\n"
                                      "    p = X + offset(tl.program_id(0).to(tl.int64), stride)\n")
    for name in ("by_name", "by_alias"):
        found = findings_in_file(tmp_path / f"{name}.py")
        assert [(f.file, f.function, f.expr) for f in found] == [("_shared.py", "offset", "i * stride")], name
    assert findings_in_file(tmp_path / "cast.py") == []
    assert findings_in_file(tmp_path / "_shared.py") == []  # untainted on its own
