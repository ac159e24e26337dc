"""``workbench eval``: lm-eval on every model of a run, offline."""
from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.common import command
from workbench.eval.models import KINDS


def add_parser(sub) -> None:
    p = command(sub, "eval", help="evaluate the run's base, adapter, merged and GGUF models with lm-eval (offline)",
                description="Evaluate every model of the run (or those --models names) with lm-eval on the run's "
                "held-out split: the shipped tasks (multiple choice, generation, perplexity) and any --include "
                "folders; one comparison table, each model's change against the adapter, flagged beyond tolerance.",
                writes=["RUN/eval/<model>/results.json and samples_<task>.jsonl, RUN/eval/data/, RUN/eval/tasks/",
                        "RUN/eval/comparison.csv and comparison.md",
                        "RUN/manifest.json: the eval record (models and their hashes, metrics, flags)"],
                exits=["0  evaluated (changes beyond tolerance are flagged in the table, not an error)"],
                example="workbench eval --run runs/mine --models adapter,merged,q4_k_m --limit 50")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory written by `workbench train`")
    p.add_argument("--tasks", help="comma-separated lm-eval task names (default: wb_synthetic_mc, wb_synthetic_gen, "
                                   "wb_heldout_ppl, the shipped tasks on the run's held-out data)")
    p.add_argument("--models", help=f"comma-separated models: {', '.join(KINDS)} "
                                    "(default: every one the run has; a listed one that is missing is an error)")
    p.add_argument("--include", action="append", metavar="PATH",
                   help="a folder of lm-eval task YAML files to add (repeatable)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N documents of each task")
    p.add_argument("--tolerances", metavar="YAML",
                   help="per-model-kind tolerances overriding the defaults (see workbench.eval.compare)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed task prompts as plain text instead of through the tokenizer's chat template")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workbench.eval.models import parse_models
    from workbench.eval.run import run_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    record = run_eval(args.run, tasks=tasks, model_kinds=parse_models(args.models), include=args.include or [],
                      limit=args.limit, tolerances=args.tolerances, chat_template=not args.no_chat_template)
    print((Path(args.run) / "eval" / "comparison.md").read_text(), end="")
    print(f"comparison: {args.run}/eval/comparison.csv and {args.run}/eval/comparison.md")
    if record["flags"]:
        print(f"{len(record['flags'])} change(s) beyond tolerance; see the flags column.")
    return 0
