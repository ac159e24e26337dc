"""The nightly GPU workflow runs on a self-hosted runner that CI never reaches: its commands
are checked here against the CLI they call, so a renamed flag, a stack or shape that no
longer exists, or a missing script fails on every change instead of on the next night."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

from workbench.bench import train as tbench
from workbench.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly-gpu.yml"


def _steps(job: str) -> list[dict]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"][job]["steps"]


def _shell(text: str) -> str:
    """A step's script with the expressions GitHub fills in replaced by what it would put there:
    ``${{ inputs.x || 'default' }}`` by the default, ``${{ ... }}`` otherwise by a word."""
    text = re.sub(r"\$\{\{\s*inputs\.\w+\s*\|\|\s*'([^']*)'\s*\}\}", r"\1", text)
    return re.sub(r"\$\{\{[^}]*\}\}", "X", text)


def _workbench_commands() -> list[list[str]]:
    commands = []
    for step in _steps("gpu"):
        for line in _shell(step.get("run", "")).splitlines():
            line = line.split(" || ")[0].strip()
            if "-m workbench " not in line:
                continue
            words = shlex.split(line)
            commands.append(words[words.index("workbench") + 1:])
    return commands


def test_the_nightly_workflow_runs_every_suite():
    suites = {c[1] for c in _workbench_commands() if c[0] == "bench"}
    assert suites == {"kernels", "train", "accuracy", "context"}
    assert any(c[0] == "regress" for c in _workbench_commands())


@pytest.mark.parametrize("argv", _workbench_commands(), ids=lambda a: " ".join(a[:3]))
def test_every_workbench_command_of_the_nightly_workflow_parses(argv):
    args = build_parser().parse_args(argv)  # an unknown flag or a bad choice: SystemExit
    if argv[0] == "bench":
        assert args.suite == argv[1]
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


def test_the_files_the_workflow_names_exist():
    text = WORKFLOW.read_text()
    for path in sorted(set(re.findall(r"\b((?:scripts|src/workbench/configs)/[\w./-]+)", text))):
        assert (ROOT / path).is_file(), path


def test_the_nightly_tries_the_newest_versions():
    # The lock keeps a fresh clone on the tested set; the nightly's CPU job is what
    # notices a new release that breaks the suite.
    runs = [step.get("run", "") for step in _steps("latest-versions")]
    assert any(r.strip() == "bash scripts/test.sh --latest" for r in runs), runs
    assert "--latest" in (ROOT / "scripts" / "test.sh").read_text()
