"""`workbench run`: the whole pipeline in one run directory, resumable stage by stage;
and bringing your own adapter or merged model to `workbench merge` / `workbench export`."""
import json
import re
import shutil
from pathlib import Path

import pytest

from _export_run import build_merged_run, build_run
from workbench import manifest, pipeline, stages
from workbench.cli import main
from workbench.errors import UserError

STAGES = ["train", "merge", "export", "eval", "report"]
# The built-in default, shrunk: 3 optimizer steps on 64 rows (a few seconds on the
# CPU; the default's 800 steps take minutes), no accuracy generation in train, 4
# documents per eval task.
SMALL = ["--set", "training.max_steps=3", "--set", "training.logging_steps=1", "--set", "eval.max_rows=0",
         "--set", "data.builtin_rows=64", "--set", "eval.max_new_tokens=4", "--eval-limit", "4"]


def _run(capsys, run, *extra):
    capsys.readouterr()
    code = main(["run", "--run", str(run), *SMALL, *extra])
    return code, capsys.readouterr().out


def _actions(out: str) -> dict:
    """{stage: "running" | "skipped" | ...} from the [i/5] header lines."""
    found = {}
    for i, name, action in re.findall(r"^\[(\d)/5\] (\w+): (running|skipped|failed)", out, flags=re.M):
        found[name] = action   # a stage that fails prints "running", then "failed": the last line wins
        assert STAGES[int(i) - 1] == name
    return found


def _records(run):
    return manifest.read(run)["stages"]


def test_run_completes_then_skips_forces_resumes_and_retrains_on_a_changed_config(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"

    # 1. First run: every stage runs, in order, each with a numbered header.
    code, out = _run(capsys, run)
    assert code == 0, out
    assert _actions(out) == dict.fromkeys(STAGES, "running")
    assert "[1/5] train: running (no train stage yet)" in out and "[5/5] report: done in" in out
    rec = _records(run)
    assert [rec[s]["status"] for s in STAGES] == ["complete"] * 5
    assert rec["train"]["steps"] == 3 and len((run / "train" / "loss.jsonl").read_text().splitlines()) == 3
    assert sorted(rec["export"]["files"]) == ["f16", "q4_k_m", "q8_0"]   # f16: the lossless reference
    assert all(f["passed"] for f in rec["export"]["files"].values())
    # ... and the adapter as a GGUF LoRA adapter on the base's GGUFs, verified in llama.cpp, with Modelfiles.
    assert rec["export"]["adapter"]["passed"] and set(rec["export"]["adapter"]["bases"]) == {"f16", "q8_0"}
    assert sorted(rec["export"]["modelfiles"]) == ["adapter", "f16", "q4_k_m", "q8_0"]
    assert rec["eval"]["models"] == ["base", "adapter", "merged", "f16", "q8_0", "q4_k_m"] and rec["eval"]["limit"] == 4
    assert rec["report"]["missing"] == [] and set(rec["report"]["input_hashes"]) == {"train", "merge", "export", "eval"}
    for name in ("report.md", "report.json", "loss.png", "verification.png", "eval.png"):
        assert (run / "report" / name).stat().st_size > 0, name
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["missing"] == [] and data["sections"]["train"]["steps"] == 3
    assert data["sections"]["eval"]["metrics"] == rec["eval"]["metrics"]
    assert data["sections"]["export"]["files"]["q8_0"]["llama_cpp"] == rec["export"]["files"]["q8_0"]["llama_cpp"]
    assert set(data["sections"]["eval"]["change_vs_f16"]) == {"q8_0", "q4_k_m"}
    # The summary: where the report is, and a table per stage and per model.
    assert f"report: {run.resolve() / 'report' / 'report.md'}" in out
    assert "| train | ran |" in out and "| q4_k_m |" in out and "ok, KL" in out

    # 2. Same command again: every stage is up to date, nothing is rewritten.
    code, out = _run(capsys, run)
    assert code == 0
    assert _actions(out) == dict.fromkeys(STAGES, "skipped")
    assert out.count("skipped: up to date") == 5
    assert _records(run) == rec
    # A bare `workbench run --run DIR` resumes the run as it was set up: its own config
    # and eval limit, not the built-in default's 800 steps over every document.
    capsys.readouterr()
    assert main(["run", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"config: {run / 'config.yaml'} (this run's own" in out and "eval limit: 4 documents" in out
    assert _actions(out) == dict.fromkeys(STAGES, "skipped") and _records(run) == rec

    # What makes a stage stale, without running it: a killed run, a changed input.
    data = manifest.read(run)
    data["stages"]["train"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(data))
    from workbench import config

    cfg = config.load(None, [kv for kv in SMALL[:10] if kv != "--set"])

    def why(name, **settings):   # what the pipeline asks each stage before running it
        return stages.why_run(run, stages.get(name), stages.Settings(**settings))
    assert "did not finish" in why("train", cfg=cfg)
    data["stages"]["train"]["status"] = "complete"
    (run / "manifest.json").write_text(json.dumps(data))
    assert why("train", cfg=cfg) is None
    cfg.training.lr = 1e-3
    assert why("train", cfg=cfg) == "the config changed (--config / --set)"
    assert why("export", quants=["f16"], adapter_gguf=True).startswith("it exported f16, q8_0, q4_k_m")
    # `workbench run` exports the adapter GGUF too; an export that asks for none would differ by that.
    assert why("export", quants=["f16", "q8_0", "q4_k_m"]) == "it read the adapter, which this run does not ask for"
    gguf = run / "export" / "model-q8_0.gguf"
    saved = gguf.read_bytes()
    gguf.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    assert "model-q8_0.gguf changed since the export stage wrote it" in why("export", quants=["f16", "q8_0", "q4_k_m"],
                                                                            adapter_gguf=True)
    assert why("eval", eval_limit=4) == "the q8_0 model changed since the last eval"
    gguf.write_bytes(saved)
    assert why("eval", eval_limit=4) is None and why("eval", eval_limit=5).startswith("it ran with limit 4")

    # 3. --force export: export, eval and report run again; train and merge are untouched.
    adapter_mtime = (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    gguf_mtime = gguf.stat().st_mtime_ns
    code, out = _run(capsys, run, "--force", "export")
    assert code == 0
    assert _actions(out) == {"train": "skipped", "merge": "skipped", "export": "running", "eval": "running",
                             "report": "running"}
    assert "[3/5] export: running (--force export)" in out and "[4/5] eval: running (export just ran)" in out
    after = _records(run)
    assert after["train"] == rec["train"] and after["merge"] == rec["merge"]
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime
    assert gguf.stat().st_mtime_ns != gguf_mtime
    assert after["export"]["input_hashes"] == rec["export"]["input_hashes"]

    # 3b. A GGUF that fails its verification: exit 1, but eval and the report still run and show it.
    strict = tmp_path / "strict.yaml"
    strict.write_text("q4_k_m: {kl_mean: 1.0e-9}\n")
    code, out = _run(capsys, run, "--thresholds", str(strict))
    assert code == 1
    assert "[3/5] export: running (it was verified against other thresholds than " in out
    assert "FAILED verification: q4_k_m" in out and "[5/5] report: done" in out and "FAILED, KL" in out
    assert manifest.stage(run, "export")["status"] == "failed_verification"
    assert "FAILED: llama.cpp kl_mean" in (run / "report" / "report.md").read_text()
    failed_rec = _records(run)
    # The same command again settles: nothing changed, so nothing reruns, and it still exits 1.
    code, out = _run(capsys, run, "--thresholds", str(strict))
    assert code == 1 and _actions(out) == dict.fromkeys(STAGES, "skipped")
    assert "[3/5] export: skipped: verified before: 1 GGUF(s) failed (q4_k_m;" in out
    assert "it is not fit to ship" in out and _records(run) == failed_rec
    # A bare run remembers the thresholds (and GGUF types) of the run's last export, as it does the eval limit.
    capsys.readouterr()
    assert main(["run", "--run", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"thresholds: {strict.resolve()}, as in this run's last export" in out
    assert "GGUF types: f16, q8_0, q4_k_m, as in this run's last export" in out
    assert _actions(out) == dict.fromkeys(STAGES, "skipped") and _records(run) == failed_rec

    # 4. An export that fails midway: the pipeline stops there, marks export failed, and
    # leaves train and merge (records and files) as they were; the next run resumes at export.
    import workbench.export.stage as export_stage

    def broken_export(run_dir, quants, **kwargs):
        (run_dir / "export" / "model-f16.gguf").write_bytes(b"half a file")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export_stage, "run_export", broken_export)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["run", "--run", str(run), *SMALL, "--force", "export"])
    out = capsys.readouterr().out
    assert "[3/5] export: failed after" in out and "resumes at export" in out and "[4/5]" not in out
    failed = _records(run)
    assert failed["train"] == rec["train"] and failed["merge"] == rec["merge"]
    assert failed["export"]["status"] == "failed" and "disk on fire" in failed["export"]["error"]
    assert manifest.verify_outputs(run, "train") == [] and manifest.verify_outputs(run, "merge") == []
    monkeypatch.undo()

    code, out = _run(capsys, run)
    assert code == 0
    assert _actions(out) == {"train": "skipped", "merge": "skipped", "export": "running", "eval": "running",
                             "report": "running"}
    assert "[3/5] export: running (the last export ended failed (RuntimeError: disk on fire))" in out
    resumed = _records(run)
    assert resumed["export"]["status"] == "complete" and manifest.verify_outputs(run, "export") == []
    assert resumed["export"]["files"]["f16"]["sha256"] == rec["export"]["files"]["f16"]["sha256"]  # deterministic

    # 5. A changed --set retrains, and so redoes everything downstream.
    code, out = _run(capsys, run, "--set", "training.max_steps=4")
    assert code == 0
    assert _actions(out) == dict.fromkeys(STAGES, "running")
    assert "[1/5] train: running (the config changed (--config / --set))" in out
    assert "[2/5] merge: running (train just ran)" in out
    final = _records(run)
    assert final["train"]["steps"] == 4 and final["train"]["input_hashes"]["config"] != rec["train"]["input_hashes"]["config"]
    assert final["merge"]["input_hashes"]["adapter"] != rec["merge"]["input_hashes"]["adapter"]
    assert final["eval"]["input_hashes"]["adapter"] == manifest.hash_tree(run / "adapter")
    assert final["merge"]["input_hashes"]["base_model"] == manifest.hash_tree(run / "base")   # the built-in base

    # 6. `workbench train` alone retrains: the report marks what was made from the earlier adapter as stale
    # (and says so on its Stages line), and the next `workbench run` redoes exactly those stages.
    capsys.readouterr()
    assert main(["train", "--run", str(run), *[a for a in SMALL[:10]], "--set", "training.max_steps=2"]) == 0
    assert main(["report", "--run", str(run)]) == 0
    md = (run / "report" / "report.md").read_text()
    label = f"Stale: made from an earlier train; rerun `workbench run --run {run.resolve()}`."
    assert "Stages: train complete, merge stale, export stale, eval stale." in md and md.count(label) == 3
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["stages"] == {"train": "complete", "merge": "stale", "export": "stale", "eval": "stale"}
    assert data["sections"]["eval"]["stale"] == label[len("Stale: "):-1]
    capsys.readouterr()
    assert main(["run", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert _actions(out) == {"train": "skipped", **dict.fromkeys(STAGES[1:], "running")}
    assert "[2/5] merge: running (the adapter changed since the last merge)" in out
    assert "stale" not in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_goes_through_every_stage_unchanged(tmp_path, capsys, method):
    # The later stages read a preference run as they read an SFT one: its adapter, and held-out
    # rows whose chosen reply is their completion.
    run = tmp_path / "run"
    code, out = _run(capsys, run, "--set", f"training.method={method}")
    assert code == 0, out
    assert _actions(out) == dict.fromkeys(STAGES, "running")
    rec = _records(run)
    assert [rec[s]["status"] for s in STAGES] == ["complete"] * 5
    assert rec["train"]["method"] == method and rec["train"]["steps"] == 3
    assert all(f["passed"] for f in rec["export"]["files"].values()) and rec["export"]["adapter"]["passed"]
    assert rec["eval"]["models"] == ["base", "adapter", "merged", "f16", "q8_0", "q4_k_m"]
    assert f"| method | {method}, beta 0.1 |" in (run / "report" / "report.md").read_text()


def test_run_rejects_a_bad_force_and_limit(tmp_path, capsys):
    assert main(["run", "--run", str(tmp_path / "r"), "--eval-limit", "-1"]) == 2
    assert "--eval-limit must be 0 (every document) or more" in capsys.readouterr().err
    with pytest.raises(UserError, match="--eval-limit must be at least 1"):
        pipeline.run_pipeline(None, tmp_path / "r", eval_limit=0)
    with pytest.raises(SystemExit):   # argparse: --force takes a stage name
        main(["run", "--run", str(tmp_path / "r"), "--force", "everything"])
    assert not (tmp_path / "r" / "manifest.json").exists()
    (tmp_path / "file").write_text("not a run")
    capsys.readouterr()
    for argv in (["run", "--run", str(tmp_path / "file")], ["report", "--run", str(tmp_path / "file")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a file, not a run directory" in err[0] and "Traceback" not in err[0], err


# --------------------------------------------------------------------------- bring your own
@pytest.fixture(scope="module")
def user_adapter(tmp_path_factory):
    """A user's own LoRA adapter and base (the merge tests' tiny qwen2 fixture), outside any run."""
    src = build_run(tmp_path_factory.mktemp("user") / "src", "qwen2")
    return src


def test_merge_a_user_adapter_then_run_the_rest(tmp_path, capsys, user_adapter):
    src, run = user_adapter, tmp_path / "run"
    base = tmp_path / "base"   # a copy: this test changes it later
    shutil.copytree(src / "base", base)
    assert main(["merge", "--run", str(run), "--adapter", str(src / "adapter"), "--base", str(base),
                 "--tokenizer", str(src / "tokenizer")]) == 0
    train = manifest.stage(run, "train")
    assert train["user_provided"] is True and train["base_model"] == str(base.resolve())
    assert train["source"]["adapter"] == str((src / "adapter").resolve()) and train["inputs"]["adapter"] == "adapter"
    assert train["input_hashes"]["adapter"] == manifest.hash_tree(run / "adapter")
    assert train["input_hashes"]["base_model"] == manifest.hash_tree(base)
    assert train["lora"]["r"] == 4 and train["lora"]["alpha"] == 8
    for name in ("adapter_config.json", "adapter_model.safetensors"):   # copied byte for byte
        assert (run / "adapter" / name).read_bytes() == (src / "adapter" / name).read_bytes()
    merge = manifest.stage(run, "merge")
    assert merge["status"] == "complete" and merge["metrics"]["merged"]["kl_mean"] < 1e-9
    assert merge["input_hashes"]["adapter"] == train["input_hashes"]["adapter"]
    assert merge["input_hashes"]["base_model"] == manifest.hash_tree(base)

    # The pipeline keeps what the user brought and carries on from there.
    capsys.readouterr()
    assert main(["run", "--run", str(run), "--quant", "f16", "--eval-limit", "2"]) == 0
    out = capsys.readouterr().out
    assert f"[1/5] train: skipped: brought by you (from {(src / 'adapter').resolve()})" in out
    assert "[2/5] merge: skipped: up to date" in out and "[3/5] export: running" in out
    assert manifest.stage(run, "eval")["models"] == ["base", "adapter", "merged", "f16"]
    assert "The adapter was brought by the user" in (run / "report" / "report.md").read_text()
    # A bare run keeps the run's GGUF types (and eval limit): nothing to redo.
    assert main(["run", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "GGUF types: f16, as in this run's last export" in out
    assert _actions(out) == dict.fromkeys(STAGES, "skipped")
    # The base the adapter is merged into changes: merge (and what follows) is redone.
    from safetensors.torch import load_file, save_file

    weights = load_file(base / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert main(["run", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[2/5] merge: running (the base model changed since the last merge)" in out
    assert _actions(out) == {"train": "skipped", **dict.fromkeys(STAGES[1:], "running")}
    assert manifest.stage(run, "merge")["input_hashes"]["base_model"] == manifest.hash_tree(base)
    assert manifest.stage(run, "export")["files"].keys() == {"f16"}
    # Training into a run that holds an adapter the user brought is refused (a new --run is the way).
    assert main(["train", "--run", str(run), *SMALL[:10]]) == 2
    assert "use a new --run directory" in capsys.readouterr().err
    # Neither a config nor --force train makes sense without a training run.
    assert main(["run", "--run", str(run), "--set", "training.max_steps=2"]) == 2
    assert "brought by you, so there is nothing to train" in capsys.readouterr().err
    assert main(["run", "--run", str(run), "--force", "train"]) == 2
    assert "--force train has nothing to redo" in capsys.readouterr().err


def test_export_a_user_merged_model_and_report_it(tmp_path, capsys):
    src = build_merged_run(tmp_path / "src", "llama") / "merge" / "merged"
    run = tmp_path / "run"
    assert main(["export", "--run", str(run), "--merged", str(src), "--quant", "f16"]) == 0
    merge = manifest.stage(run, "merge")
    assert merge["user_provided"] is True and merge["source"]["merged"] == str(src.resolve())
    assert merge["input_hashes"]["merged"] == manifest.hash_tree(run / "merge" / "merged") == manifest.hash_tree(src)
    assert merge["dtype"] == "float32"
    export = manifest.stage(run, "export")
    assert export["status"] == "complete" and export["files"]["f16"]["passed"]
    assert export["input_hashes"]["merged"] == merge["input_hashes"]["merged"]
    assert export["versions"]["gguf"] and export["versions"]["llama-cpp-python"]
    assert (run / "tokenizer" / "tokenizer.json").is_file()   # eval reads the run's tokenizer

    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 0
    assert "missing stages: eval" in capsys.readouterr().out
    md = (run / "report" / "report.md").read_text()
    assert "Not needed: the merged model was brought by the user" in md
    assert "The merged model was brought by the user" in md and "`model-f16.gguf`" in md
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["stages"] == {"train": "not_needed", "merge": "user_provided", "export": "complete",
                              "eval": "missing"}

    # The pipeline carries on after the merged model: nothing to train or merge, export up to date.
    capsys.readouterr()
    assert main(["run", "--run", str(run), "--quant", "f16", "--eval-limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "[1/5] train: skipped: not needed, the merge stage was brought by you" in out
    assert f"[2/5] merge: skipped: brought by you (from {src.resolve()})" in out
    assert "[3/5] export: skipped: up to date" in out and "[4/5] eval: running (no eval stage yet)" in out
    assert manifest.stage(run, "eval")["models"] == ["merged", "f16"]
    assert json.loads((run / "report" / "report.json").read_text())["missing"] == []

    # A changed copy is caught before the pipeline builds on it.
    (run / "merge" / "merged" / "config.json").write_text("{}")
    assert main(["run", "--run", str(run)]) == 2
    assert "the merge stage you brought" in capsys.readouterr().err


def _edited_adapter(adapter: Path, dst: Path, **changes) -> Path:
    """A copy of ``adapter`` whose adapter_config.json has ``changes`` applied."""
    shutil.copytree(adapter, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def _bin_only(folder, name):
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"pickle")
    return folder


@pytest.mark.parametrize("case", ["no_adapter", "bin_adapter", "not_lora", "no_local_base", "base_missing",
                                  "bin_base", "no_tokenizer", "over_trained_run", "base_without_adapter",
                                  "merged_missing", "merged_no_tokenizer", "merged_bin", "merged_over_run"])
def test_bring_your_own_bad_paths_are_one_clear_sentence(tmp_path, capsys, user_adapter, case):
    src = user_adapter
    run = tmp_path / "run"
    adapter = str(src / "adapter")
    if case == "no_adapter":
        argv, needle = ["merge", "--run", str(run), "--adapter", str(tmp_path / "nope")], "is not a PEFT adapter folder"
    elif case == "bin_adapter":
        bad = _bin_only(tmp_path / "a", "adapter_model.bin")
        shutil.copy(src / "adapter" / "adapter_config.json", bad)
        argv, needle = ["merge", "--run", str(run), "--adapter", str(bad)], "only pickle weights (adapter_model.bin)"
    elif case == "not_lora":
        bad = _edited_adapter(src / "adapter", tmp_path / "a", peft_type="IA3")
        argv, needle = ["merge", "--run", str(run), "--adapter", str(bad)], "is a IA3 adapter"
    elif case == "no_local_base":
        bad = _edited_adapter(src / "adapter", tmp_path / "a", base_model_name_or_path="org/some-hub-model")
        argv, needle = ["merge", "--run", str(run), "--adapter", str(bad)], "pass --base FOLDER"
    elif case == "base_missing":
        argv, needle = ["merge", "--run", str(run), "--adapter", adapter, "--base", str(tmp_path / "nb")], \
            "--base " + str(tmp_path / "nb") + " does not exist"
    elif case == "bin_base":
        bad = _bin_only(tmp_path / "b", "pytorch_model.bin")
        shutil.copy(src / "base" / "config.json", bad)
        argv, needle = ["merge", "--run", str(run), "--adapter", adapter, "--base", str(bad)], \
            "only pickle weights (pytorch_model.bin)"
    elif case == "no_tokenizer":
        argv, needle = ["merge", "--run", str(run), "--adapter", adapter, "--base", str(src / "base")], \
            "pass --tokenizer FOLDER"
    elif case == "over_trained_run":
        run = build_run(tmp_path / "trained", "qwen2")   # a run whose train stage the pipeline made
        argv, needle = ["merge", "--run", str(run), "--adapter", adapter, "--tokenizer", str(src / "tokenizer")], \
            "already holds a train stage made by the pipeline"
    elif case == "base_without_adapter":
        argv, needle = ["merge", "--run", str(run), "--base", str(src / "base")], "--base and --tokenizer go with --adapter"
    elif case == "merged_missing":
        argv, needle = ["export", "--run", str(run), "--merged", str(tmp_path / "m")], "does not exist"
    elif case == "merged_no_tokenizer":
        argv, needle = ["export", "--run", str(run), "--merged", str(src / "base")], "has no tokenizer.json"
    elif case == "merged_bin":
        bad = _bin_only(tmp_path / "m", "pytorch_model.bin")
        shutil.copy(src / "base" / "config.json", bad)
        argv, needle = ["export", "--run", str(run), "--merged", str(bad)], "only pickle weights"
    else:   # merged_over_run
        run = build_run(tmp_path / "trained", "qwen2")
        merged = tmp_path / "m"
        shutil.copytree(src / "base", merged)
        shutil.copy(src / "tokenizer" / "tokenizer.json", merged)
        argv, needle = ["export", "--run", str(run), "--merged", str(merged)], "already holds a train stage"
    before = manifest.read(run) if run.exists() else None
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("workbench: error: ") and needle in err[0], err
    assert "Traceback" not in err[0]
    if before is None:
        assert not run.exists()   # nothing was written for a refused bring
    else:
        assert manifest.read(run) == before


def test_bring_functions_raise_user_errors_directly(tmp_path):
    with pytest.raises(UserError, match="is not a PEFT adapter folder"):
        pipeline.bring_adapter(tmp_path / "run", tmp_path)
    with pytest.raises(UserError, match="is not a checkpoint folder"):
        pipeline.bring_merged(tmp_path / "run", tmp_path)
