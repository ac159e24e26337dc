"""One training run of a benchmark suite, in its own process, on one comparison stack.

    python -m workbench.bench.train_child --stack liger --config RUN.yaml --run DIR

is ``workbench train --config RUN.yaml --run DIR`` with the recipe's model built by the
stack (workbench.bench.stacks) instead of the product's: the stack is prepared first (Unsloth
must be imported before transformers), then the same recipe trains and writes the same run
directory and train record. Errors and exit codes are ``workbench train``'s: a refusal is one
sentence on stderr and exit 2 (running out of GPU memory among them, which the context suite
reads as "does not fit").
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from workbench.bench.stacks import STACKS
    from workbench.cli import run_guarded

    parser = argparse.ArgumentParser(prog="python -m workbench.bench.train_child", description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True, choices=sorted(STACKS), help="the comparison stack")
    parser.add_argument("--config", required=True, metavar="YAML", help="the run's training config")
    parser.add_argument("--run", required=True, metavar="DIR", help="the run directory")
    parser.add_argument("--profile-loop", metavar="DEST", help="profile the Trainer's loop by phase "
                        "(workbench.bench.loop_profile) into DEST.json and DEST.trace.json")
    parser.add_argument("--profile-after", type=int, default=0, metavar="STEP",
                        help="with --profile-loop: the optimizer step after which the profiled steps start")
    parser.add_argument("--profile-steps", type=int, default=None, metavar="N",
                        help="with --profile-loop: steps profiled (default: workbench.bench.loop_profile.STEPS)")
    args = parser.parse_args(argv)
    profile = None if args.profile_loop is None else (args.profile_loop, args.profile_after, args.profile_steps)
    return run_guarded(lambda: _train(STACKS[args.stack], args.config, args.run, profile))


def _train(stack, config_path: str, run: str, profile: tuple | None = None) -> int:
    from workbench import config

    cfg = config.load(config_path)   # (yaml only: nothing heavy is imported yet)
    stack.prepare(cfg)   # before transformers is imported
    from workbench.cli.common import ensure_interpreter_if_no_gpu
    from workbench.train import run_train

    ensure_interpreter_if_no_gpu()
    if profile is not None:
        from pathlib import Path

        from workbench.bench import loop_profile

        dest, after, steps = profile
        stack = loop_profile.profiled(stack, Path(dest), after, loop_profile.STEPS if steps is None else steps)
    run_train(cfg, run, stack=stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
