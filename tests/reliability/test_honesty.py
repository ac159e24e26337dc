"""Nobody fooled (issue 21): a parity report has to be a real run of this checkout's
kernels; q4_k_m that fell back says so; a copied or moved run uses its own files; rows
cut by max_seq_len are counted; code that came with a checkpoint never enters a run;
what a killed command left is cleaned up by the next one."""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

from reliability_support import SMALL, invoke, main


def _with_kernels(run: Path, kernels=("rms_norm",)) -> None:
    """Say in the train record that the run trained with these kernels."""
    data = json.loads((run / "manifest.json").read_text())
    data["stages"]["train"]["kernels"] = {"family": "llama", "swapped": {k: {"LlamaRMSNorm": 9} for k in kernels}}
    (run / "manifest.json").write_text(json.dumps(data))


def _gate(run: Path, report: Path | None, gates: Path | None = None):
    from workbench import qualify

    return qualify.gate_parity(qualify.Context(run, qualify.load_gates(gates), report, None))


#: The issue's fourteen hand-written lines: rms_norm, zero failures, this device.
def _hand_written() -> dict:
    from workbench.envinfo import device_name

    return {"suite": "parity", "environment": {"device": device_name()}, "exit_code": 0,
            "kernels": {"rms_norm": {"tests": 3, "examples": 60, "failed": 0}},
            "properties": [{"kernel": "rms_norm", "dtype": d, "examples": 20, "ok": True}
                           for d in ("float32", "float16", "bfloat16")]}


def test_a_hand_written_parity_report_fails_the_gate(finished, tmp_path):
    run = finished.copy(tmp_path / "run")
    _with_kernels(run)
    path = tmp_path / "parity.json"
    path.write_text(json.dumps(_hand_written(), indent=1))
    result = _gate(run, path)
    assert result["status"] == "FAIL"
    message = result["message"]
    assert "rms_norm: the report records no sha256 of the source of rms_norm" in message
    assert "the report records no pytest counts" in message and "names no junit XML" in message
    assert "made with other versions" in message


def test_a_real_report_passes_and_one_of_other_kernel_sources_fails_naming_the_kernel(finished, tmp_path):
    run = finished.copy(tmp_path / "run")
    _with_kernels(run)
    gates = tmp_path / "gates.yaml"
    gates.write_text("parity: {examples: 2}\n")
    ran = _gate(run, None, gates)                 # qualify runs rms_norm's parity tests and writes the report
    assert ran["status"] == "PASS", ran["message"]
    (report,) = (run / "qualify" / "parity").glob("*.json")
    doc = json.loads(report.read_text())
    assert doc["counts"] == {"tests": 3, "passed": 3, "failed": 0, "errors": 0, "skipped": 0}
    assert (report.parent / doc["junit"]["file"]).is_file() and len(doc["junit"]["sha256"]) == 64
    assert set(doc["versions"]) == {"torch", "triton", "workbench"} and doc["device"]
    assert doc["kernel_sources"]["rms_norm"]["file"] == "kernels/rms_norm.py"
    assert _gate(run, report)["status"] == "PASS"

    def variant(name: str, change) -> dict:
        other = json.loads(report.read_text())
        change(other)
        path = report.parent / f"{name}.json"
        path.write_text(json.dumps(other))
        result = _gate(run, path)
        assert result["status"] == "FAIL", name
        return result

    def other_source(d):
        d["kernel_sources"]["rms_norm"]["sha256"] = "0" * 64

    result = variant("other-source", other_source)
    assert result["checks"][0]["item"] == "rms_norm"
    assert "the report tested other kernel sources: the source of rms_norm (kernels/rms_norm.py)" in result["message"]
    assert "shared kernel code" in variant("other-support", lambda d: d["kernel_sources"]["_support"].update(
        sha256="1" * 64))["message"]
    assert "exit code is 1" in variant("exit-1", lambda d: d.update(exit_code=1))["message"]
    assert "1 failed" in variant("a-failure", lambda d: d["counts"].update(failed=1, passed=2))["message"]
    assert "other versions: torch" in variant("other-torch", lambda d: d["versions"].update(torch="1.0"))["message"]
    assert "not on this device" in variant("other-device", lambda d: d["environment"].update(device="H100"))["message"]
    xml = report.parent / doc["junit"]["file"]
    xml.write_bytes(xml.read_bytes().replace(b'failures="0"', b'failures="1"'))
    assert "not the one the report was written with" in _gate(run, report)["message"]


def test_workbench_parity_report_records_the_junit_xml_and_the_counts(tmp_path, monkeypatch, capsys):
    """`workbench parity --report` asks pytest for a junit XML and keeps it, with its hash,
    next to the report (pytest itself is faked here: its real run is in the test above)."""
    import os

    from workbench import cli
    from workbench.cli import parity as parity_cli

    seen = {}

    class FakePytest:
        def __init__(self, cmd, env):
            seen["cmd"] = cmd
            xml = next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1]
            cases = "".join(f'<testcase name="test_parity[rms_norm-{d}]"/>' for d in ("float32", "float16", "bfloat16"))
            Path(xml).write_text(f'<testsuites><testsuite tests="3">{cases}</testsuite></testsuites>')
            with open(env["PARITY_STATS"], "w") as fh:
                for d in ("float32", "float16", "bfloat16"):
                    fh.write(json.dumps({"kernel": "rms_norm", "dtype": d, "examples": 2, "seconds": 0.1, "ok": True,
                                         "profile": "ci"}) + "\n")
            self.stdout = iter(["3 passed in 1.0s\n"])

        def wait(self):
            return 0

    real_popen = parity_cli.subprocess.Popen

    def popen(cmd, *args, **kwargs):  # pytest is faked; anything else (git, for the report) runs
        return FakePytest(cmd, kwargs["env"]) if "pytest" in cmd else real_popen(cmd, *args, **kwargs)

    monkeypatch.setattr(parity_cli.subprocess, "Popen", popen)
    out = tmp_path / "reports"
    assert cli.main(["parity", "--kernel", "rms_norm", "--report", str(out)]) == 0
    assert any(a.startswith("--junitxml=") for a in seen["cmd"])
    (report,) = out.glob("*.json")
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 0 and doc["counts"]["passed"] == 3 and doc["counts"]["failed"] == 0
    assert (out / doc["junit"]["file"]).is_file()
    assert not os.path.exists(next(a for a in seen["cmd"] if a.startswith("--junitxml=")).split("=", 1)[1])

    # A second run the same day on the same device writes a report of its own beside the first.
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["parity", "--kernel", "rms_norm", "--report", str(out)]) == 0
    assert all((out / name).read_bytes() == data for name, data in first.items())
    second = json.loads((out / f"{report.stem}-2.json").read_text())
    assert second["junit"]["file"] == f"{report.stem}-2.junit.xml" and (out / second["junit"]["file"]).is_file()


def test_the_built_in_default_s_q4_k_m_is_real_q4_k(finished):
    """The main job exercises llama.cpp's k-quants: every matrix row of the built-in default is a
    multiple of 256 (workbench/default.py), so the q4_k_m file it writes holds Q4_K and Q6_K
    matrices, none of the fallback types; the run's summary says "all Q4_K/Q6_K" and notes no fallback."""
    from workbench.export import quantize

    types = quantize.tensor_types(finished.path / "export" / "model-q4_k_m.gguf")
    matrices = {n: t["type"] for n, t in types.items() if len(t["shape"]) > 1}
    assert all(t["row_length"] % quantize.QK_K == 0 for t in types.values() if len(t["shape"]) > 1)
    assert set(matrices.values()) == {"Q4_K", "Q6_K"}, matrices
    assert sum(t == "Q4_K" for t in matrices.values()) > len(matrices) / 2   # most of them: Q4_K_M's mix
    assert "holds no Q4_K/Q6_K" not in finished.out and "fallback types" not in finished.out
    assert "all Q4_K/Q6_K |" in next(line for line in finished.out.splitlines() if line.startswith("| q4_k_m |"))
    rec = json.loads((finished.path / "manifest.json").read_text())["stages"]["export"]
    assert "fallback_note" not in rec["files"]["q4_k_m"]


def test_q4_k_m_fallback_is_named_in_the_summary_the_report_and_the_verdict(models, tmp_path):
    from workbench import qualify

    # A user's checkpoint of hidden 64 (rows of 64 and 128): no row takes a k-quant, so no Q4_K at all.
    run = tmp_path / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["run", "--run", str(run), *SMALL, "--set", f"model.path={models.base4}", "--eval-limit", "4"])
    out = buf.getvalue()
    assert code == 0, out[-3000:]
    assert "q4_k_m holds no Q4_K/Q6_K matrix" in out                   # the summary line of `workbench run`
    assert "fallback types (not Q4_K/Q6_K)" in out                     # its model table
    assert "**Quantization fell back:** q4_k_m holds no Q4_K/Q6_K matrix" in (run / "report" / "report.md").read_text()
    rec = json.loads((run / "manifest.json").read_text())["stages"]["export"]
    assert "k-quants need multiples of 256" in rec["files"]["q4_k_m"]["fallback_note"]
    ctx = qualify.Context(run, qualify.load_gates(None), None, None)
    gguf = qualify.gate_gguf(ctx)
    assert "note: q4_k_m holds no Q4_K/Q6_K matrix" in gguf["message"]
    assert "- **gguf** note: q4_k_m holds no" in qualify.table([gguf])


def test_a_copied_and_a_moved_run_use_their_own_files(finished, tmp_path, capfd):
    from workbench import manifest
    from workbench.eval import models

    copy = finished.copy(tmp_path / "copy")
    records = manifest.read(copy)["stages"]
    assert records["train"]["base_model"] == "base" and records["merge"]["inputs"]["base_model"] == "base"
    assert records["eval"]["inputs"]["f16"] == "export/model-f16.gguf"
    found = models.locate(copy)
    assert found["base"].path == (copy / "base").resolve() and found["merged"].path == copy / "merge" / "merged"
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(copy), moved)
    code, out, err, tb = invoke(["run", "--run", moved], capfd)
    assert tb is None and code == 0, err[-2000:]
    assert out.count("skipped: up to date") == 5


def test_rows_longer_than_max_seq_len_are_counted_and_said(capsys):
    from workbench import config, data, synthetic
    from workbench.tokenizer import default_tokenizer

    rows = synthetic.build(seed=0, train_rows=64)["train"][:20]
    long = {**rows[0], "prompt": [{"role": "user", "content": "word " * 300}]}   # the prompt alone fills 256
    cut = {**rows[1], "completion": [{"role": "assistant", "content": "7 " * 300}]}   # the answer is cut
    stats = {}
    data = data.training_dataset(config.load(None), default_tokenizer(), rows + [long, cut], stats)
    assert stats == {"rows": 22, "longer_than_max_seq_len": 2, "dropped_no_answer_token": 1} and len(data) == 21
    err = capsys.readouterr().err
    assert "2 of 22 training row(s) are longer than training.max_seq_len (256 tokens)" in err
    assert "1 of them kept no answer token and are left out" in err


def test_export_merged_copies_no_python(models, tmp_path):
    from workbench.pipeline import bring_merged

    folder = shutil.copytree(models.base4, tmp_path / "mine")
    (folder / "modeling_helper.py").write_text("import os\n")   # no auto_map: never run, and never copied
    (folder / "weights.pt").write_bytes(b"pickle")
    bring_merged(tmp_path / "run", folder)
    copied = sorted(p.name for p in (tmp_path / "run" / "merge" / "merged").iterdir())
    assert "modeling_helper.py" not in copied and "weights.pt" not in copied and "model.safetensors" in copied


def test_the_quantizers_log_names_the_cause():
    from workbench.export.quantize import _Tail

    tail = _Tail()
    for chunk in (b"llama_model_quantize_impl: loading model\n", b"llama_model_quantize: failed to quantize: ",
                  b"tensor 'x' has an invalid shape. More text follows\n", b"done\n"):
        tail.feed(3, chunk, None)
    assert tail.cause() == "llama_model_quantize: failed to quantize: tensor 'x' has an invalid shape. More text follows"


def test_a_killed_commands_leftovers_are_cleaned_by_the_next_run(finished, tmp_path, capfd):
    from workbench import manifest

    run = finished.copy(tmp_path / "run")
    (run / "train" / ".trainer.abc123").mkdir()                     # what kill -9 of a train left (before the fix)
    (run / ".train.partial" / "adapter").mkdir(parents=True)        # ... and of a train now
    (run / "export" / ".model-f16.gguf.x1y2.partial").write_bytes(b"GGUF half")
    data = manifest.read(run)
    data["attempts"] = {"train": {"status": "running", "pid": 999999}}
    (run / "manifest.json").write_text(json.dumps(data))
    code, out, err, tb = invoke(["run", "--run", run], capfd)
    assert tb is None and code == 0, err[-2000:]
    assert "removed what an interrupted command left" in out and out.count("skipped: up to date") == 5
    assert not list(run.rglob(".*.partial")) and not list((run / "train").glob(".trainer.*"))
    assert manifest.attempt(run, "train")["status"] == "killed"


def test_a_checkpoint_with_custom_code_never_reaches_the_run(models, tmp_path, capfd):
    folder = shutil.copytree(models.base4, tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config.update(auto_map={"AutoModelForCausalLM": "modeling_x.M"}, trust_remote_code=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_x.py").write_text("raise SystemExit('ran')\n")
    for argv in (["train", "--run", tmp_path / "a", "--set", f"model.path={folder}"],
                 ["export", "--run", tmp_path / "b", "--merged", folder],
                 ["merge", "--run", tmp_path / "c", "--adapter", models.adapter4, "--base", folder]):
        code, out, err, tb = invoke(argv, capfd)
        assert tb is None and code == 2 and "declares custom code" in err, (argv, err[-2000:])
    assert not any((tmp_path / name).exists() for name in "abc")

