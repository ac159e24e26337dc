"""`workbench merge` and `workbench export` (light: the heavy stack loads in the handlers)."""
from __future__ import annotations

import argparse
import sys


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import run_merge

    run_merge(args.run)
    print(f"merged model: {args.run}/merge/merged (report: {args.run}/merge/merge_report.json)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .stage import parse_quants, run_export

    report = run_export(args.run, parse_quants(args.quant), thresholds=args.thresholds)
    for kind, entry in report["files"].items():
        status = "ok" if entry["passed"] else "FAILED: " + "; ".join(entry["failures"])
        print(f"{entry['file']}: {status}")
    print(f"export report: {args.run}/export/export_report.json")
    if not report["passed"]:
        print("workbench: export verification failed; the GGUFs above marked FAILED are not fit to ship.",
              file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge the run's LoRA adapter into its base (and the NF4 base for QLoRA)")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory written by `workbench train`")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write GGUF files (f16, bf16, q8_0, q4_k_m) and verify them with llama.cpp")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (after `workbench merge`)")
    p.add_argument("--quant", default="f16,bf16,q8_0,q4_k_m",
                   help="comma-separated GGUF types: f16, bf16, q8_0, q4_k_m (default: all)")
    p.add_argument("--thresholds", metavar="YAML",
                   help="per-type verification limits overriding the defaults (see workbench.export.verify)")
    p.set_defaults(func=cmd_export)
