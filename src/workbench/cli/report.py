"""``workbench report``: one run's results as Markdown, JSON and plots (workbench.report)."""
from __future__ import annotations

import argparse

from workbench.cli.common import command


def add_parser(sub) -> None:
    p = command(sub, "report", help="render a run's report (Markdown, JSON, PNG plots) into RUN/report/",
                description="Render what the run's stage records and files say: training (loss curve, speed, "
                "memory, held-out accuracy), merge, export (each GGUF's verification) and evaluation, every number "
                "with the device and versions of the stage that made it. A missing or failed stage is said so with "
                "the command that makes it; a section made from an earlier version of an upstream stage is "
                "labelled stale.",
                writes=["RUN/report/report.md, report.json and loss.png, verification.png, eval.png (those it has "
                        "data for)", "RUN/manifest.json: the report record (the hashes of the records it rendered)"],
                exits=["0  rendered (missing stages are named in the report, not an error)"],
                example="workbench report --run runs/mine")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workbench import report

    paths = report.render(args.run, command=args.command_line)
    print(f"report: {paths['md']} (and {paths['json'].name}, {', '.join(p.name for p in paths['png']) or 'no plots'})")
    if paths["missing"]:
        print(f"missing stages: {', '.join(paths['missing'])} (the report says how to make them)")
    return 0
