"""Markdown + JSON report of one parity-suite run (reports/parity/<date>-<device>.*)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from . import atomic
from .envinfo import environment


def load_stats(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(out_dir: Path, stats: list[dict], command: str, wall_seconds: float, exit_code: int,
          summary_line: str = "") -> tuple[Path, Path]:
    env = environment()
    stem = f"{env['date']}-{env['device_slug']}"
    by_kernel: dict[str, dict] = defaultdict(lambda: {"examples": 0, "seconds": 0.0, "tests": 0, "failed": 0})
    for row in stats:
        agg = by_kernel[row["kernel"]]
        agg["examples"] += row["examples"]
        agg["seconds"] += row["seconds"]
        agg["tests"] += 1
        agg["failed"] += 0 if row["ok"] else 1
    doc = {
        "suite": "parity",
        "environment": env,
        "command": command,
        "exit_code": exit_code,
        "passed": exit_code == 0,
        "wall_seconds": round(wall_seconds, 1),
        "pytest_summary": summary_line,
        "total_examples": sum(r["examples"] for r in stats),
        "kernels": dict(sorted(by_kernel.items())),
        "properties": stats,
    }
    lines = [
        f"# Parity suite — {env['device']} — {env['date']}",
        "",
        f"- **Result:** {'PASS' if exit_code == 0 else 'FAIL'} (exit code {exit_code}); {summary_line}",
        f"- **Command:** `{command}`",
        f"- **Wall time:** {wall_seconds:.0f} s; **hypothesis examples:** {doc['total_examples']}"
        f" (profile `{stats[0]['profile'] if stats else '?'}`)",
        f"- **Versions:** torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"transformers {env['transformers']}, hypothesis {env['hypothesis']}, python {env['python']}",
        "",
        "| kernel | dtype tests | examples | seconds | failed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, agg in sorted(by_kernel.items()):
        lines.append(f"| {name} | {agg['tests']} | {agg['examples']} | {agg['seconds']:.1f} | {agg['failed']} |")
    lines += ["", "Each example compares every output and every gradient against the fp64 reference, "
              "bounded by PyTorch's own error in the same dtype (see parity/README.md).", ""]
    out_dir = Path(out_dir)
    md = atomic.write_text(out_dir / f"{stem}.md", "\n".join(lines))
    js = atomic.write_json(out_dir / f"{stem}.json", doc)
    return md, js
