"""`workbench export`: GGUF f16/bf16 from our writer, q8_0/q4_k_m from llama.cpp's
quantizer, each read back by llama.cpp and by transformers and compared with the HF
merged model; tokenizer round trip; per-arch conversion; atomic files."""
import json

import pytest
from gguf import GGUFReader

from _export_run import build_merged_run, build_run, heldout, tokenizer
from workbench import manifest
from workbench.cli import main
from workbench.export import quantize, verify
from workbench.export.stage import run_export

ALL = ["f16", "bf16", "q8_0", "q4_k_m"]
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The whole path on a tiny llama (the built-in default's family): train-like run -> merge -> export."""
    run = build_run(tmp_path_factory.mktemp("export") / "run", "llama")
    assert main(["merge", "--run", str(run)]) == 0
    assert main(["export", "--run", str(run)]) == 0
    return run, json.loads((run / "export" / "export_report.json").read_text())


def test_every_gguf_is_written_verified_and_recorded(exported):
    run, report = exported
    rec = manifest.require_stage(run, "export", "")
    assert set(rec["files"]) == set(ALL) == set(report["files"])
    for kind, entry in rec["files"].items():
        path = run / entry["path"]
        assert path.name == f"model-{kind}.gguf"
        assert entry["sha256"] == manifest.sha256_file(path) and entry["bytes"] == path.stat().st_size
        assert entry["passed"] and entry["llama_cpp"] == report["files"][kind]["llama_cpp"]
    assert manifest.verify_outputs(run, "export") == []
    assert not list((run / "export").glob(".*"))


def test_each_quant_meets_its_thresholds_and_errors_grow_with_compression(exported):
    _, report = exported
    files = report["files"]
    for kind in ALL:
        assert verify.failures(files[kind]["llama_cpp"], verify.DEFAULT_THRESHOLDS[kind]) == []
        assert files[kind]["llama_cpp"]["positions"] >= 256
    kl = {k: files[k]["llama_cpp"]["kl_mean"] for k in ALL}
    assert kl["f16"] < kl["bf16"] and kl["f16"] < kl["q8_0"] < kl["q4_k_m"]


def test_transformers_reads_the_same_numbers_back(exported):
    _, report = exported
    for kind in ALL:
        tf = report["files"][kind]["transformers"]
        assert tf["supported"], tf
        assert verify.failures(tf, verify.DEFAULT_THRESHOLDS[kind]) == []
    # Dequantized q4_k_m weights in fp32 (transformers) and llama.cpp's own kernels see
    # the same quantization error: their KL to the HF model agrees within a factor of 2.
    tf_kl = report["files"]["q4_k_m"]["transformers"]["kl_mean"]
    assert 0.5 < tf_kl / report["files"]["q4_k_m"]["llama_cpp"]["kl_mean"] < 2


def test_tokenizer_round_trip_through_llama_cpp(exported):
    _, report = exported
    for kind in ALL:
        tok = report["files"][kind]["tokenizer"]
        assert tok["mismatches"] == [] and tok["strings"] >= 30


def test_tokenizer_corpus_covers_specials_whitespace_unicode_and_chat():
    tok = tokenizer()
    corpus = verify.tokenizer_corpus(tok, heldout())
    joined = "\n".join(corpus)
    for needle in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "  ", "\t", "\r\n", "東京", "🙂", "Привет"):
        assert needle in joined
    assert any(s.startswith("<|im_start|>system") for s in corpus)            # chat template output
    assert any(s.endswith("<|im_start|>assistant\n") for s in corpus)         # with generation prompt


def test_logits_are_compared_on_the_held_out_rows_as_training_tokenizes_them():
    """verify.heldout_windows, the one definition of the ids every comparison of a run uses
    (merge, export, adapter GGUF, the qualify gates): one window per held-out row holding the
    ids training makes of it (chat template, data.training_dataset), skills in turn, EVAL_TOKENS
    in all; a tokenizer without a chat template gets the rows as plain question/answer text,
    and the label says so."""
    from workbench import config, data, synthetic
    from workbench.eval.suite import interleave

    tok = tokenizer()
    rows = interleave(synthetic.build()["test"])
    wins, window = verify.heldout_windows(tok, 256, synthetic.build()["test"])
    trained = data.training_dataset(config.load(None), tok, rows)["input_ids"]
    assert window == verify.EVAL_WINDOW and sum(map(len, wins)) == verify.EVAL_TOKENS
    assert wins[:-1] == trained[:len(wins) - 1]                       # whole rows, as trained ...
    assert wins[-1] == trained[len(wins) - 1][:len(wins[-1])]         # ... the last one cut at the budget
    assert {r["skill"] for r in rows[:len(wins)]} == set(synthetic.SKILLS)
    assert verify.heldout_windows(tok, 256, synthetic.build()["test"]) == (wins, window)   # ids_sha256 is stable
    label = verify.heldout_label(tok, "x")
    assert "chat template, as training tokenizes them" in label and "no chat template" not in label
    cut, window = verify.heldout_windows(tok, 8, rows)                # a short context cuts each row, keeping its start
    assert window == 8 and cut == [t[:8] for t in trained[:len(cut)]]
    tok.chat_template = None
    plain, _ = verify.heldout_windows(tok, 256, rows)
    assert [tok.decode(w) for w in plain[:2]] == [f"{synthetic.question(r)}\n{r['answer']}\n\n" for r in rows[:2]]
    assert "no chat template" in verify.heldout_label(tok, "x")


def test_logit_metrics_count_each_distinct_context_once():
    """Windows that start alike (every chat row starts with the template's tokens) repeat those
    contexts, and their logits: KL and top-1 count each once; perplexity counts every token."""
    import torch

    from workbench.export.compare import distinct_contexts, logit_metrics

    wins = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6], [7, 2]]
    assert distinct_contexts(wins).tolist() == [True, True, True, True,
                                                False, False, True,
                                                False, False, False, True,
                                                True, True]
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(len(w), 9, generator=gen) for w in wins]
    test = [x.clone() for x in ref]
    test[1][1, 0] += 50.0          # a repeated context (ids 1, 2) disagrees: not counted again
    m = logit_metrics(ref, test, wins)
    assert m["positions"] == 8 and m["kl_mean"] == 0.0 and m["top1_agreement"] == 1.0
    assert m["ppl_rel_delta"] > 0   # the token after it is a token of the text: perplexity sees it
    test[0][1, 0] += 50.0          # the first occurrence of that context: counted
    assert logit_metrics(ref, test, wins)["kl_mean"] > 0


def test_gguf_metadata_matches_the_checkpoint(exported):
    run, _ = exported
    tok = tokenizer()
    config = json.loads((run / "merge" / "merged" / "config.json").read_text())
    reader = GGUFReader(str(run / "export" / "model-f16.gguf"))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] == len(tok)
    assert tokens[tok.eos_token_id] == "<|im_end|>"
    token_types = _field(reader, "tokenizer.ggml.token_type")
    assert {token_types[i] for i in tok.all_special_ids} == {3}   # CONTROL: matched only with special=True
    assert token_types[tok.convert_tokens_to_ids("a")] == 1       # NORMAL
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert len(_field(reader, "tokenizer.ggml.merges")) > 100
    assert _field(reader, "llama.embedding_length") == config["hidden_size"]
    assert _field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(run / "export" / "model-bf16.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types   # the default llama has an untied head


def test_q4_k_m_names_every_tensor_llama_cpp_could_not_k_quantize(exported):
    run, report = exported
    entry = report["files"]["q4_k_m"]
    on_disk = quantize.tensor_types(run / "export" / "model-q4_k_m.gguf")
    assert entry["tensor_types"] == {n: t["type"] for n, t in on_disk.items()}
    matrices = {n: t for n, t in on_disk.items() if len(t["shape"]) > 1}
    # The tiny llama's rows (64, 96) are not multiples of 256: llama.cpp
    # itself fell back for every matrix, and the report names each with its type.
    assert set(entry["fallbacks"]) == set(matrices)
    for name, fb in entry["fallbacks"].items():
        assert fb["row_length"] % 256 != 0 and fb["type"] not in K_QUANTS and fb["type"] == on_disk[name]["type"]
    assert all(t["type"] == "F32" for n, t in on_disk.items() if len(t["shape"]) == 1)


def test_q4_k_is_used_where_rows_allow_it(tmp_path):
    # Hidden 256: the attention and gate/up matrices take k-quants; down_proj's rows
    # (intermediate 320) do not. Only q4_k_m is asked for, so an f16 is written as its source.
    # initializer_range 0.05 = 0.1 * sqrt(64 / 256) keeps activations at the hidden-64 models' scale.
    run = build_merged_run(tmp_path / "run", "qwen2", hidden_size=256, intermediate_size=320, head_dim=64,
                           initializer_range=0.05)
    report = run_export(run, ["q4_k_m"])
    assert sorted(report["files"]) == ["f16", "q4_k_m"] and report["source_for_quants"] == "model-f16.gguf"
    types = quantize.tensor_types(run / "export" / "model-q4_k_m.gguf")
    fallbacks = report["files"]["q4_k_m"]["fallbacks"]
    for name, t in types.items():
        if len(t["shape"]) > 1 and t["row_length"] % 256 == 0:
            assert t["type"] in {"Q4_K", "Q6_K"} and name not in fallbacks, (name, t)
    assert types["blk.0.attn_q.weight"]["type"] == "Q4_K"
    assert "blk.0.ffn_down.weight" in fallbacks
    # Real Q4_K blocks stay within the q4_k_m limits (measured KL 0.016, top-1 0.63 on this
    # random model's nearly flat next-token distributions, ppl -1.3%).
    assert verify.failures(report["files"]["q4_k_m"]["llama_cpp"], verify.DEFAULT_THRESHOLDS["q4_k_m"]) == []


def test_thresholds_come_from_the_config_file(tmp_path, capsys):
    run = build_merged_run(tmp_path / "run", "qwen2")
    strict = tmp_path / "strict.yaml"
    strict.write_text("f16: {kl_mean: 1.0e-12}\n")   # below what f16 can reach (measured ~5e-7)
    assert main(["export", "--run", str(run), "--quant", "f16", "--thresholds", str(strict)]) == 1
    report = json.loads((run / "export" / "export_report.json").read_text())
    assert report["thresholds"]["f16"] == dict(verify.DEFAULT_THRESHOLDS["f16"], kl_mean=1e-12)
    assert report["files"]["f16"]["failures"][0].startswith("llama.cpp kl_mean")
    assert manifest.stage(run, "export")["status"] == "failed_verification"


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_every_family_round_trips_through_llama_cpp(tmp_path, family):
    run = build_merged_run(tmp_path / "run", family)
    report = run_export(run, ["f16"])
    f16 = report["files"]["f16"]
    assert f16["passed"], f16["failures"]
    assert f16["tokenizer"]["mismatches"] == []
    # transformers' GGUF loader has no gemma (v1); it reads mistral's file as the llama it is.
    assert f16["transformers"]["supported"] == (family != "gemma"), f16["transformers"]
    if family == "mistral":   # tiny mistral keeps transformers' default 4096-token window
        assert any("sliding window" in note and "4096" in note for note in report["notes"])
    expected_arch = {"mistral": "llama"}.get(family, family)
    assert report["gguf_arch"] == expected_arch
    reader = GGUFReader(str(run / "export" / "model-f16.gguf"))
    names = {t.name for t in reader.tensors}
    if family == "qwen3":
        assert "blk.0.attn_q_norm.weight" in names
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in names
        # transformers loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which adds NFC.
        assert any("NFC" in note for note in report["notes"])
    else:
        assert not any("NFC" in note for note in report["notes"])
    if family in ("gemma", "gemma2"):
        assert "output.weight" not in names   # tied: llama.cpp reuses token_embd
    if family == "gemma2":
        assert _field(reader, "gemma2.final_logit_softcapping") == pytest.approx(5.0)
        assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= names


@pytest.mark.parametrize("family, broken", [("llama", "permute_qk"), ("gemma", "norm_offset")])
def test_a_conversion_mistake_fails_verification(tmp_path, monkeypatch, capsys, family, broken):
    """The thresholds can fail: skip the llama rope row reordering, or Gemma's 1 + w."""
    import dataclasses

    from workbench.export import archs

    if broken == "permute_qk":
        monkeypatch.setitem(archs.ARCHS, family, dataclasses.replace(archs.ARCHS[family], permute_qk=False))
    else:
        monkeypatch.setattr(archs, "norm_offset", lambda fam: 0.0)
    run = build_merged_run(tmp_path / "run", family)
    assert main(["export", "--run", str(run), "--quant", "f16"]) == 1
    assert "FAILED" in capsys.readouterr().out
    rec = manifest.stage(run, "export")
    assert rec["status"] == "failed_verification" and not rec["files"]["f16"]["passed"]
    assert rec["files"]["f16"]["llama_cpp"]["kl_mean"] > 100 * verify.DEFAULT_THRESHOLDS["f16"]["kl_mean"]


def test_killed_write_leaves_no_finished_looking_file(tmp_path, monkeypatch):
    import gguf

    run = build_merged_run(tmp_path / "run", "qwen2")
    out = run / "export"
    seen = {}

    def interrupted(self, *args, **kwargs):
        seen["partial"] = [p.name for p in out.iterdir()]
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export(run, ["f16"])
    (partial,) = seen["partial"]                              # written under a temp name ...
    assert partial.startswith(".model-f16.gguf.") and partial.endswith(".partial")
    assert list(out.iterdir()) == []                          # ... and removed; no model-f16.gguf
    assert manifest.stage(run, "export") is None


def test_a_hard_kill_leftover_is_cleaned_by_the_next_export(tmp_path):
    run = build_merged_run(tmp_path / "run", "qwen2")
    (run / "export").mkdir()
    (run / "export" / ".model-q8_0.gguf.partial").write_bytes(b"GGUF half written")
    run_export(run, ["f16"])
    assert sorted(p.name for p in (run / "export").iterdir()) == ["export_report.json", "model-f16.Modelfile",
                                                                  "model-f16.gguf"]
