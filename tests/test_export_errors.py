"""Bad input to `workbench merge` / `workbench export`: one clear sentence, exit 2, and
no finished-looking file left behind."""
import errno
import json
import shutil

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from _export_run import build_merged_run, build_run, heldout, tokenizer
from workbench import manifest
from workbench.cli import main
from workbench.errors import UserError
from workbench.export import vocab


def _fails(argv, capsys, *needles):
    capsys.readouterr()   # drop what building the fixture printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert err.startswith("workbench: error: ")
    for needle in needles:
        assert needle in err, err
    return err


def _rerecord_merge(run):
    """After editing merge/merged on purpose: record it again, as a merge that wrote it would."""
    manifest.record_stage(run, "merge", {"merged_dir": "merge/merged",
                                         "outputs": manifest.outputs_record(run, [run / "merge" / "merged"])})


@pytest.fixture
def merged_run(tmp_path):
    return build_merged_run(tmp_path / "run", "qwen2")


def test_the_cli_loads_no_export_stack_until_a_command_runs():
    import subprocess
    import sys

    code = ("import sys; from workbench.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('llama_cpp', 'gguf', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- run dir / stages
def test_missing_run_dir(tmp_path, capsys):
    _fails(["export", "--run", str(tmp_path / "nope")], capsys, "does not exist")
    _fails(["merge", "--run", str(tmp_path / "nope")], capsys, "does not exist")


def test_export_before_merge(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    _fails(["export", "--run", str(tmp_path / "run")], capsys, "no completed merge stage", "workbench merge")


def test_merge_before_train(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    _fails(["merge", "--run", str(tmp_path / "run")], capsys, "no completed train stage", "workbench train")


def test_merge_needs_a_local_base(tmp_path, capsys):
    run = build_run(tmp_path / "run", "qwen2")
    shutil.rmtree(run / "base")
    _fails(["merge", "--run", str(run)], capsys, "not a local folder")
    assert not (run / "merge").exists()


def test_merge_falls_back_to_the_adapters_local_base(tmp_path):
    from workbench.export.merge import base_model_path

    run = build_run(tmp_path / "run", "qwen2")
    train = dict(manifest.stage(run, "train"), base_model=str(tmp_path / "moved-away"))
    assert base_model_path(run, train) == (run / "base").resolve()   # adapter_config's base_model_name_or_path


def test_merge_refuses_a_base_without_safetensors(tmp_path, capsys):
    run = build_run(tmp_path / "run", "qwen2")
    (run / "base" / "model.safetensors").rename(run / "base" / "pytorch_model.bin")
    _fails(["merge", "--run", str(run)], capsys, "only safetensors")


def test_export_refuses_merged_files_changed_after_merge(merged_run, capsys):
    (merged_run / "merge" / "merged" / "config.json").write_text("{}")
    _fails(["export", "--run", str(merged_run)], capsys, "changed since", "workbench merge")


def test_unknown_quant_and_bad_thresholds(merged_run, tmp_path, capsys):
    _fails(["export", "--run", str(merged_run), "--quant", "f16,q3_x"], capsys, "q3_x", "q4_k_m")
    bad = tmp_path / "t.yaml"
    bad.write_text("q4_k_m: {kl_mean: 0.1, accuracy: 0.5}\n")
    _fails(["export", "--run", str(merged_run), "--thresholds", str(bad)], capsys, "accuracy")
    assert not (merged_run / "export").exists()


# --------------------------------------------------------------------------- the checkpoint
def test_unsupported_architecture(merged_run, capsys):
    config_path = merged_run / "merge" / "merged" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "phi3"
    config_path.write_text(json.dumps(config))
    _rerecord_merge(merged_run)
    _fails(["export", "--run", str(merged_run)], capsys, "'phi3'", "llama, mistral, qwen2, qwen3, gemma, gemma2")
    assert not list((merged_run / "export").glob("*.gguf"))


def test_rope_scaling_is_refused(tmp_path, capsys):
    run = build_merged_run(tmp_path / "run", "llama",
                           rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    _fails(["export", "--run", str(run)], capsys, "rope scaling 'linear'")


@pytest.mark.parametrize("family, overrides, message", [
    ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("gemma2", {"hidden_activation": "silu"}, "activation 'silu'"),
    ("llama", {"attention_bias": True}, "attention_bias=true"),
    ("mistral", {"mlp_bias": True}, "mlp_bias=true"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar=32"),
    ("gemma2", {"final_logit_softcapping": None}, "without final_logit_softcapping"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}, "must alternate"),
])
def test_what_llama_cpp_would_compute_differently_is_refused(family, overrides, message):
    from workbench.export import archs
    from workbench.families import tiny_config

    config = tiny_config(family, 300, **overrides).to_dict()
    with pytest.raises(UserError, match=message):
        archs.check_exportable(config)
    archs.check_exportable(tiny_config(family, 300).to_dict())   # the same family without it passes


def test_gemma2_attention_scale_check_is_needed(tmp_path, monkeypatch):
    """Without the refusal, a gemma2 whose query_pre_attn_scalar is not head_dim exports
    and fails verification: llama.cpp scales by 1/sqrt(head_dim) for this shape."""
    from workbench.export import archs
    from workbench.export.stage import run_export

    monkeypatch.setattr(archs, "_check_gemma2", lambda config: None)
    run = build_merged_run(tmp_path / "run", "gemma2", query_pre_attn_scalar=64)   # head_dim 16
    report = run_export(run, ["f16"])
    assert not report["passed"] and report["files"]["f16"]["llama_cpp"]["kl_mean"] > 1e-3


def test_vocab_size_mismatch(tmp_path, capsys):
    run = build_merged_run(tmp_path / "run", "qwen2", vocab_size=len(tokenizer()) - 10)
    _fails(["export", "--run", str(run)], capsys, "token ids but the model only", "embedding rows")
    assert not list((run / "export").glob("*.gguf"))


def test_missing_tokenizer(merged_run, capsys):
    (merged_run / "merge" / "merged" / "tokenizer.json").unlink()
    _rerecord_merge(merged_run)
    _fails(["export", "--run", str(merged_run)], capsys, "no tokenizer", "workbench merge")


def test_a_nan_missing_or_infinite_metric_fails_its_threshold():
    from workbench.export.verify import DEFAULT_THRESHOLDS, failures

    limits = DEFAULT_THRESHOLDS["f16"]
    good = {"kl_mean": 1e-7, "top1_agreement": 1.0, "ppl_rel_delta": 1e-4}
    assert failures(good, limits) == []
    nan = float("nan")
    assert failures({**good, "kl_mean": nan}, limits) == ["kl_mean is nan (not a finite number)"]
    assert failures({**good, "top1_agreement": nan}, limits) == ["top1_agreement is nan (not a finite number)"]
    assert failures({**good, "ppl_rel_delta": float("-inf")}, limits) == ["ppl_rel_delta is -inf (not a finite number)"]
    assert failures({k: v for k, v in good.items() if k != "kl_mean"}, limits) == ["kl_mean is missing"]
    assert failures({**good, "kl_mean": 0.2}, limits) == ["kl_mean 0.2 > 1e-05"]


def test_a_weight_beyond_float16_range_asks_for_bf16():
    import torch

    from workbench.export.gguf_writer import _to_numpy

    big = torch.tensor([[1.0, 7e4]])   # float16's largest finite value is 65504
    with pytest.raises(UserError, match="does not fit in float16.*bf16"):
        _to_numpy(big, "f16")
    array, _ = _to_numpy(big, "bf16")
    assert array.shape == (1, 2)


# --------------------------------------------------------------------------- disk and quantizer failures
def test_full_disk_leaves_no_finished_looking_file(merged_run, monkeypatch, capsys):
    import gguf

    def full_disk(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 4096)   # part of the data made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    _fails(["export", "--run", str(merged_run)], capsys, "no space left", "model-f16.gguf")
    assert list((merged_run / "export").iterdir()) == []
    assert manifest.stage(merged_run, "export") is None


def test_failed_quantization_keeps_the_f16(merged_run, monkeypatch, capsys):
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *args: 1)
    _fails(["export", "--run", str(merged_run), "--quant", "f16,q8_0"], capsys, "could not quantize",
           "model-f16.gguf is intact")
    out = merged_run / "export"
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf"]
    from workbench.export.verify import LlamaCpp

    llm = LlamaCpp(out / "model-f16.gguf", n_ctx=64)   # still a loadable GGUF
    try:
        assert llm.tokenize("hello") == tokenizer().encode("hello")
    finally:
        llm.close()


# --------------------------------------------------------------------------- pre-tokenizer
def _bpe_tokenizer(pattern: str | None, *, byte_level: bool = True):
    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([heldout(), "It's 1234 Größe 東京 🙂\n\n  x"], trainer)
    return tok


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "gpt-2"])
def test_known_pre_tokenizers_are_recognised_by_behaviour(name):
    assert vocab.detect_pre_tokenizer(_bpe_tokenizer(vocab.KNOWN_PRE_TOKENIZERS[name])) == name


def test_the_probe_tells_the_known_pre_tokenizers_apart():
    splits = {name: tuple(vocab._reference_split(p, vocab.PROBE_TEXT)) for name, p in vocab.KNOWN_PRE_TOKENIZERS.items()}
    assert len(set(splits.values())) == len(splits)


def test_unknown_pre_tokenizer_is_refused(tmp_path, capsys):
    with pytest.raises(UserError, match="unlike every pre-tokenizer llama.cpp knows"):
        vocab.detect_pre_tokenizer(_bpe_tokenizer(None))
    # digits in runs of 1-2: a split no llama.cpp pre-tokenizer implements
    odd = vocab.KNOWN_PRE_TOKENIZERS["llama-bpe"].replace(r"\p{N}{1,3}", r"\p{N}{1,2}")
    hf = PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer(odd), eos_token="<|endoftext|>")
    run = build_merged_run(tmp_path / "run", "llama", tok=hf, vocab_size=len(hf))
    _fails(["export", "--run", str(run)], capsys, "splits text unlike")


@pytest.mark.parametrize("name", ["llama-bpe", "gpt-2"])
def test_other_known_pre_tokenizers_round_trip_through_llama_cpp(tmp_path, name):
    from workbench.export.stage import run_export

    hf = PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer(vocab.KNOWN_PRE_TOKENIZERS[name]),
                                 eos_token="<|endoftext|>")
    # A llama checkpoint: transformers keeps tokenizer.json's split (for qwen2 it would
    # substitute Qwen2's own, see test_export.py).
    run = build_merged_run(tmp_path / "run", "llama", tok=hf, vocab_size=len(hf))
    report = run_export(run, ["f16"])
    assert report["pre_tokenizer"] == name
    assert report["files"]["f16"]["tokenizer"]["mismatches"] == []
