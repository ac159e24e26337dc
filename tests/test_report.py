"""`workbench report`: a run's records rendered as Markdown, JSON and PNG plots, every
number with its device and versions; partial and failed runs render what they have."""
import hashlib
import json

import pytest

from workbench import manifest, report
from workbench.cli import main

ENV = {"device": "NVIDIA Test GPU 80GB", "torch": "9.9.9", "transformers": "8.8.8", "peft": "7.7.7",
       "python": "3.11.0"}
LOSS = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens": 100 * s, "elapsed": 0.5 * s}
        for s in range(1, 11)]


def _verify(kl, top1, ppl):
    return {"positions": 512, "kl_mean": kl, "kl_max": 3 * kl, "top1_agreement": top1, "max_abs_logit_diff": 0.5,
            "mean_abs_logit_diff": 0.1, "ppl_ref": 10.0, "ppl": ppl, "ppl_rel_delta": ppl / 10.0 - 1}


def _train(run):
    (run / "train").mkdir(parents=True)
    (run / "train" / "loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LOSS))
    manifest.record_stage(run, "train", {
        "environment": ENV, "versions": {"trl": "6.6.6"}, "base_model": str(run / "base"), "family": "llama",
        "quantization": None, "lora": {"r": 16, "alpha": 32}, "kernels": {"rms_norm": True},
        "dataset": {"source": "builtin", "train_rows": 3000, "test_rows": 156},
        "steps": 10, "final_loss": 0.5, "train_loss": 1.4645, "eval": {"base": 0.0, "adapter": 0.875},
        "tokens": 1000, "tokens_per_s": 1234.5, "peak_memory_gib": 1.25, "peak_rss_mib": 900.0,
        "timings": {"train_s": 0.81, "total_s": 2.0},
        "outputs": manifest.outputs_record(run, [run / "train" / "loss.jsonl"])})


def _rest(run):
    (run / "merge").mkdir()
    (run / "merge" / "merge_report.json").write_text(json.dumps(
        {"reference": "adapter on the base, unmerged, in fp32", "eval": {"tokens": 512}}))
    manifest.record_stage(run, "merge", {"environment": ENV, "dtype": "bfloat16", "quantization": None,
                                         "merged_dir": "merge/merged",
                                         "metrics": {"merged": _verify(2.5e-13, 1.0, 10.0)}})
    files = {"f16": (_verify(7e-7, 0.998, 10.001), True), "q4_k_m": (_verify(0.2, 0.5, 13.0), False)}
    (run / "export").mkdir()
    (run / "export" / "export_report.json").write_text(json.dumps({
        "arch": "llama", "eval": {"tokens": 512}, "passed": False,
        "thresholds": {"f16": {"kl_mean": 1e-5}, "q4_k_m": {"kl_mean": 0.1}},
        "files": {k: {"failures": [] if ok else ["llama.cpp kl_mean 0.2 > 0.1"]} for k, (_, ok) in files.items()}}))
    manifest.record_stage(run, "export", {
        "environment": ENV, "status": "failed_verification", "versions": {"llama-cpp-python": "0.3.36"},
        "files": {k: {"path": f"export/model-{k}.gguf", "bytes": 3 * 2**20, "type": k, "passed": ok, "llama_cpp": m,
                      "tokenizer_mismatches": 0, "transformers": {"supported": False}}
                  for k, (m, ok) in files.items()}})
    metrics = {"base": {"wb_synthetic_mc acc": 0.25, "wb_heldout_ppl word_perplexity": 400.0},
               "adapter": {"wb_synthetic_mc acc": 0.9, "wb_heldout_ppl word_perplexity": 20.0},
               "merged": {"wb_synthetic_mc acc": 0.9, "wb_heldout_ppl word_perplexity": 20.0},
               "f16": {"wb_synthetic_mc acc": 0.9, "wb_heldout_ppl word_perplexity": 20.0},
               "q4_k_m": {"wb_synthetic_mc acc": 0.8, "wb_heldout_ppl word_perplexity": 22.0}}
    manifest.record_stage(run, "eval", {
        "environment": ENV, "versions": {"lm-eval": "0.4.13"}, "models": list(metrics),
        "tasks": ["wb_synthetic_mc", "wb_heldout_ppl"], "limit": None, "metrics": metrics,
        "data": {"documents": {"wb_synthetic_mc": 156}}, "skipped": {"q8_0": "no q8_0 GGUF yet", "merged": "no merged model yet"},
        "flags": [{"model": "q4_k_m", "metric": "wb_synthetic_mc acc", "change": -0.1, "tolerance": 0.05}]})


def _png_size(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path)).shape


def test_full_report_has_every_section_its_numbers_and_readable_plots(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run)
    _rest(run)
    assert main(["report", "--run", str(run)]) == 0
    assert "report: " in capsys.readouterr().out
    md = (run / "report" / "report.md").read_text()
    for heading in ("## Training", "## Merge", "## Export (GGUF)", "## Evaluation"):
        assert heading in md
    # Every section says on what device and with which versions its numbers were made.
    assert md.count("*Device: NVIDIA Test GPU 80GB;") == 4 and md.count("torch 9.9.9") >= 4
    assert "trl 6.6.6" in md and "llama-cpp-python 0.3.36" in md and "lm-eval 0.4.13" in md
    # Training numbers, from the train record.
    assert "| throughput (tokens/s) | 1234 |" in md and "| peak memory | 1.250 GiB (CUDA, allocated) |" in md
    assert "| held-out exact-match accuracy, base → adapter | 0.000 → 0.875 |" in md
    # Merge and export verification per artifact; the failed GGUF says why.
    assert "| merged | 2.500e-13 |" in md
    assert "| `model-f16.gguf` | 3.00 MiB | 7.000e-07 |" in md
    assert "FAILED: llama.cpp kl_mean 0.2 > 0.1" in md
    # Evaluation: the table, the flags, and q4_k_m against the lossless f16.
    assert "| q4_k_m | 22 | 0.8 | synthetic_mc acc -0.1 beyond ±0.05 |" in md
    assert "Change of each quantized GGUF against the lossless f16 GGUF" in md
    # A GGUF type the export was not asked for is no news; a model that is missing is.
    assert "Not evaluated: merged (no merged model yet)." in md and "no q8_0 GGUF" not in md
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["missing"] == [] and data["stages"]["export"] == "failed_verification"
    vs = data["sections"]["eval"]["change_vs_f16"]["q4_k_m"]
    assert vs["wb_synthetic_mc acc"] == pytest.approx(-0.1) and vs["wb_heldout_ppl word_perplexity"] == pytest.approx(0.1)
    assert data["sections"]["train"]["loss_curve"][-1]["loss"] == pytest.approx(0.5)
    for name in ("train", "merge", "export", "eval"):
        assert data["sections"][name]["device"] == ENV["device"] and data["sections"][name]["versions"]["torch"] == "9.9.9"
    assert data["plots"] == {"loss": "loss.png", "verification": "verification.png", "eval": "eval.png"}
    for name in data["plots"].values():
        height, width, _ = _png_size(run / "report" / name)
        assert width >= 700 and height >= 400
        assert f"]({name})" in md
    # The report records the sha256 of each stage record it rendered (computed here from manifest.json itself).
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    rec = stages["report"]
    assert rec["input_hashes"] == {n: hashlib.sha256(json.dumps(stages[n], sort_keys=True).encode()).hexdigest()
                                   for n in ("train", "merge", "export", "eval")}
    assert manifest.verify_outputs(run, "report") == []
    # llama.cpp runs on the CPU, whatever device the stage's transformers side used.
    assert "The llama.cpp numbers come from llama.cpp on the CPU; the reference and the transformers read-back " \
           "ran on NVIDIA Test GPU 80GB." in md
    assert "The GGUF rows (f16, q4_k_m) come from llama.cpp on the CPU; base, adapter, merged ran on NVIDIA Test " \
           "GPU 80GB." in md
    assert "stale" not in md and data["stale"] == {}


def test_a_train_only_run_renders_training_and_names_the_missing_stages(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run)
    _rest(run)
    assert main(["report", "--run", str(run)]) == 0
    assert (run / "report" / "eval.png").is_file()
    # Later the run loses everything after train (a fresh train in the same folder, say).
    data = manifest.read(run)
    data["stages"] = {"train": data["stages"]["train"]}
    (run / "manifest.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 0
    assert "missing stages: merge, export, eval" in capsys.readouterr().out
    md = (run / "report" / "report.md").read_text()
    assert "**Missing stages: merge, export, eval.**" in md
    assert f"Missing: the merge stage has not run. Make it with `workbench merge --run {run.resolve()}`" in md
    assert f"`workbench eval --run {run.resolve()}`" in md and "![training loss](loss.png)" in md
    assert sorted(p.name for p in (run / "report").iterdir()) == ["loss.png", "report.json", "report.md"]
    assert json.loads((run / "report" / "report.json").read_text())["missing"] == ["merge", "export", "eval"]


def test_a_failed_stage_is_named_with_its_error(tmp_path):
    run = tmp_path / "run"
    _train(run)
    manifest.record_stage(run, "merge", {"status": "failed", "error": "RuntimeError: disk on fire"})
    paths = report.render(run)
    md = paths["md"].read_text()
    assert "Missing: the merge stage is failed (RuntimeError: disk on fire)." in md
    assert paths["missing"] == ["merge", "export", "eval"]


def test_report_of_a_missing_or_empty_run_is_a_user_error(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
    assert "no stage has run there" in capsys.readouterr().err


def test_a_loss_curve_without_a_final_loss_still_plots(tmp_path):
    run = tmp_path / "run"
    _train(run)
    rec = manifest.stage(run, "train")
    manifest.record_stage(run, "train", {**rec, "final_loss": None})
    paths = report.render(run)
    assert [p.name for p in paths["png"]] == ["loss.png"]
    assert "| final loss (last logged step) | — |" in paths["md"].read_text()


def test_sections_made_from_an_earlier_stage_are_marked_stale(tmp_path):
    run = tmp_path / "run"
    _train(run)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"first adapter")
    _rest(run)
    merge = manifest.stage(run, "merge")
    manifest.record_stage(run, "merge", {**merge, "input_hashes": {"adapter": manifest.hash_tree(run / "adapter")}})
    data = report.collect(run)
    assert data["stale"] == {} and data["stages"]["merge"] == "complete"

    # A retrain replaces the adapter: merge, and everything made from it, describe the old one.
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"second adapter")
    paths = report.render(run)
    md = paths["md"].read_text()
    label = f"stale: made from an earlier train; rerun `workbench run --run {run.resolve()}`"
    assert "Stages: train complete, merge stale, export stale, eval stale." in md
    assert md.count(f"**S{label[1:]}.**") == 3
    data = json.loads(paths["json"].read_text())
    assert data["stages"] == {"train": "complete", "merge": "stale", "export": "stale", "eval": "stale"}
    assert data["stale"] == {"merge": "train", "export": "train", "eval": "train"}
    assert all(data["sections"][n]["stale"] == label[len("stale: "):] for n in ("merge", "export", "eval"))
    assert data["sections"]["export"]["status"] == "failed_verification" and data["missing"] == []
    assert "| merged | 2.500e-13 |" in md   # the numbers are still shown, under the label


def test_report_of_a_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "f").write_text("not a run")
    assert main(["report", "--run", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a run directory" in err[0]
