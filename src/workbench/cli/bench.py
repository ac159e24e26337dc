"""``workbench bench SUITE``: the benchmark suites, one subcommand each, each with its own flags.

    kernels    every kernel against PyTorch eager, torch.compile and Liger (bench/kernels.py)
    train      training runs per mode and stack through the training recipe (bench/train.py)
    step       the plain training loop peers publish, per stack (bench/step.py)
    context    the longest sequence a training step fits in, per stack (bench/context.py)
    accuracy   lm-eval of adapters trained with and without our kernels (bench/accuracy.py)

Every suite writes ``<report>/<date>-<device>[-tag].{json,md}`` (and a PNG where it plots),
compares a complete report with the previous one of the same setup, and regenerates the
archive's CURRENT.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from workbench.bench.stacks import STACKS
from workbench.cli.common import (against_previous, check_tag, command, environment_of_a_child,
                                  ensure_interpreter_if_no_gpu, refresh_current, stem, stopped_by_signal,
                                  write_suite_report)
from workbench.errors import UserError

#: The stacks a suite may name, for the help: bench/stacks.py's registry, so the two cannot drift.
STACK_NAMES = ", ".join(STACKS)
MODEL_SHAPES = "llama3.2-1b, llama3.1-8b, qwen3-1.7b, tiny, tiny-qwen3 (the tiny ones run on the CPU)"


def add_parser(sub) -> None:
    p = command(sub, "bench", help="the benchmark suites: kernels, train, step, context, accuracy",
                description="Run one benchmark suite; each has its own flags (`workbench bench SUITE --help`). "
                "Nothing asserts a speed: the numbers go to the report, with the device, the versions, the shapes "
                "and the command.",
                writes=["REPORT/<date>-<device>[-TAG].json and .md (and .png), REPORT defaulting to reports/SUITE; "
                        "the archive's CURRENT.md and index"],
                exits=["0  every measurement ran", "1  a run failed (train, step, context) or a metric is outside the "
                       "noise (accuracy); the report says which"],
                example="workbench bench kernels --shape llama3.2-1b")
    suites = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    _kernels(suites)
    _train(suites)
    _step(suites)
    _context(suites)
    _accuracy(suites)


def _report_flags(p, suite: str, runs: bool = True) -> None:
    p.add_argument("--tag", help="appended to the report's file name: <date>-<device>-<tag>")
    p.add_argument("--report", metavar="DIR", default=f"reports/{suite}",
                   help=f"where <date>-<device>.md/.json go (default: reports/{suite})")
    if runs:
        p.add_argument("--run", metavar="DIR", default=f"runs/bench-{suite}",
                       help=f"where the runs go (default: runs/bench-{suite})")


def _suite(suites, name: str, *, help: str, description: str, writes: list[str], exits: list[str], example: str,
           func) -> argparse.ArgumentParser:
    p = command(suites, name, help=help, description=description, writes=writes, exits=exits, example=example)
    p.set_defaults(func=func)
    return p


# --------------------------------------------------------------------------- kernels
def _kernels(suites) -> None:
    p = _suite(suites, "kernels", help="micro-benchmark every kernel against PyTorch, torch.compile and Liger",
               description="Time each kernel's forward and forward+backward, and its peak extra memory, against "
                           "PyTorch eager, torch.compile and Liger-Kernel at a model's shapes: runs `pytest bench/` "
                           "(pytest-benchmark, device time) and makes the report and its plots from the JSON it "
                           "writes, or with --from-json from one written before. CUDA only, but for --shape tiny "
                           "(a smoke test in the interpreter).",
               writes=["REPORT/<date>-<device>[-TAG].json, .md and .png, and the pytest-benchmark JSON they are made "
                       "of: REPORT/<date>-<device>[-TAG].benchmark.json (not with --from-json)"],
               exits=["0  benchmarked", "1  a benchmark failed (its row says why) or pytest bench/ did not run"],
               example="workbench bench kernels --shape llama3.2-1b --only rms_norm,swiglu", func=run_kernels)
    p.add_argument("--shape", default="llama3-8b",
                   help="shape set: llama3-8b (default), llama3.2-1b, qwen3-4b, tiny (CPU smoke test)")
    p.add_argument("--dtype", default="bfloat16", help="float32, float16 or bfloat16 (default)")
    p.add_argument("--only", help="comma-separated kernel names (default: every kernel)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile stack")
    p.add_argument("--timing", choices=["graph", "events"], default="graph",
                   help="on CUDA: graph (default; each call replayed from a CUDA graph, launch overhead excluded) "
                        "or events (one call between CUDA events, launch overhead included)")
    p.add_argument("--from-json", metavar="FILE", help="make the report of this `pytest bench/ --benchmark-json` "
                   "file instead of running the benchmarks (the run's shape, dtype and timing are the file's)")
    _report_flags(p, "kernels", runs=False)


def run_kernels(args: argparse.Namespace) -> int:
    """The kernel micro-benchmarks: `pytest bench/` times them (its pytest-benchmark JSON is the one
    record of the times), and the report, its plots and the comparison with the previous report are
    made from that JSON."""
    from workbench import atomic
    from workbench.bench import kernels as kbench

    check_tag(args.tag)  # a bad --tag fails now, not after the runs
    out = Path(args.report)
    if args.from_json:
        source = Path(args.from_json)
        result = kbench.from_benchmark_json(_benchmark_json(source), str(source))
        code = 1 if any(r["error"] for r in result["rows"]) else 0
        command_line = result["command"]  # the command that measured these numbers
        name = stem(result["environment"], args.tag)
        if source.resolve() != (out / f"{name}.benchmark.json").resolve():  # (its own JSON is not an earlier report)
            name = stem(result["environment"], args.tag, out)
    else:
        _check_kernel_args(args)
        # The device (for the file names) read by a child: this process holds no CUDA context while pytest runs.
        name = stem(environment_of_a_child(), args.tag, out)
        source = out / f"{name}.benchmark.json"
        code = _run_pytest_bench(args, source)
        if not source.is_file():
            print(f"workbench: pytest bench/ wrote no {source} (exit status {code}); its output above says why.",
                  file=sys.stderr)
            return 1
        result = kbench.from_benchmark_json(_benchmark_json(source), str(source))
        code = 0 if code == 0 else 1
        command_line = args.command_line
    env = result.pop("environment")
    result["benchmark_command"] = result.pop("command")
    result["benchmark_json"] = os.path.relpath(source.resolve(), out.resolve())
    png = kbench.plot(result, out / f"{name}.png", env)
    doc = {"suite": "kernels", "environment": env, "command": command_line, **result}
    text = kbench.markdown(result, env, command_line, png.name) + "\n" + against_previous(out, doc, f"{name}.json")
    atomic.write_json(out / f"{name}.json", doc)
    atomic.write_text(out / f"{name}.md", text)
    refresh_current(out / f"{name}.json")
    print(text)
    print(f"kernel report: {out / (name + '.md')}, {out / (name + '.json')} and {png} (from {source})")
    return code


def _benchmark_json(path: Path) -> dict:
    import json

    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the file that `pytest bench/ --benchmark-json=FILE` wrote.")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}); pass the file that `pytest bench/ "
                        "--benchmark-json=FILE` wrote.") from None


def _check_kernel_args(args: argparse.Namespace) -> None:
    import importlib.util

    ensure_interpreter_if_no_gpu()
    import torch

    from workbench.bench import kernels as kbench
    from workbench.cli.common import REPO_ROOT
    from workbench.kernels import registry
    from workbench.kernels._harness import DTYPES

    if args.shape not in kbench.SHAPES:
        raise UserError(f"unknown shape set {args.shape!r}; use one of {', '.join(kbench.SHAPES)}.")
    if args.dtype not in DTYPES:
        raise UserError(f"unknown dtype {args.dtype!r}; use one of {', '.join(DTYPES)}.")
    only = [k for k in (args.only or "").split(",") if k]
    unknown = sorted(set(only) - set(registry()))
    if unknown:
        raise UserError(f"unknown kernel(s) {', '.join(unknown)}; see `workbench kernels`.")
    if not torch.cuda.is_available() and args.shape != "tiny":
        raise UserError("kernel benchmarks need a CUDA device; on the CPU only `--shape tiny` runs (a smoke test).")
    bench = REPO_ROOT / "bench"
    if not (bench / "test_kernels.py").is_file():
        raise UserError(f"the kernel benchmarks live in bench/ of a checkout of the project ({bench} is not there); "
                        "run `workbench bench kernels` from an editable install (pip install -e .).")
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise UserError("the kernel benchmarks run under pytest-benchmark, which is not installed; install the test "
                        "extra (pip install -e '.[test]').")


def _run_pytest_bench(args: argparse.Namespace, json_path: Path) -> int:
    """`pytest bench/` in a child process, from the checkout (the benchmarks' names are relative to
    it), writing ``json_path``; its exit status."""
    import subprocess

    from workbench.cli.common import REPO_ROOT

    json_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path.resolve()}", "--bench-shape", args.shape, "--bench-dtype", args.dtype,
           "--bench-timing", args.timing]
    cmd += ["--bench-only", args.only] if args.only else []
    cmd += ["--bench-no-compile"] if args.no_compile else []
    print("[bench] " + " ".join(cmd[2:]), flush=True)
    # A child of an xdist worker (the test suite's) is no worker: pytest-benchmark turns itself off in one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    with stopped_by_signal():  # pytest's output, pytest-benchmark's tables among it, goes to the terminal
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode


# --------------------------------------------------------------------------- train and step
def _modes_and_stacks(p, modes_default: str = "lora,qlora") -> None:
    p.add_argument("--modes", default=modes_default, help=f"comma-separated: lora, qlora (default: {modes_default})")
    p.add_argument("--stacks", help=f"comma-separated, hf among them (the baseline): {STACK_NAMES} (default: every "
                   "one that can run here: liger needs liger-kernel and CUDA; unsloth needs CUDA and unsloth, "
                   "installed or in the site folder named by WORKBENCH_UNSLOTH_SITE)")


def _train(suites) -> None:
    p = _suite(suites, "train", help="training runs with and without our kernels, per mode and stack",
               description="Train the same LoRA/QLoRA config on every (mode, stack), each run in its own process "
                           "through the training recipe, from one random-weight checkpoint of a real model's shape: "
                           "loss curves, tokens/s, step time and peak memory, every stack's loss against hf's.",
               writes=["REPORT/<date>-<device>[-TAG].json, .md and .png (rewritten after every run, marked "
                       "incomplete until the last)", "RUN/<mode>-<stack>/: each run's directory",
                       "with --profile: REPORT/<date>-<device>[-TAG]-profile/ (per-run loop summaries and Chrome "
                       "traces)"],
               exits=["0  every run finished", "1  a run failed (its row says why)"],
               example="workbench bench train --shape llama3.2-1b --stacks hf,ours --seq 2048 --batch 4",
               func=run_train)
    p.add_argument("--shape", default="llama3.2-1b", help=f"model shape: {MODEL_SHAPES} (default: llama3.2-1b)")
    _modes_and_stacks(p)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: 30)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--seq", type=int, metavar="TOKENS", help="sequences of exactly TOKENS tokens (the built-in rows "
                   "packed; e.g. 2048 for the 4 x 2048 shape; default: one short row per sequence)")
    p.add_argument("--method", default="sft", help="sft (default), or dpo / orpo: preference training on the built-in "
                   "pairs, --batch pairs a step, TRL's loss (hf) against our fused one (ours) and Liger's (liger: "
                   "Liger's layer kernels and its LigerFusedLinearDPOLoss / LigerFusedLinearORPOLoss, set to TRL's "
                   "semantics, in the same TRL trainer as ours); stacks hf, hf-gc, ours, ours-gc, ours-bf16, liger "
                   "(Unsloth is not wired in); no --seq")
    p.add_argument("--plain-loop", type=int, nargs="?", const=10, metavar="STEPS",
                   help="after each SFT run (needs --seq), time the step suite's plain loop (no Trainer) on the same "
                        "checkpoint and batch shape for STEPS steps after 3 of warm-up (default 10), and report how "
                        "much the TRL loop adds per step")
    p.add_argument("--profile", action="store_true",
                   help="after each run, the same run again, short, with the Trainer's loop profiled by phase "
                        "(torch.profiler): host and GPU time per phase in the report, a summary and a Chrome trace "
                        "per run in REPORT/<date>-<device>[-TAG]-profile/")
    _report_flags(p, "train")


def check_modes_and_stacks(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--modes and --stacks of the train and step suites: hf always (the baseline); without
    --stacks every stack that can run here (for a preference --method, of PREFERENCE_STACKS); a
    stack named that cannot run is an error."""
    from workbench.bench import train as tbench

    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(tbench.MODES):
        raise UserError(f"unknown mode(s) in --modes; use {', '.join(tbench.MODES)}.")
    preference = getattr(args, "method", "sft") != "sft"
    allowed = tbench.PREFERENCE_STACKS if preference else tuple(tbench.STACKS)
    stacks = [s for s in (args.stacks or ",".join(allowed)).split(",") if s]
    if preference and set(stacks) - set(allowed):
        raise UserError(f"--method {args.method} runs the stacks {', '.join(allowed)} (Unsloth's trainer is not "
                        "wired into the recipe for preference training, and offloaded checkpointing is SFT's); "
                        f"leave out {', '.join(sorted(set(stacks) - set(allowed)))}.")
    if set(stacks) - set(tbench.STACKS) or "hf" not in stacks:
        raise UserError(f"--stacks takes {', '.join(tbench.STACKS)} and must include hf (the baseline every "
                        "other stack is compared with).")
    if args.stacks:
        missing = tbench.available_stacks(stacks)[1]
        if missing:
            raise UserError("cannot run " + "; ".join(f"--stacks {k}: {v}" for k, v in missing.items())
                            + ". Leave it out (without --stacks, unavailable optional stacks are skipped).")
    return modes, stacks


def run_train(args: argparse.Namespace) -> int:
    """Training runs with and without our kernels, each in its own process (bench/train.py)."""
    import torch

    from workbench.bench import train as tbench

    check_tag(args.tag)  # a bad --tag fails now, not after the runs
    if args.shape not in tbench.SHAPES:
        raise UserError(f"unknown model shape {args.shape!r} for the train suite; use one of "
                        f"{', '.join(tbench.SHAPES)}.")
    if not torch.cuda.is_available() and not args.shape.startswith("tiny"):
        raise UserError("training benchmarks of real model shapes need a CUDA device; on the CPU use --shape tiny.")
    from workbench.config import METHODS

    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; use one of {', '.join(METHODS)}.")
    if args.method != "sft" and args.seq:
        raise UserError(f"--seq packs the built-in rows into full sequences, but --method {args.method} trains on "
                        "preference pairs, which are not packed; leave out --seq.")
    if args.plain_loop is not None:
        if args.method != "sft" or not args.seq:
            raise UserError("--plain-loop times the step suite's loop on the train run's batch shape: it needs --seq "
                            "and SFT (the plain loop trains no preference pairs).")
        if args.plain_loop < 1:
            raise UserError(f"--plain-loop takes a number of steps >= 1, got {args.plain_loop}.")
    modes, stacks = check_modes_and_stacks(args)

    def render(result: dict, env: dict, png: Path) -> str:
        return tbench.markdown(result, env, args.command_line, tbench.plot(result, png).name)

    return run_launcher(args, "train", {"trl": "trl", "bitsandbytes": "bitsandbytes"}, render,
                        lambda partial, out, name: tbench.run(args.shape, steps=args.steps, batch=args.batch,
                                                              out=args.run, modes=modes, stacks=stacks, seq=args.seq,
                                                              method=args.method, partial=partial,
                                                              plain_steps=args.plain_loop or 0,
                                                              profile_dir=out / f"{name}-profile" if args.profile
                                                              else None),
                        lambda result: all(r["exit_code"] == 0 for r in result["runs"]))


def run_launcher(args: argparse.Namespace, suite: str, packages: dict, render, launch, ok) -> int:
    """What the suites that launch a process per measurement share (train, step, context): the
    environment read by a child (the launcher holds no CUDA context on the device its runs
    measure), the report rewritten after every run (``launch(partial, out, stem)``; ``render(result,
    env, png path)`` gives its text), SIGTERM as a stop that keeps it, and the exit code (``ok``)."""
    from workbench.envinfo import version

    env = environment_of_a_child()
    env.update({key: version(dist) for key, dist in packages.items()})
    name, out = stem(env, args.tag, args.report), Path(args.report)

    def write(result: dict) -> str:
        return write_suite_report(out, name, suite, env, args.command_line, result,
                                  render(result, env, out / f"{name}.png"))

    with stopped_by_signal():
        result = launch(write, out, name)
    text = write(result)
    print(text)
    print(f"{suite} report: {out / (name + '.md')}")
    return 0 if ok(result) else 1


def _step(suites) -> None:
    p = _suite(suites, "step", help="the plain training loop peers publish, per stack",
               description="Time model(ids, labels) -> backward -> AdamW -> zero_grad per stack, each (shape, mode, "
                           "autocast, stack) in its own process: median step time, tokens/s, MFU against the "
                           "measured bf16 matmul rate, peak memory, and every step's loss against hf's.",
               writes=["REPORT/<date>-<device>[-TAG].json, .md and .png", "with --profile: "
                       "REPORT/<date>-<device>[-TAG]-profile/ (per-record kernel CSVs and Chrome traces)"],
               exits=["0  every record ran", "1  a record failed (its row says why)"],
               example="workbench bench step --shape llama3.2-1b,qwen3-1.7b --stacks hf,ours --profile",
               func=run_step)
    p.add_argument("--shape", default="llama3.2-1b", help=f"model shapes, comma-separated: {MODEL_SHAPES} "
                   "(default: llama3.2-1b)")
    _modes_and_stacks(p)
    p.add_argument("--autocast", default="on",
                   help="on (default: bf16 autocast around forward and loss, as the Trainer with bf16=True), off "
                        "(the bf16 model without autocast) or both")
    p.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    p.add_argument("--seq", type=int, default=2048, metavar="TOKENS", help="random tokens per sequence "
                   "(default: 2048)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones (default: 3)")
    p.add_argument("--profile", action="store_true", help="profile a few steps of every record after its timed "
                   "ones (torch.profiler): top kernels per step and the GPU's idle share in the report, a CSV and a "
                   "Chrome trace per record")
    p.add_argument("--cuda-graph", action="store_true",
                   help="after the warm-up, capture the whole step (forward, backward, AdamW with capturable=True) "
                        "as one CUDA graph and time its replays: what host launch overhead costs each stack "
                        "(a stack whose step cannot be captured fails with the reason in its row); CUDA only")
    _report_flags(p, "step")


def run_step(args: argparse.Namespace) -> int:
    """The plain training loop per stack: s/step, tokens/s, MFU, memory, losses (bench/step.py)."""
    import torch

    from workbench.bench import step as sbench, train as tbench

    check_tag(args.tag)  # a bad --tag fails now, not after the runs
    shapes = list(dict.fromkeys(s for s in args.shape.split(",") if s))
    unknown = [s for s in shapes if s not in tbench.SHAPES]
    if unknown or not shapes:
        raise UserError(f"unknown model shape(s) {', '.join(unknown) or repr(args.shape)} for the step suite; use "
                        f"one or more (comma-separated) of {', '.join(tbench.SHAPES)}.")
    if not torch.cuda.is_available() and not all(s.startswith("tiny") for s in shapes):
        raise UserError("step benchmarks of real model shapes need a CUDA device; on the CPU use --shape tiny "
                        "(or tiny-qwen3).")
    modes, stacks = check_modes_and_stacks(args)
    if args.autocast not in ("on", "off", "both"):
        raise UserError(f"--autocast takes on, off or both, not {args.autocast!r}.")
    batch, seq, steps, warmup = args.batch, args.seq, args.steps, args.warmup
    if batch < 1 or seq < 2 or steps < 1 or warmup < 0:
        raise UserError(f"the step suite needs --batch >= 1 ({batch}), --seq >= 2 ({seq}), --steps >= 1 ({steps}) "
                        f"and --warmup >= 0 ({warmup}).")
    short = [s for s in shapes if tbench.SHAPES[s]["max_position_embeddings"] < seq]
    if short:
        raise UserError(f"--seq {seq} is beyond the position limit of {', '.join(short)} "
                        f"({min(tbench.SHAPES[s]['max_position_embeddings'] for s in short)}); use a shorter --seq.")
    autocasts = ("on", "off") if args.autocast == "both" else (args.autocast,)
    if args.cuda_graph and not torch.cuda.is_available():
        raise UserError("--cuda-graph captures the step as a CUDA graph and needs a CUDA device; leave it out on "
                        "the CPU.")

    def render(result: dict, env: dict, png: Path) -> str:
        return sbench.markdown(result, env, args.command_line, sbench.plot(result, png).name)

    return run_launcher(args, "step", {"bitsandbytes": "bitsandbytes", "liger_kernel": "liger-kernel"}, render,
                        lambda partial, out, name: sbench.run(
                            shapes, modes, stacks, autocasts, batch=batch, seq=seq, steps=steps, warmup=warmup,
                            out=args.run, profile_dir=out / f"{name}-profile" if args.profile else None,
                            profile_steps=sbench.PROFILE_STEPS, partial=partial, cuda_graph=args.cuda_graph),
                        lambda result: all(r["exit_code"] == 0 for r in result["rows"]))


# --------------------------------------------------------------------------- context
def _context(suites) -> None:
    p = _suite(suites, "context", help="the longest training sequence that fits, per mode and stack",
               description="Search, per (mode, stack), the longest sequence a training step at batch 1 fits in: "
                           "doubling from --seq, then bisecting down to --granularity; each trial a training run "
                           "in its own process, and only running out of GPU memory counts as not fitting. CUDA "
                           "only.",
               writes=["REPORT/<date>-<device>[-TAG].json and .md (rewritten after every trial, marked incomplete "
                       "until the last)", "RUN/<mode>-<stack>-<seq>/: each trial's run directory"],
               exits=["0  every search ended", "1  a search stopped on a failure that is not out of memory"],
               example="workbench bench context --shape llama3.1-8b --stacks hf-gc,ours-gc --devices all",
               func=run_context)
    p.add_argument("--shape", default="llama3.1-8b", help=f"model shape: {MODEL_SHAPES} (default: llama3.1-8b)")
    p.add_argument("--modes", default="qlora", help="comma-separated: lora, qlora (default: qlora)")
    p.add_argument("--stacks", default="hf,ours", help=f"comma-separated: {STACK_NAMES} (default: hf,ours)")
    p.add_argument("--seq", type=int, default=2048, metavar="TOKENS", help="where the doubling starts "
                   "(default: 2048)")
    p.add_argument("--max-seq", type=int, default=131072, metavar="TOKENS",
                   help="the longest sequence tried (default: 131072)")
    p.add_argument("--granularity", type=int, default=1024, metavar="TOKENS",
                   help="bisect until the longest fit and the first miss are this close (default: 1024)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per trial (default: 2)")
    p.add_argument("--devices", metavar="IDS", help="comma-separated GPU indices (e.g. 0,1) or all; the (mode, "
                   "stack) searches then run at the same time, one per GPU, each trial alone on its GPU (default: "
                   "one after another on the GPU the suite's processes see)")
    _report_flags(p, "context")


def run_context(args: argparse.Namespace) -> int:
    """The longest training sequence that fits, per mode and stack (bench/context.py)."""
    import torch

    from workbench.bench import context, train as tbench

    check_tag(args.tag)  # a bad --tag fails now, not after the runs
    if args.shape not in tbench.SHAPES:
        raise UserError(f"unknown model shape {args.shape!r} for the context suite; use one of "
                        f"{', '.join(tbench.SHAPES)}.")
    if not torch.cuda.is_available():
        raise UserError("the context search measures GPU memory and needs a CUDA device.")
    modes = [m for m in args.modes.split(",") if m]
    stacks = [s for s in args.stacks.split(",") if s]
    if set(modes) - set(tbench.MODES) or set(stacks) - set(tbench.STACKS):
        raise UserError(f"--modes takes {', '.join(tbench.MODES)}; --stacks takes {', '.join(tbench.STACKS)}.")
    start, limit, granularity, steps = args.seq, args.max_seq, args.granularity, args.steps
    if start < 1 or limit < start or granularity < 1 or steps < 1:
        raise UserError(f"the context search needs 1 <= --seq ({start}) <= --max-seq ({limit}), --granularity >= 1 "
                        f"({granularity}) and --steps >= 1 ({steps}).")
    devices = _devices(args.devices)
    return run_launcher(args, "context", {"trl": "trl", "bitsandbytes": "bitsandbytes"},
                        lambda result, env, png: context.markdown(result, env, args.command_line),
                        lambda partial, out, name: context.run(
                            args.shape, modes, stacks, args.run, start=start, limit=limit, granularity=granularity,
                            steps=steps, partial=partial, devices=devices),
                        lambda result: all(r["error"] is None for r in result["rows"]))


def _devices(given: str | None) -> list[str] | None:
    """--devices as CUDA_VISIBLE_DEVICES values for the children (None: not given)."""
    import torch

    devices = [d.strip() for d in (given or "").split(",") if d.strip()] or None
    if devices is None:
        return None
    count = torch.cuda.device_count()  # counts what CUDA_VISIBLE_DEVICES leaves visible
    if devices == ["all"]:
        devices = [str(i) for i in range(count)]
    wrong = [d for d in devices if not d.isdigit() or int(d) >= count]
    if wrong or len(set(devices)) != len(devices):
        raise UserError(f"--devices takes distinct GPU indices below {count} (this process sees {count} GPUs); "
                        f"got {given!r}.")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # the children's CUDA_VISIBLE_DEVICES replaces this one: name the same GPUs
        ids = [v.strip() for v in visible.split(",")]
        devices = [ids[int(d)] for d in devices]
    return devices


# --------------------------------------------------------------------------- accuracy
def _accuracy(suites) -> None:
    p = _suite(suites, "accuracy", help="lm-eval of HF- and ours-trained adapters against the seed-to-seed noise",
               description="Train one config with kernels off (hf) and on (ours) at two or more seeds, each run and "
                           "each eval in its own process, score every adapter with lm-eval, and check that ours "
                           "differs from hf by no more than hf's seeds differ from each other.",
               writes=["REPORT/<date>-<device>[-TAG].json, .md and .png",
                       "RUN/<stack>-seed<seed>/ and .yaml: each run and its config"],
               exits=["0  every run finished and every metric is within noise",
                      "1  a run failed or a metric is outside the noise (the report says which)"],
               example="workbench bench accuracy --config src/workbench/configs/accuracy-gpu.yaml --seeds 0,1,2",
               func=run_accuracy)
    p.add_argument("--config", metavar="YAML", help="the training config (default: the built-in run)")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds; two or more measure the "
                   "run-to-run noise (default: 0,1)")
    p.add_argument("--stacks", default="hf,ours", help="comma-separated: hf (kernels off), ours (kernels on) "
                   "(default: hf,ours)")
    p.add_argument("--steps", type=int, help="override the config's training.max_steps")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (default: the shipped ones)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N documents per task (default: all)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="run up to N (seed, stack) pipelines (train, "
                   "then eval) at once, each process with cpu count / N CPU threads (default 1: one after another). "
                   "The same runs in the same order; above 1 they share the device, so the report gives no speed "
                   "numbers")
    _report_flags(p, "accuracy")


def run_accuracy(args: argparse.Namespace) -> int:
    """The same config trained with and without our kernels at two seeds, each adapter
    scored by lm-eval; the difference must sit within the seed-to-seed noise (bench/accuracy.py)."""
    from workbench import atomic
    from workbench.bench import accuracy as abench
    from workbench.envinfo import environment, version

    check_tag(args.tag)  # a bad --tag fails now, not after the runs
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, e.g. 0,1; got {args.seeds!r}.") from None
    stacks = tuple(s for s in args.stacks.split(",") if s)
    tasks = [t for t in (args.tasks or "").split(",") if t] or None
    result = abench.run(args.config, args.run, seeds=seeds, stacks=stacks, steps=args.steps, tasks=tasks,
                        limit=args.limit, jobs=args.jobs)
    env = environment()
    env["trl"], env["lm_eval"] = version("trl"), version("lm-eval")
    name, out = stem(env, args.tag, args.report), Path(args.report)
    png = abench.plot(result, out / f"{name}.png")
    atomic.write_json(out / f"{name}.json", {"suite": "accuracy", "environment": env, "command": args.command_line,
                                             **result})
    text = abench.markdown(result, env, args.command_line, png.name)
    atomic.write_text(out / f"{name}.md", text)
    refresh_current(out / f"{name}.json")
    print(text)
    print(f"accuracy report: {out / (name + '.md')}")
    return 0 if result["ok"] else 1
