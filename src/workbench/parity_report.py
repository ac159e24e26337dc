"""Markdown + JSON report of one parity-suite run (<report dir>/<date>-<device>.*).

The JSON carries what makes it checkable against a checkout and an environment
(``workbench qualify --parity-report`` checks all of it): pytest's exit code and its
counts (tests, passed, failed, errors, skipped) from the junit XML that pytest wrote,
that XML itself next to the report (``<stem>.junit.xml``) with its sha256, the
torch/triton/workbench versions and the device, and the sha256 of every kernel's
source file and of the shared kernel code (``kernels/_*.py``) the tests ran.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from . import atomic
from .envinfo import environment
from .markdown import table

#: The versions a report must share with the environment that reads it.
VERSION_KEYS = ("torch", "triton", "workbench")
#: The shared kernel code every kernel's tests run through (harness, tolerances, helpers).
SUPPORT = "kernels/_*.py"


def _package_root() -> Path:
    return Path(__file__).resolve().parent


def kernel_sources() -> dict:
    """{kernel: {"file": path relative to the package, "sha256": ...}} for every registered
    kernel, and "_support": the sha256 over the shared kernel code (``kernels/_*.py``)."""
    from workbench.kernels import registry

    root = _package_root()
    out = {}
    for name, spec in sorted(registry().items()):
        path = Path(inspect.getsourcefile(spec.fn)).resolve()
        out[name] = {"file": path.relative_to(root).as_posix(), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    h = hashlib.sha256()
    for path in sorted(root.glob(SUPPORT)):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    out["_support"] = {"file": SUPPORT, "sha256": h.hexdigest()}
    return out


def junit_counts(path: Path) -> dict:
    """{"tests", "passed", "failed", "errors", "skipped"} and {"cases": {test name: outcome}}
    from a pytest junit XML (ValueError when it is not one)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"not a junit XML file ({err})") from None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    if not suites:
        raise ValueError("no <testsuite> in it")
    cases = {}
    for suite in suites:
        for case in suite.iter("testcase"):
            kinds = {child.tag for child in case}
            outcome = ("failed" if "failure" in kinds else "errors" if "error" in kinds
                       else "skipped" if "skipped" in kinds else "passed")
            cases[case.get("name", "")] = outcome
    counts = {k: sum(v == k for v in cases.values()) for k in ("passed", "failed", "errors", "skipped")}
    return {"tests": len(cases), **counts, "cases": cases}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_stats(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(out_dir: Path, stats: list[dict], command: str, wall_seconds: float, exit_code: int,
          summary_line: str = "", junit: Path | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` (and ``<stem>.junit.xml``, a copy of ``junit``,
    the XML pytest wrote) into ``out_dir``."""
    env = environment()
    out_dir = Path(out_dir)
    stem = atomic.free_stem(out_dir, f"{env['date']}-{env['device_slug']}")
    junit_doc, counts = None, None
    if junit is not None and Path(junit).is_file():
        data = Path(junit).read_bytes()
        xml = atomic.write_bytes(out_dir / f"{stem}.junit.xml", data)
        try:
            counts = junit_counts(xml)
            counts.pop("cases")
        except ValueError:
            counts = None
        junit_doc = {"file": xml.name, "sha256": hashlib.sha256(data).hexdigest()}
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
        "counts": counts,
        "junit": junit_doc,
        "versions": {k: env.get(k) for k in VERSION_KEYS},
        "device": env["device"],
        "kernel_sources": kernel_sources(),
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
        f"- **Counts (junit XML{' ' + junit_doc['file'] if junit_doc else ''}):** "
        + (", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "none (no junit XML was written)"),
        f"- **Command:** `{command}`",
        f"- **Wall time:** {wall_seconds:.0f} s; **hypothesis examples:** {doc['total_examples']}"
        f" (profile `{stats[0]['profile'] if stats else '?'}`)",
        f"- **Versions:** torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"transformers {env['transformers']}, hypothesis {env['hypothesis']}, python {env['python']}",
        "",
        *table(["kernel", "dtype tests", "examples", "seconds", "failed"],
               [[name, str(agg["tests"]), str(agg["examples"]), f"{agg['seconds']:.1f}", str(agg["failed"])]
                for name, agg in sorted(by_kernel.items())], align="lrrrr"),
    ]
    lines += ["", "Each example compares every output and every gradient against the fp64 reference, "
              "bounded by PyTorch's own error in the same dtype (see parity/README.md).", ""]
    md = atomic.write_text(out_dir / f"{stem}.md", "\n".join(lines))
    js = atomic.write_json(out_dir / f"{stem}.json", doc)
    return md, js
