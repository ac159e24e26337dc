"""``workbench train``: light to import; the training stack loads only when it runs."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA/QLoRA adapter (default: the built-in tiny model and data)")
    p.add_argument("--config", metavar="YAML", help="training config (default: the built-in default run)")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/<UTC timestamp>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set training.max_steps=50 (repeatable)")
    p.set_defaults(func=cmd_train)


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.cli import _ensure_interpreter_if_no_gpu

    _ensure_interpreter_if_no_gpu()  # `kernels: true` on a CPU runs them in Triton's interpreter
    from workbench import config
    from workbench.train import run_train

    cfg = config.load(args.config, args.overrides)
    run = Path(args.run) if args.run else default_run_dir()
    record = run_train(cfg, run)
    from workbench import train

    if not train._MAIN:  # another process of a distributed launch: the main one reports
        return 0
    evals = record.get("eval", {})
    if "adapter" in evals:
        print(f"held-out accuracy: base {evals['base']:.3f} -> adapter {evals['adapter']:.3f}")
    print(f"run directory: {run.resolve()}")
    return 0
