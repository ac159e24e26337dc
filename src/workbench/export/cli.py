"""`workbench merge` and `workbench export` (light: the heavy stack loads in the handlers)."""
from __future__ import annotations

import argparse
import sys


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import run_merge

    if args.adapter:   # bring your own: record it as the run's (user-provided) train stage
        from workbench.pipeline import bring_adapter

        bring_adapter(args.run, args.adapter, args.base, args.tokenizer)
    elif args.base or args.tokenizer:
        from workbench.errors import UserError

        raise UserError("--base and --tokenizer go with --adapter (your own adapter); without --adapter, merge uses "
                        "the run's trained adapter and its recorded base.")
    run_merge(args.run)
    print(f"merged model: {args.run}/merge/merged (report: {args.run}/merge/merge_report.json)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .stage import parse_quants, run_export

    quants = parse_quants(args.quant)
    if args.merged:   # bring your own: record it as the run's (user-provided) merge stage
        from workbench.pipeline import bring_merged

        bring_merged(args.run, args.merged)
    report = run_export(args.run, quants, thresholds=args.thresholds, adapter_gguf=args.adapter_gguf)
    for kind, entry in report["files"].items():
        status = "ok" if entry["passed"] else "FAILED: " + "; ".join(entry["failures"])
        if entry.get("fallback_note"):
            status += f" (note: {entry['fallback_note']})"
        print(f"{entry['file']}: {status}")
    from .adapter_export import summary_lines

    for line in summary_lines(report):
        print(line)
    print(f"export report: {args.run}/export/export_report.json")
    if not report["passed"]:
        print("workbench: export verification failed; the GGUFs above marked FAILED are not fit to ship.",
              file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge the run's LoRA adapter into its base (and the NF4 base for QLoRA)")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory written by `workbench train` "
                   "(with --adapter: any directory, created if needed)")
    p.add_argument("--adapter", metavar="FOLDER", help="merge your own PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors): it is copied into the run and recorded as a user-provided train stage")
    p.add_argument("--base", metavar="FOLDER", help="with --adapter: the HF checkpoint it was trained on (default: "
                   "the adapter's base_model_name_or_path, when that is a local folder)")
    p.add_argument("--tokenizer", metavar="FOLDER", help="with --adapter: the tokenizer folder (default: the "
                   "adapter's folder if it has one, else the base's)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write GGUF files (f16, bf16, q8_0, q4_k_m) and verify them with llama.cpp")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (after `workbench merge`; with "
                   "--merged: any directory, created if needed)")
    p.add_argument("--merged", metavar="FOLDER", help="export your own merged HF checkpoint (safetensors + tokenizer): "
                   "it is copied into the run and recorded as a user-provided merge stage")
    p.add_argument("--quant", default="f16,bf16,q8_0,q4_k_m",
                   help="comma-separated GGUF types: f16, bf16, q8_0, q4_k_m (default: all)")
    p.add_argument("--thresholds", metavar="YAML",
                   help="per-type verification limits overriding the defaults (see workbench.export.verify; "
                        "the adapter's under adapter: {f16: ..., q8_0: ...})")
    p.add_argument("--adapter-gguf", action="store_true",
                   help="also write the run's LoRA adapter as a GGUF LoRA adapter (adapter-f16.gguf) with the base "
                        "model's f16 and q8_0 GGUFs it applies to, and verify it in llama.cpp (workbench run does this)")
    p.set_defaults(func=cmd_export)
