"""`workbench eval` on bad input: one clear sentence (exit 2), nothing recorded."""
import json

import pytest

from _export_run import build_run
from workbench import manifest
from workbench.cli import main
from workbench.errors import UserError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run as the train stage leaves it (no merge, no export)."""
    return build_run(tmp_path_factory.mktemp("eval_errors") / "run", "llama")


def _fails(capsys, run, *args) -> str:
    """Run `workbench eval` expecting a UserError; return its message."""
    capsys.readouterr()   # drop what building the run printed
    assert main(["eval", "--run", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench: error: ") and "Traceback" not in err
    assert manifest.stage(run, "eval") is None
    return err


def test_an_unknown_task_is_named_with_what_is_available(run, capsys):
    err = _fails(capsys, run, "--models", "base", "--tasks", "wb_heldout_ppl,no_such_task")
    assert "unknown task(s) no_such_task;" in err
    assert "wb_synthetic_gen" in err and "--include" in err


def test_a_requested_model_that_is_missing_names_the_stage_that_makes_it(run, capsys):
    err = _fails(capsys, run, "--models", "adapter,f16")
    assert "--models asks for f16, but no f16 GGUF yet (run `workbench export --run DIR --quant f16`)" in err
    err = _fails(capsys, run, "--models", "merged")
    assert "no merged model yet (run `workbench merge --run DIR`)" in err


def test_an_unknown_model_kind_lists_the_kinds(run, capsys):
    err = _fails(capsys, run, "--models", "base,gpt4")
    assert "unknown --models value(s) gpt4; choose from base, adapter, merged, f16, bf16, q8_0, q4_k_m." in err


def test_a_task_file_with_bad_yaml_is_named_with_its_line(run, tmp_path, capsys):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "fine.yaml").write_text("task: fine\ndataset_path: json\noutput_type: generate_until\n")
    (tasks / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\nmetric_list:\n  - metric: acc\n")
    err = _fails(capsys, run, "--models", "base", "--include", str(tasks), "--tasks", "fine")
    assert f"task file {tasks / 'broken.yaml'} is not valid YAML at line" in err and "fix its syntax" in err


def test_a_task_whose_data_is_not_available_offline_fails_before_any_model_runs(run, tmp_path, capsys):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "gone.yaml").write_text(
        "task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\nmetric_list:\n  - metric: exact_match\n")
    err = _fails(capsys, run, "--models", "base", "--include", str(tasks), "--tasks", "gone")
    assert "could not build task(s) gone:" in err and "must be a local file" in err
    assert not (run / "eval" / "base").exists()


def test_multiple_choice_needs_built_in_skill_rows(tmp_path, capsys):
    run = build_run(tmp_path / "run", "llama")
    (run / "data").mkdir()
    row = {"prompt": [{"role": "user", "content": "Capital of France?"}],
           "completion": [{"role": "assistant", "content": "Paris"}], "skill": "all", "answer": "Paris"}
    (run / "data" / "test.jsonl").write_text(json.dumps(row) + "\n")
    err = _fails(capsys, run, "--models", "base", "--tasks", "wb_synthetic_mc")
    assert "task wb_synthetic_mc has no documents in this run" in err


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit must be at least 1, got 0."),
    (["--tasks", " , "], "--tasks names no task;"),
    (["--include", "/nonexistent/tasks"], "--include /nonexistent/tasks is not a folder"),
    (["--tolerances", "/nonexistent/tol.yaml"], "cannot read tolerances file /nonexistent/tol.yaml"),
])
def test_bad_options_are_refused_before_anything_is_written(run, capsys, args, message):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert message in _fails(capsys, run, "--models", "base", *args)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_tolerances_file_with_unknown_keys_or_values_is_refused(run, tmp_path, capsys):
    bad = tmp_path / "tol.yaml"
    bad.write_text("q4_k_m: {score: 0.1, ppl: 0.1}\n")
    assert "is not understood; kinds: merged, f16, bf16, q8_0, q4_k_m" in _fails(capsys, run, "--tolerances", str(bad))
    bad.write_text("f16: {score: -1}\n")
    assert "f16.score must be a finite number >= 0, got -1." in _fails(capsys, run, "--tolerances", str(bad))


def test_a_missing_run_directory(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "nope")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_a_model_that_fails_mid_eval_marks_the_stage_failed_and_keeps_earlier_stages(tmp_path, monkeypatch):
    from workbench.eval import run as eval_run

    run = build_run(tmp_path / "run", "llama")

    real = eval_run.evaluate
    calls = []

    def second_fails(lm, *args, **kwargs):
        calls.append(lm)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the adapter's evaluation")
        return real(lm, *args, **kwargs)

    monkeypatch.setattr(eval_run, "evaluate", second_fails)
    train_before = manifest.stage(run, "train")
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["eval", "--run", str(run), "--models", "base,adapter", "--tasks", "wb_heldout_ppl", "--limit", "2"])
    rec = manifest.stage(run, "eval")
    assert rec["status"] == "failed" and "simulated crash" in rec["error"]
    assert rec["finished_models"] == ["base"] and rec["models"] == ["base", "adapter"]
    assert (run / "eval" / "base" / "results.json").is_file() and not (run / "eval" / "adapter").exists()
    assert not (run / "eval" / "comparison.csv").exists()
    assert manifest.stage(run, "train") == train_before
    with pytest.raises(UserError, match="no completed eval stage"):
        manifest.require_stage(run, "eval", "rerun it.")
