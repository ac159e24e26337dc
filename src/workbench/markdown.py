"""Markdown tables: the project's one table helper (run reports, bench reports, the verdict,
the reports' CURRENT.md and index)."""
from __future__ import annotations

import math


def num(v, digits: int = 4) -> str:
    """A cell: None (and NaN) as "—", booleans as yes/no, ints with thousands separators, floats
    to ``digits`` significant digits (scientific when tiny or huge), text with "|" escaped."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(head: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """A Markdown table's lines. Cells go through :func:`num` (pass text for a format of your
    own). ``align``: one letter per column, "l" or "r" (right-aligned: "---:"); without it the
    separator is "---" throughout."""
    rule = "|" + "|".join("---" for _ in head) + "|" if align is None else \
        "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    return ["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(num(c) for c in row) + " |" for row in rows)]
