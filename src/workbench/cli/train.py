"""``workbench train``: the training recipe (workbench.train) on a config."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from workbench.cli.common import command


def add_parser(sub) -> None:
    p = command(sub, "train", help="fine-tune a LoRA/QLoRA adapter (default: the built-in tiny model and data)",
                description="Fine-tune a LoRA (or, with quantization: {type: nf4}, QLoRA) adapter with TRL's "
                "SFTTrainer (or, with training.method dpo or orpo, its DPO or ORPO trainer on prompt/chosen/rejected "
                "pairs), our Triton kernels on as the config's `kernels:` says. Everything that can be checked "
                "without training is checked before the run directory is touched.",
                writes=["RUN/config.yaml, RUN/tokenizer/, RUN/data/{train,test}.jsonl, RUN/base/ (built-in model)",
                        "RUN/train/loss.jsonl, RUN/train/eval.json, RUN/adapter/",
                        "RUN/manifest.json: the train record (inputs and their hashes, outputs, timings)"],
                exits=["0  trained; the adapter is in RUN/adapter"],
                example="workbench train --config src/workbench/configs/qlora-local.yaml --run runs/mine")
    p.add_argument("--config", metavar="YAML", help="training config (default: the built-in default run)")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/<UTC timestamp>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set training.max_steps=50 (repeatable)")
    p.set_defaults(func=run)


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def run(args: argparse.Namespace) -> int:
    from workbench.cli.common import ensure_interpreter_if_no_gpu

    ensure_interpreter_if_no_gpu()  # `kernels: true` on a CPU runs them in Triton's interpreter
    from workbench import config, distributed
    from workbench.train import run_train

    cfg = config.load(args.config, args.overrides)
    run_dir = Path(args.run) if args.run else default_run_dir()
    record = run_train(cfg, run_dir)
    if not distributed.is_main():  # another process of a distributed launch: the main one reports
        return 0
    evals = record.get("eval", {})
    if "adapter" in evals:
        print(f"held-out accuracy: base {evals['base']:.3f} -> adapter {evals['adapter']:.3f}")
    print(f"run directory: {run_dir.resolve()}")
    return 0
