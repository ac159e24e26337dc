"""``workbench reports``: the report archive's generated pages."""
from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.common import command
from workbench.errors import UserError


def add_parser(sub) -> None:
    p = command(sub, "reports", help="today's numbers from the report archive (reports/CURRENT.md)",
                description="Regenerate a report archive's CURRENT.md (the newest complete report of each suite, "
                "device and setup, with its headline numbers) and the index in its README.md. Each suite does this "
                "after writing a report.",
                writes=["see `workbench reports current --help`"], exits=["0  written"],
                example="workbench reports current")
    actions = p.add_subparsers(dest="reports_command", metavar="ACTION", required=True)
    q = command(actions, "current", help="write DIR/CURRENT.md and the index in DIR/README.md",
                description="Write DIR/CURRENT.md, the generated index section of DIR/README.md and the "
                "headline-numbers section of the README.md above DIR (the project's) from DIR/<suite>/*.json; a "
                "README.md without its section is left alone.",
                writes=["DIR/CURRENT.md", "the index section of DIR/README.md",
                        "the headline-numbers section of DIR/../README.md"],
                exits=["0  written", "2  DIR does not exist"], example="workbench reports current --reports reports")
    q.add_argument("--reports", default="reports", metavar="DIR", help="the report archive (default: reports)")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``workbench reports current``: CURRENT.md and the index of a report archive, from its reports."""
    from workbench.bench import current

    root = Path(args.reports)
    if not root.is_dir():
        raise UserError(f"the reports folder {root} does not exist; pass --reports DIR, the folder that holds "
                        "<suite>/<date>-<device>.json (reports/ in a checkout).")
    for path in current.write_current(root):
        print(f"wrote {path}")
    return 0
