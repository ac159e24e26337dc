import json
from pathlib import Path
import os
import subprocess
import sys

import pytest

from workbench.bench import child
from workbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_bench_smoke_writes_a_report_without_errors(tmp_path, capsys):
    # The CPU path only proves the harness end to end (tiny shapes, interpreter); GPU numbers come from `device`.
    code = main(["bench", "kernels", "--shape", "tiny", "--only", "rms_norm,swiglu,cross_entropy", "--report", str(tmp_path),
                 "--tag", "smoke"])
    assert code == 0
    (js,) = [p for p in tmp_path.glob("*.json") if not p.name.endswith(".benchmark.json")]
    assert js.name.endswith("-smoke.json")
    doc = json.loads(js.read_text())
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == {"rms_norm", "swiglu", "cross_entropy"}
    for r in rows:
        assert r["error"] is None, r
        if r["stack"] in ("ours", "torch"):
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert doc["environment"]["device"] and doc["command"].startswith("workbench bench")
    assert (tmp_path / js.name.replace(".json", ".md")).exists()
    # The report is made of pytest bench/'s JSON, written beside it: its benchmarks' medians are the rows' times.
    bench_json = tmp_path / doc["benchmark_json"]
    assert bench_json.name == js.name.replace(".json", ".benchmark.json")
    assert doc["benchmark_command"].startswith("pytest bench ") and "--bench-shape tiny" in doc["benchmark_command"]
    benchmarks = json.loads(bench_json.read_text())["benchmarks"]
    ours = next(r for r in rows if r["kernel"] == "rms_norm" and r["stack"] == "ours")
    (fwd,) = [b for b in benchmarks if b["name"] == "test_kernel[tiny-bfloat16-rms_norm-ours-fwd]"]
    assert ours["fwd_ms"] == fwd["stats"]["median"] * 1e3
    # `workbench regress` reads the pytest-benchmark JSON as it reads the report.
    capsys.readouterr()
    assert main(["regress", str(js), str(bench_json)]) == 0
    assert "no regression" in capsys.readouterr().out
    doc_b = json.loads(bench_json.read_text())
    for b in doc_b["benchmarks"]:
        if b["extra_info"]["kernel"] == "swiglu" and b["extra_info"]["stack"] == "ours":
            b["stats"]["median"] *= 1.2
    slower = tmp_path / "slower.benchmark.json"
    slower.write_text(json.dumps(doc_b))
    assert main(["regress", str(bench_json), str(slower)]) == 1
    flagged = _flagged(capsys)
    assert len(flagged) == 2 and all("swiglu" in f and "1.200×" in f for f in flagged), flagged


def test_pytest_bench_writes_device_time_and_extra_info_in_its_json(tmp_path):
    """`pytest bench/ --benchmark-json` on the CPU: one tiny case, wall clock in the interpreter
    (a check that the suite works; the GPU times device work). A subprocess, as a user runs it."""
    from workbench.bench import kernels as kbench

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # benchmarks are off in a worker
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                           f"--benchmark-json={out}", f"--benchmark-storage=file://{tmp_path / 'storage'}",
                           "-k", "rms_norm and ours"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    names = sorted(b["name"] for b in doc["benchmarks"])
    assert names == ["test_kernel[tiny-bfloat16-rms_norm-ours-fwd]", "test_kernel[tiny-bfloat16-rms_norm-ours-fwd_bwd]"]
    for b in doc["benchmarks"]:
        assert b["options"]["timer"].endswith("device_clock")  # the samples measure() took, not a host clock
        assert b["stats"]["rounds"] == len(b["stats"]["data"]) > 0 and b["stats"]["median"] > 0
        info = b["extra_info"]
        assert set(info) == set(kbench.EXTRA_INFO), sorted(info)
        assert (info["kernel"], info["stack"], info["shape_set"], info["dtype"]) == ("rms_norm", "ours", "tiny",
                                                                                     "bfloat16")
        assert info["pass"] == b["name"].rsplit("-", 1)[1].rstrip("]") and info["timing"] == "wall"
        assert info["bytes_moved"] > 0 and info["device"] and info["versions"]["torch"]
    section = doc["workbench"]
    assert (section["suite"], section["shape"], section["errors"]) == ("kernels", "tiny", [])
    assert section["command"].startswith("pytest bench/ ")
    report = kbench.from_benchmark_json(doc)
    assert [(r["kernel"], r["stack"]) for r in report["rows"]] == [("rms_norm", "ours"), ("rms_norm", "floor")]


@pytest.mark.parametrize("args, message", [
    (["bench", "kernels", "--shape", "llama3-8b"], "need a CUDA device"),
    (["bench", "kernels", "--shape", "tiny", "--only", "nope"], "unknown kernel"),
    (["bench", "kernels", "--shape", "tiny", "--only", "rms_norm", "--tag", "../x"], "part of a file name"),
])
def test_bench_user_errors(args, message, capsys):
    if "CUDA" in message and __import__("torch").cuda.is_available():
        pytest.skip("the message is about machines without CUDA")
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_every_suite_is_a_subcommand_and_an_unknown_one_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "inference"])
    assert stop.value.code == 2 and "invalid choice: 'inference'" in capsys.readouterr().err


def test_train_suite_compares_stacks_of_one_run_and_flags_loss_differences(tmp_path):
    from workbench.bench import train as tbench

    def run(stack, losses, step_s, peak):
        return {"mode": "lora", "stack": stack, "label": tbench.STACKS[stack], "exit_code": 0, "steps": len(losses),
                "step_s": step_s, "peak_memory_gib": peak, "tokens_per_s": 1.0, "final_loss": losses[-1],
                "kernels": None, "loss_curve": list(enumerate(losses, 1))}
    runs = [run("hf", [4.0, 3.0, 2.0], 0.2, 10.0), run("ours", [4.0, 3.003, 2.0], 0.1, 5.0),
            run("ours-gc", [4.0, 3.0, 2.1], 0.15, 2.0)]
    # Steady step times (after the warm-up) win over whole-run ones where both runs have them.
    runs[0]["steady_step_s"], runs[1]["steady_step_s"] = 0.3, 0.15
    c, gc = tbench.compare(runs)
    assert (c["stack"], gc["stack"]) == ("ours", "ours-gc")
    assert c["steps_compared"] == 3
    assert abs(c["max_rel_loss_diff"] - 1e-3) < 1e-12 and c["final_rel_loss_diff"] == 0.0
    assert c["speedup"] == 2.0 and c["memory_ratio"] == 0.5 and not c["loss_differs"]
    assert c["speed_measure"] == "steady" and gc["speed_measure"] == "whole run"
    # 5 % off at the last step: faster and leaner, but flagged.
    assert gc["loss_differs"] and abs(gc["final_rel_loss_diff"] - 0.05) < 1e-12 and gc["memory_ratio"] == 0.2
    result = {"shape": "tiny", "shape_dims": {}, "steps": 3, "batch": 2, "seed": 0, "runs": runs,
              "comparisons": [c, gc]}
    env = {"device": "cpu", "date": "2026-01-01", "torch": "x", "cuda": None, "triton": "x", "transformers": "x",
           "peft": "x"}
    png = tbench.plot(result, tmp_path / "curves.png")
    assert png.stat().st_size > 1000
    text = tbench.markdown(result, env, "workbench bench train", png.name)
    assert "| lora | ours | 3 | 0.00e+00 | 1.00e-03 | 0.00e+00 | — | 2.00x | 0.50 | agrees |" in text
    assert "| lora | ours-gc | 3 | 0.00e+00 | 5.00e-02 | 5.00e-02 | — | 1.33x (whole run) | 0.20 | **DIFFERS** |" in text
    # What a flag says about its cause: other data (the first batches' fingerprints), or a
    # different loss already at step 1, where every stack still has the same weights.
    fp = [{"tokens": 8, "token_sum": 100, "targets": 6, "target_sum": 70}]
    runs[0]["data_fingerprint"] = runs[1]["data_fingerprint"] = fp
    runs[2]["data_fingerprint"] = [dict(fp[0], targets=7, target_sum=75)]
    c, gc = tbench.compare(runs)
    assert c["same_data"] is True and gc["same_data"] is False
    assert "| — | 1.33x (whole run)" not in tbench.markdown(dict(result, comparisons=[c, gc]), env, "x", png.name)
    assert "**DIFFERS**: other data" in tbench.markdown(dict(result, comparisons=[c, gc]), env, "x", png.name)
    runs[2]["data_fingerprint"] = fp
    runs[2]["loss_curve"] = [(1, 4.02), (2, 3.0), (3, 2.1)]  # 5e-3 > 2^-8 at step 1
    gc = tbench.compare(runs)[1]
    assert gc["same_data"] is True and abs(gc["first_rel_loss_diff"] - 5e-3) < 1e-12
    assert "**DIFFERS**: already at step 1, same weights and same data" in tbench.markdown(
        dict(result, comparisons=[c, gc]), env, "x", png.name)
    runs[2]["loss_curve"] = [(1, 4.0), (2, 3.0), (3, 2.1)]
    runs[2].pop("data_fingerprint")
    # The kernels column says what ran in training, not what was patched (on the H200 the
    # QLoRA runs had rms_norm, rope and the fused loss patched, and none of them ran).
    runs[1]["kernels"] = {"swapped": {"rms_norm": {"LlamaRMSNorm": 5}, "rope": {"x": 2}},
                          "calls_in_training": {"lora_o": 6}}
    runs[2]["kernels"] = {"swapped": {"rms_norm": {"LlamaRMSNorm": 5}}, "calls_in_training": {}}
    text = tbench.markdown(result, env, "workbench bench train", png.name)
    row = next(line for line in text.splitlines() if line.startswith("| lora | ours (workbench.patch) |"))
    assert row.endswith("| lora_o ×6 |") and "rms_norm" not in row
    assert "| none ran (every call fell back) |" in text
    # A peer's row names the engine, and under DPO / ORPO whose loss ran (bench/stacks.Liger's record).
    runs[2].update(trl="1.16.0", kernels={"engine": "liger-kernel", "version": "0.8.5",
                                          "loss": "liger_kernel.chunked_loss.LigerFusedLinearDPOLoss"})
    text = tbench.markdown(result, env, "workbench bench train", png.name)
    assert "| liger-kernel 0.8.5 (trl 1.16.0), loss LigerFusedLinearDPOLoss |" in text


def test_batch_fingerprint_ignores_the_layout_and_sees_the_data():
    """B padded rows and the same sequences concatenated into one padding-free row (each
    sequence's first label masked, as padding-free collators do) give one fingerprint;
    another label mask or another token gives another."""
    import torch

    from workbench.data import batch_fingerprint

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, 6, 7, 8], [-100, -100, 11, -100]])
    rows = batch_fingerprint({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert rows == {"tokens": 7, "token_sum": 56, "targets": 4, "target_sum": 32}
    flat = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11]]),
            "labels": torch.tensor([[-100, 6, 7, 8, -100, -100, 11]])}
    assert batch_fingerprint(flat) == rows
    assert batch_fingerprint(dict(flat, labels=torch.tensor([[-100, 6, 7, 8, -100, 10, 11]]))) != rows
    assert batch_fingerprint(dict(flat, input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 12]]))) != rows
    assert batch_fingerprint({"input_ids": ids, "attention_mask": mask}) == {"tokens": 7, "token_sum": 56}


def test_steady_rate_times_the_steps_after_the_warm_up():
    from workbench.bench.train import steady_rate

    # 20 steps: a slow first step (compilation), then 0.5 s and 4096 tokens a step.
    log = [{"step": i, "loss": 1.0, "elapsed": 5.0 + 0.5 * (i - 1), "tokens": 4096 * i} for i in range(1, 21)]
    out = steady_rate(log, 20)
    assert out == {"steady_from_step": 4, "steady_step_s": 0.5, "steady_tokens_per_s": 8192.0}
    # The whole-run figure the warm-up distorts: 14.5 s / 20 steps.
    assert abs(log[-1]["elapsed"] / 20 - 0.725) < 1e-12
    assert steady_rate(log[:1], 20) == {}                                   # nothing after the warm-up
    assert steady_rate([{k: v for k, v in r.items() if k != "elapsed"} for r in log], 20) == {}  # an old log
    no_tokens = steady_rate([{**r, "tokens": None} for r in log], 20)
    assert no_tokens == {"steady_from_step": 4, "steady_step_s": 0.5}


def test_optional_train_stacks_are_skipped_with_a_reason_and_refused_when_asked_for(monkeypatch, capsys):
    import importlib.util

    from workbench.bench import train as tbench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("liger_kernel", "unsloth") else real(name, *a))
    monkeypatch.delenv(tbench.UNSLOTH_SITE, raising=False)
    run, skipped = tbench.available_stacks()
    assert "liger" not in run and skipped.pop("liger") == "liger-kernel is not installed"
    assert set(skipped) == {"unsloth", "unsloth-gc"} and "WORKBENCH_UNSLOTH_SITE" in skipped["unsloth"]
    assert {"hf", "hf-gc", "ours", "ours-gc"} <= set(run)
    # Our kernels are the ours stacks' only: the peers' are the stack's to apply (bench/stacks.py).
    assert tbench.config_for(Path("/x"), "lora", "liger", 3, 2, 0, None)["kernels"] is False
    assert tbench.config_for(Path("/x"), "lora", "ours-gc", 3, 2, 0, None)["kernels"] is True
    assert tbench.config_for(Path("/x"), "lora", "hf-gc", 3, 2, 0, None)["kernels"] is False
    # Asked for by name, a stack that cannot run is an error, not a quiet skip.
    assert main(["bench", "train", "--shape", "tiny", "--stacks", "hf,liger"]) == 2
    assert "--stacks liger: liger-kernel is not installed" in capsys.readouterr().err


def test_unsloth_stacks_run_from_their_own_site(monkeypatch, tmp_path):
    """Unsloth pins an older trl/datasets than ours: its stacks find it in a site folder of
    its own, put first on PYTHONPATH in their processes only."""
    import importlib.util

    from workbench.bench import train as tbench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "unsloth" else real(name, *a))
    site = tmp_path / "site-unsloth"
    monkeypatch.setenv(tbench.UNSLOTH_SITE, str(site))
    monkeypatch.setenv("PYTHONPATH", "/main/site")
    assert "unsloth" in tbench.available_stacks(("hf", "unsloth"))[1]  # the folder has no unsloth package yet
    assert tbench.stack_env("unsloth") is None
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text("")
    assert tbench.available_stacks(("unsloth",))[1] == {"unsloth": "unsloth needs a CUDA device"} \
        or __import__("torch").cuda.is_available()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    run, skipped = tbench.available_stacks(("hf", "unsloth", "unsloth-gc"))
    assert run == ["hf", "unsloth", "unsloth-gc"] and not skipped
    assert tbench.stack_env("unsloth-gc")["PYTHONPATH"] == f"{site.resolve()}{os.pathsep}/main/site"
    assert tbench.stack_env("ours") is None and tbench.stack_env("liger") is None
    cfg = tbench.config_for(tmp_path, "qlora", "unsloth-gc", 3, 2, 0, 64)
    assert cfg["kernels"] is False and cfg["training"]["gradient_checkpointing"] is True
    assert child.train_command("x.yaml", "run", "unsloth-gc")[2:5] == ["workbench.bench.train_child", "--stack",
                                                                        "unsloth-gc"]


@pytest.mark.parametrize("args, message", [
    (["--method", "kto"], "unknown --method 'kto'; use one of sft, dpo, orpo"),
    (["--method", "dpo", "--seq", "64"], "preference pairs, which are not packed; leave out --seq"),
    (["--method", "orpo", "--stacks", "hf,ours-offload"], "leave out ours-offload"),
    (["--method", "dpo", "--stacks", "hf,unsloth"], "Unsloth's trainer is not wired into the recipe for preference"),
    (["--method", "orpo", "--stacks", "hf,liger,unsloth-gc"], "; leave out unsloth-gc."),
])
def test_train_suite_refuses_what_a_preference_method_cannot_run(args, message, capsys, tmp_path):
    assert main(["bench", "train", "--shape", "tiny", "--modes", "lora", *args, "--run", str(tmp_path / "runs"),
                 "--report", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err  # one sentence
    assert not any(tmp_path.iterdir())   # refused before anything is written


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_train_suite_takes_liger_for_a_preference_method(method, monkeypatch, capsys, tmp_path):
    """The liger stack is one of a preference suite's (Liger's layer kernels through TRL's
    use_liger_kernel, and Liger's fused DPO / ORPO loss in our fused trainer: bench/stacks.Liger);
    it runs where liger-kernel and CUDA are, and asked for elsewhere it is refused for that, not
    the method."""
    import argparse
    import importlib.util

    from workbench.bench import train as tbench
    from workbench.cli.bench import check_modes_and_stacks

    assert "liger" in tbench.PREFERENCE_STACKS and not {"unsloth", "unsloth-gc", "ours-offload"} & \
        set(tbench.PREFERENCE_STACKS)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    assert main(["bench", "train", "--shape", "tiny", "--modes", "lora", "--method", method, "--stacks", "hf,liger",
                 "--run", str(tmp_path / "runs"), "--report", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err
    assert "--stacks liger: liger-kernel is not installed" in err and "wired" not in err
    assert not any(tmp_path.iterdir())
    # Where liger-kernel and CUDA are, the stack is taken, named or by default.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel"
                        else real(name, *a))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    named = argparse.Namespace(modes="lora", stacks="hf,liger", method=method)
    assert check_modes_and_stacks(named) == (["lora"], ["hf", "liger"])
    default = argparse.Namespace(modes="lora", stacks=None, method=method)
    assert check_modes_and_stacks(default) == (["lora"], list(tbench.PREFERENCE_STACKS))
    # Its config is the hf stack's: no kernels of ours; Liger's come from the stack's trainer arguments.
    cfg = tbench.config_for(Path("/x"), "lora", "liger", 3, 2, 0, None, method)
    assert cfg["kernels"] is False and cfg["training"]["method"] == method


def test_train_suite_help_names_the_preference_stacks(capsys, monkeypatch):
    from workbench.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")   # argparse wraps at the terminal's width, hyphens included
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "stacks hf, hf-gc, ours, ours-gc, ours-bf16, liger (Unsloth is not wired in)" in text
    assert ("Liger's (liger: Liger's layer kernels and its LigerFusedLinearDPOLoss / LigerFusedLinearORPOLoss, set "
            "to TRL's semantics, in the same TRL trainer as ours)") in text


def test_train_suite_runs_dpo_with_trls_loss_and_ours(tmp_path):
    """hf (TRL's DPO loss) and ours (our kernels and the fused preference loss) on the tiny shape,
    each in its own process: the same preference data, losses within the suite's band (fp32 on
    the CPU: far inside it), a report that names the method and a setup of its own."""
    from workbench.bench import current

    report = tmp_path / "reports"
    assert main(["bench", "train", "--shape", "tiny", "--modes", "lora", "--stacks", "hf,ours", "--method", "dpo",
                 "--steps", "3", "--batch", "2", "--run", str(tmp_path / "runs"), "--report", str(report)]) == 0
    [json_path] = report.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["method"] == "dpo" and [r["stack"] for r in doc["runs"]] == ["hf", "ours"]
    hf, ours = doc["runs"]
    assert all(r["exit_code"] == 0 and [s for s, _ in r["loss_curve"]] == [1, 2, 3] for r in doc["runs"])
    assert ours["kernels"]["calls_in_training"]["fused_linear_preference"] == 3 and hf["kernels"] is None
    [c] = doc["comparisons"]
    assert c["same_data"] is True and not c["loss_differs"] and c["max_rel_loss_diff"] < 1e-5
    yaml_text = (tmp_path / "runs" / "lora-ours.yaml").read_text()
    assert "method: dpo" in yaml_text and "kernels: true" in yaml_text
    md = json_path.with_suffix(".md").read_text()
    assert md.startswith("# Training runs (DPO)")
    assert ("(the loss is Liger's own LigerFusedLinearDPOLoss (sigmoid, summed completion log-probs) from "
            "`liger_kernel.chunked_loss`, set to TRL's semantics, in the same TRL trainer subclass as ours") in md
    assert "`ours` computes its loss in fused_linear_preference, `liger` in Liger's fused linear loss" in md
    assert current.setup(doc, "lora") == (("tiny", "lora", 2, None, "dpo"), "tiny, lora, DPO, batch 2 pairs")
    sft = {k: v for k, v in doc.items() if k != "method"}
    assert current.setup(sft, "lora")[0] == ("tiny", "lora", 2, None)   # an SFT report's setup, as before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message is about machines without CUDA")
def test_train_suite_needs_cuda_for_real_shapes(capsys):
    from workbench.cli import main

    assert main(["bench", "train", "--shape", "llama3.2-1b"]) == 2
    assert "need a CUDA device" in capsys.readouterr().err


# --------------------------------------------------------------------------- workbench regress
FIXTURES = Path(__file__).parent / "fixtures" / "bench"
KERNEL_REPORT = str(FIXTURES / "kernels-2026-11-23-nvidia-h100-80gb-hbm3.json")
TRAIN_REPORT = str(FIXTURES / "train-2026-11-23-nvidia-h100-80gb-hbm3.json")


def _report_pair(tmp_path, source, edit):
    """A real H100 report (a copy of the archive's) as baseline, and a copy changed by ``edit`` as the new run."""
    doc = json.loads(Path(source).read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    edit(doc)
    new = tmp_path / "new.json"
    new.write_text(json.dumps(doc))
    return str(old), str(new)


def _row(doc, **match):
    rows = doc["rows"] if doc["suite"] == "kernels" else doc["runs"]
    (row,) = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return row


def _flagged(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if "**" in line and line.startswith("| ")]


def test_regress_passes_an_identical_rerun_and_small_noise(tmp_path, capsys):
    def noise(doc):
        for r in doc["rows"]:
            if r["fwd_bwd_ms"]:
                r["fwd_bwd_ms"] *= 1.05  # within the 10 % time threshold
    old, new = _report_pair(tmp_path, KERNEL_REPORT, noise)
    assert main(["regress", old, new, "--out", str(tmp_path / "cmp.md")]) == 0
    assert _flagged(capsys) == [] and "no regression" in (tmp_path / "cmp.md").read_text()


def test_regress_flags_a_slower_kernel_more_memory_and_a_new_failure(tmp_path, capsys):
    def worse(doc):
        _row(doc, kernel="rms_norm", stack="ours")["fwd_bwd_ms"] *= 1.2
        _row(doc, kernel="fused_linear_cross_entropy", stack="ours")["peak_extra_gib"] *= 1.1
        _row(doc, kernel="swiglu", stack="ours")["error"] = "RuntimeError: boom"
        _row(doc, kernel="rope", stack="ours")["fwd_ms"] *= 0.5  # faster: fine
    old, new = _report_pair(tmp_path, KERNEL_REPORT, worse)
    assert main(["regress", old, new]) == 1
    flagged = _flagged(capsys)
    assert len(flagged) == 3, flagged
    assert any("rms_norm" in f and "fwd_bwd_ms" in f and "1.200×" in f for f in flagged)
    assert any("fused_linear_cross_entropy" in f and "peak_extra_gib" in f for f in flagged)
    assert any("swiglu" in f and "fails now: RuntimeError: boom" in f for f in flagged)


def test_regress_on_train_reports_flags_lower_throughput_and_a_moved_loss(tmp_path, capsys):
    def worse(doc):
        _row(doc, mode="lora", stack="ours")["tokens_per_s"] *= 0.8
        _row(doc, mode="qlora", stack="ours")["final_loss"] *= 1.03
        _row(doc, mode="lora", stack="hf")["tokens_per_s"] *= 1.5  # faster baseline: fine
    old, new = _report_pair(tmp_path, TRAIN_REPORT, worse)
    assert main(["regress", old, new]) == 1
    flagged = _flagged(capsys)
    assert len(flagged) == 2, flagged
    assert any("lora / ours" in f and "tokens_per_s" in f for f in flagged)
    assert any("qlora / ours" in f and "final_loss" in f for f in flagged)


def test_regress_refuses_other_devices_and_other_suites(tmp_path, capsys):
    def other_device(doc):
        doc["environment"]["device"] = "NVIDIA H200"
    old, new = _report_pair(tmp_path, KERNEL_REPORT, other_device)
    assert main(["regress", old, new]) == 2
    assert "different devices" in capsys.readouterr().err
    assert main(["regress", old, new, "--allow-other-device"]) == 0
    capsys.readouterr()
    assert main(["regress", old, TRAIN_REPORT]) == 2
    assert "cannot compare a kernels report with a train report" in capsys.readouterr().err
    assert main(["regress", old, str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_regress_refuses_reports_timed_differently_and_skips_rows_timed_differently(tmp_path, capsys):
    # CUDA graphs leave out the launch overhead that CUDA events include: a ratio across them is no regression.
    def graphs(doc):
        doc["timing"] = "graph"
    old, new = _report_pair(tmp_path, KERNEL_REPORT, graphs)  # the H100 report predates the choice: events
    assert main(["regress", old, new]) == 2
    assert "timed differently (events vs graph" in capsys.readouterr().err

    def one_case_fell_back(doc):
        for r in doc["rows"]:
            r["timing"] = "events" if r["kernel"] == "cross_entropy" else "graph"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, new = _report_pair(tmp_path / "a", KERNEL_REPORT, lambda doc: [r.update(timing="graph") for r in doc["rows"]])
    _, new2 = _report_pair(tmp_path / "b", KERNEL_REPORT, one_case_fell_back)
    assert main(["regress", new, new2]) == 0
    out = capsys.readouterr().out
    assert "timed with graph before and events now: not compared" in out and _flagged_lines(out) == []


def _flagged_lines(text):
    return [line for line in text.splitlines() if "**" in line and line.startswith("| ")]


CONTEXT_REPORT = str(FIXTURES / "context-2026-11-30-nvidia-h200-full-262144.json")


def test_regress_on_context_reports_flags_a_shorter_fit_and_more_memory_at_a_length(tmp_path, capsys):
    """Context searches compare by their longest fit (which may not shrink) and their peak
    at every length that fitted in both; a search that fits nothing now is flagged too."""
    def unchanged(doc):
        pass
    old, same = _report_pair(tmp_path, CONTEXT_REPORT, unchanged)
    assert main(["regress", old, same]) == 0
    out = capsys.readouterr().out
    assert "the longest fit may not shrink" in out and "final loss" not in out and _flagged_lines(out) == []
    assert "| qlora / ours-gc | max_fit | 147456 | 147456 | 1.000× |" in out
    assert "| qlora / ours-offload | peak_memory_gib@262144 | 94.91 | 94.91 | 1.000× |" in out

    def worse(doc):
        ours_gc = next(r for r in doc["rows"] if r["stack"] == "ours-gc")
        ours_gc["max_fit"], ours_gc["first_miss"] = 131072, 147456
        ours_gc["trials"][-1]["fits"] = False  # 147456 now runs out of memory
        offload = next(r for r in doc["rows"] if r["stack"] == "ours-offload")
        offload["trials"][2]["peak_memory_gib"] *= 1.05  # 131072: 5 % more
        hf = next(r for r in doc["rows"] if r["stack"] == "hf-gc")
        hf["trials"][0]["peak_memory_gib"] *= 1.01  # within the 2 % memory threshold
        unsloth = next(r for r in doc["rows"] if r["stack"] == "unsloth-gc")
        unsloth["max_fit"], unsloth["first_miss"] = None, 32768
        for t in unsloth["trials"]:
            t["fits"] = False
    (tmp_path / "w").mkdir()
    old, new = _report_pair(tmp_path / "w", CONTEXT_REPORT, worse)
    assert main(["regress", old, new]) == 1
    flagged = _flagged_lines(capsys.readouterr().out)
    assert len(flagged) == 3, flagged
    assert any("ours-gc | max_fit | 147456 | 131072" in f for f in flagged)
    assert any("ours-offload | peak_memory_gib@131072" in f and "1.050×" in f for f in flagged)
    assert any("unsloth-gc | max_fit" in f and "not even the start now" in f for f in flagged)
    # A longer fit is no regression.
    (tmp_path / "b").mkdir()
    old, new = _report_pair(tmp_path / "b", CONTEXT_REPORT, lambda doc: doc["rows"][1].update(max_fit=155648))
    assert main(["regress", old, new]) == 0


def test_regress_on_a_context_search_stopped_midway_says_so(tmp_path, capsys):
    def stopped(doc):
        doc["rows"][3].update(searching=True, max_fit=131072, trials=doc["rows"][3]["trials"][:3])
        doc["complete"] = False
    old, new = _report_pair(tmp_path, CONTEXT_REPORT, stopped)
    assert main(["regress", old, new]) == 1
    flagged = _flagged_lines(capsys.readouterr().out)
    assert len(flagged) == 1 and "ours-offload" in flagged[0] and "search not finished" in flagged[0]


def test_regress_refuses_context_searches_run_with_other_options(tmp_path, capsys):
    old, new = _report_pair(tmp_path, CONTEXT_REPORT, lambda doc: doc.update(granularity=8192))
    assert main(["regress", old, new]) == 2
    assert "the context searches differ in granularity (16384 vs 8192)" in capsys.readouterr().err


def test_kernel_timing_choices():
    import torch

    from workbench.bench import kernels as kbench

    with pytest.raises(ValueError, match="timing must be one of"):
        kbench._timer(torch.device("cpu"), "sometimes")
    assert kbench.graph_blocker({"x": lambda: 1 / 0}, torch.device("cpu")) is None  # nothing to capture on the CPU
    doc = {"shape": "tiny", "shape_dims": {}, "dtype": "bfloat16", "timing": "graph", "rows": [
        {"kernel": "rms_norm", "shape": "s", "stack": "ours", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "peak_extra_gib": 0.1,
         "error": None, "timing": "events", "extra": {"timing_note": "CUDA events in every stack of this kernel: x"}}]}
    env = {"device": "d", "date": "2026-11-29", "torch": "t", "cuda": "c", "triton": "tr", "transformers": "tf"}
    text = kbench.markdown(doc, env, "workbench bench")
    assert "do_bench_cudagraph" in text and "| CUDA events in every stack of this kernel: x |" in text


# --------------------------------------------------------------------------- context search
def test_context_search_doubles_then_bisects_to_the_granularity():
    from workbench.bench.context import search

    seen = []

    def trial(seq):
        seen.append(seq)
        return {"fits": seq <= 21000}
    r = search(trial, start=2048, limit=131072, granularity=1024)
    assert seen[:5] == [2048, 4096, 8192, 16384, 32768]  # doubling until the first miss
    assert r["max_fit"] == 20480 and r["first_miss"] == 21504 and r["error"] is None
    assert r["first_miss"] - r["max_fit"] == 1024 and all(s % 1024 == 0 for s in seen)
    # Every length it kept as fitting did fit, and the first miss did not.
    assert trial(r["max_fit"])["fits"] and not trial(r["first_miss"])["fits"]


def test_context_search_edges_and_a_crash_is_not_a_memory_limit():
    from workbench.bench.context import search

    assert search(lambda s: {"fits": False})["max_fit"] is None
    everything = search(lambda s: {"fits": True}, limit=16384)
    assert everything["max_fit"] == 16384 and everything["first_miss"] is None
    crashed = search(lambda s: {"fits": True} if s < 8192 else {"error": "exit code 1: Segmentation fault"})
    assert crashed["error"] == "exit code 1: Segmentation fault" and crashed["max_fit"] == 4096
    assert crashed["first_miss"] is None  # unknown: the crash says nothing about memory


def test_context_search_tries_the_limit_itself():
    """A start that does not double onto the limit: the last doubling is clamped, so the
    limit is tried rather than the search stopping below it."""
    from workbench.bench.context import search

    seen = []

    def trial(seq):
        seen.append(seq)
        return {"fits": True}
    r = search(trial, start=24576, limit=131072, granularity=8192)
    assert seen == [24576, 49152, 98304, 131072] and r["max_fit"] == 131072 and r["first_miss"] is None
    seen.clear()
    assert search(trial, start=262144, limit=131072)["max_fit"] == 131072 and seen == [131072]


def test_context_suite_passes_its_search_options(monkeypatch, tmp_path, capsys):
    """--seq, --max-seq, --granularity and --steps reach the search; the report names them."""
    import torch

    from workbench.bench import context

    seen = {}

    def fake_run(shape, modes, stacks, out, **kwargs):
        seen.update(kwargs, shape=shape, modes=modes, stacks=stacks)
        return {"shape": shape, "shape_dims": {}, "batch": 1, "start": kwargs["start"], "limit": kwargs["limit"],
                "granularity": kwargs["granularity"], "steps": kwargs["steps"],
                "rows": [{"mode": "qlora", "stack": "ours-gc", "max_fit": 131072, "first_miss": None,
                          "granularity": kwargs["granularity"], "error": None,
                          "trials": [{"seq": 131072, "fits": True, "peak_memory_gib": 40.0,
                                      "peak_reserved_gib": 44.5, "step_s": 61.0}]}]}
    from workbench import envinfo
    from workbench.cli import bench as bench_cli

    env = envinfo.environment()  # this machine's, taken before CUDA is faked below
    monkeypatch.setattr(bench_cli, "environment_of_a_child", lambda: dict(env, device="Fake GPU"))
    monkeypatch.setattr(context, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "context", "--stacks", "ours-gc", "--seq", "32768", "--max-seq", "131072",
                 "--granularity", "8192", "--steps", "1", "--report", str(tmp_path)]) == 0
    assert callable(seen.pop("partial"))  # the report is rewritten after every trial
    assert seen == {"start": 32768, "limit": 131072, "granularity": 8192, "steps": 1, "shape": "llama3.1-8b",
                    "modes": ["qlora"], "stacks": ["ours-gc"], "devices": None}
    text = next(tmp_path.glob("*.md")).read_text()
    assert "bisection down to 8192 tokens" in text and "1 steps per trial" in text
    assert "| qlora | ours-gc | 131072 | (none up to 131072) | 40.00 | 44.50 | 61.00 | 1 |" in text
    assert "## Against the previous report" in text and "No earlier context report" in text
    assert main(["bench", "context", "--seq", "4096", "--max-seq", "2048"]) == 2
    assert "--max-seq" in capsys.readouterr().err


def test_context_search_beyond_the_shapes_positions_raises_them_and_says_so(tmp_path, monkeypatch):
    """--max-seq above the shape's max_position_embeddings: the search's checkpoint gets that
    many positions (a checkpoint of its own, not the shorter one), and the report says that
    lengths past the real limit measure memory and speed only."""
    import json

    from workbench.bench import context, train as tbench

    monkeypatch.setattr(context, "train_trial", lambda *a, **k: (lambda seq: {"fits": True, "step_s": 1.0}))
    result = context.run("tiny", ["lora"], ["hf"], tmp_path, start=256, limit=1024, steps=1,
                         progress=lambda _: None)
    config = json.loads((tmp_path / "base-tiny-pos1024" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and result["positions_raised_to"] == 1024
    assert result["rows"][0]["max_fit"] == 1024
    env = {"device": "cpu", "date": "today", "torch": "t", "cuda": "c", "triton": "t", "transformers": "t",
           "peft": "p"}
    assert "position limit (512) is raised to 1024" in context.markdown(result, env, "cmd")
    # Within the shape's limit nothing changes: the plain checkpoint, its own positions.
    result = context.run("tiny", ["lora"], ["hf"], tmp_path, start=256, limit=512, steps=1, progress=lambda _: None)
    assert result["positions_raised_to"] is None
    assert json.loads((tmp_path / "base-tiny" / "config.json").read_text())["max_position_embeddings"] == 512
    assert "is raised" not in context.markdown(result, env, "cmd")
    assert tbench.SHAPES["tiny"]["max_position_embeddings"] == 512  # the shape table itself is untouched


def test_context_trial_tells_out_of_memory_from_other_failures(tmp_path, monkeypatch):
    """A trial runs `workbench train`; only the train stage's out-of-memory message
    means "does not fit"."""
    import subprocess

    from workbench import config
    from workbench.bench import child, context
    from workbench.trainer import oom_message

    assert context.OOM_MARK in oom_message(config.load(None))
    answers = iter([(2, "train: ...\nworkbench: error: " + oom_message(config.load(None))),
                    (1, "Traceback ...\nRuntimeError: CUDA error: an illegal memory access")])

    def fake_run(cmd, **kwargs):
        code, err = next(answers)
        return subprocess.CompletedProcess(cmd, code, "", err)
    monkeypatch.setattr(child, "run_child", fake_run)
    trial = context.train_trial(tmp_path / "base", "qlora", "ours", tmp_path)
    assert trial(4096) == {"fits": False, "wall_s": pytest.approx(0, abs=5)}
    r = trial(8192)
    assert "fits" not in r and r["error"].startswith("exit code 1: RuntimeError: CUDA error")
    cfg = (tmp_path / "qlora-ours-8192.yaml").read_text()
    assert "packing: wrapped" in cfg and "max_seq_len: 8192" in cfg and "batch_size: 1" in cfg


def test_context_trial_that_trained_shorter_sequences_is_an_error_not_a_fit(tmp_path, monkeypatch):
    """A trial "fits" only when its steps trained full sequences of the length tried (the
    fingerprints of its micro-batches): before the wrapped packing was fixed, trials at 131072
    trained on ~26.5K-token sequences and reported the memory of those as 131072's."""
    import subprocess

    from workbench.bench import child, context

    def fake_run(cmd, **kwargs):
        run_dir = Path(cmd[cmd.index("--run") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        seq = int(run_dir.name.rsplit("-", 1)[1])
        held = seq if seq == 4096 else 26500
        (run_dir / "manifest.json").write_text(json.dumps({"stages": {"train": {
            "tokens": None,  # Unsloth's log has no token count: the fingerprints are what counts
            "data_fingerprint": [{"tokens": held, "token_sum": 1}, {"tokens": held, "token_sum": 2}],
            "steps": 2, "peak_memory_gib": 1.0, "peak_reserved_gib": 1.5, "timings": {"train_s": 2.0}}}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(child, "run_child", fake_run)
    trial = context.train_trial(tmp_path / "base", "qlora", "ours", tmp_path, steps=2)
    assert trial(4096)["fits"] is True
    r = trial(131072)
    assert "fits" not in r and r["error"] == "the trial's first micro-batches held [26500, 26500] tokens, not 131072 each"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message is about machines without CUDA")
def test_context_suite_needs_cuda(capsys):
    assert main(["bench", "context"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def _fake_train_runs(monkeypatch, stop_at: int):
    """Stand-in for the suites' training children (bench/child.py): each writes a finished run's
    manifest and loss log; call ``stop_at`` raises SystemExit(143) as SIGTERM does under
    workbench.cli's handler."""
    import subprocess

    from workbench.bench import child

    calls = []

    def fake_run(cmd, **kwargs):
        assert "workbench.bench.train_child" in cmd and "--run" in cmd
        calls.append(cmd)
        if len(calls) == stop_at:
            raise SystemExit(143)
        run_dir = Path(cmd[cmd.index("--run") + 1])
        (run_dir / "train").mkdir(parents=True, exist_ok=True)
        (run_dir / "train" / "loss.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 5.0 - s, "elapsed": s * 0.5, "tokens": 64 * s}) + "\n"
                    for s in (1, 2, 3)))
        (run_dir / "manifest.json").write_text(json.dumps({"stages": {"train": {
            "tokens": 192, "tokens_per_s": 100.0, "peak_memory_gib": None, "steps": 3, "final_loss": 2.0,
            "timings": {"train_s": 1.5}, "data_fingerprint": [{"tokens": 64, "token_sum": 1}]}}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(child, "run_child", fake_run)
    return calls


def test_a_train_suite_stopped_midway_leaves_a_report_of_the_runs_it_finished(tmp_path, monkeypatch):
    """After each run the report is rewritten (atomically), marked incomplete until the last:
    a command killed by its time limit keeps what it measured, says so, and is no baseline
    for the next report's comparison."""
    from workbench.bench import compare

    calls = _fake_train_runs(monkeypatch, stop_at=3)
    report = tmp_path / "reports"
    with pytest.raises(SystemExit):
        main(["bench", "train", "--shape", "tiny", "--modes", "lora", "--stacks", "hf,hf-gc,ours,ours-gc",
              "--steps", "3", "--batch", "2", "--run", str(tmp_path / "runs"), "--report", str(report)])
    assert len(calls) == 3
    [json_path] = report.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["complete"] is False and doc["incomplete"] == {"done": 2, "planned": 4}
    assert [r["stack"] for r in doc["runs"]] == ["hf", "hf-gc"]
    text = json_path.with_suffix(".md").read_text()
    assert "**Incomplete:** written after 2 of 4 runs" in text and "| lora | hf-gc |" in text
    assert json_path.with_suffix(".png").is_file()
    assert compare.previous_report(report, {**doc, "complete": True}, "other.json") is None

    # The same command run to its end: a complete report, which a later report may take as its baseline.
    _fake_train_runs(monkeypatch, stop_at=0)
    assert main(["bench", "train", "--shape", "tiny", "--modes", "lora", "--stacks", "hf,hf-gc,ours,ours-gc",
                 "--steps", "3", "--batch", "2", "--run", str(tmp_path / "runs"), "--report", str(report)]) == 0
    doc = json.loads(json_path.read_text())
    assert doc["complete"] is True and "incomplete" not in doc and len(doc["runs"]) == 4
    assert "Incomplete" not in json_path.with_suffix(".md").read_text()
    assert compare.previous_report(report, {**doc, "environment": {**doc["environment"], "time_utc": "9"}},
                                   "other.json") == json_path


def test_a_context_search_reports_its_bounds_after_every_trial(tmp_path, monkeypatch):
    from workbench.bench import context

    fits_up_to = {"hf": 4096, "ours": 16384}
    monkeypatch.setattr(context, "train_trial", lambda checkpoint, mode, stack, out, steps, device: (
        lambda seq: {"fits": seq <= fits_up_to[stack], "step_s": 1.0}))
    partials = []
    result = context.run("tiny", ["lora"], ["hf", "ours"], tmp_path, start=1024, limit=32768, granularity=1024,
                         steps=1, progress=lambda _: None, partial=partials.append)
    assert [r["max_fit"] for r in result["rows"]] == [4096, 16384] and "incomplete" not in result
    # After hf's third trial (1024, 2048, 4096 fit): its bounds so far, no row of ours yet.
    third = partials[2]
    assert third["incomplete"] == {"done": 0, "planned": 2}
    assert [(r["stack"], r["max_fit"], r["first_miss"], r["searching"]) for r in third["rows"]] == [
        ("hf", 4096, None, True)]
    env = {"device": "cpu", "date": "today", "torch": "t", "cuda": "c", "triton": "t", "transformers": "t",
           "peft": "p"}
    text = context.markdown(third, env, "cmd")
    assert "**Incomplete:** written after 0 of 2 (mode, stack) searches" in text
    assert "| lora | hf | 4096 | — |" in text and "search not finished: the bounds so far" in text
    # Once hf's search has ended, its row is final and ours is the one in search.
    later = next(p for p in partials if len(p["rows"]) == 2)
    assert later["rows"][0] == result["rows"][0] and later["rows"][1]["searching"]


def test_sigterm_stops_a_suite_as_an_exception_and_the_handler_is_put_back():
    import signal

    from workbench.cli.common import stopped_by_signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        with stopped_by_signal():
            handler = signal.getsignal(signal.SIGTERM)
            assert handler is not before
            handler(signal.SIGTERM, None)  # as the interpreter calls it on a SIGTERM (none is sent here)
    assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_with_cuda_the_suite_process_writes_no_checkpoint_itself(tmp_path, monkeypatch):
    """The process that launches the runs never builds the model on the GPU: the checkpoint is
    written by a child, so no memory of it stays cached in the launcher during the runs."""
    import subprocess

    from workbench.bench import train as tbench

    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        out = Path(cmd[4])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(tbench.subprocess, "run", fake_run)
    monkeypatch.setattr(tbench, "write_checkpoint_here", lambda *a, **k: pytest.fail("built in the launcher"))
    path = tbench.write_checkpoint("tiny", tmp_path / "base-tiny", 3, positions=1024)
    assert path == tmp_path / "base-tiny" and len(seen) == 1
    assert "write_checkpoint_here" in seen[0][2] and seen[0][3:] == ["tiny", str(path), "3", "1024"]
    assert tbench.write_checkpoint("tiny", tmp_path / "base-tiny") == path and len(seen) == 1  # reused


# --------------------------------------------------------------------------- context search on several GPUs
def test_context_searches_on_several_gpus_run_at_once_each_on_its_own(tmp_path, monkeypatch):
    """--devices 0,1: two searches at a time, one per GPU; the rows keep the order of the
    stacks given, each says its GPU, and the report says how the GPUs were shared."""
    import threading
    import time

    from workbench.bench import context

    fits_up_to = {"hf-gc": 4096, "ours-gc": 16384, "ours-offload": 32768}
    both_started = threading.Barrier(2, timeout=20)  # broken (a test failure) if the first two are not concurrent
    first = set()
    made = []

    def fake_trial(checkpoint, mode, stack, out, steps, device):
        made.append((stack, device))

        def trial(seq):
            if stack not in first:
                first.add(stack)
                if len(first) <= 2:
                    both_started.wait()
            if stack == "ours-gc":
                time.sleep(0.2)  # the long search: hf-gc's GPU is free first
            return {"fits": seq <= fits_up_to[stack], "step_s": 1.0, "peak_memory_gib": seq / 1024}
        return trial
    monkeypatch.setattr(context, "train_trial", fake_trial)
    partials = []
    result = context.run("tiny", ["qlora"], list(fits_up_to), tmp_path, start=1024, limit=32768, granularity=1024,
                         steps=1, progress=lambda _: None, partial=partials.append, devices=["0", "1"])
    assert [r["stack"] for r in result["rows"]] == ["hf-gc", "ours-gc", "ours-offload"]
    assert [r["max_fit"] for r in result["rows"]] == [4096, 16384, 32768] and "incomplete" not in result
    assert result["devices"] == ["0", "1"] and {r["device"] for r in result["rows"]} <= {"0", "1"}
    assert made[:2] in ([("hf-gc", "0"), ("ours-gc", "1")], [("ours-gc", "1"), ("hf-gc", "0")])
    # ours-offload went to whichever GPU finished first: hf-gc's (fewer trials).
    assert made[2] == ("ours-offload", "0") and result["rows"][2]["device"] == "0"
    # Every partial report lists the rows in the given order, never one twice.
    for doc in partials:
        stacks = [r["stack"] for r in doc["rows"]]
        assert stacks == [s for s in fits_up_to if s in stacks]
    assert len(partials) == sum(len(r["trials"]) for r in result["rows"])
    env = {"device": "cpu", "date": "today", "torch": "t", "cuda": "c", "triton": "t", "transformers": "t",
           "peft": "p"}
    text = context.markdown(result, env, "cmd")
    assert "**GPUs:** 2 of this host (`CUDA_VISIBLE_DEVICES` 0, 1), one search on each at a time" in text
    assert "| qlora | ours-gc | 16384 | 17408 | 16.00 | — | 1.00 | 10 | GPU 1 |" in text


def test_a_context_trial_runs_on_the_gpu_it_is_given(tmp_path, monkeypatch):
    import subprocess

    from workbench.bench import context

    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs)
        return subprocess.CompletedProcess(cmd, 1, "", "boom")
    monkeypatch.setattr(child, "run_child", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    context.train_trial(tmp_path / "base", "qlora", "ours", tmp_path, device="1")(4096)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "1" and seen["env"]["PATH"] == os.environ["PATH"]
    context.train_trial(tmp_path / "base", "qlora", "ours", tmp_path)(4096)
    assert seen["env"] is None  # no device: the suite's own environment, as before


def test_a_stop_during_parallel_searches_kills_their_trials(tmp_path):
    """SIGTERM (SystemExit under workbench.cli) reaches only the main thread: the trials the
    other threads started are killed, and no further search begins."""
    import signal
    import time

    from workbench.bench import child, context

    started, stopped = [], []

    def search_one(mode, stack, device):
        started.append(stack)
        try:
            child.run_child([sys.executable, "-c", "import time; time.sleep(60)"])
        except child.Stopped:  # not a result: a search records no trial for it
            stopped.append(stack)
            raise

    def stop(signum, frame):
        raise SystemExit(143)
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(SystemExit):
            context._in_parallel([("qlora", "a"), ("qlora", "b"), ("qlora", "c")], ["0", "1"], search_one)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - t0 < 30  # the sleeping children were killed, not waited for
    assert sorted(started) == ["a", "b"] and sorted(stopped) == ["a", "b"]
    assert not child._CHILDREN and not child._KILLED


def test_a_failing_search_on_one_gpu_is_raised_after_the_others_end():
    from workbench.bench import context

    ended = []

    def search_one(mode, stack, device):
        if stack == "bad":
            raise RuntimeError("the checkpoint is unreadable")
        ended.append(stack)
    with pytest.raises(RuntimeError, match="unreadable"):
        context._in_parallel([("lora", "bad"), ("lora", "good")], ["0", "1"], search_one)
    assert ended in (["good"], [])  # the other search may have started; none starts after the failure


def test_context_suite_devices_are_checked_and_follow_cuda_visible_devices(monkeypatch, tmp_path, capsys):
    import torch

    from workbench import envinfo
    from workbench.bench import context
    from workbench.cli import bench as bench_cli

    seen = {}

    def fake_run(shape, modes, stacks, out, **kwargs):
        seen.update(kwargs)
        return {"shape": shape, "shape_dims": {}, "batch": 1, "start": 1, "limit": 2, "granularity": 1, "steps": 1,
                "rows": []}
    env = envinfo.environment()
    monkeypatch.setattr(bench_cli, "environment_of_a_child", lambda: dict(env, device="Fake GPU"))
    monkeypatch.setattr(context, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = ["bench", "context", "--report", str(tmp_path), "--run", str(tmp_path / "runs")]
    assert main([*args, "--devices", "0,1"]) == 0 and seen["devices"] == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert main([*args, "--devices", "1,0"]) == 0 and seen["devices"] == ["6", "4"]
    assert main([*args, "--devices", "all"]) == 0 and seen["devices"] == ["4", "6"]
    for bad in ("0,2", "0,0", "x"):
        seen.clear()
        assert main([*args, "--devices", bad]) == 2 and not seen
        assert "--devices takes distinct GPU indices below 2" in capsys.readouterr().err


def test_regress_against_a_stopped_baseline_compares_only_what_it_measured(tmp_path, capsys):
    """A baseline stopped midway (the previous night cut short) measured less: its unfinished
    search and the rows it lacks are named as not compared, and the header says the verdict
    does not cover them, where a plain 'no regression' would stand for rows nobody checked."""
    old = json.loads(Path(CONTEXT_REPORT).read_text())
    stopped = {**old, "complete": False, "incomplete": {"done": 1, "planned": 5},
               "rows": [old["rows"][0], {**old["rows"][1], "searching": True, "max_fit": 32768}]}
    (tmp_path / "old.json").write_text(json.dumps(stopped))
    assert main(["regress", str(tmp_path / "old.json"), CONTEXT_REPORT]) == 0
    out = capsys.readouterr().out
    assert "The baseline is incomplete** (1 of 5 planned)" in out
    second, rest = old["rows"][1], old["rows"][2:]
    assert f"| {second['mode']} / {second['stack']} | - |  |  |  | search not finished in the baseline" in out
    for row in rest:
        assert f"| {row['mode']} / {row['stack']} | - |  |  |  | not in the baseline: not compared |" in out
    assert f"| {old['rows'][0]['mode']} / {old['rows'][0]['stack']} | max_fit |" in out
    assert main(["regress", CONTEXT_REPORT, CONTEXT_REPORT]) == 0
    assert "incomplete" not in capsys.readouterr().out


def test_train_suite_times_the_trl_loop_against_the_plain_loop(tmp_path, monkeypatch, capsys):
    """--plain-loop: after each (here stand-in) TRL run, the step suite's plain loop really runs
    on the same checkpoint and batch shape, and the report says how much longer the TRL step is."""
    from workbench.bench import child

    real = child.run_child
    _fake_train_runs(monkeypatch, stop_at=0)
    fake = child.run_child
    monkeypatch.setattr(child, "run_child", lambda cmd, **kw: real(cmd, **kw) if "workbench.bench.step" in cmd
                        else fake(cmd, **kw))
    report = tmp_path / "reports"
    args = ["bench", "train", "--shape", "tiny", "--modes", "lora", "--stacks", "hf,ours", "--steps", "3", "--batch",
            "1", "--run", str(tmp_path / "runs"), "--report", str(report)]
    assert main([*args, "--plain-loop", "2"]) == 2  # no --seq: nothing to time the plain loop on
    assert "needs --seq" in capsys.readouterr().err and not report.exists()
    assert main([*args, "--seq", "32", "--plain-loop", "0"]) == 2
    assert "a number of steps >= 1, got 0" in capsys.readouterr().err and not report.exists()
    assert main([*args, "--seq", "32", "--plain-loop", "2"]) == 0
    [doc] = [json.loads(p.read_text()) for p in report.glob("*.json")]
    for r in doc["runs"]:
        plain = r["plain_loop"]
        assert "error" not in plain, plain
        assert plain["step_s"] > 0 and (plain["steps"], plain["warmup"], plain["autocast"]) == (2, 3, "off")
        assert r["loop_overhead"] == pytest.approx(r["steady_step_s"] / plain["step_s"] - 1)
    text = next(report.glob("*.md")).read_text()
    assert "### The TRL loop against the plain loop" in text
    hf = doc["runs"][0]
    assert f"| lora | hf | {hf['steady_step_s']:.4f} | {hf['plain_loop']['step_s']:.4f} | " \
           f"{100 * hf['loop_overhead']:+.1f} % |" in text


def test_train_suite_profiles_the_trl_loop_by_phase(tmp_path):
    """--profile: a short second run per stack, really trained here, with each phase of the
    Trainer's loop timed once per profiled step; the report names each phase with its time."""
    from workbench.bench import loop_profile
    from workbench.bench import train as tbench

    report = tmp_path / "reports"
    assert main(["bench", "train", "--shape", "tiny", "--modes", "lora", "--stacks", "hf", "--steps", "3",
                 "--batch", "1", "--seq", "32", "--profile", "--run", str(tmp_path / "runs"),
                 "--report", str(report)]) == 0
    [doc] = [json.loads(p.read_text()) for p in report.glob("*.json")]
    [run] = doc["runs"]
    prof = run["loop_profile"]
    assert "error" not in prof, prof
    assert prof["steps"] == loop_profile.STEPS and prof["wall_ms_per_step"] > 0
    phases = {p["phase"]: p for p in prof["phases"]}
    # Every phase the loop ran, once a profiled step (the window is whole steps).
    for name in ("fetch batch", "forward + backward", "in it: model.train() (every module)", "clip gradients",
                 "optimizer step", "model.zero_grad() (every parameter)", "LR schedule", "callbacks: step begin",
                 "callbacks: step end", "log (reads loss, grad norm)"):
        assert phases[name]["calls_per_step"] == 1.0, (name, phases[name])
        assert phases[name]["host_ms_per_step"] > 0, name
    assert (report / prof["trace"]).is_file() and (report / prof["summary"]).is_file()
    text = next(report.glob("*.md")).read_text()
    assert "### Where the TRL loop's step goes" in text
    assert f"| forward + backward | {phases['forward + backward']['host_ms_per_step']:.2f} |" in text
    assert f"steps {tbench.PROFILE_AFTER + 1} to {tbench.PROFILE_AFTER + loop_profile.STEPS}" in text
