"""Every command's --help says what it does, what it writes, its exit codes and an example;
`workbench bench` has one subcommand per suite, each with its own flags and real defaults."""
import pytest

from workbench.cli import COMMANDS, build_parser

BENCH_SUITES = ("kernels", "train", "step", "context", "accuracy")


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [(c,) for c in COMMANDS] + [("bench", s) for s in BENCH_SUITES]
                         + [("reports", "current")], ids=" ".join)
def test_every_help_has_a_description_what_it_writes_exit_codes_and_an_example(capsys, argv):
    text = _help(capsys, *argv)
    usage, description = text.split("\n\n", 2)[:2]
    assert usage.startswith(f"usage: workbench {' '.join(argv)}") and len(description.split()) >= 5, text
    for section in ("writes:", "exit codes:", "example:"):
        assert f"\n{section}\n" in text, (section, text)
    assert "  0  " in text and "  2  bad input" in text
    example = text.split("example:\n", 1)[1].strip().splitlines()[0]
    assert example.startswith(f"workbench {argv[0]}"), example
    build_parser().parse_args(example.split()[1:])   # the example itself parses


def test_bench_suites_have_their_own_flags_and_no_sentinel_defaults():
    parse = build_parser().parse_args
    assert parse(["bench", "kernels"]).shape == "llama3-8b" and parse(["bench", "train"]).shape == "llama3.2-1b"
    assert parse(["bench", "context"]).shape == "llama3.1-8b" and parse(["bench", "context"]).seq == 2048
    assert parse(["bench", "train"]).report == "reports/train" and parse(["bench", "step"]).run == "runs/bench-step"
    assert parse(["bench", "step"]).steps == 10 and parse(["bench", "train"]).steps == 30
    assert parse(["bench", "train"]).method == "sft" and parse(["bench", "train", "--method", "dpo"]).method == "dpo"
    for suite, foreign in (("kernels", "--seeds"), ("train", "--only"), ("context", "--jobs"), ("accuracy", "--shape"),
                           ("step", "--granularity")):
        with pytest.raises(SystemExit):
            parse(["bench", suite, foreign, "1"])
