import json
import subprocess
import sys

import pytest

from workbench.cli import main

CORE_KERNELS = {"rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy"}
MEMORY_KERNELS = {"fused_linear_cross_entropy", "fused_linear_preference", "lora_mlp", "lora_qkv", "lora_o"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True)


def test_help_lists_the_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("kernels", "parity"):
        assert cmd in out.stdout


def test_kernels_json_lists_core_kernels_with_gradients(capsys):
    assert main(["kernels", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert CORE_KERNELS <= set(by_name), f"missing: {CORE_KERNELS - set(by_name)}"
    for name in CORE_KERNELS:
        row = by_name[name]
        assert row["grads"], f"{name} lists no gradients"
        assert row["reference"].endswith("_reference")
        assert set(row["dtypes"]) == {"float32", "float16", "bfloat16"}


def test_kernels_json_lists_memory_kernels(capsys):
    assert main(["kernels", "--json"]) == 0
    by_name = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in MEMORY_KERNELS:
        assert by_name[name]["grads"], name
    assert "hidden" in by_name["fused_linear_cross_entropy"]["grads"]
    assert by_name["nf4_dequant"]["grads"] == []  # frozen weights: nothing to differentiate
    # The LoRA kernels also compare the change their adapters make to every output and gradient
    # (the harness's delta: comparisons).
    for name in ("lora_o", "lora_qkv", "lora_mlp"):
        r = by_name[name]
        assert r["deltas"] == [*r["outputs"], *(f"grad:{g}" for g in r["grads"])], name
    assert by_name["rms_norm"]["deltas"] == []


def test_kernels_table_names_every_kernel(capsys):
    assert main(["kernels"]) == 0
    out = capsys.readouterr().out
    for name in CORE_KERNELS:
        assert name in out


def test_parity_reruns_one_case(capsys):
    params = {"batch": 1, "rows": 3, "hidden": 5, "eps": 1e-6, "casting": "gemma", "offset": 1.0,
              "scale": 1.0, "strided": True, "grad_x": True, "grad_w": True, "_block": None}
    code = main(["parity", "--kernel", "rms_norm", "--dtype", "bfloat16", "--seed", "3",
                 "--params", json.dumps(params)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "grad:weight" in out and out.strip().endswith("PASS")


@pytest.mark.parametrize("args, message", [
    (["parity", "--kernel", "nope", "--params", "{}"], "no kernel named 'nope'"),
    (["parity", "--kernel", "rms_norm", "--params", "{not json"], "not valid JSON"),
    (["parity", "--kernel", "rms_norm", "--dtype", "float64", "--params", "{}"], "unknown dtype"),
    (["parity", "--seed", "1"], "need --kernel"),
])
def test_user_errors_are_one_sentence_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
