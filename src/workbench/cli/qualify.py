"""``workbench qualify``: the release gate."""
from __future__ import annotations

import argparse

from workbench.cli.common import command


def add_parser(sub) -> None:
    p = command(sub, "qualify", help="the release gate: parity, merge, GGUF, adapter GGUF, eval, tokenizer, "
                                     "hash (and performance) gates; exit 0 only when every gate passes",
                description="Measure every gate on a finished run and compare it with its threshold (the defaults "
                "and what each gate checks: src/workbench/configs/gates.yaml): kernel parity on this device, the "
                "merge, each GGUF, the eval's changes, the tokenizer round trip, every recorded hash, and with "
                "--baseline the train stage's speed and memory. A gate that cannot run fails with the command that "
                "makes what it needs; the others still run.",
                writes=["RUN/qualify/verdict.json and verdict.md (and RUN/qualify/parity/ when it runs the parity "
                        "tests)", "RUN/manifest.json: the qualify record"],
                exits=["0  every gate passed (or is not applicable)", "1  a gate failed: the verdict says which and why"],
                example="workbench qualify --run runs/mine --baseline runs/last-release/manifest.json")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (after train, merge, export, eval)")
    p.add_argument("--gates", metavar="YAML",
                   help="gate thresholds overriding the defaults (src/workbench/configs/gates.yaml documents them)")
    p.add_argument("--parity-report", metavar="JSON",
                   help="a `workbench parity --report` JSON made on this device, instead of running the parity "
                        "tests of the run's kernels; it must test each of them in every dtype, with 0 failures")
    p.add_argument("--baseline", metavar="REPORT.json",
                   help="a run's manifest.json or a qualify verdict.json: also gate tokens/s and peak memory "
                        "of the train stage against it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workbench.qualify import run_qualify
    from workbench.verdict_text import plain

    verdict = run_qualify(args.run, gates=args.gates, parity_report=args.parity_report, baseline=args.baseline,
                          command=getattr(args, "command_line", None))
    print(plain(verdict["gates"]))
    print(f"verdict: {verdict['verdict']} ({verdict['summary']})")
    print(f"report: {args.run}/qualify/verdict.md and {args.run}/qualify/verdict.json")
    print(f"`workbench report --run {args.run}` links this verdict from the run report ({args.run}/report/report.md).")
    return 0 if verdict["passed"] else 1
