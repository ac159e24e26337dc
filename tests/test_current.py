"""reports/CURRENT.md, the reports' index and the README's headline numbers (workbench.bench.current).

The first test is the only one that reads reports/: CURRENT.md, the index in reports/README.md
and the headline table in README.md must be what `workbench reports current` makes of the archive,
so a report committed without regenerating them fails here. Everything else runs on the small
archive in tests/fixtures/reports/.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workbench import cli
from workbench.bench import compare, current

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "reports"


def test_committed_current_and_index_match_the_archive():
    reports = REPO_ROOT / "reports"
    hint = "out of date: run `workbench reports current` and commit reports/CURRENT.md and reports/README.md"
    assert (reports / "CURRENT.md").read_text() == current.render_current(reports), f"reports/CURRENT.md is {hint}"
    assert (reports / "README.md").read_text() == current.render_readme(reports), f"the reports' index is {hint}"
    readme = current.render_project_readme(reports)
    assert readme is not None, "README.md has lost its generated headline-numbers section"
    assert (REPO_ROOT / "README.md").read_text() == readme, f"README.md's headline table is {hint} and README.md"


# --------------------------------------------------------------------------- the fixture archive
def _rows(markdown: str) -> list[list[str]]:
    """A Markdown table's body rows, split into cells."""
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith(("| suite |", "| report |"))]


def _doc(relative: str) -> dict:
    return json.loads((FIXTURES / relative).read_text())


def test_current_keeps_the_newest_complete_report_of_each_setup():
    rows = _rows(current.render_current(FIXTURES))
    reports = {(r[0], r[2]): r[4] for r in rows}
    # lora: 01-02 is superseded, 01-04 stopped midway, so 01-03 (not the newer-dated ones) is current;
    # qlora was measured only in 01-01, which stays current for that mode alone.
    lora = reports[("train", "tiny, lora, batch 4 × 2048")]
    assert lora.startswith("[2026-01-03-gpu-x](train/2026-01-03-gpu-x.json)")
    assert "([notes](train/2026-01-03-gpu-x.notes.md))" in lora
    assert reports[("train", "tiny, qlora, batch 4 × 2048")].startswith("[2026-01-01-gpu-x](train/")
    stems = " ".join(r[4] for r in rows)
    assert "gpu-x-wrong" not in stems and "gpu-x-stopped" not in stems
    # one row per (suite, device, setup); the Markdown-only regress check is in the index only
    assert len(rows) == len({(r[0], r[1], r[2]) for r in rows}) == 7
    assert [r[0] for r in rows] == ["kernels", "kernels", "train", "train", "context", "accuracy", "parity"]


def test_headlines_of_each_suite():
    kernels = current.headline(_doc("kernels/2026-01-01-gpu-x.json"))
    # eager: rms_norm 4x, FLCE 1x (HF eager), nf4_dequant 9x forward-only -> (4*1*9)^(1/3); the chunk sweep is not ours
    assert kernels == "ours vs eager 3.30× (3); vs torch.compile 0.95× (2); vs Liger 2.00× (1)"
    assert current.headline(_doc("train/2026-01-03-gpu-x.json")) == (
        "**ours 1.25× / 0.60×**; liger 1.20× / 0.80× (loss differs); unsloth failed")
    assert current.headline(_doc("train/2026-01-01-gpu-x.json"), "qlora") == "**ours 1.50× / 0.50×**"
    assert current.headline(_doc("context/2026-01-01-gpu-x.json")) == (
        "hf-gc 4096 (4.2 GiB); ours-offload ≥ 8192 (2.5 GiB); ours-gc < 1024")
    assert current.headline(_doc("accuracy/2026-01-01-gpu-x.json")) == (
        "ours NOT within noise of hf: train final_loss (ours better); 2 seeds")
    assert current.headline(_doc("parity/2026-01-01-gpu-x.json")) == (
        "PASS: 12 passed, 1 skipped; 2 kernels, 240 examples, 0 failed")


def test_a_report_lacking_fields_shows_a_dash():
    sparse = _doc("kernels/2026-01-02-gpu-x-sparse.json")
    assert current.headline(sparse) == "—"
    assert current.setup(sparse)[1] == "tiny, bfloat16, CUDA-event timing"  # no timing: the events of old reports
    for suite in ("train", "context", "accuracy", "parity", "step", "some-new-suite"):
        assert current.headline({"suite": suite}) == "—"
    no_numbers = {"suite": "train", "comparisons": [{"mode": "lora", "stack": "ours", "speedup": None}]}
    assert current.headline(no_numbers) == "**ours — / —**"
    assert current.headline({"suite": "context", "rows": "not a list"}) == "—"  # a malformed report still renders


def test_the_pytest_benchmark_json_beside_a_kernels_report_is_no_report_of_its_own(tmp_path):
    # `workbench bench kernels` keeps the JSON of `pytest bench/` (<stem>.benchmark.json) next to the report
    # made of it; CURRENT.md and the index list the report only.
    archive = tmp_path / "reports"
    shutil.copytree(FIXTURES, archive)
    before = current.render_current(archive), current.render_readme(archive)
    (archive / "kernels" / "2026-01-05-gpu-x.benchmark.json").write_text(json.dumps(
        {"machine_info": {}, "commit_info": {}, "benchmarks": [], "datetime": "2026-01-05T00:00:00", "version": "5",
         "workbench": {"suite": "kernels", "shape": "tiny", "dtype": "bfloat16", "timing": "graph", "cases": [],
                       "errors": [], "environment": {"device": "gpu x", "date": "2026-01-05"}}}))
    assert (current.render_current(archive), current.render_readme(archive)) == before


def test_index_lists_every_report_with_its_status():
    index = current.render_index(FIXTURES)
    status = {r[0].split("]")[0].lstrip("["): r[4] for r in _rows(index)}
    assert status["2026-01-02-gpu-x-wrong"] == "superseded by [2026-01-03-gpu-x](train/2026-01-03-gpu-x.json)"
    assert status["2026-01-04-gpu-x-stopped"] == "incomplete"
    assert status["2026-01-03-gpu-x"] == "**current**"
    assert status["2026-01-01-gpu-x"].startswith("**current**")
    assert "**current** (qlora); newer: lora: [2026-01-03-gpu-x]" in index
    assert "| [2026-01-03-gpu-x-train](regress/2026-01-03-gpu-x-train.md) | GPU X | — | no regression |  |" in index
    assert index.index("### kernels") < index.index("### train") < index.index("### regress")


def test_write_current_and_the_cli(tmp_path, capsys):
    archive = tmp_path / "reports"
    shutil.copytree(FIXTURES, archive)
    assert cli.main(["reports", "current", "--reports", str(archive)]) == 0
    assert (archive / "CURRENT.md").read_text() == current.render_current(archive)
    readme = (archive / "README.md").read_text()
    assert readme.startswith("# Reports") and current.INDEX_START in readme and current.INDEX_END in readme
    # the hand-written part of README.md is kept; only the generated section is rewritten
    (archive / "README.md").write_text("# Ours\n\nkept\n\n" + current.INDEX_START + "\nstale\n" + current.INDEX_END
                                       + "\n\ntail\n")
    current.write_current(archive)
    readme = (archive / "README.md").read_text()
    assert readme.startswith("# Ours\n\nkept\n\n") and "stale" not in readme and readme.endswith("tail\n")
    # a README.md without the generated section is someone else's file
    (archive / "README.md").write_text("mine\n")
    assert current.write_current(archive) == [archive / "CURRENT.md"]
    assert (archive / "README.md").read_text() == "mine\n"
    assert cli.main(["reports", "current", "--reports", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_project_readme_gets_the_current_table_with_links_into_the_archive(tmp_path):
    archive = tmp_path / "reports"
    shutil.copytree(FIXTURES, archive)
    start, end = current.HEADLINES_START, current.HEADLINES_END
    (tmp_path / "README.md").write_text(f"# Project\n\n{start}\nold\n{end}\n\n## More\n")
    assert tmp_path / "README.md" in [p.resolve() for p in current.write_current(archive)]
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith(f"# Project\n\n{start}") and readme.endswith(f"{end}\n\n## More\n")
    assert "old" not in readme
    assert ("| [2026-01-03-gpu-x](reports/train/2026-01-03-gpu-x.json) "
            "([notes](reports/train/2026-01-03-gpu-x.notes.md)) |") in readme
    # a README.md without the section is not touched
    (tmp_path / "README.md").write_text("# Project\n")
    current.write_current(archive)
    assert (tmp_path / "README.md").read_text() == "# Project\n"


def test_after_report_regenerates_only_an_archive(tmp_path):
    archive = tmp_path / "reports"
    shutil.copytree(FIXTURES, archive)
    assert current.after_report(archive / "train" / "2026-01-03-gpu-x.json") == [
        archive / "CURRENT.md", archive / "README.md"]
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    assert current.after_report(elsewhere / "2026-01-03-gpu-x.json") == []
    assert not (tmp_path / "CURRENT.md").exists()


def test_a_superseded_report_is_no_regression_baseline(tmp_path):
    newest = _doc("train/2026-01-03-gpu-x.json")
    # 01-01 measured other modes, so the only earlier report of 01-03's setup is 01-02, which is superseded
    assert compare.previous_report(FIXTURES / "train", newest, "2026-01-03-gpu-x.json") is None
    shutil.copytree(FIXTURES / "train", tmp_path / "train")
    wrong = tmp_path / "train" / "2026-01-02-gpu-x-wrong.json"
    wrong.write_text(json.dumps({k: v for k, v in json.loads(wrong.read_text()).items() if k != "superseded_by"}))
    assert compare.previous_report(tmp_path / "train", newest, "2026-01-03-gpu-x.json") == wrong


@pytest.mark.parametrize("stem", ["2026-01-02-gpu-x-wrong", "2026-01-04-gpu-x-stopped"])
def test_skipped_reports_are_not_eligible(stem):
    entry = next(e for e in current.load(FIXTURES) if e.stem == stem)
    assert not entry.eligible


def test_the_suites_regenerate_current_after_writing_a_report(tmp_path, capsys):
    archive = tmp_path / "reports"
    shutil.copytree(FIXTURES, archive)
    newer = _doc("train/2026-01-03-gpu-x.json")
    env = {**newer["environment"], "date": "2026-01-05", "time_utc": "2026-01-05T12:00:00Z"}
    result = {k: v for k, v in newer.items() if k not in ("suite", "environment", "command", "complete")}
    result["comparisons"] = [{**result["comparisons"][1], "speedup": 1.75}]
    # a report stopped midway leaves CURRENT.md alone (it is never current)
    cli.common.write_suite_report(archive / "train", "2026-01-05-gpu-x", "train", env, "cmd",
                            {**result, "incomplete": "stopped"}, "# text\n")
    assert not (archive / "CURRENT.md").exists()
    # the complete one is written, then CURRENT.md and the index name it
    cli.common.write_suite_report(archive / "train", "2026-01-05-gpu-x", "train", env, "cmd", result, "# text\n")
    row = "**ours 1.75× / 0.60×**; unsloth failed | [2026-01-05-gpu-x](train/2026-01-05-gpu-x.md)"
    assert row in (archive / "CURRENT.md").read_text()
    # a regression check written into the archive's regress/ folder enters the index
    old, new = archive / "train" / "2026-01-03-gpu-x.json", archive / "train" / "2026-01-05-gpu-x.json"
    cli.main(["regress", str(old), str(new), "--out", str(archive / "regress" / "2026-01-05-gpu-x-train.md")])
    assert "[2026-01-05-gpu-x-train](regress/2026-01-05-gpu-x-train.md)" in (archive / "README.md").read_text()


def test_step_reports_with_and_without_autocast_are_separate_setups():
    """Without autocast ours follows PEFT's fp32 adapters, with it bf16: other numerics, so a newer
    report of one setting must not hide the other's numbers."""
    base = {"suite": "step", "shape": "llama3.2-1b", "modes": ["lora"], "batch": 4, "seq": 2048}
    rows = [{"mode": "lora", "stack": "ours", "speedup": 1.5, "memory_ratio": 0.4}]
    on = {**base, "autocast": ["on"], "comparisons": [{**rows[0], "autocast": "on"}]}
    off = {**base, "autocast": ["off"], "comparisons": [{**rows[0], "autocast": "off", "speedup": 1.2}]}
    assert current.setup(on, "lora")[0] != current.setup(off, "lora")[0]
    assert current.setup(on, "lora")[1] == "llama3.2-1b, lora, batch 4 × 2048, autocast on"
    both = {**base, "autocast": ["on", "off"], "comparisons": on["comparisons"] + off["comparisons"]}
    assert current.headline(both, "lora") == ("autocast on: **ours 1.50× / 0.40×** · "
                                              "autocast off: **ours 1.20× / 0.40×**")


def test_a_parity_run_of_part_of_the_suite_is_a_setup_of_its_own(tmp_path):
    # `workbench parity ... -- -k 'mutant and rms_norm'` runs a selection: its row says so, and the
    # whole suite's row of that profile stays current beside it. A run of mutants alone records no
    # hypothesis profile; the command's --profile names it.
    archive = tmp_path / "reports"
    shutil.copytree(FIXTURES, archive)
    whole = _doc("parity/2026-01-01-gpu-x.json")
    part = {**whole, "command": "workbench parity --profile gpu --workers 12 --report out -- -k 'mutant and rms_norm'",
            "properties": [], "kernels": {}, "total_examples": 0,
            "environment": {**whole["environment"], "date": "2026-01-09"}}
    (archive / "parity" / "2026-01-09-gpu-x.json").write_text(json.dumps(part))
    assert current.setup(part)[1] == "profile gpu, only `-k 'mutant and rms_norm'`"
    kernel = {**part, "command": "workbench parity --kernel rope --profile ci"}
    assert current.setup(kernel)[1] == "profile ci, only `--kernel rope`"
    # Options that change only what pytest prints leave the whole suite the whole suite.
    loud = {**whole, "command": "workbench parity --profile gpu --workers 12 --report out -- -v --durations 25 -rf"}
    assert current.setup(loud) == current.setup(whole)
    assert current.setup({**loud, "command": loud["command"] + " -x"})[1] == current.setup(whole)[1] + ", only `-x`"
    rows = [r for r in _rows(current.render_current(archive)) if r[0] == "parity"]
    assert [(r[2], r[4].split("]")[0]) for r in rows] == [
        (current.setup(whole)[1], "[2026-01-01-gpu-x"),
        ("profile gpu, only `-k 'mutant and rms_norm'`", "[2026-01-09-gpu-x")]


def test_an_archive_inside_the_archive_is_linked_not_listed(tmp_path):
    # nightly.sh --short writes a whole archive (its own CURRENT.md) to reports/nightly-short: none of
    # its reports is the outer archive's; the index links it.
    archive = tmp_path / "reports"
    shutil.copytree(FIXTURES, archive)
    before = current.render_current(archive)
    inner = archive / "nightly-short"
    shutil.copytree(FIXTURES, inner)
    current.write_current(inner)
    assert current.render_current(archive) == before
    index = current.render_index(archive)
    assert "### nightly-short" not in index
    assert "- [nightly-short](nightly-short/CURRENT.md): its own CURRENT.md and [index](nightly-short/README.md)" \
        in index
