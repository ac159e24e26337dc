"""``workbench regress``: two reports of one bench suite compared."""
from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.common import command, refresh_current


def add_parser(sub) -> None:
    p = command(sub, "regress", help="compare two reports of one bench suite (e.g. last night's and tonight's); "
                "exit 1 on a regression",
                description="Compare two reports of one bench suite, device and setup (kernels, train, context or "
                "step): slower, more memory, a moved final loss, a shorter context fit or a new failure beyond the "
                "thresholds is a regression.",
                writes=["with --out FILE.md: the comparison as Markdown (and the reports' index when FILE is in the "
                        "archive's regress/ folder)"],
                exits=["0  no regression", "1  a regression (the flagged rows say which)"],
                example="workbench regress reports/train/LAST-NIGHT.json reports/train/TONIGHT.json --out cmp.md")
    p.add_argument("baseline", help="the earlier report (.json written by `workbench bench`; for kernels also the "
                   "file of `pytest bench/ --benchmark-json`)")
    p.add_argument("current", help="the new report of the same suite, device and shape")
    p.add_argument("--time", type=float, default=0.10, help="allowed slowdown, as a fraction (default 0.10)")
    p.add_argument("--memory", type=float, default=0.02, help="allowed peak-memory growth (default 0.02)")
    p.add_argument("--loss", type=float, default=0.01, help="allowed relative move of the final loss (default 0.01)")
    p.add_argument("--allow-other-device", action="store_true", help="compare reports of different devices/shapes")
    p.add_argument("--out", metavar="FILE.md", help="also write the comparison as Markdown")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compare two reports of one bench suite; exit 1 on a regression."""
    from workbench import atomic
    from workbench.bench import compare

    old, new = compare.load(args.baseline), compare.load(args.current)
    limits = {"time": args.time, "memory": args.memory, "loss": args.loss}
    changes = compare.compare(old, new, limits, allow_other_device=args.allow_other_device)
    text = compare.markdown(changes, args.baseline, args.current, old, new, limits)
    print(text)
    if args.out:
        atomic.write_text(args.out, text)
        refresh_current(Path(args.out))  # the index lists <reports>/regress/*.md
        print(f"regression report: {args.out}")
    return 1 if any(c.regression for c in changes) else 0
