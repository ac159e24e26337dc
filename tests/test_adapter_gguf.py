"""`workbench export --adapter-gguf`: the LoRA adapter as a GGUF LoRA adapter with the
metadata and tensors llama.cpp expects, applied by llama.cpp to the base's f16 and
q8_0 GGUFs and compared with the HF adapter on its base; a corrupted adapter fails."""
import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from _export_run import build_run
from workbench import manifest
from workbench.cli import main
from workbench.errors import UserError
from workbench.export import adapter_export, adapter_gguf, gguf_writer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny llama run (the built-in default's family): train-like run -> merge -> export --adapter-gguf."""
    run = build_run(tmp_path_factory.mktemp("adapter") / "run", "llama")
    assert main(["merge", "--run", str(run)]) == 0
    assert main(["export", "--run", str(run), "--quant", "f16", "--adapter-gguf"]) == 0
    return run, json.loads((run / "export" / "export_report.json").read_text())


def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_the_file_holds_llama_cpp_adapter_metadata_and_one_a_b_pair_per_adapted_weight(exported):
    run, _ = exported
    reader = GGUFReader(str(run / "export" / "adapter-f16.gguf"))
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)              # PEFT's lora_alpha, not folded in
    assert not any(k.startswith(("llama.", "tokenizer.")) for k in fields)  # those are the base GGUF's
    base_names = {t.name: t for t in GGUFReader(str(run / "export" / "base-f16.gguf")).tensors}
    tensors = {t.name: t for t in reader.tensors}
    pairs = {n.rsplit(".", 1)[0] for n in tensors}
    assert len(pairs) == 2 * 7 and len(tensors) == 2 * len(pairs)           # 2 layers x 7 target modules
    assert all(n.endswith((".weight.lora_a", ".weight.lora_b")) for n in tensors)
    for name in pairs:
        w, a, b = base_names[name], tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        # GGML ne order: A [in, r], B [r, out], W [in, out] (what llama_adapter_lora_init checks).
        assert list(a.shape) == [w.shape[0], 4] and list(b.shape) == [4, w.shape[1]]
        assert a.tensor_type.name == b.tensor_type.name == "F16"


def test_tensors_are_peft_a_and_b_with_the_q_k_rows_of_b_reordered_like_the_base(exported):
    run, _ = exported
    peft = load_file(run / "adapter" / "adapter_model.safetensors")
    config = json.loads((run / "base" / "config.json").read_text())
    tensors = {t.name: np.array(t.data) for t in GGUFReader(str(run / "export" / "adapter-f16.gguf")).tensors}
    prefix = "base_model.model.model.layers.1."
    for module, gguf_name, heads in (("self_attn.q_proj", "blk.1.attn_q", config["num_attention_heads"]),
                                     ("self_attn.k_proj", "blk.1.attn_k", config["num_key_value_heads"]),
                                     ("mlp.down_proj", "blk.1.ffn_down", None)):
        a, b = peft[f"{prefix}{module}.lora_A.weight"], peft[f"{prefix}{module}.lora_B.weight"]
        want_b = gguf_writer.permute_rope_rows(b, heads) if heads else b
        assert np.array_equal(tensors[f"{gguf_name}.weight.lora_a"], a.half().numpy())
        assert np.array_equal(tensors[f"{gguf_name}.weight.lora_b"], want_b.half().numpy())
        if heads:
            assert not torch.equal(want_b, b)    # the reordering does something here


def test_llama_cpp_applies_it_to_the_f16_and_q8_0_base_within_the_merged_ggufs_limits(exported):
    run, report = exported
    section = report["adapter"]
    assert section["passed"] and set(section["bases"]) == {"f16", "q8_0"}
    assert section["thresholds"] == adapter_export.DEFAULT_THRESHOLDS
    for kind, entry in section["bases"].items():
        m = entry["llama_cpp"]
        assert entry["failures"] == [] and m["positions"] >= 256
        assert m["kl_mean"] <= section["thresholds"][kind]["kl_mean"]
        # llama.cpp did apply it: without the adapter the same base is far off the HF adapter.
        assert entry["without_adapter"]["kl_mean"] > 100 * m["kl_mean"]
    assert section["bases"]["f16"]["llama_cpp"]["kl_mean"] < 5e-6            # measured 3.9e-7
    # Measured 0.997: this random model's next-token distributions are flat, and one of its
    # 363 distinct contexts is a near-tie that f16 rounding flips (KL says how little it moves).
    assert section["bases"]["f16"]["llama_cpp"]["top1_agreement"] >= 0.99
    rec = manifest.stage(run, "export")
    assert rec["status"] == "complete" and rec["adapter"]["passed"]
    assert rec["adapter"]["sha256"] == manifest.sha256_file(run / "export" / "adapter-f16.gguf")
    for rel in ("export/adapter-f16.gguf", "export/base-f16.gguf", "export/base-q8_0.gguf",
                "export/adapter-f16.Modelfile", "export/model-f16.Modelfile"):
        assert rel in rec["outputs"], rel
    assert manifest.verify_outputs(run, "export") == []


def test_the_adapter_changes_what_llama_cpp_computes_as_peft_does(exported):
    """End to end in llama.cpp's own API: the base GGUF with the adapter gives the merged GGUF's logits."""
    from transformers import AutoTokenizer

    from workbench.export.compare import logit_metrics
    from workbench.export.verify import LlamaCpp, heldout_rows, heldout_windows

    run, _ = exported
    wins, _ = heldout_windows(AutoTokenizer.from_pretrained(str(run / "tokenizer")), 128, heldout_rows(run)[0])
    merged = LlamaCpp(run / "export" / "model-f16.gguf", 128)
    with_adapter = LlamaCpp(run / "export" / "base-f16.gguf", 128, lora_path=run / "export" / "adapter-f16.gguf")
    try:
        m = logit_metrics(merged.logits(wins), with_adapter.logits(wins), wins)
    finally:
        merged.close()
        with_adapter.close()
    assert m["kl_mean"] < 5e-6 and m["top1_agreement"] >= 0.99   # measured 5.7e-7, 0.997 (a near-tie, as above)


@pytest.mark.parametrize("mistake", ["b_times_10", "q_k_rows_not_reordered"])
def test_a_corrupted_adapter_fails_verification(tmp_path, monkeypatch, capsys, mistake):
    original = adapter_gguf.tensors

    def corrupted(adapter, config, shapes):
        rows = original(adapter, config, shapes)
        if mistake == "b_times_10":
            return [(n, a, 10 * b, h) for n, a, b, h in rows]
        return [(n, a, _unpermute(b, config, h), h) for n, a, b, h in rows]

    monkeypatch.setattr(adapter_gguf, "tensors", corrupted)
    run = build_run(tmp_path / "run", "llama")
    assert main(["merge", "--run", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--quant", "f16", "--adapter-gguf"]) == 1
    out = capsys.readouterr().out
    assert "adapter-f16.gguf on base-f16.gguf: FAILED" in out and "model-f16.gguf: ok" in out
    rec = manifest.stage(run, "export")
    assert rec["status"] == "failed_verification" and not rec["adapter"]["passed"]
    f16 = rec["adapter"]["bases"]["f16"]
    assert f16["llama_cpp"]["kl_mean"] > 100 * adapter_export.DEFAULT_THRESHOLDS["f16"]["kl_mean"]


def _unpermute(b, config, hf_name):
    """B as HF stores it, for the q/k rows the writer would have reordered (the mistake)."""
    if ".self_attn.q_proj." in hf_name:
        heads = config["num_attention_heads"]
    elif ".self_attn.k_proj." in hf_name:
        heads = config["num_key_value_heads"]
    else:
        return b
    rows = b.shape[0]
    return b.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1)


@pytest.mark.parametrize("change, words", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "trains biases"),
    ({"alpha_pattern": {"q_proj": 4}}, "per-module alphas"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_what_the_format_cannot_carry_is_refused_before_anything_is_written(tmp_path, capsys, change, words):
    run = build_run(tmp_path / "run", "llama")
    assert main(["merge", "--run", str(run)]) == 0
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--quant", "f16", "--adapter-gguf"]) == 2
    err = capsys.readouterr().err
    assert words in err and "cannot be written as a GGUF LoRA adapter" in err and "Traceback" not in err
    assert not (run / "export").exists() or not list((run / "export").glob("*.gguf"))


def test_rslora_stores_alpha_times_sqrt_r(tmp_path):
    run = build_run(tmp_path / "run", "qwen2")
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_rslora": True}))
    facts = adapter_gguf.write(run / "adapter", run / "base", tmp_path / "a.gguf")
    assert facts["alpha"] == pytest.approx(8 * 2.0)   # llama.cpp's alpha / r = PEFT's 8 / sqrt(4)
    assert _fields(GGUFReader(str(tmp_path / "a.gguf")))["general.architecture"] == "qwen2"


def test_an_adapter_of_another_base_is_refused(tmp_path):
    run = build_run(tmp_path / "run", "llama")
    other = build_run(tmp_path / "other", "llama", hidden_size=96, head_dim=24)
    with pytest.raises(UserError, match="do not fit the base weight"):
        adapter_gguf.write(run / "adapter", other / "base", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_every_gguf_has_a_modelfile_next_to_it_whose_files_exist(exported):
    from workbench.export import modelfile
    from workbench.tokenizer import default_tokenizer

    run, report = exported
    out = run / "export"
    assert sorted(p.name for p in out.glob("*.Modelfile")) == ["adapter-f16.Modelfile", "model-f16.Modelfile"]
    assert report["modelfiles"]["template"] and report["modelfiles"]["stops"] == ["<|im_end|>", "<|im_start|>"]
    tok = default_tokenizer()
    conv = [{"role": "user", "content": "What is 3 plus 4?"}]
    for path in out.glob("*.Modelfile"):
        parsed = modelfile.parse(path.read_text())
        assert (out / parsed["FROM"]).is_file()
        if path.name.startswith("adapter"):
            assert parsed["FROM"] == "./base-f16.gguf" and parsed["ADAPTER"] == "./adapter-f16.gguf"
            assert (out / parsed["ADAPTER"]).is_file()
        else:
            assert parsed["FROM"] == "./model-f16.gguf" and parsed["ADAPTER"] is None
        assert modelfile.ollama_text(parsed["TEMPLATE"], conv) == tok.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=True)
        assert ("num_ctx", "128") in parsed["PARAMETER"]   # the test model's max_position_embeddings
