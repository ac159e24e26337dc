"""The stage contract (workbench.stages): a stage declares what it reads and writes, one helper
records it, and the pipeline's loop asks the declaration whether to run. Shown here on a toy
stage in a test pipeline: adding an input is a change in the stage's declaration only."""
import json
from pathlib import Path

import pytest

from workbench import manifest, stages
from workbench.pipeline import run_stages


class Words(stages.Stage):
    """A toy stage: counts the words of a text file the run holds, as the settings' case says."""

    name = "words"
    runs = 0

    def inputs(self, run: Path, settings: stages.Settings) -> dict:
        return {"text": run / "text.txt", "case": settings.command or "lower"}

    def outputs(self, run: Path, settings: stages.Settings) -> list[Path]:
        return [run / "words.json"]

    def run(self, run: Path, settings: stages.Settings) -> dict:
        type(self).runs += 1
        words = (run / "text.txt").read_text().split()
        words = [w.upper() if settings.command == "upper" else w.lower() for w in words]
        (run / "words.json").write_text(json.dumps(words))
        return stages.record(run, self, settings, {"count": len(words)})

    def summary(self, run: Path, rec: dict) -> str:
        return f"{rec['count']} words"


class Shout(Words):
    """The same stage with one more input (an extra file): only its declaration changes."""

    name = "shout"

    def inputs(self, run: Path, settings: stages.Settings) -> dict:
        return {**super().inputs(run, settings), "suffix": run / "suffix.txt"}

    def outputs(self, run: Path, settings: stages.Settings) -> list[Path]:
        return [run / "shout.json"]

    def run(self, run: Path, settings: stages.Settings) -> dict:
        type(self).runs += 1
        text = (run / "text.txt").read_text().upper() + (run / "suffix.txt").read_text()
        (run / "shout.json").write_text(json.dumps(text))
        return stages.record(run, self, settings, {"count": len(text.split())})


def _pipeline(run, pipeline, settings=None, force=None):
    with manifest.lock(run):
        result = run_stages(run, pipeline, settings or stages.Settings(), force=force)
    return {s.name: (s.action, s.reason) for s in result.stages}


def test_a_toy_stage_resumes_and_reruns_when_a_declared_input_changes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "text.txt").write_text("One two three")
    words = Words()
    Words.runs = 0

    first = _pipeline(run, [words])
    assert first == {"words": ("ran", "no words stage yet")} and Words.runs == 1
    rec = manifest.stage(run, "words")
    assert rec["count"] == 3 and rec["inputs"] == {"text": "text.txt"}
    assert set(rec["input_hashes"]) == {"text", "case"} and rec["input_hashes"]["text"] == \
        manifest.sha256_file(run / "text.txt")
    assert set(rec["outputs"]) == {"words.json"}
    assert "[1/1] words: done in" in capsys.readouterr().out

    # Up to date: skipped, nothing rewritten.
    assert _pipeline(run, [words])["words"][0] == "skipped" and Words.runs == 1
    assert manifest.stage(run, "words") == rec

    # A file input changes: it runs again, and says why.
    (run / "text.txt").write_text("One two three four")
    assert _pipeline(run, [words]) == {"words": ("ran", "the text changed since the last words")}
    assert Words.runs == 2 and manifest.stage(run, "words")["count"] == 4

    # A value input (a setting) changes: the same.
    assert _pipeline(run, [words], stages.Settings(command="upper"))["words"] == (
        "ran", "the case changed since the last words")
    assert json.loads((run / "words.json").read_text())[0] == "ONE"
    assert _pipeline(run, [words], stages.Settings(command="upper"))["words"][0] == "skipped"

    # An output changed behind the stage's back: it runs again; --force runs it whatever.
    (run / "words.json").write_text("[]")
    assert "its outputs changed (words.json changed since the words stage wrote it" in \
        _pipeline(run, [words], stages.Settings(command="upper"))["words"][1]
    assert _pipeline(run, [words], stages.Settings(command="upper"), force="words")["words"] == (
        "ran", "--force words")


def test_a_stage_with_one_more_input_and_a_later_stage_follow_from_the_declaration(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "text.txt").write_text("a b")
    (run / "suffix.txt").write_text("!")
    pipeline = [Words(), Shout()]
    assert [a for a, _ in _pipeline(run, pipeline).values()] == ["ran", "ran"]
    assert [a for a, _ in _pipeline(run, pipeline).values()] == ["skipped", "skipped"]
    # Only the second stage reads suffix.txt: the first stays up to date, the second reruns.
    (run / "suffix.txt").write_text("?")
    assert _pipeline(run, pipeline) == {"words": ("skipped", "skipped: up to date (complete, same input hashes, "
                                                  "outputs intact)"),
                                        "shout": ("ran", "the suffix changed since the last shout")}
    # A change upstream reruns every later stage.
    (run / "text.txt").write_text("a b c")
    assert _pipeline(run, pipeline) == {"words": ("ran", "the text changed since the last words"),
                                        "shout": ("ran", "words just ran")}
    # What the report and qualify ask: the recorded path inputs, now.
    assert stages.get.__doc__ and stages.changed_inputs(run, Shout(), strict=False) == []
    (run / "suffix.txt").unlink()
    assert Shout().drift(run, manifest.stage(run, "shout")) == [
        "its input suffix.txt is missing (rerun `workbench shout --run DIR`)"]


def test_a_record_of_an_older_version_without_an_input_hash_reruns(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "text.txt").write_text("x")
    _pipeline(run, [Words()])
    rec = manifest.stage(run, "words")
    manifest.record_stage(run, "words", {**rec, "input_hashes": {"text": rec["input_hashes"]["text"]}})
    assert _pipeline(run, [Words()])["words"] == (
        "ran", "its record has no hash of the case (made by an older workbench)")


@pytest.mark.parametrize("name", stages.NAMES)
def test_every_pipeline_stage_is_declared_in_its_module(name):
    stage = stages.get(name)
    assert stage.name == name and type(stage).__module__ == stages.PIPELINE[name]
    assert set(stage.upstream.values()) <= set(stages.NAMES[:stages.NAMES.index(name)])


def test_another_training_method_retrains_and_the_same_one_does_not(tmp_path):
    # The train stage's inputs hold the config's text, training.method and beta among it: a run
    # trained with one method is retrained for another (what `workbench run` asks, per stage).
    from workbench import config

    quick = ["training.max_steps=2", "training.batch_size=2", "eval.max_rows=0", "data.builtin_rows=16"]
    run = tmp_path / "run"
    run.mkdir()
    train = [stages.get("train")]

    def settings(*sets):
        return stages.Settings(cfg=config.load(None, [*quick, *sets]))

    assert _pipeline(run, train, settings("training.method=dpo"))["train"] == ("ran", "no train stage yet")
    assert manifest.stage(run, "train")["method"] == "dpo"
    assert _pipeline(run, train, settings("training.method=dpo"))["train"][0] == "skipped"
    changed = ("ran", "the config changed (--config / --set)")
    assert _pipeline(run, train, settings("training.method=dpo", "training.beta=0.5"))["train"] == changed
    assert _pipeline(run, train, settings("training.method=orpo", "training.beta=0.5"))["train"] == changed
    rec = manifest.stage(run, "train")
    assert (rec["method"], rec["beta"]) == ("orpo", 0.5)
    assert (run / "data" / "train.jsonl").read_text().count('"rejected"') == 16
