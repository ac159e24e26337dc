"""``workbench merge``: fold the run's adapter (or one you bring) into its base."""
from __future__ import annotations

import argparse

from workbench.cli.common import command


def add_parser(sub) -> None:
    p = command(sub, "merge", help="merge the run's LoRA adapter into its base (and the NF4 base for QLoRA)",
                description="Merge the run's LoRA adapter into its base checkpoint (in fp32, saved in the base's "
                "stored dtype) and measure the merged model against the unmerged adapter on held-out tokens. With "
                "--adapter, your own PEFT adapter is copied into the run first and recorded as a user-provided "
                "train stage.",
                writes=["RUN/merge/merged/ (and RUN/merge/merged_from_nf4/ for QLoRA), RUN/merge/merge_report.json",
                        "with --adapter: RUN/adapter/ and RUN/tokenizer/ (copies)",
                        "RUN/manifest.json: the merge record (and a user-provided train record)"],
                exits=["0  merged"],
                example="workbench merge --run runs/mine --adapter my-adapter/ --base my-base/")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory written by `workbench train` "
                   "(with --adapter: any directory, created if needed)")
    p.add_argument("--adapter", metavar="FOLDER", help="merge your own PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors): it is copied into the run and recorded as a user-provided train stage")
    p.add_argument("--base", metavar="FOLDER", help="with --adapter: the HF checkpoint it was trained on (default: "
                   "the adapter's base_model_name_or_path, when that is a local folder)")
    p.add_argument("--tokenizer", metavar="FOLDER", help="with --adapter: the tokenizer folder (default: the "
                   "adapter's folder if it has one, else the base's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workbench.errors import UserError
    from workbench.export.merge import run_merge

    if args.adapter:   # bring your own: record it as the run's (user-provided) train stage
        from workbench.pipeline import bring_adapter

        bring_adapter(args.run, args.adapter, args.base, args.tokenizer)
    elif args.base or args.tokenizer:
        raise UserError("--base and --tokenizer go with --adapter (your own adapter); without --adapter, merge uses "
                        "the run's trained adapter and its recorded base.")
    run_merge(args.run)
    print(f"merged model: {args.run}/merge/merged (report: {args.run}/merge/merge_report.json)")
    return 0
