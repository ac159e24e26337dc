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
    (["bench", "--suite", "train"], "unknown suite"),
    (["bench", "--shape", "llama3-8b"], "need a CUDA device"),
    (["bench", "--shape", "tiny", "--only", "nope"], "unknown kernel"),
])
def test_bench_user_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
