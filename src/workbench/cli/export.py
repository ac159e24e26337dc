"""``workbench export``: GGUF files of the merged model, each verified in llama.cpp."""
from __future__ import annotations

import argparse
import sys

from workbench.cli.common import command
from workbench.export import GGUF_TYPES


def add_parser(sub) -> None:
    p = command(sub, "export", help=f"write GGUF files ({', '.join(GGUF_TYPES)}) and verify them with llama.cpp",
                description="Write the merged model as GGUF files (the 16-bit ones by our writer, the quantized "
                "ones by llama.cpp's quantizer) and verify each against the merged model: KL, top-1 agreement, "
                "perplexity and the tokenizer, in llama.cpp (and transformers' GGUF loader where it can). With "
                "--merged, your own merged checkpoint is copied into the run first and recorded as a "
                "user-provided merge stage.",
                writes=["RUN/export/model-<type>.gguf for each type, RUN/export/export_report.json",
                        "with --adapter-gguf: RUN/export/adapter-f16.gguf, the base's f16/q8_0 GGUFs and Modelfiles",
                        "with --merged: RUN/merge/merged/ and RUN/tokenizer/ (copies)",
                        "RUN/manifest.json: the export record (and a user-provided merge record)"],
                exits=["0  every GGUF passed its verification", "1  a GGUF failed its verification (not fit to ship)"],
                example="workbench export --run runs/mine --quant f16,q4_k_m")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (after `workbench merge`; with "
                   "--merged: any directory, created if needed)")
    p.add_argument("--merged", metavar="FOLDER", help="export your own merged HF checkpoint (safetensors + tokenizer): "
                   "it is copied into the run and recorded as a user-provided merge stage")
    p.add_argument("--quant", default=",".join(GGUF_TYPES),
                   help=f"comma-separated GGUF types: {', '.join(GGUF_TYPES)} (default: all)")
    p.add_argument("--thresholds", metavar="YAML",
                   help="per-type verification limits overriding the defaults (see workbench.export.verify; "
                        "the adapter's under adapter: {f16: ..., q8_0: ...})")
    p.add_argument("--adapter-gguf", action="store_true",
                   help="also write the run's LoRA adapter as a GGUF LoRA adapter (adapter-f16.gguf) with the base "
                        "model's f16 and q8_0 GGUFs it applies to, and verify it in llama.cpp (workbench run does this)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workbench.export.stage import parse_quants, run_export

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
    from workbench.export.adapter_export import summary_lines

    for line in summary_lines(report):
        print(line)
    print(f"export report: {args.run}/export/export_report.json")
    if not report["passed"]:
        print("workbench: export verification failed; the GGUFs above marked FAILED are not fit to ship.",
              file=sys.stderr)
        return 1
    return 0
