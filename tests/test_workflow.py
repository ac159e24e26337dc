"""The nightly GPU workflow runs on a self-hosted runner that CI never reaches: its commands
are checked here against the CLI they call, so a renamed flag, a stack or shape that no
longer exists, or a missing script fails on every change instead of on the next night.
The job's body is scripts/nightly.sh: its commands (nightly and ``--short``) come from its
``--dry-run``, and any workbench command left in the workflow itself is checked as well."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workbench.bench import train as tbench
from workbench.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly-gpu.yml"
NIGHTLY = ROOT / "scripts" / "nightly.sh"


def _steps(job: str) -> list[dict]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"][job]["steps"]


def _shell(text: str) -> str:
    """A step's script with the expressions GitHub fills in replaced by what it would put there:
    ``${{ inputs.x || 'default' }}`` by the default, ``${{ ... }}`` otherwise by a word."""
    text = re.sub(r"\$\{\{\s*inputs\.\w+\s*\|\|\s*'([^']*)'\s*\}\}", r"\1", text)
    return re.sub(r"\$\{\{[^}]*\}\}", "X", text)


def _words(line: str) -> list[str] | None:
    line = line.split(" || ")[0].strip()
    if "-m workbench " not in line:
        return None
    words = shlex.split(line)
    return words[words.index("workbench") + 1:]


def _workflow_commands() -> list[list[str]]:
    commands = []
    for step in _steps("gpu"):
        for line in _shell(step.get("run", "")).splitlines():
            if (words := _words(line)) is not None:
                commands.append(words)
    return commands


def _script_commands(*flags: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(NIGHTLY), "--dry-run", *flags], capture_output=True, text=True, check=True)
    return [w for w in map(_words, out.stdout.splitlines()) if w is not None]


def _script_lines(*flags: str) -> list[str]:
    out = subprocess.run(["bash", str(NIGHTLY), "--dry-run", *flags], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _workbench_commands() -> list[list[str]]:
    return _workflow_commands() + _script_commands() + _script_commands("--short")


def test_the_workflow_runs_the_nightly_script():
    runs = " ".join(step.get("run", "") for step in _steps("gpu"))
    assert "scripts/nightly.sh" in runs


@pytest.mark.parametrize("flags", [(), ("--short",)], ids=["nightly", "short"])
def test_the_nightly_script_runs_every_suite_and_parity(flags):
    commands = _script_commands(*flags)
    suites = {c[1] for c in commands if c[0] == "bench"}
    assert suites == {"kernels", "train", "step", "accuracy", "context"}
    assert sum(c[0] == "regress" for c in commands) == 4
    assert any(line.startswith("bash scripts/gpu_parity.sh ") for line in _script_lines(*flags))


@pytest.mark.parametrize("argv", _workbench_commands(), ids=lambda a: " ".join(a[:3]))
def test_every_workbench_command_of_the_nightly_workflow_parses(argv):
    args = build_parser().parse_args(argv)  # an unknown flag or a bad choice: SystemExit
    if argv[0] == "bench":
        assert args.suite == argv[1]
        if args.suite == "kernels":
            from workbench.bench import kernels as kbench

            assert args.shape in kbench.SHAPES, args.shape
        if args.suite in ("train", "context"):
            assert args.shape in tbench.SHAPES
            for stack in (args.stacks or "").split(","):
                assert not stack or stack in tbench.STACKS, stack
            for mode in (args.modes or "").split(","):
                assert not mode or mode in tbench.MODES, mode
        if args.suite == "context":
            assert args.seq <= args.max_seq and args.granularity >= 1
        if getattr(args, "config", None):
            assert (ROOT / args.config.replace("$GITHUB_WORKSPACE/", "")).is_file(), args.config


def _pytest_bench_command(*flags: str) -> list[str]:
    (line,) = [line for line in _script_lines(*flags) if " -m pytest bench/" in line]
    words = shlex.split(line)
    return words[words.index("pytest") + 1:]


@pytest.mark.parametrize("flags", [(), ("--short",)], ids=["nightly", "short"])
def test_the_nightly_kernels_run_under_pytest_benchmark_and_their_json_is_the_record(flags, tmp_path):
    """The kernels step is `pytest bench/ --benchmark-json=...`, compared with the previous night's JSON
    (failing on a median 10 % slower); the report and the regression check are made of that JSON. Its
    flags are parsed by pytest itself (with pytest-benchmark and bench/conftest.py), collecting on the
    CPU: the shape set is checked here and swapped for tiny, the paths for files of this test."""
    from workbench.bench import kernels as kbench

    args = _pytest_bench_command(*flags)
    assert args[0] == "bench/"
    options = dict(a.split("=", 1) for a in args if a.startswith("--benchmark-"))
    reports = "reports/nightly-short" if flags else "reports"
    assert re.fullmatch(re.escape(reports) + r"/kernels/\d{4}-\d\d-\d\d(-\d+)?\.benchmark\.json",
                        options["--benchmark-json"])
    assert options["--benchmark-compare"] == "previous-reports/kernels.benchmark.json"
    assert options["--benchmark-compare-fail"] == "median:10%"
    commands = _script_commands(*flags)
    (report,) = [c for c in commands if c[:2] == ["bench", "kernels"]]
    assert report[report.index("--from-json") + 1] == options["--benchmark-json"]
    (regress,) = [c for c in commands if c[0] == "regress" and c[-1].endswith("/kernels.md")]
    assert regress[1:3] == [options["--benchmark-compare"], options["--benchmark-json"]]

    shape = args[args.index("--bench-shape") + 1]
    assert shape in kbench.SHAPES, shape
    previous = tmp_path / "previous.json"  # a pytest-benchmark JSON with no benchmarks: enough to compare with
    previous.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": [], "datetime": "",
                                    "version": "5"}))
    swap = {f"--benchmark-json={options['--benchmark-json']}": f"--benchmark-json={tmp_path / 'b.json'}",
            f"--benchmark-compare={options['--benchmark-compare']}": f"--benchmark-compare={previous}",
            shape: "tiny", "bench/": str(ROOT / "bench")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    # From tmp_path: pytest-benchmark keeps its storage (.benchmarks) in the working directory.
    proc = subprocess.run([sys.executable, "-m", "pytest", *[swap.get(a, a) for a in args], "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_kernel[tiny-bfloat16-rms_norm-ours-fwd]" in proc.stdout


def test_a_second_nightly_on_one_day_keeps_the_first_kernels_json(tmp_path):
    day = subprocess.run(["date", "-u", "+%F"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "kernels").mkdir()

    def json_arg() -> str:
        args = _pytest_bench_command("--short", "--reports", str(tmp_path))
        return dict(a.split("=", 1) for a in args if a.startswith("--benchmark-"))["--benchmark-json"]

    assert json_arg() == f"{tmp_path}/kernels/{day}.benchmark.json"
    (tmp_path / "kernels" / f"{day}.benchmark.json").write_text("{}")
    assert json_arg() == f"{tmp_path}/kernels/{day}-2.benchmark.json"
    (tmp_path / "kernels" / f"{day}-2.benchmark.json").write_text("{}")
    assert json_arg() == f"{tmp_path}/kernels/{day}-3.benchmark.json"


def test_the_files_the_workflow_names_exist():
    text = WORKFLOW.read_text() + NIGHTLY.read_text()
    for path in sorted(set(re.findall(r"\b((?:scripts|src/workbench/configs)/[\w./-]+)", text))):
        assert (ROOT / path).is_file(), path


def test_the_nightly_tries_the_newest_versions():
    # The lock keeps a fresh clone on the tested set; the nightly's CPU job is what
    # notices a new release that breaks the suite.
    runs = [step.get("run", "") for step in _steps("latest-versions")]
    assert any(r.strip() == "bash scripts/test.sh --latest" for r in runs), runs
    assert "--latest" in (ROOT / "scripts" / "test.sh").read_text()
