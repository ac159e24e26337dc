import json

import pytest

from workbench.cli import main


def test_kernel_bench_smoke_writes_a_report_without_errors(tmp_path, capsys):
    # The CPU path only proves the harness end to end (tiny shapes, interpreter); GPU numbers come from `device`.
    code = main(["bench", "--shape", "tiny", "--only", "rms_norm,swiglu,cross_entropy", "--report", str(tmp_path)])
    assert code == 0
    (js,) = tmp_path.glob("*.json")
    doc = json.loads(js.read_text())
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == {"rms_norm", "swiglu", "cross_entropy"}
    for r in rows:
        assert r["error"] is None, r
        if r["stack"] in ("ours", "torch"):
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert doc["environment"]["device"] and doc["command"].startswith("workbench bench")
    assert (tmp_path / js.name.replace(".json", ".md")).exists()


@pytest.mark.parametrize("args, message", [
    (["bench", "--suite", "inference"], "unknown suite"),
    (["bench", "--shape", "llama3-8b"], "need a CUDA device"),
    (["bench", "--shape", "tiny", "--only", "nope"], "unknown kernel"),
])
def test_bench_user_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_train_suite_compares_stacks_of_one_run_and_flags_loss_differences(tmp_path):
    from workbench.bench import train as tbench

    def run(stack, losses, step_s, peak):
        return {"mode": "lora", "stack": stack, "label": tbench.STACKS[stack], "exit_code": 0, "steps": len(losses),
                "step_s": step_s, "peak_memory_gib": peak, "tokens_per_s": 1.0, "final_loss": losses[-1],
                "kernels": None, "loss_curve": list(enumerate(losses, 1))}
    runs = [run("hf", [4.0, 3.0, 2.0], 0.2, 10.0), run("ours", [4.0, 3.03, 2.0], 0.1, 5.0)]
    (c,) = tbench.compare(runs)
    assert c["steps_compared"] == 3
    assert abs(c["max_rel_loss_diff"] - 0.01) < 1e-12 and c["final_rel_loss_diff"] == 0.0
    assert c["speedup"] == 2.0 and c["memory_ratio"] == 0.5
    result = {"shape": "tiny", "shape_dims": {}, "steps": 3, "batch": 2, "seed": 0, "runs": runs, "comparisons": [c]}
    env = {"device": "cpu", "date": "2026-01-01", "torch": "x", "cuda": None, "triton": "x", "transformers": "x",
           "peft": "x"}
    png = tbench.plot(result, tmp_path / "curves.png")
    assert png.stat().st_size > 1000
    text = tbench.markdown(result, env, "workbench bench --suite train", png.name)
    assert "| lora | 3 | 1.00e-02 | 0.00e+00 | 2.00x | 0.50 |" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message is about machines without CUDA")
def test_train_suite_needs_cuda_for_real_shapes(capsys):
    from workbench.cli import main

    assert main(["bench", "--suite", "train", "--shape", "llama3.2-1b"]) == 2
    assert "need a CUDA device" in capsys.readouterr().err
