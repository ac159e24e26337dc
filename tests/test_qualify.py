"""`workbench qualify`: a qualified tiny run passes every gate; tampered copies of it
(a flipped GGUF byte, a swapped adapter, a wrong tokenizer, a deleted file, missing
stages) fail exactly the gates that must catch them, with a clear message, and the
other gates still run; the parity, eval and performance gates read what they should."""
import json
import shutil
from pathlib import Path

import pytest

from workbench.offline import enforce_offline

enforce_offline()

import torch  # noqa: E402

from workbench import manifest, qualify  # noqa: E402
from workbench.cli import main  # noqa: E402

# A short real run (`workbench run`): 30 LoRA steps of the
# built-in default move the held-out perplexity (word ppl 1.0e5 -> 5.7e4), so the
# adapter is far from a no-op; the eval covers the whole held-out split (156 rows),
# as the eval gate's tolerances assume. Measured on this 2-core CPU, one torch
# thread: train 10 s, merge 0.4 s, export 2.5 s, eval 12 s; a qualify run 4-6 s.
TRAIN = ["training.max_steps=30", "training.lr=3e-3", "training.logging_steps=10", "eval.max_rows=0",
         "data.builtin_rows=256", "eval.max_new_tokens=12"]
QUANTS = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The run as the README's main command leaves it: `workbench run` (train, merge,
    export, eval, report), shortened by --set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("qualify") / "run"
        overrides = [arg for kv in TRAIN for arg in ("--set", kv)]
        assert main(["run", "--run", str(run), *overrides, "--quant", ",".join(QUANTS)]) == 0
        assert [s for s in ("train", "merge", "export", "eval", "report")
                if manifest.stage(run, s)["status"] != "complete"] == []
        yield run
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def copy(built, tmp_path):
    """A fresh copy of the built run for one test to tamper with."""
    def make(name="run"):
        return shutil.copytree(built, tmp_path / name)
    return make


def by_name(verdict):
    return {g["name"]: g for g in verdict["gates"]}


def statuses(verdict):
    return {g["name"]: g["status"] for g in verdict["gates"]}


GOOD = {"parity": "N/A", "merge": "PASS", "gguf": "PASS", "adapter_gguf": "PASS", "eval": "PASS", "tokenizer": "PASS", "hashes": "PASS",
        "performance": "N/A"}


# --------------------------------------------------------------------------- the qualified run
def test_a_qualified_run_passes_every_gate_and_writes_its_verdict(copy, capsys):
    run = copy()
    stages_before = manifest.read(run)["stages"]
    assert main(["qualify", "--run", str(run)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    for name in qualify.TITLES:
        assert any(line.startswith(f"{name} ") for line in lines), name   # the final table, plain text
        assert f"] {name}: " in err                            # progress per gate
    assert "\\|" not in out and "…" not in out               # no Markdown escapes, nothing cut off
    assert "verdict: PASS" in out

    verdict = json.loads((run / "qualify" / "verdict.json").read_text())
    assert statuses(verdict) == GOOD and verdict["passed"]
    gates = by_name(verdict)
    assert gates["parity"]["message"] == "not applicable: the run used no Triton kernels"
    # Merge: recomputed from base + adapter and the merged folder; an fp32 merge is exact to rounding.
    (merged,) = gates["merge"]["checks"]
    assert merged["item"] == "merge/merged" and merged["measured"]["kl_mean"] < 1e-9
    assert merged["measured"]["top1_agreement"] == 1.0 and merged["threshold"]["kl_mean"] == 1e-6
    # GGUF: the export stage's numbers and llama.cpp's recomputed ones, per file.
    assert [c["item"] for c in gates["gguf"]["checks"]] == [f"export/model-{q}.gguf" for q in QUANTS]
    for c in gates["gguf"]["checks"]:
        assert c["measured"]["now kl_mean"] <= c["threshold"]["kl_mean"]
        assert c["measured"]["export kl_mean"] <= c["threshold"]["kl_mean"]
    assert gates["gguf"]["checks"][0]["measured"]["now kl_mean"] < 1e-5      # f16
    # Recomputed on the export stage's own tokens, so it measures what the export measured.
    for c in gates["gguf"]["checks"] + gates["adapter_gguf"]["checks"]:
        assert c["measured"]["now kl_mean"] == pytest.approx(c["measured"]["export kl_mean"], rel=1e-6)
    assert "export stage's 512 held-out tokens" in gates["gguf"]["message"]
    # The adapter GGUF that `workbench run` ships, applied by llama.cpp to the f16 and q8_0 base.
    assert [c["item"] for c in gates["adapter_gguf"]["checks"]] == [
        "export/adapter-f16.gguf on export/base-f16.gguf", "export/adapter-f16.gguf on export/base-q8_0.gguf"]
    assert gates["adapter_gguf"]["checks"][0]["measured"]["now kl_mean"] < 1e-5
    # Eval: every shipped model's changes against the adapter.
    assert [c["item"] for c in gates["eval"]["checks"]] == ["merged", *QUANTS]
    assert all(abs(c["measured"]["wb_synthetic_mc acc Δ"]) <= c["threshold"]["score"] for c in gates["eval"]["checks"])
    for c in gates["tokenizer"]["checks"]:
        assert c["measured"]["strings"] > 150 and c["measured"]["id_mismatches"] == 0
        assert c["measured"]["llama_cpp_detokenize_mismatches"] == 0
    # The report: measured, threshold and status per gate, hashes and environment.
    md = (run / "qualify" / "verdict.md").read_text()
    assert "| merge | PASS |" in md and "export/model-q8_0.gguf" in md and "## Environment" in md
    assert verdict["artifacts"]["export"]["export/model-q8_0.gguf"]["sha256"] == \
        manifest.sha256_file(run / "export" / "model-q8_0.gguf")
    assert verdict["environment"]["torch"] == torch.__version__

    # Recorded as a stage; no earlier stage's record or file changed.
    after = manifest.read(run)["stages"]
    assert {k: v for k, v in after.items() if k != "qualify"} == stages_before
    assert all(manifest.verify_outputs(run, name) == [] for name in after)
    rec = after["qualify"]
    assert rec["status"] == "complete" and rec["gates"] == GOOD
    assert set(rec["outputs"]) == {"qualify/verdict.json", "qualify/verdict.md"}


# --------------------------------------------------------------------------- tampered runs
def test_a_flipped_byte_in_a_gguf_fails_the_hash_gate_and_the_rest_still_run(copy):
    run = copy()
    gguf = run / "export" / "model-q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    verdict = qualify.run_qualify(run)
    assert not verdict["passed"]
    gates = by_name(verdict)
    assert gates["hashes"]["status"] == "FAIL"
    assert "export/model-q8_0.gguf changed since the export stage wrote it" in gates["hashes"]["message"]
    assert verdict["artifacts"]["export"]["export/model-q8_0.gguf"]["state"] == "changed"
    # The eval results are of another file now; the other gates ran to their own verdict
    # (recomputed by llama.cpp, one flipped weight bit stays within q8_0's limits).
    assert gates["eval"]["status"] == "FAIL"
    assert "the q8_0 model changed since `workbench eval` measured it" in gates["eval"]["message"]
    assert {k: v for k, v in statuses(verdict).items() if k not in ("hashes", "eval")} == \
        {k: v for k, v in GOOD.items() if k not in ("hashes", "eval")}
    q8 = next(c for c in gates["gguf"]["checks"] if c["item"] == "export/model-q8_0.gguf")
    assert q8["measured"]["note"] == "sha256 differs from the export record"


def test_a_changed_gguf_too_large_to_recompute_fails_the_gguf_gate(copy, tmp_path):
    run = copy()
    gguf = run / "export" / "model-f16.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0x01
    gguf.write_bytes(bytes(data))
    gates = tmp_path / "gates.yaml"
    gates.write_text("gguf: {recompute_max_mib: 0}\n")
    ctx = qualify.Context(run, qualify.load_gates(gates), None, None)
    result = qualify.gate_gguf(ctx)
    assert result["status"] == "FAIL"
    assert "export/model-f16.gguf: the file changed since the export stage measured it" in result["message"]
    assert [c["status"] for c in result["checks"]] == ["FAIL", "PASS", "PASS"]


def test_a_swapped_adapter_fails_the_merge_and_hash_gates(copy):
    from safetensors.torch import load_file, save_file

    run = copy()
    path = run / "adapter" / "adapter_model.safetensors"
    # Another adapter: same names and shapes, other weights (each tensor's values shuffled).
    gen = torch.Generator().manual_seed(1)
    other = {k: v.flatten()[torch.randperm(v.numel(), generator=gen)].reshape(v.shape).contiguous()
             for k, v in load_file(str(path)).items()}
    save_file(other, str(path), metadata={"format": "pt"})
    verdict = qualify.run_qualify(run)
    gates = by_name(verdict)
    assert gates["merge"]["status"] == "FAIL"
    (check,) = gates["merge"]["checks"]
    assert check["measured"]["kl_mean"] > 1e3 * check["threshold"]["kl_mean"]
    assert "merge/merged: not the merge of this adapter into this base" in gates["merge"]["message"]
    assert gates["hashes"]["status"] == "FAIL"
    assert "adapter/adapter_model.safetensors changed since the train stage wrote it" in gates["hashes"]["message"]
    assert "merge: its input adapter changed since the merge stage read it" in " ".join(
        f"{c['item']}: {p}" for c in gates["hashes"]["checks"] for p in c["problems"])
    assert gates["eval"]["status"] == "FAIL" and "adapter model changed" in gates["eval"]["message"]
    assert gates["gguf"]["status"] == gates["tokenizer"]["status"] == "PASS"
    # The adapter GGUF was made from the original adapter: llama.cpp applying it no longer matches.
    assert gates["adapter_gguf"]["status"] == "FAIL" and "recomputed: kl_mean" in gates["adapter_gguf"]["message"]


def test_a_missing_or_corrupted_adapter_gguf_fails_its_gate(copy, monkeypatch):
    from workbench.export import adapter_gguf

    run = copy()
    rec = manifest.stage(run, "export")
    _edit_record(run, "export", adapter=None)
    gate = qualify.gate_adapter_gguf(qualify.Context(run, qualify.load_gates(None), None, None))
    assert gate["status"] == "FAIL" and "wrote no adapter GGUF" in gate["message"]
    assert "`workbench export --run DIR --adapter-gguf`" in gate["message"]

    _edit_record(run, "export", adapter=rec["adapter"])
    original = adapter_gguf.tensors
    monkeypatch.setattr(adapter_gguf, "tensors", lambda *a: [(n, x, 10 * y, h) for n, x, y, h in original(*a)])
    adapter_gguf.write(run / "adapter", run / "base", run / "export" / "adapter-f16.gguf")   # B x 10
    verdict = qualify.run_qualify(run)
    gate = by_name(verdict)["adapter_gguf"]
    assert gate["status"] == "FAIL"
    for check in gate["checks"]:
        assert check["measured"]["note"] == "sha256 differs from the export record"
        assert check["measured"]["now kl_mean"] > 100 * check["threshold"]["kl_mean"]
    assert "export/adapter-f16.gguf changed since the export stage wrote it" in by_name(verdict)["hashes"]["message"]


def test_a_wrong_tokenizer_fails_the_tokenizer_gate(copy):
    from workbench import synthetic, tokenizer as wtok

    run = copy()
    # A tokenizer of the same kind trained on other text: other merges, other ids.
    other = wtok.train_tokenizer(synthetic.tokenizer_corpus(seed=7)[:200], vocab_size=320)
    shutil.rmtree(run / "tokenizer")
    wtok.save_tokenizer(other, run / "tokenizer")
    verdict = qualify.run_qualify(run)
    gates = by_name(verdict)
    assert gates["tokenizer"]["status"] == "FAIL"
    for check in gates["tokenizer"]["checks"]:
        assert check["status"] == "FAIL" and check["measured"]["id_mismatches"] > 100
        assert "tokenize differently in llama.cpp than with RUN/tokenizer" in check["problems"][0]
    assert gates["hashes"]["status"] == "FAIL" and "tokenizer/tokenizer.json changed" in gates["hashes"]["message"]


def test_a_deleted_file_is_named_by_the_hash_gate(copy, capsys):
    run = copy()
    (run / "merge" / "merged" / "tokenizer_config.json").unlink()
    assert main(["qualify", "--run", str(run)]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("hashes ") and "FAIL" in line for line in out.splitlines())
    assert "verdict: FAIL (failed: eval, hashes)" in out
    verdict = json.loads((run / "qualify" / "verdict.json").read_text())
    hashes = by_name(verdict)["hashes"]
    assert "merge: merge/merged/tokenizer_config.json is missing" in hashes["message"]
    assert verdict["artifacts"]["merge"]["merge/merged/tokenizer_config.json"]["state"] == "missing"
    # The merged folder is an input of the export and of the eval: both records name another folder now.
    assert "export: its input merge/merged changed since the export stage read it" in hashes["message"]
    assert "the merged model changed since `workbench eval`" in by_name(verdict)["eval"]["message"]
    assert manifest.stage(run, "qualify")["status"] == "failed_qualification"


def test_a_report_older_than_a_stage_record_fails_the_hash_gate(copy):
    from workbench.qualify import run_qualify

    run = copy()
    # The eval stage runs again after the report was rendered: its record (timings,
    # timestamps) is new, so the report no longer shows what the run holds.
    record = manifest.stage(run, "eval")
    manifest.record_stage(run, "eval", {k: v for k, v in record.items() if k not in ("status", "finished_utc")})
    hashes = by_name(run_qualify(run))["hashes"]
    assert hashes["status"] == "FAIL"
    assert "report: the report predates the current eval record" in hashes["message"]
    assert "stages.train" not in hashes["message"]  # the other records it rendered still match


def test_missing_stages_fail_their_gates_with_the_command_that_makes_them(copy, capsys):
    run = copy()
    data = manifest.read(run)
    for name in ("export", "eval", "report"):  # a run stopped after merge (so no report either)
        del data["stages"][name]
    (run / manifest.MANIFEST).write_text(json.dumps(data))
    assert main(["qualify", "--run", str(run)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    gates = by_name(json.loads((run / "qualify" / "verdict.json").read_text()))
    for name in ("gguf", "tokenizer"):
        assert gates[name]["status"] == "FAIL" and "run `workbench export --run DIR`" in gates[name]["message"]
    assert gates["adapter_gguf"]["status"] == "FAIL"
    assert "run `workbench export --run DIR --adapter-gguf`" in gates["adapter_gguf"]["message"]
    assert gates["eval"]["status"] == "FAIL" and "run `workbench eval --run DIR`" in gates["eval"]["message"]
    assert gates["merge"]["status"] == gates["hashes"]["status"] == "PASS"

    assert main(["qualify", "--run", str(run.parent / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _edit_record(run, name, **changes):
    """Change (or with None, drop) keys of a stage's manifest record in place."""
    data = manifest.read(run)
    rec = data["stages"][name]
    for key, value in changes.items():
        rec.pop(key, None) if value is None else rec.__setitem__(key, value)
    (run / manifest.MANIFEST).write_text(json.dumps(data))


def test_an_eval_of_other_tasks_custom_tasks_or_without_the_chat_template_fails_the_eval_gate(copy, tmp_path):
    run = copy()
    full = manifest.stage(run, "eval")
    assert full["tasks"] == ["wb_synthetic_mc", "wb_synthetic_gen", "wb_heldout_ppl"]
    # Only the perplexity task: every model's numbers of that task still agree.
    assert main(["eval", "--run", str(run), "--tasks", "wb_heldout_ppl"]) == 0
    ctx = qualify.Context(run, qualify.load_gates(None), None, None)
    result = qualify.gate_eval(ctx)
    assert result["status"] == "FAIL"
    assert [c["status"] for c in result["checks"]] == ["FAIL", "PASS", "PASS", "PASS", "PASS"]
    assert "the eval ran tasks wb_heldout_ppl, not wb_synthetic_mc, wb_synthetic_gen" in result["message"]
    assert "rerun `workbench eval --run DIR` without --tasks" in result["message"]

    # The whole eval's record, but with custom tasks or without the chat template.
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    _edit_record(run, "eval", **{**full, "include": [str(tasks)]})
    result = qualify.gate_eval(ctx)
    assert result["status"] == "FAIL" and result["checks"][0]["item"] == "eval stage"
    assert f"custom tasks (--include {tasks})" in result["message"] and "without --include" in result["message"]
    _edit_record(run, "eval", **{**full, "chat_template": False})
    result = qualify.gate_eval(ctx)
    assert result["status"] == "FAIL"
    assert "without the chat template" in result["message"] and "without --no-chat-template" in result["message"]
    _edit_record(run, "eval", **full)
    assert qualify.gate_eval(ctx)["status"] == "PASS"


def test_a_nan_or_missing_metric_fails_the_eval_and_gguf_gates(copy, tmp_path):
    run = copy()
    eval_rec = manifest.stage(run, "eval")
    metrics = json.loads(json.dumps(eval_rec["metrics"]))
    ppl = "wb_heldout_ppl word_perplexity"
    assert ppl in metrics["adapter"]
    metrics["merged"][ppl] = float("nan")
    del metrics["q8_0"][ppl]
    _edit_record(run, "eval", metrics=metrics)
    ctx = qualify.Context(run, qualify.load_gates(None), None, None)
    result = qualify.gate_eval(ctx)
    assert result["status"] == "FAIL"
    checks = {c["item"]: c for c in result["checks"]}
    assert {k: c["status"] for k, c in checks.items()} == {"merged": "FAIL", "f16": "PASS", "q8_0": "FAIL",
                                                           "q4_k_m": "PASS"}
    assert checks["merged"]["problems"][0].startswith(f"{ppl} is nan against the adapter's")
    assert "not a finite number, so not within tolerance" in checks["merged"]["problems"][0]
    assert checks["q8_0"]["problems"] == [f"{ppl} is missing (the adapter has it); rerun `workbench eval --run DIR`"]

    # The export record's llama.cpp numbers: a NaN KL or a missing top-1 is no pass
    # (recompute_max_mib 0: only the recorded numbers are read).
    export = json.loads(json.dumps(manifest.stage(run, "export")))
    export["files"]["f16"]["llama_cpp"]["kl_mean"] = float("nan")
    del export["files"]["q8_0"]["llama_cpp"]["top1_agreement"]
    _edit_record(run, "export", files=export["files"])
    gates = tmp_path / "gates.yaml"
    gates.write_text("gguf: {recompute_max_mib: 0}\n")
    result = qualify.gate_gguf(qualify.Context(run, qualify.load_gates(gates), None, None))
    assert [c["status"] for c in result["checks"]] == ["FAIL", "FAIL", "PASS"]
    assert "export/model-f16.gguf: export stage (llama.cpp): kl_mean is nan (not a finite number)" in result["message"]
    assert "export/model-q8_0.gguf: export stage (llama.cpp): top1_agreement is missing" in result["message"]


def test_a_changed_base_model_outside_the_run_fails_the_hash_gate(copy, tmp_path):
    run = copy()
    # The run trained on a user's base folder outside it (as with --set model.path=FOLDER).
    base = shutil.copytree(run / "base", tmp_path / "user-base")
    train = manifest.stage(run, "train")
    _edit_record(run, "train", base_model=str(base), inputs={**train["inputs"], "base_model": str(base)},
                 input_hashes={**train["input_hashes"], "base_model": manifest.hash_tree(base)})

    def train_check():   # (the report, which rendered the old train record, is stale now: its own problem)
        result = qualify.gate_hashes(qualify.Context(run, qualify.load_gates(None), None, None))
        return result, next(c for c in result["checks"] if c["item"] == "train")

    assert train_check()[1]["status"] == "PASS"
    config_file = base / "config.json"
    config_file.write_text(config_file.read_text().replace("}", ', "note": "edited"}', 1))
    result, check = train_check()
    assert result["status"] == check["status"] == "FAIL"
    assert check["problems"] == [f"its input {base} changed since the train stage read it (rerun "
                                 "`workbench train --run DIR`)"]
    shutil.rmtree(base)
    result, check = train_check()
    assert check["status"] == "FAIL" and check["problems"][0].startswith(f"its input {base} is missing")

    # A brought adapter's record names its copy in the run as the input, and the folder it was
    # copied from as its source: the copy is checked, the source may be gone.
    run = copy("brought")
    train = manifest.stage(run, "train")
    _edit_record(run, "train", user_provided=True, source={"adapter": str(tmp_path / "gone")},
                 inputs={**train["inputs"], "adapter": "adapter"},
                 input_hashes={**train["input_hashes"], "adapter": manifest.hash_tree(run / "adapter")})
    result = qualify.gate_hashes(qualify.Context(run, qualify.load_gates(None), None, None))
    assert next(c for c in result["checks"] if c["item"] == "train")["status"] == "PASS", result["message"]


def _parity_doc(folder, kernel="rms_norm", dtypes=("float32", "float16", "bfloat16"), examples=2, **agg):
    """A `workbench parity --report` JSON of one kernel, made on this device with this
    checkout's kernel sources, and its junit XML in ``folder`` (where the JSON goes)."""
    import hashlib

    from workbench import parity_report
    from workbench.envinfo import environment

    env = environment()
    rows = [{"kernel": kernel, "dtype": d, "examples": examples, "seconds": 0.1, "ok": True, "profile": "ci"}
            for d in dtypes]
    kernels = {kernel: {"examples": examples * len(rows), "seconds": 0.1 * len(rows), "tests": len(rows),
                        "failed": 0, **agg}}
    cases = "".join(f'<testcase classname="parity.test_parity" name="test_parity[{kernel}-{d}]" time="0.1"/>'
                    for d in dtypes)
    xml = (f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0" '
           f'skipped="0" tests="{len(dtypes)}">{cases}</testsuite></testsuites>').encode()
    (Path(folder) / "parity.junit.xml").write_bytes(xml)
    return {"suite": "parity", "environment": {"device": env["device"]}, "command": "workbench parity",
            "exit_code": 0, "kernels": {k: {n: v for n, v in a.items() if v is not None} for k, a in kernels.items()},
            "properties": rows,
            "counts": {"tests": len(dtypes), "passed": len(dtypes), "failed": 0, "errors": 0, "skipped": 0},
            "junit": {"file": "parity.junit.xml", "sha256": hashlib.sha256(xml).hexdigest()},
            "versions": {k: env[k] for k in parity_report.VERSION_KEYS}, "device": env["device"],
            "kernel_sources": parity_report.kernel_sources()}


def test_a_parity_report_must_cover_every_dtype_with_a_recorded_zero_failures(copy, tmp_path):
    run = copy()
    _edit_record(run, "train", kernels={"family": "llama", "swapped": {"rms_norm": {"LlamaRMSNorm": 9}}})

    def gate(doc, gates_text=None):
        path = tmp_path / "parity.json"
        path.write_text(json.dumps(doc))
        gates = None
        if gates_text:
            gates = tmp_path / "gates.yaml"
            gates.write_text(gates_text)
        return qualify.gate_parity(qualify.Context(run, qualify.load_gates(gates), path, None))

    assert gate(_parity_doc(tmp_path))["status"] == "PASS"
    partial = gate(_parity_doc(tmp_path, dtypes=("float32",)))
    assert partial["status"] == "FAIL"
    assert "the report does not test rms_norm in float16, bfloat16" in partial["message"]
    unrecorded = gate(_parity_doc(tmp_path, failed=None))
    assert unrecorded["status"] == "FAIL" and "records no failure count for rms_norm" in unrecorded["message"]
    few = gate(_parity_doc(tmp_path, examples=2), "parity: {examples: 5}\n")
    assert few["status"] == "FAIL"
    assert "fewer hypothesis examples than the gates' parity.examples (5)" in few["message"]
    assert gate(_parity_doc(tmp_path, examples=5), "parity: {examples: 5}\n")["status"] == "PASS"


def test_a_parity_report_or_baseline_that_is_no_json_object_is_bad_input(copy, tmp_path, capsys):
    run = copy()                   # parity is N/A here (no kernels): a bad report is still bad input
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for argv in (["--parity-report", str(listed)], ["--parity-report", str(tmp_path)],
                 ["--parity-report", str(run / manifest.MANIFEST)], ["--baseline", str(listed)]):
        capsys.readouterr()
        assert main(["qualify", "--run", str(run), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Error:" not in err.replace("workbench: error:", "")
        assert f"{argv[0]} {argv[1]}" in err
    assert not (run / "qualify").exists()
    assert main(["qualify", "--run", str(run), "--baseline", str(listed)]) == 2
    assert "holds an array where a JSON object is expected; pass a run's manifest.json or a qualify " \
        "verdict.json." in capsys.readouterr().err


def test_a_brought_merged_model_has_no_training_and_no_adapter_to_check(built, tmp_path):
    from workbench.eval.suite import default_tasks
    from workbench.pipeline import bring_merged

    run = tmp_path / "brought"
    bring_merged(run, built / "merge" / "merged")
    run = run.resolve()
    merged = manifest.stage(built, "eval")["metrics"]["merged"]
    manifest.record_stage(run, "eval", {"models": ["merged"], "metrics": {"merged": merged},
                                        "tasks": default_tasks(run), "include": [], "chat_template": True,
                                        "limit": None,
                                        "input_hashes": {"merged": manifest.hash_tree(run / "merge" / "merged")}})
    baseline = built / manifest.MANIFEST
    ctx = qualify.Context(run, qualify.load_gates(None), None, baseline)
    parity = qualify.gate_parity(ctx)
    assert parity["status"] == "N/A"
    assert parity["message"] == "not applicable: no training in this run: the merged model was brought"
    brought = ("a brought merged model has no adapter to check it against; bring the adapter with "
               "`workbench merge --run DIR --adapter FOLDER --base FOLDER` instead")
    with pytest.raises(qualify.UserError, match="no adapter to check it against"):
        qualify.gate_merge(ctx)
    verdict = qualify.run_qualify(run, baseline=baseline)
    gates = by_name(verdict)
    assert gates["parity"]["status"] == gates["performance"]["status"] == "N/A"
    assert gates["merge"]["status"] == "FAIL" and gates["merge"]["message"] == brought + "."
    assert gates["eval"]["status"] == "FAIL" and gates["eval"]["checks"][0]["problems"] == [brought]
    assert all("workbench train" not in g["message"] for g in verdict["gates"])
    assert gates["adapter_gguf"]["status"] == "N/A" and "has no adapter" in gates["adapter_gguf"]["message"]


# --------------------------------------------------------------------------- gates one by one
def test_a_qlora_merge_is_checked_against_the_adapter_on_both_bases(tmp_path):
    pytest.importorskip("bitsandbytes")
    from _export_run import build_run
    from workbench.export.merge import run_merge

    run = build_run(tmp_path / "run", "llama", qlora=True)
    run_merge(run)
    ctx = qualify.Context(run.resolve(), qualify.load_gates(None), None, None)
    result = qualify.gate_merge(ctx)
    # merge/merged vs the adapter on the 16-bit base, merge/merged_from_nf4 vs the adapter on the NF4 base.
    assert [c["item"] for c in result["checks"]] == ["merge/merged", "merge/merged_from_nf4"]
    assert result["status"] == "PASS", result["message"]
    # The 16-bit merge standing in for the NF4 one differs by NF4's rounding of every weight
    # (measured KL 0.04, top-1 0.47 on this random tiny model).
    shutil.rmtree(run / "merge" / "merged_from_nf4")
    shutil.copytree(run / "merge" / "merged", run / "merge" / "merged_from_nf4")
    result = qualify.gate_merge(qualify.Context(run.resolve(), qualify.load_gates(None), None, None))
    assert [c["status"] for c in result["checks"]] == ["PASS", "FAIL"]
    assert result["checks"][1]["measured"]["kl_mean"] > 1e-3


def test_parity_gate_runs_exactly_the_kernels_the_run_used_and_reads_a_report(copy, tmp_path):
    run = copy()
    data = manifest.read(run)
    data["stages"]["train"]["kernels"] = {"family": "llama", "swapped": {"rms_norm": {"LlamaRMSNorm": 9}, "rope": {}}}
    (run / manifest.MANIFEST).write_text(json.dumps(data))
    gates = tmp_path / "gates.yaml"
    gates.write_text("parity: {examples: 2}\n")
    ctx = qualify.Context(run, qualify.load_gates(gates), None, None)
    result = qualify.gate_parity(ctx)                      # rms_norm only: rope swapped nothing
    assert result["status"] == "PASS", result
    (check,) = result["checks"]
    # 2 drawn examples per dtype, and the kernel's targeted ones (registry Example) on top.
    from workbench import kernels as registered

    spec = registered.get("rms_norm")
    targeted = sum(len(e.dtypes or spec.dtypes) for e in spec.examples)
    assert check["item"] == "rms_norm" and check["measured"] == {"tests": 3, "examples": 6 + targeted, "failed": 0}
    (report,) = (run / "qualify" / "parity").glob("*.json")

    def from_report(doc):
        path = report.parent / "variant.json"   # next to the junit XML the report names
        path.write_text(json.dumps(doc))
        return qualify.gate_parity(qualify.Context(run, qualify.load_gates(None), path, None))

    doc = json.loads(report.read_text())
    assert from_report(doc)["status"] == "PASS"
    other_device = {**doc, "environment": {**doc["environment"], "device": "NVIDIA H100 80GB HBM3"}}
    assert "not on this device" in from_report(other_device)["message"]
    assert "does not cover rms_norm" in from_report({**doc, "kernels": {}})["message"]
    failed = {**doc, "kernels": {"rms_norm": {**doc["kernels"]["rms_norm"], "failed": 1}}}
    assert from_report(failed)["status"] == "FAIL"


def test_gate_thresholds_come_from_the_gates_file(built, tmp_path, capsys):
    from workbench.eval.compare import DEFAULT_TOLERANCES
    from workbench.export.verify import DEFAULT_THRESHOLDS

    defaults = qualify.load_gates(None)
    # The shipped GGUF and eval limits are the export and eval stages' own defaults.
    assert defaults["gguf"]["thresholds"] == DEFAULT_THRESHOLDS
    from workbench.export.adapter_export import DEFAULT_THRESHOLDS as ADAPTER_THRESHOLDS

    assert defaults["adapter_gguf"]["thresholds"] == ADAPTER_THRESHOLDS
    assert defaults["eval"]["tolerances"] == DEFAULT_TOLERANCES

    strict = tmp_path / "strict.yaml"
    strict.write_text("merge: {float32: {kl_mean: 1.0e-30}}\neval: {tolerances: {q4_k_m: {perplexity: 0.0}}}\n")
    gates = qualify.load_gates(strict)
    assert gates["merge"]["float32"]["top1_agreement"] == defaults["merge"]["float32"]["top1_agreement"]
    ctx = qualify.Context(built, gates, None, None)
    merge = qualify.gate_merge(ctx)
    assert merge["status"] == "FAIL" and "kl_mean" in merge["message"] and "> 1e-30" in merge["message"]
    evals = {c["item"]: c["status"] for c in qualify.gate_eval(ctx)["checks"]}
    assert evals == {"merged": "PASS", "f16": "PASS", "q8_0": "PASS", "q4_k_m": "FAIL"}

    bad = tmp_path / "bad.yaml"
    bad.write_text("merge: {float32: {kl_maen: 1.0}}\n")
    assert main(["qualify", "--run", str(built), "--gates", str(bad)]) == 2
    assert "unknown key 'merge.float32.kl_maen'" in capsys.readouterr().err


def test_performance_gate_against_a_baseline(built, tmp_path):
    base = json.loads((built / manifest.MANIFEST).read_text())

    def gate(train_changes):
        doc = json.loads(json.dumps(base))
        doc["stages"]["train"].update(train_changes)
        path = tmp_path / "baseline.json"
        path.write_text(json.dumps(doc))
        return qualify.gate_performance(qualify.Context(built, qualify.load_gates(None), None, path))

    same = gate({})
    assert same["status"] == "PASS" and [c["measured"]["ratio"] for c in same["checks"]] == [1.0, 1.0]
    tps = base["stages"]["train"]["tokens_per_s"]
    slower = gate({"tokens_per_s": tps / 0.8})               # this run makes 0.8x the baseline's tokens/s
    assert slower["status"] == "FAIL" and "0.800 x the baseline's tokens/s" in slower["message"]
    leaner = gate({"peak_rss_mib": base["stages"]["train"]["peak_rss_mib"] / 1.5})
    assert leaner["status"] == "FAIL" and "1.500 x the baseline's peak_rss_mib" in leaner["message"]
    elsewhere = gate({"environment": {"device": "NVIDIA H200"}})
    assert elsewhere["status"] == "FAIL" and "trained on 'NVIDIA H200'" in elsewhere["message"]
