"""What the command modules share: the help text's shape, report file names, the reports'
CURRENT.md refresh, stopping a suite on SIGTERM, and Triton's interpreter on the CPU."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from workbench.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[3]

#: The exit codes every command shares.
EXIT_BAD_INPUT = "2  bad input (a path, a config key, a flag): one sentence on stderr, nothing written"
EXIT_INTERRUPTED = "130  interrupted (Ctrl-C); what was written is consistent and the same command resumes"


def command(sub, name: str, *, help: str, description: str, writes: list[str], exits: list[str], example: str,
            **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` has a description, what it writes, its exit codes and
    an example (``exits``: "N  meaning" lines besides 2 and 130, which every command shares)."""
    epilog = ["writes:", *(f"  {w}" for w in writes or ["nothing"]), "", "exit codes:",
              *(f"  {e}" for e in [*exits, EXIT_BAD_INPUT, EXIT_INTERRUPTED]), "", "example:", f"  {example}"]
    return sub.add_parser(name, help=help, description=textwrap.fill(description, 100), epilog="\n".join(epilog),
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def ensure_interpreter_if_no_gpu() -> None:
    """Kernels launched on the CPU need Triton's interpreter, which must be chosen
    before triton is imported. Importing torch does not import triton."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def check_tag(tag: str | None) -> None:
    if tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
        raise UserError(f"--tag {tag!r} must be letters, digits, '.', '_' or '-' (it becomes part of a file name).")


def stem(env: dict, tag: str | None, report_dir: str | os.PathLike | None = None) -> str:
    """A report's file name: <date>-<device>, and -<tag> when --tag is given (a second
    report of one suite, device and day, say); with ``report_dir``, -2, -3... after it where
    a complete report of that name is already there (one command's report is rewritten after
    each of its runs, under the name chosen here, and a report left incomplete by a stopped
    command is the one its re-run completes; a complete one is never overwritten)."""
    check_tag(tag)
    name = f"{env['date']}-{env['device_slug']}" + (f"-{tag}" if tag else "")
    if report_dir is None:
        return name
    from workbench import atomic
    from workbench.bench.compare import complete

    def incomplete(s: str) -> bool:
        try:
            return not complete(json.loads((Path(report_dir) / f"{s}.json").read_text()))
        except (OSError, ValueError, AttributeError):
            return False
    return atomic.free_stem(report_dir, name, reusable=incomplete)


def against_previous(report_dir: Path, doc: dict, name: str) -> str:
    """The report's section comparing it with the newest earlier report of the same
    suite, device and setup in ``report_dir`` (`workbench regress`'s thresholds)."""
    from workbench.bench import compare

    text, regressed = compare.previous_section(report_dir, doc, name)
    if regressed:
        print(f"workbench: regression against the previous report in {report_dir} (see the report's last section)",
              file=sys.stderr)
    return text


def write_suite_report(out: Path, stem: str, suite: str, env: dict, command: str, result: dict, text: str) -> str:
    """A suite's report (JSON and Markdown), rewritten atomically after every run, trial or
    record: ``complete`` false while the result is marked incomplete, and only a complete report
    ends with its comparison against the previous one and becomes current (CURRENT.md)."""
    from workbench import atomic

    doc = {"suite": suite, "environment": env, "command": command, **result, "complete": "incomplete" not in result}
    if doc["complete"]:
        text += "\n" + against_previous(out, doc, f"{stem}.json")
    atomic.write_json(out / f"{stem}.json", doc)
    atomic.write_text(out / f"{stem}.md", text)
    if doc["complete"]:  # an incomplete report is never current
        refresh_current(out / f"{stem}.json")
    return text


def refresh_current(report: Path) -> None:
    """After a suite wrote ``<reports>/<suite>/<stem>.*``: regenerate ``<reports>/CURRENT.md`` and
    the index in ``<reports>/README.md`` (bench/current.py)."""
    from workbench.bench import current

    current.after_report(report)


@contextlib.contextmanager
def stopped_by_signal():
    """SIGTERM (`timeout`, a CI job's limit) raises SystemExit in the main thread, as Ctrl-C
    raises KeyboardInterrupt: the child in flight is killed (an orphan would keep the GPU), and
    the report written after the last finished run stays."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def environment_of_a_child() -> dict:
    """envinfo.environment(), gathered by a child process: the suites that only launch runs
    must not hold a CUDA context on the device their runs measure."""
    code = "import json; from workbench.envinfo import environment; print(json.dumps(environment()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())  # not a folder whose modules could shadow packages
    if proc.returncode != 0:
        raise RuntimeError(f"reading the environment failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
