import os

import pytest

from workbench import atomic


def test_write_replaces_atomically(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic.write_json(target, {"x": 1})
    atomic.write_json(target, {"x": 2})
    assert target.read_text().strip().endswith("}")
    assert '"x": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    atomic.write_text(target, "old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_free_stem_never_names_an_existing_report(tmp_path):
    from workbench import atomic

    stem = "2026-12-07-nvidia-h100"
    assert atomic.free_stem(tmp_path / "absent", stem) == stem
    assert atomic.free_stem(tmp_path, stem) == stem
    (tmp_path / f"{stem}.md").write_text("")
    assert atomic.free_stem(tmp_path, stem) == f"{stem}-2"
    (tmp_path / f"{stem}-2-profile").mkdir()          # a profile folder alone holds the name too
    assert atomic.free_stem(tmp_path, stem) == f"{stem}-3"
    (tmp_path / f"{stem}-tag.json").write_text("")   # a tagged report is another name
    assert atomic.free_stem(tmp_path, f"{stem}-tag") == f"{stem}-tag-2"
    assert atomic.free_stem(tmp_path, "other") == "other"


def test_a_bench_report_name_resumes_an_incomplete_report_and_never_overwrites_a_complete_one(tmp_path):
    import json

    from workbench.cli.common import stem

    env = {"date": "2026-12-07", "device_slug": "nvidia-h100"}
    name = "2026-12-07-nvidia-h100-step"
    (tmp_path / f"{name}.json").write_text(json.dumps({"complete": False}))
    assert stem(env, "step", tmp_path) == name                 # a stopped command's re-run completes it
    (tmp_path / f"{name}.json").write_text(json.dumps({"complete": True}))
    assert stem(env, "step", tmp_path) == f"{name}-2"          # a finished one stays as it is
    assert stem(env, "step") == name                          # no folder given: the plain name
