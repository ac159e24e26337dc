"""``workbench kernels``: the kernel registry."""
from __future__ import annotations

import argparse
import json

from workbench.cli.common import command


def add_parser(sub) -> None:
    p = command(sub, "kernels", help="list every registered kernel, its reference and what parity compares",
                description="List every registered Triton kernel with its dtypes, its PyTorch reference, what the "
                "parity suite compares (outputs, the change its adapters make, gradients) and its options.",
                writes=["nothing (the list on stdout)"], exits=["0  listed"], example="workbench kernels --json")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workbench.kernels import registry

    rows = [spec.describe() for spec in registry().values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'kernel'.ljust(width)}  dtypes                       compares")
    for r in rows:
        compares = ", ".join([f"out:{o}" for o in r["outputs"]] + [f"delta:{o}" for o in r["deltas"]]
                             + [f"d{g}" for g in r["grads"]])
        print(f"{r['name'].ljust(width)}  {', '.join(r['dtypes']).ljust(27)}  {compares}")
        print(f"{''.ljust(width)}  reference: {r['reference']}")
        if r["options"]:
            print(f"{''.ljust(width)}  options: {'; '.join(r['options'])}")
    return 0
