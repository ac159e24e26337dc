"""The ``workbench`` command: a thin layer over the project's functions."""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


from workbench.errors import UserError  # noqa: E402  (re-exported for callers of the CLI)


def _ensure_interpreter_if_no_gpu() -> None:
    """Kernels launched on the CPU need Triton's interpreter, which must be chosen
    before triton is imported. Importing torch does not import triton."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------- kernels
def cmd_kernels(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------- parity
def _parity_case(args: argparse.Namespace) -> int:
    _ensure_interpreter_if_no_gpu()
    from workbench.kernels import get
    from workbench.kernels._harness import DTYPES, run_case

    if args.dtype not in DTYPES:
        raise UserError(f"unknown dtype {args.dtype!r}; use one of {', '.join(DTYPES)}.")
    try:
        spec = get(args.kernel)
    except KeyError as err:
        raise UserError(str(err.args[0])) from None
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        raise UserError(f"--params is not valid JSON ({err.msg}); pass the dict printed by the failing test.") from None
    report = run_case(spec, params, DTYPES[args.dtype], args.seed)
    print(report.describe())
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


def cmd_parity(args: argparse.Namespace) -> int:
    if args.kernel and args.params is not None:
        return _parity_case(args)
    if args.params is not None or args.seed is not None:
        raise UserError("--params and --seed rerun one case and need --kernel as well.")
    parity_dir = REPO_ROOT / "parity"
    if not parity_dir.is_dir():
        raise UserError(f"the parity suite is not at {parity_dir}; run from a source checkout (pip install -e .).")
    env = dict(os.environ)
    if args.profile:
        env["PARITY_PROFILE"] = args.profile
    if args.examples:
        env["PARITY_EXAMPLES"] = str(args.examples)
    cmd = [sys.executable, "-m", "pytest", str(parity_dir), "-q"]
    if args.kernel:
        cmd += ["-k", args.kernel]
    if args.workers and args.workers > 1:
        cmd += ["-n", str(args.workers)]
    cmd += args.pytest_args
    print("running:", " ".join(cmd), flush=True)
    if not args.report:
        return subprocess.call(cmd, env=env, cwd=REPO_ROOT)

    import tempfile
    import time

    from workbench import parity_report

    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.jsonl"
        junit = Path(tmp) / "junit.xml"
        env["PARITY_STATS"] = str(stats)
        cmd.append(f"--junitxml={junit}")   # the counts the report records, and the file whose hash it carries
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last = ""
        for line in proc.stdout:  # stream progress through, keep pytest's summary line
            sys.stdout.write(line)
            if line.strip():
                last = line.strip().strip("= ")
        code = proc.wait()
        md, js = parity_report.write(Path(args.report), parity_report.load_stats(stats),
                                     args.command_line,
                                     time.perf_counter() - start, code, last, junit=junit)
    _refresh_current(js)
    print(f"parity report: {md} and {js}")
    return code


# --------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    _stem({"date": "", "device_slug": ""}, args)  # a bad --tag fails now, not after the runs
    _ensure_interpreter_if_no_gpu()
    import torch

    from workbench import atomic
    from workbench.bench import kernels as kbench
    from workbench.envinfo import _version, environment
    from workbench.kernels import registry
    from workbench.kernels._harness import DTYPES

    if args.suite == "train":
        return _bench_train(args)
    if args.suite == "context":
        return _bench_context(args)
    if args.suite == "accuracy":
        return _bench_accuracy(args)
    if args.suite == "step":
        return _bench_step(args)
    if args.suite != "kernels":
        raise UserError(f"unknown suite {args.suite!r}; available: kernels, train, context, accuracy, step.")
    shape = args.shape or "llama3-8b"
    if shape not in kbench.SHAPES:
        raise UserError(f"unknown shape set {shape!r}; use one of {', '.join(kbench.SHAPES)}.")
    if args.dtype not in DTYPES:
        raise UserError(f"unknown dtype {args.dtype!r}; use one of {', '.join(DTYPES)}.")
    only = [k for k in (args.only or "").split(",") if k]
    unknown = sorted(set(only) - set(registry()))
    if unknown:
        raise UserError(f"unknown kernel(s) {', '.join(unknown)}; see `workbench kernels`.")
    if not torch.cuda.is_available() and shape != "tiny":
        raise UserError("kernel benchmarks need a CUDA device; on the CPU only `--shape tiny` runs (a smoke test).")
    result = kbench.run(shape, DTYPES[args.dtype], only or None, compile_reference=not args.no_compile,
                        timing=args.timing)
    env = environment()
    env["liger_kernel"] = _version("liger-kernel")
    command = args.command_line
    doc = {"suite": "kernels", "environment": env, "command": command, **result}
    stem = _stem(env, args)
    out = Path(args.report or "reports/kernels")
    png = kbench.plot(result, out / f"{stem}.png", env)
    text = kbench.markdown(result, env, command, png.name) + "\n" + _against_previous(out, doc, f"{stem}.json")
    atomic.write_json(out / f"{stem}.json", doc)
    atomic.write_text(out / f"{stem}.md", text)
    _refresh_current(out / f"{stem}.json")
    print(text)
    print(f"kernel report: {out / (stem + '.md')}, {out / (stem + '.json')} and {png}")
    return 0


def _stem(env: dict, args: argparse.Namespace) -> str:
    """A report's file name: <date>-<device>, and -<tag> when --tag is given (a second
    report of one suite, device and day, say)."""
    tag = getattr(args, "tag", None)
    if tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
        raise UserError(f"--tag {tag!r} must be letters, digits, '.', '_' or '-' (it becomes part of a file name).")
    return f"{env['date']}-{env['device_slug']}" + (f"-{tag}" if tag else "")


def _against_previous(report_dir: Path, doc: dict, name: str) -> str:
    """The report's section comparing it with the newest earlier report of the same
    suite, device and setup in ``report_dir`` (`workbench regress`'s thresholds)."""
    from workbench.bench import compare

    text, regressed = compare.previous_section(report_dir, doc, name)
    if regressed:
        print(f"workbench: regression against the previous report in {report_dir} (see the report's last section)",
              file=sys.stderr)
    return text


def _write_suite_report(out: Path, stem: str, suite: str, env: dict, command: str, result: dict, text: str) -> str:
    """A train, context or step report (JSON and Markdown), rewritten atomically after every run,
    trial or record: ``complete`` false while the result is marked incomplete, and only a complete
    report ends with its comparison against the previous one."""
    from workbench import atomic

    doc = {"suite": suite, "environment": env, "command": command, **result, "complete": "incomplete" not in result}
    if doc["complete"]:
        text += "\n" + _against_previous(out, doc, f"{stem}.json")
    atomic.write_json(out / f"{stem}.json", doc)
    atomic.write_text(out / f"{stem}.md", text)
    if doc["complete"]:  # an incomplete report is never current
        _refresh_current(out / f"{stem}.json")
    return text


def _refresh_current(report: Path) -> None:
    """After a suite wrote ``<reports>/<suite>/<stem>.*``: regenerate ``<reports>/CURRENT.md`` and
    the index in ``<reports>/README.md`` (bench/current.py)."""
    from workbench.bench import current

    current.after_report(report)


@contextlib.contextmanager
def _stopped_by_signal():
    """SIGTERM (`timeout`, a CI job's limit) raises SystemExit in the main thread, as Ctrl-C
    raises KeyboardInterrupt: ``subprocess.run`` then kills the run in flight (an orphan would
    keep the GPU), and the report written after the last finished run stays."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _environment_of_a_child() -> dict:
    """envinfo.environment(), gathered by a child process: the train and context suites only
    launch runs, and must not hold a CUDA context on the device their runs measure."""
    code = "import json; from workbench.envinfo import environment; print(json.dumps(environment()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())  # not a folder whose modules could shadow packages
    if proc.returncode != 0:
        raise RuntimeError(f"reading the environment failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bench_train(args: argparse.Namespace) -> int:
    """Training runs with and without our kernels, each in its own process (bench/train.py)."""
    import torch

    from workbench.bench import train as tbench
    from workbench.envinfo import _version

    shape = args.shape or "llama3.2-1b"
    if shape not in tbench.SHAPES:
        raise UserError(f"unknown model shape {shape!r} for the train suite; use one of {', '.join(tbench.SHAPES)}.")
    if not torch.cuda.is_available() and not shape.startswith("tiny"):
        raise UserError("training benchmarks of real model shapes need a CUDA device; on the CPU use --shape tiny.")
    modes, stacks = _modes_and_stacks(args)
    env = _environment_of_a_child()
    env["trl"], env["bitsandbytes"] = _version("trl"), _version("bitsandbytes")
    stem = _stem(env, args)
    out = Path(args.report or "reports/train")

    def write(result: dict) -> str:
        png = tbench.plot(result, out / f"{stem}.png")
        return _write_suite_report(out, stem, "train", env, args.command_line, result,
                                   tbench.markdown(result, env, args.command_line, png.name))

    with _stopped_by_signal():
        result = tbench.run(shape, steps=args.steps or 30, batch=8 if args.batch is None else args.batch,
                            out=args.run or "runs/bench-train",
                            modes=modes, stacks=stacks, seq=args.seq or None, partial=write)
    text = write(result)
    print(text)
    print(f"train report: {out / (stem + '.md')}")
    return 0 if all(r["exit_code"] == 0 for r in result["runs"]) else 1


def _modes_and_stacks(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--modes and --stacks of the train and step suites: every mode and every stack that can
    run here by default; hf always (the baseline); a stack named that cannot run is an error."""
    from workbench.bench import train as tbench

    modes = [m for m in (args.modes or ",".join(tbench.MODES)).split(",") if m]
    if not modes or set(modes) - set(tbench.MODES):
        raise UserError(f"unknown mode(s) in --modes; use {', '.join(tbench.MODES)}.")
    stacks = [s for s in (args.stacks or ",".join(tbench.STACKS)).split(",") if s]
    if set(stacks) - set(tbench.STACKS) or "hf" not in stacks:
        raise UserError(f"--stacks takes {', '.join(tbench.STACKS)} and must include hf (the baseline every "
                        "other stack is compared with).")
    if args.stacks:
        missing = tbench.available_stacks(stacks)[1]
        if missing:
            raise UserError("cannot run " + "; ".join(f"--stacks {k}: {v}" for k, v in missing.items())
                            + ". Leave it out (without --stacks, unavailable optional stacks are skipped).")
    return modes, stacks


def cmd_regress(args: argparse.Namespace) -> int:
    """Compare two reports of one bench suite; exit 1 on a regression."""
    from workbench import atomic
    from workbench.bench import compare

    old, new = compare.load(args.baseline), compare.load(args.current)
    limits = {"time": args.time, "memory": args.memory, "loss": args.loss}
    changes = compare.compare(old, new, limits, allow_other_device=args.allow_other_device)
    text = compare.markdown(changes, args.baseline, args.current, old, new, limits)
    print(text)
    if args.out:
        atomic.write_text(args.out, text)
        _refresh_current(Path(args.out))  # the index lists <reports>/regress/*.md
        print(f"regression report: {args.out}")
    return 1 if any(c.regression for c in changes) else 0


def _bench_context(args: argparse.Namespace) -> int:
    """The longest training sequence that fits, per mode and stack (bench/context.py)."""
    import torch

    from workbench.bench import context, train as tbench
    from workbench.envinfo import _version

    shape = args.shape or "llama3.1-8b"
    if shape not in tbench.SHAPES:
        raise UserError(f"unknown model shape {shape!r} for the context suite; use one of {', '.join(tbench.SHAPES)}.")
    if not torch.cuda.is_available():
        raise UserError("the context search measures GPU memory and needs a CUDA device.")
    modes = [m for m in (args.modes or "qlora").split(",") if m]
    stacks = [s for s in (args.stacks or "hf,ours").split(",") if s]
    if set(modes) - set(tbench.MODES) or set(stacks) - set(tbench.STACKS):
        raise UserError(f"--modes takes {', '.join(tbench.MODES)}; --stacks takes {', '.join(tbench.STACKS)}.")
    start, limit, granularity, steps = args.seq or 2048, args.max_seq, args.granularity, args.steps or 2
    if start < 1 or limit < start or granularity < 1 or steps < 1:
        raise UserError(f"the context search needs 1 <= --seq ({start}) <= --max-seq ({limit}), --granularity >= 1 "
                        f"({granularity}) and --steps >= 1 ({steps}).")
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()] or None
    if devices is not None:
        count = torch.cuda.device_count()  # counts what CUDA_VISIBLE_DEVICES leaves visible
        if devices == ["all"]:
            devices = [str(i) for i in range(count)]
        wrong = [d for d in devices if not d.isdigit() or int(d) >= count]
        if wrong or len(set(devices)) != len(devices):
            raise UserError(f"--devices takes distinct GPU indices below {count} (this process sees {count} GPUs); "
                            f"got {args.devices!r}.")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:  # the children's CUDA_VISIBLE_DEVICES replaces this one: name the same GPUs
            ids = [v.strip() for v in visible.split(",")]
            devices = [ids[int(d)] for d in devices]
    env = _environment_of_a_child()
    env["trl"], env["bitsandbytes"] = _version("trl"), _version("bitsandbytes")
    stem = _stem(env, args)
    out = Path(args.report or "reports/context")

    def write(result: dict) -> str:
        return _write_suite_report(out, stem, "context", env, args.command_line, result,
                                   context.markdown(result, env, args.command_line))

    with _stopped_by_signal():
        result = context.run(shape, modes, stacks, args.run or "runs/bench-context", start=start, limit=limit,
                             granularity=granularity, steps=steps, partial=write, devices=devices)
    text = write(result)
    print(text)
    print(f"context report: {out / (stem + '.md')}")
    return 0 if all(r["error"] is None for r in result["rows"]) else 1


def _bench_step(args: argparse.Namespace) -> int:
    """The plain training loop per stack: s/step, tokens/s, MFU, memory, losses (bench/step.py)."""
    import torch

    from workbench.bench import step as sbench, train as tbench
    from workbench.envinfo import _version

    shapes = list(dict.fromkeys(s for s in (args.shape or "llama3.2-1b").split(",") if s))
    unknown = [s for s in shapes if s not in tbench.SHAPES]
    if unknown or not shapes:
        raise UserError(f"unknown model shape(s) {', '.join(unknown) or repr(args.shape)} for the step suite; use "
                        f"one or more (comma-separated) of {', '.join(tbench.SHAPES)}.")
    if not torch.cuda.is_available() and not all(s.startswith("tiny") for s in shapes):
        raise UserError("step benchmarks of real model shapes need a CUDA device; on the CPU use --shape tiny "
                        "(or tiny-qwen3).")
    modes, stacks = _modes_and_stacks(args)
    autocast = args.autocast or "on"
    if autocast not in ("on", "off", "both"):
        raise UserError(f"--autocast takes on, off or both, not {autocast!r}.")
    batch = 4 if args.batch is None else args.batch
    seq = 2048 if args.seq is None else args.seq
    steps = 10 if args.steps is None else args.steps
    warmup = 3 if args.warmup is None else args.warmup
    if batch < 1 or seq < 2 or steps < 1 or warmup < 0:
        raise UserError(f"the step suite needs --batch >= 1 ({batch}), --seq >= 2 ({seq}), --steps >= 1 ({steps}) "
                        f"and --warmup >= 0 ({warmup}).")
    short = [s for s in shapes if tbench.SHAPES[s]["max_position_embeddings"] < seq]
    if short:
        raise UserError(f"--seq {seq} is beyond the position limit of {', '.join(short)} "
                        f"({min(tbench.SHAPES[s]['max_position_embeddings'] for s in short)}); use a shorter --seq.")
    env = _environment_of_a_child()
    env["bitsandbytes"], env["liger_kernel"] = _version("bitsandbytes"), _version("liger-kernel")
    stem = _stem(env, args)
    out = Path(args.report or "reports/step")

    def write(result: dict) -> str:
        png = sbench.plot(result, out / f"{stem}.png")
        return _write_suite_report(out, stem, "step", env, args.command_line, result,
                                   sbench.markdown(result, env, args.command_line, png.name))

    with _stopped_by_signal():
        result = sbench.run(shapes, modes, stacks, ("on", "off") if autocast == "both" else (autocast,), batch=batch,
                            seq=seq, steps=steps, warmup=warmup, out=args.run or "runs/bench-step",
                            profile_dir=out / f"{stem}-profile" if args.profile else None,
                            profile_steps=sbench.PROFILE_STEPS, partial=write)
    text = write(result)
    print(text)
    print(f"step report: {out / (stem + '.md')}")
    return 0 if all(r["exit_code"] == 0 for r in result["rows"]) else 1


def _bench_accuracy(args: argparse.Namespace) -> int:
    """The same config trained with and without our kernels at two seeds, each adapter
    scored by lm-eval; the difference must sit within the seed-to-seed noise (bench/accuracy.py)."""
    from workbench import atomic
    from workbench.bench import accuracy as abench
    from workbench.envinfo import _version, environment

    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, e.g. 0,1; got {args.seeds!r}.") from None
    stacks = tuple(s for s in (args.stacks or "hf,ours").split(",") if s)
    tasks = [t for t in (args.tasks or "").split(",") if t] or None
    result = abench.run(args.config, args.run or "runs/bench-accuracy", seeds=seeds, stacks=stacks,
                        steps=args.steps, tasks=tasks, limit=args.limit, jobs=args.jobs)
    env = environment()
    env["trl"], env["lm_eval"] = _version("trl"), _version("lm-eval")
    stem = _stem(env, args)
    out = Path(args.report or "reports/accuracy")
    png = abench.plot(result, out / f"{stem}.png")
    atomic.write_json(out / f"{stem}.json", {"suite": "accuracy", "environment": env, "command": args.command_line,
                                             **result})
    text = abench.markdown(result, env, args.command_line, png.name)
    atomic.write_text(out / f"{stem}.md", text)
    _refresh_current(out / f"{stem}.json")
    print(text)
    print(f"accuracy report: {out / (stem + '.md')}")
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- reports
def cmd_reports(args: argparse.Namespace) -> int:
    """``workbench reports current``: CURRENT.md and the index of a report archive, from its reports."""
    from workbench.bench import current

    root = Path(args.reports)
    if not root.is_dir():
        raise UserError(f"the reports folder {root} does not exist; pass --reports DIR, the folder that holds "
                        "<suite>/<date>-<device>.json (reports/ in a checkout).")
    for path in current.write_current(root):
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.strip() if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("kernels", help="list every registered kernel, its reference and what parity compares")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("parity", help="run the parity suite, or rerun one failing case")
    p.add_argument("--kernel", help="only this kernel (with --params/--seed: rerun that one case)")
    p.add_argument("--profile", choices=["ci", "gpu", "nightly"], help="hypothesis profile (default: gpu with CUDA, else ci)")
    p.add_argument("--examples", type=int, help="examples per (kernel, dtype) test, overriding the profile")
    p.add_argument("--workers", type=int, default=1, help="pytest-xdist workers")
    p.add_argument("--dtype", default="float32", help="dtype of the rerun case (float32, float16, bfloat16)")
    p.add_argument("--seed", type=int, help="seed of the rerun case")
    p.add_argument("--params", help="params (JSON) of the rerun case, as printed by the failing test")
    p.add_argument("--report", metavar="DIR", help="write <date>-<device>.md/.json with timings and examples to DIR")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="further arguments for pytest, after --")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="micro-benchmark the kernels against PyTorch, torch.compile and Liger")
    p.add_argument("--suite", default="kernels", help="benchmark suite: kernels, train (training runs with "
                   "and without our kernels), context (the longest sequence a training step fits in), accuracy "
                   "(lm-eval of HF- and ours-trained adapters against the seed-to-seed noise) or step (the plain "
                   "training loop peers publish, per stack: s/step, tokens/s, MFU, peak memory and every step's loss "
                   "against hf; "
                   "writes reports/step/<date>-<device>[-tag].md/.json/.png, and with --profile a -profile folder of "
                   "per-record kernel CSVs and Chrome traces)")
    p.add_argument("--shape", help="kernels suite: shape set llama3-8b (default), llama3.2-1b, qwen3-4b, tiny (CPU "
                   "smoke test); train, context and step suites: model shape llama3.2-1b (train and step default), "
                   "llama3.1-8b (context default), qwen3-1.7b, tiny, tiny-qwen3 (CPU); step: several, comma-separated")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--only", help="comma-separated kernel names")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile stack")
    p.add_argument("--timing", choices=["graph", "events"], default="graph",
                   help="kernels suite on CUDA: graph (default; each call replayed from a CUDA graph, launch overhead "
                        "excluded) or events (one call between CUDA events, launch overhead included)")
    p.add_argument("--tag", help="appended to the report's file name: <date>-<device>-<tag>")
    p.add_argument("--report", metavar="DIR",
                   help="where <date>-<device>.md/.json go (default reports/<suite>)")
    p.add_argument("--steps", type=int, help="train suite: optimizer steps per run (default 30); context suite: "
                   "per trial (default 2); accuracy suite: override the config's max_steps; step suite: timed steps "
                   "(default 10)")
    p.add_argument("--warmup", type=int, help="step suite: untimed steps before the timed ones (default 3)")
    p.add_argument("--batch", type=int, help="train suite: batch size (default 8); step suite: (default 4)")
    p.add_argument("--seq", type=int, metavar="TOKENS",
                   help="train suite: sequences of exactly TOKENS tokens (the built-in rows packed; e.g. 2048 for "
                        "the 4 x 2048 shape; default: one short row per sequence); step suite: random tokens per "
                        "sequence (default 2048)")
    p.add_argument("--autocast", help="step suite: on (default: bf16 autocast around forward and loss, as the "
                   "Trainer with bf16=True), off (the bf16 model without autocast) or both")
    p.add_argument("--profile", action="store_true", help="step suite: profile a few steps of every record after "
                   "its timed ones (torch.profiler): top kernels per step and the GPU's idle share in the report, "
                   "a CSV and a Chrome trace per record in <report>/<date>-<device>[-tag]-profile/")
    p.add_argument("--max-seq", type=int, default=131072, metavar="TOKENS",
                   help="context suite: the longest sequence tried (default 131072); --seq is where the doubling "
                        "starts (default 2048)")
    p.add_argument("--granularity", type=int, default=1024, metavar="TOKENS",
                   help="context suite: bisect until the longest fit and the first miss are this close (default 1024)")
    p.add_argument("--devices", metavar="IDS", help="context suite: comma-separated GPU indices (e.g. 0,1) or all; the "
                   "(mode, stack) searches then run at the same time, one per GPU, each trial alone on its GPU "
                   "(default: one after another on the GPU the suite's processes see)")
    p.add_argument("--modes", help="train and step suites: lora,qlora (default both)")
    p.add_argument("--stacks", help="train and step suites: hf,hf-gc,ours,ours-gc,ours-offload,liger,unsloth,"
                   "unsloth-gc (default all "
                   "that can run here: liger needs liger-kernel and CUDA; unsloth needs CUDA and unsloth, installed "
                   "or in the site folder named by WORKBENCH_UNSLOTH_SITE; hf is the baseline)")
    p.add_argument("--run", metavar="DIR", help="train/context/accuracy/step suites: where the runs go (default "
                   "runs/bench-<suite>)")
    p.add_argument("--config", metavar="YAML", help="accuracy suite: the training config (default: the built-in run)")
    p.add_argument("--seeds", default="0,1", help="accuracy suite: comma-separated seeds (two or more measure "
                   "the run-to-run noise)")
    p.add_argument("--tasks", help="accuracy suite: comma-separated lm-eval tasks (default: the shipped ones)")
    p.add_argument("--limit", type=int, metavar="N", help="accuracy suite: only the first N documents per task")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="accuracy suite: run up to N (seed, stack) "
                   "pipelines (train, then eval) at once, each process with cpu count / N CPU threads (default 1: "
                   "one after another). The same runs in the same order; above 1 they share the device, so the report "
                   "gives no speed numbers")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("regress", help="compare two reports of one bench suite (e.g. last night's and tonight's); "
                       "exit 1 on a regression")
    p.add_argument("baseline", help="the earlier report (.json written by `workbench bench`)")
    p.add_argument("current", help="the new report of the same suite, device and shape")
    p.add_argument("--time", type=float, default=0.10, help="allowed slowdown, as a fraction (default 0.10)")
    p.add_argument("--memory", type=float, default=0.02, help="allowed peak-memory growth (default 0.02)")
    p.add_argument("--loss", type=float, default=0.01, help="allowed relative move of the final loss (default 0.01)")
    p.add_argument("--allow-other-device", action="store_true", help="compare reports of different devices/shapes")
    p.add_argument("--out", metavar="FILE.md", help="also write the comparison as Markdown")
    p.set_defaults(func=cmd_regress)

    p = sub.add_parser("reports", help="today's numbers from the report archive (reports/CURRENT.md)",
                       description="Regenerate a report archive's CURRENT.md (the newest complete report of each "
                       "suite, device and setup, with its headline numbers) and the index in its README.md. Each "
                       "suite does this after writing a report. Example: workbench reports current")
    reports_sub = p.add_subparsers(dest="reports_command", metavar="ACTION", required=True)
    q = reports_sub.add_parser("current", help="write DIR/CURRENT.md and the index in DIR/README.md",
                               description="Write DIR/CURRENT.md, the generated index section of DIR/README.md and "
                               "the headline-numbers section of the README.md above DIR (the project's) from "
                               "DIR/<suite>/*.json; a README.md without its section is left alone. Exit 0; 2 when DIR "
                               "does not exist.")
    q.add_argument("--reports", default="reports", metavar="DIR", help="the report archive (default: reports)")
    q.set_defaults(func=cmd_reports)

    # Pipeline stages: each module is light to import and defines add_parser(sub);
    # its handler imports the heavy stack (transformers, TRL, llama.cpp) only when run.
    import importlib
    import importlib.util

    for name in STAGE_CLI_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).add_parser(sub)
    return parser


# Light CLI modules of the pipeline stages, in pipeline order.
STAGE_CLI_MODULES = [
    "workbench.train_cli",      # workbench train
    "workbench.export.cli",     # workbench merge, workbench export
    "workbench.eval.cli",       # workbench eval
    "workbench.pipeline_cli",   # workbench run, report
    "workbench.qualify_cli",    # workbench qualify
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["workbench", *(sys.argv[1:] if argv is None else argv)])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "pytest_args", None) and args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    if getattr(args, "seed", None) is None and getattr(args, "params", None) is not None:
        args.seed = 0
    try:
        return args.func(args)
    except UserError as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The state left is consistent (every artifact is written under a temp name and
        # renamed; the interrupted stage is recorded as such): say so, exit 130 (128 + SIGINT).
        print("workbench: interrupted; nothing that looks finished was left half-written, and running the same "
              "command again resumes.", file=sys.stderr)
        return 130
    except OSError as err:
        # The file system refused (full disk, read-only or vanished folder, permissions): one
        # sentence naming the file, never a traceback from deep inside a library.
        print(f"workbench: error: {os_error_sentence(err)}", file=sys.stderr)
        return 2


def os_error_sentence(err: OSError) -> str:
    """One sentence for an OSError: what the system said, the file, what to do."""
    import errno

    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}; free some space and run the same command again (what was "
                "being written was not kept).")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the file system refused a write{where}: {err.strerror}; make the folder writable or use another one."
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason}{where}; check the path, its permissions and free space, then run the same command again."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
