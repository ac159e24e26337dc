"""The step suite (`workbench bench step`) on the CPU: one end-to-end run of hf and ours
on the tiny shape (ours' kernels in the Triton interpreter), and the parts that need no run.
No timing is asserted: on the CPU the numbers mean nothing."""
import json
import math

import pytest

from workbench.cli import main


def test_step_suite_runs_hf_and_ours_and_writes_its_report(tmp_path, monkeypatch):
    from workbench.bench import step, train as tbench

    monkeypatch.setattr(step, "PROFILE_STEPS", 1)  # the launcher sends it to the children
    report = tmp_path / "reports"
    assert main(["bench", "step", "--shape", "tiny", "--modes", "lora", "--stacks", "hf,ours",
                 "--autocast", "off", "--batch", "1", "--seq", "32", "--warmup", "2", "--steps", "2", "--profile",
                 "--run", str(tmp_path / "runs"), "--report", str(report), "--tag", "smoke"]) == 0
    (js,) = report.glob("*.json")
    assert js.name.endswith("-smoke.json")
    doc = json.loads(js.read_text())
    assert doc["suite"] == "step" and doc["complete"] is True and doc["command"].startswith("workbench bench")
    assert all(doc["environment"].get(k) for k in ("device", "torch", "triton", "transformers", "peft"))
    assert (doc["batch"], doc["seq"], doc["steps"], doc["warmup"], doc["autocast"]) == (1, 32, 2, 2, ["off"])
    hf, ours = doc["rows"]
    lora = step.flops_per_step(json.loads((tmp_path / "runs" / "base-tiny" / "config.json").read_text()), 1, 32,
                               16)["lora_params"]
    for row in (hf, ours):
        assert row["exit_code"] == 0 and "error" not in row, row
        assert (row["shape"], row["mode"], row["autocast"]) == ("tiny", "lora", "off")
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and len(row["step_times_s"]) == 4
        assert 0 < row["host_issue_s"] <= max(row["step_times_s"][-2:])  # issued before it finished
        assert len(row["losses"]) == 4 and all(math.isfinite(x) for x in row["losses"])
        assert row["mfu"] is None and row["device_bf16_flops"] is None  # the CPU has no matmul rate to hold it to
        assert row["peak_alloc_gib"] is None and row["peak_reserved_gib"] is None
        assert row["flops_per_step"] > 0 and row["trainable_params"] == lora  # the formula counts PEFT's adapters
    assert ours["kernels"]["swapped"] and ours["kernel_calls"]  # our kernels ran in the timed steps
    assert hf["kernels"] is None and hf["kernel_calls"] is None
    (c,) = doc["comparisons"]
    assert c["stack"] == "ours" and c["same_data"] and not c["loss_differs"]
    assert c["first_rel_loss_diff"] <= tbench.FIRST_STEP_BAND and c["max_rel_loss_diff"] <= tbench.LOSS_BAND

    for row in (hf, ours):  # --profile: a table per record, its CSV and its trace in the report's folder
        p = row["profile"]
        assert p["steps"] == 1 and p["top"] and 0 <= p["idle_share"] <= 1
        assert (report / p["csv"]).read_text().startswith("name,ms_per_step,share,calls_per_step\n")
        trace = report / p["trace"]
        assert trace.is_file() and trace.parent.name == js.stem + "-profile"
    md = js.with_suffix(".md").read_text()
    assert "## tiny · LORA · autocast off" in md and "| ours | " in md and "F = 4·N·T + 6·N_lora·T + 3·A" in md
    assert "### Profile: `ours` vs `hf`" in md and "agrees" in md and "Incomplete" not in md
    assert js.with_suffix(".png").is_file()
    assert main(["regress", str(js), str(js)]) == 0  # a step report is a baseline for the next


def _fake_rows(monkeypatch, stop_at: int = 0):
    """measure() without a process: hf and every other stack a little faster; SystemExit at
    record ``stop_at`` (as SIGTERM under the CLI). The checkpoint is only its config."""
    from workbench.bench import step

    def write_checkpoint(shape, out, seed=0):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"vocab_size": 528}))
        return out

    calls = []

    def measure(spec, config, out, profile_dir, lora_r):
        calls.append(spec["stack"])
        if len(calls) == stop_at:
            raise SystemExit(143)
        fast = 1.0 if spec["stack"] == "hf" else 0.5
        return {**{k: spec[k] for k in ("shape", "mode", "autocast", "stack")}, "label": spec["stack"],
                "exit_code": 0, "step_s": fast, "tokens_per_s": 32 / fast, "mfu": None, "peak_alloc_gib": None,
                "peak_reserved_gib": None, "losses": [6.0, 5.9], "final_loss": 5.9, "batch_fingerprint": {"t": 1}}
    monkeypatch.setattr(step.tbench, "write_checkpoint", write_checkpoint)
    monkeypatch.setattr(step, "measure", measure)
    return calls


def test_a_missing_optional_stack_is_skipped_with_its_reason_and_refused_by_name(tmp_path, monkeypatch, capsys):
    import importlib.util

    from workbench.bench import step

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    calls = _fake_rows(monkeypatch)
    result = step.run(["tiny"], ["lora"], ["hf", "ours", "liger"], ("on", "off"), batch=1, seq=32, steps=2,
                      warmup=1, out=tmp_path, progress=lambda _: None)
    assert result["skipped_stacks"] == {"liger": "liger-kernel is not installed"}
    assert calls == ["hf", "ours", "hf", "ours"] and result["stacks"] == ["hf", "ours"]
    assert [c["speedup"] for c in result["comparisons"]] == [2.0, 2.0]
    env = {"device": "cpu", "date": "today", "torch": "t", "cuda": None, "triton": "t", "transformers": "t",
           "peft": "p"}
    assert "**Not run:** `liger` (liger-kernel is not installed)" in step.markdown(result, env, "cmd", "x.png")
    # Asked for by name, a stack that cannot run is an error, not a quiet skip.
    assert main(["bench", "step", "--shape", "tiny", "--stacks", "hf,liger"]) == 2
    assert "--stacks liger: liger-kernel is not installed" in capsys.readouterr().err


def test_a_step_suite_stopped_midway_leaves_a_report_of_what_it_measured(tmp_path, monkeypatch):
    _fake_rows(monkeypatch, stop_at=3)
    report = tmp_path / "reports"
    with pytest.raises(SystemExit):
        main(["bench", "step", "--shape", "tiny", "--modes", "lora", "--stacks", "hf,ours",
              "--autocast", "both", "--seq", "32", "--run", str(tmp_path / "runs"), "--report", str(report)])
    (js,) = report.glob("*.json")
    doc = json.loads(js.read_text())
    assert doc["complete"] is False and doc["incomplete"] == {"done": 2, "planned": 4}
    assert [(r["autocast"], r["stack"]) for r in doc["rows"]] == [("on", "hf"), ("on", "ours")]
    assert "**Incomplete:** written after 2 of 4 records" in js.with_suffix(".md").read_text()


def test_flops_and_mfu_on_a_hand_computed_example():
    from workbench.bench import step

    # The tiny shape: hidden 64, intermediate 176, 2 layers, 4 heads and 2 KV heads of 16, vocab 528; r 16.
    config = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 528}
    f = step.flops_per_step(config, batch=1, seq=32, lora_r=16)
    # Per layer q 64x64, k and v 64x32, o 64x64, gate and up 64x176, down 176x64 = 46080; two layers, and
    # the LM head 528x64 = 33792.
    assert f["frozen_matmul_params"] == 2 * 46080 + 33792 == 125952
    # r (in + out): q 16x128, k and v 16x96, o 16x128, gate, up and down 16x240 = 18688 a layer.
    assert f["lora_params"] == 2 * 18688 == 37376
    # Causal attention forward: 2 L T S d_attn = 2 x 2 x 32 x 32 x 64.
    assert f["attention_forward"] == 262144
    # 4 N T + 6 N_lora T + 3 A.
    assert f["total"] == 4 * 125952 * 32 + 6 * 37376 * 32 + 3 * 262144 == 24084480
    assert step.mfu(f["total"], 0.5, 1e8) == pytest.approx(24084480 / 0.5 / 1e8)
    assert step.mfu(f["total"], 0.5, None) is None  # the CPU: no rate, no MFU
    # Without head_dim in the config it is hidden / heads.
    assert step.flops_per_step({**config, "head_dim": None}, 1, 32, 16)["total"] == f["total"]


@pytest.mark.parametrize("args, message", [
    (["--autocast", "maybe"], "--autocast takes on, off or both"),
    (["--shape", "nope"], "unknown model shape(s) nope"),
    (["--seq", "1024"], "beyond the position limit of tiny"),
    (["--steps", "0"], "--steps >= 1 (0)"),
    (["--stacks", "ours"], "must include hf"),
    (["--modes", "full"], "unknown mode(s)"),
])
def test_step_suite_user_errors(args, message, capsys):
    assert main(["bench", "step", "--shape", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message is about machines without CUDA")
def test_step_suite_needs_cuda_for_real_shapes(capsys):
    assert main(["bench", "step", "--shape", "qwen3-1.7b"]) == 2
    assert "need a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message is about machines without CUDA")
def test_cuda_graph_capture_is_refused_without_cuda(tmp_path, capsys):
    assert main(["bench", "step", "--shape", "tiny", "--seq", "32", "--cuda-graph", "--report", str(tmp_path / "r"),
                 "--run", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph" in err and "needs a CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()  # nothing written


def test_write_checkpoint_builds_another_family(tmp_path):
    from transformers import AutoModelForCausalLM

    from workbench.bench.train import write_checkpoint

    path = write_checkpoint("tiny-qwen3", tmp_path / "base")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-6
    model = AutoModelForCausalLM.from_pretrained(path)
    assert hasattr(model.model.layers[0].self_attn, "q_norm")  # Qwen3's per-head q/k norms
