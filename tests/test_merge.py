"""`workbench merge`: LoRA and QLoRA adapters folded into their base, measured against
the unmerged adapter, written atomically as safetensors."""
import errno
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _export_run import build_run
from workbench import manifest
from workbench.cli import main

SCALE = 8 / 4   # lora_alpha / r in the fixture


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _delta(run, module):
    """scale * B @ A for one adapted module, straight from the adapter file."""
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    return SCALE * adapter[f"{key}.lora_B.weight"].float() @ adapter[f"{key}.lora_A.weight"].float()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("lora") / "run", "qwen2")
    train_before = manifest.stage(run, "train")
    assert main(["merge", "--run", str(run)]) == 0
    return run, train_before


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("qlora") / "run", "llama", qlora=True)
    assert main(["merge", "--run", str(run)]) == 0
    return run


def test_merged_weights_are_base_plus_scaled_lora_product(lora_run):
    run, _ = lora_run
    base, merged = _weights(run / "base"), _weights(run / "merge" / "merged")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        want = base[f"{module}.weight"] + _delta(run, module)
        # fp32 merge: W + s*B@A in fp32 both here and in PEFT (summation order may differ).
        torch.testing.assert_close(merged[f"{module}.weight"], want, rtol=0, atol=1e-6)
        assert _delta(run, module).abs().max() > 1e-2   # the adapter is not a no-op
    # Modules without an adapter are carried over bit for bit.
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_merged_model_matches_adapter_on_base(lora_run):
    run, _ = lora_run
    report = json.loads((run / "merge" / "merge_report.json").read_text())
    m = report["merged"]
    assert report["dtype"] == "float32" and report["quantization"] is None
    assert m["positions"] >= 256
    # fp32 merged vs fp32 unmerged: only summation-order rounding (measured max 1.6e-5 on logits spanning ~10).
    assert m["max_abs_logit_diff"] < 1e-4
    assert m["kl_mean"] < 1e-9
    assert m["top1_agreement"] == 1.0
    assert abs(m["ppl_rel_delta"]) < 1e-6


def test_merge_folder_is_safetensors_with_config_and_tokenizer(lora_run):
    run, _ = lora_run
    merged = run / "merge" / "merged"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".partial"))]
    assert (merged / "tokenizer.json").read_bytes() == (run / "tokenizer" / "tokenizer.json").read_bytes()
    assert [p.name for p in (run / "merge").iterdir() if p.name.startswith(".")] == []


def test_merge_is_recorded_and_leaves_train_record_alone(lora_run):
    run, train_before = lora_run
    rec = manifest.require_stage(run, "merge", "")
    assert rec["dtype"] == "float32" and rec["merged_dir"] == "merge/merged"
    assert "merge/merge_report.json" in rec["outputs"] and "merge/merged/model.safetensors" in rec["outputs"]
    assert manifest.verify_outputs(run, "merge") == []
    assert manifest.stage(run, "train") == train_before


def test_a_failed_merge_keeps_the_previous_merge(lora_run, monkeypatch, capsys):
    run, _ = lora_run
    (run / "merge" / ".merged.killed.partial").mkdir()   # what a killed merge leaves; the next one removes it
    before = manifest.hash_tree(run / "merge" / "merged")
    record = manifest.stage(run, "merge")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert main(["merge", "--run", str(run)]) == 2
    assert "no space left" in capsys.readouterr().err
    assert manifest.hash_tree(run / "merge" / "merged") == before
    assert manifest.stage(run, "merge") == record
    assert [p.name for p in (run / "merge").iterdir() if p.name.startswith(".")] == []


def test_a_bf16_base_is_merged_in_fp32_and_saved_as_bf16(tmp_path):
    run = build_run(tmp_path / "run", "qwen2", dtype=torch.bfloat16)
    assert main(["merge", "--run", str(run)]) == 0
    merged = run / "merge" / "merged"
    with safe_open(str(merged / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    base, weights = _weights(run / "base"), _weights(merged)
    module = "model.layers.0.self_attn.v_proj"
    want = (base[f"{module}.weight"].float() + _delta(run, module)).to(torch.bfloat16)
    # One rounding of the fp32 sum: equal to bf16(W + dW) up to an ulp where PEFT's
    # summation order lands on the other side of a rounding boundary.
    torch.testing.assert_close(weights[f"{module}.weight"], want, rtol=2**-8, atol=0)
    report = json.loads((run / "merge" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16"
    # bf16-rounded merged weights vs the fp32 adapter on the bf16 base: measured KL 9e-6, top-1 0.99.
    assert report["merged"]["kl_mean"] < 1e-3
    assert report["merged"]["top1_agreement"] > 0.95


def test_qlora_merges_into_16bit_and_into_dequantized_nf4(qlora_run):
    run = qlora_run
    report = json.loads((run / "merge" / "merge_report.json").read_text())
    assert "NF4" in report["reference"]
    a, b = report["merged"], report["merged_from_nf4"]
    # The reference is the adapter on the NF4 base, so merging into the dequantized
    # NF4 weights reproduces it up to rounding, while the 16-bit merge differs by the
    # NF4 quantization error of every base weight.
    assert b["kl_mean"] < 1e-6 and b["top1_agreement"] == 1.0
    assert a["kl_mean"] > 100 * b["kl_mean"]
    cmp = report["nf4_vs_16bit"]
    assert cmp["ppl_merged_16bit"] == a["ppl"] and cmp["ppl_merged_from_nf4"] == b["ppl"]
    assert cmp["ppl_rel_diff"] == pytest.approx(a["ppl"] / b["ppl"] - 1)
    rec = manifest.require_stage(run, "merge", "")
    assert "merge/merged_from_nf4/model.safetensors" in rec["outputs"]
    assert rec["metrics"]["nf4_vs_16bit"] == cmp


def test_nf4_merge_base_is_the_nf4_dequantization(qlora_run):
    """Independently of bitsandbytes' dequantizer: our NF4 reference (bit-exact with
    bitsandbytes' CPU quantizer, parity/test_nf4_bitsandbytes.py) quantizes and
    dequantizes the base weight; merged_from_nf4 must be that plus the LoRA delta."""
    from workbench.kernels.nf4 import NF4Weight, nf4_dequant_tensors_reference

    run = qlora_run
    base, merged = _weights(run / "base"), _weights(run / "merge" / "merged_from_nf4")
    module = "model.layers.1.self_attn.o_proj"
    w = NF4Weight.quantize(base[f"{module}.weight"], double_quant=True, backend="cpu")
    deq = nf4_dequant_tensors_reference(w.packed, w.absmax, w.code, w.nested_absmax, w.offset, shape=w.shape,
                                        blocksize=w.blocksize, dtype=torch.float32)
    assert (deq - base[f"{module}.weight"]).abs().max() > 1e-3   # NF4 really changed the weight
    # fp32 sum of the same two terms; only summation order may differ.
    torch.testing.assert_close(merged[f"{module}.weight"], deq + _delta(run, module), rtol=0, atol=1e-6)
