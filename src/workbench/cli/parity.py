"""``workbench parity``: the parity suite (parity/), or one failing case again."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workbench.cli.common import REPO_ROOT, command, ensure_interpreter_if_no_gpu, refresh_current
from workbench.errors import UserError


def add_parser(sub) -> None:
    p = command(sub, "parity", help="run the parity suite, or rerun one failing case",
                description="Run the parity tests (parity/, generated from the kernel registry): every kernel "
                "against its reference under hypothesis, with the tolerance doctrine's bounds. With --kernel, "
                "--params and --seed, rerun the one case a failing test printed.",
                writes=["with --report DIR: DIR/<date>-<device>.md and .json (timings, examples, the kernels' "
                        "source hashes) and its junit XML; reports/CURRENT.md when DIR is in the archive"],
                exits=["0  every test passed (or the rerun case passed)", "1  a test (or the rerun case) failed"],
                example="workbench parity --kernel rms_norm --profile gpu --report reports/parity")
    p.add_argument("--kernel", help="only this kernel (with --params/--seed: rerun that one case)")
    p.add_argument("--profile", choices=["ci", "gpu", "nightly"],
                   help="hypothesis profile (default: gpu with CUDA, else ci)")
    p.add_argument("--examples", type=int, help="examples per (kernel, dtype) test, overriding the profile")
    p.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (default 1)")
    p.add_argument("--dtype", default="float32", help="dtype of the rerun case (float32, float16, bfloat16)")
    p.add_argument("--seed", type=int, help="seed of the rerun case (default 0)")
    p.add_argument("--params", help="params (JSON) of the rerun case, as printed by the failing test")
    p.add_argument("--report", metavar="DIR", help="write <date>-<device>.md/.json with timings and examples to DIR")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="further arguments for pytest, after --")
    p.set_defaults(func=run)


def _parity_case(args: argparse.Namespace) -> int:
    ensure_interpreter_if_no_gpu()
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


def run(args: argparse.Namespace) -> int:
    if args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    if args.seed is None and args.params is not None:
        args.seed = 0
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
        cmd += ["-n", str(args.workers), "--dist", "loadgroup"]   # xdist_group: the >2^31 cases one at a time
    cmd += args.pytest_args
    print("running:", " ".join(cmd), flush=True)
    if not args.report:
        return subprocess.call(cmd, env=env, cwd=REPO_ROOT)

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
    refresh_current(js)
    print(f"parity report: {md} and {js}")
    return code
