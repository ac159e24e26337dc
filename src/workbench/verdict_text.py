"""The qualify verdict as plain text for the terminal (verdict.md keeps the Markdown table).

One block per gate: its name and status, then each measured item on its own line and
the limits, wrapped to the terminal's width; nothing is cut off, and no Markdown
escapes (``\\|``) reach the screen. Failures and notes follow, in full.
"""
from __future__ import annotations

import shutil
import textwrap


def plain(gates: list[dict], width: int | None = None) -> str:
    from workbench.qualify import FAIL, NA, PASS

    width = width or max(80, min(140, shutil.get_terminal_size((110, 24)).columns))
    name_w = max(len(g["name"]) for g in gates) + 2
    indent = " " * (name_w + 6)
    lines = []
    for g in gates:
        head = f"{g['name']:<{name_w}}{g['status']:<6}"
        body = []
        if g["status"] == NA:
            body.append(g["message"])
        else:
            items = [c for c in g.get("checks") or [] if c.get("short")]
            if len(items) > 1:
                body += [f"{c['item']}: {c['short']}" + ("" if c["status"] == PASS else f"  [{c['status']}]")
                         for c in items]
            elif g["measured"]:
                body.append(str(g["measured"]))
            if g["threshold"]:
                body.append(f"limits: {g['threshold']}")
        body = body or [""]
        for i, text in enumerate(body):
            wrapped = textwrap.wrap(str(text), width=width, initial_indent=head if i == 0 else indent,
                                    subsequent_indent=indent + "  ", break_on_hyphens=False) or [head.rstrip()]
            lines += wrapped
    notes = [(g["name"], "failed", g["message"]) for g in gates if g["status"] == FAIL]
    notes += [(g["name"], "note", g["message"]) for g in gates
              if g["status"] == PASS and str(g["message"]).startswith("note: ")]
    if notes:
        lines.append("")
        for name, kind, message in notes:
            lines += textwrap.wrap(f"{name} {kind}: {message}" if kind == "failed" else f"{name}: {message}",
                                   width=width, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)
