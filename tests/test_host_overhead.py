"""scripts/host_overhead.py, the host-time probe of the kernels' wrappers, runs and writes every case
(in a child process: its --stub mode replaces Triton's launcher and the GEMMs process-wide)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_overhead_stub_runs_every_case(tmp_path):
    out = tmp_path / "host.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "host_overhead.py"), str(out), "--stub", "--calls", "20"],
                   check=True, env=env, capture_output=True, text=True, timeout=300)
    doc = json.loads(out.read_text())
    assert doc["mode"].startswith("stub") and doc["calls"] == 20
    assert [r["case"] for r in doc["rows"]] == ["layer", "rms_norm", "rope", "swiglu", "lora_o", "lora_qkv", "lora_mlp"]
    assert all(r["forward_us"] > 0 and r["forward_backward_us"] > 0 for r in doc["rows"])
