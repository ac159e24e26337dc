"""`workbench eval`: lm-eval on every model of a run, offline, with one comparison
table; the shipped tasks and their data; the table's deltas and flags."""
import json
import socket

import pandas as pd
import pytest

from _export_run import build_run
from workbench.offline import enforce_offline

enforce_offline()

from workbench import manifest, synthetic  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.eval import compare, suite  # noqa: E402

ORDER = ["base", "adapter", "merged", "f16", "q8_0", "q4_k_m"]
MC, GEN, PPL = "wb_synthetic_mc acc", "wb_synthetic_gen exact_match [strip]", "wb_heldout_ppl word_perplexity"

# A short real training run: 200 steps at lr 3e-3 (the default run is 800 at 2e-3)
# take ~15 s of training on this CPU. Measured with seed 0 on the 156 held-out rows
# (the built-in at hidden 256): base MC acc 0.24, exact match 0, word perplexity 1.7e4;
# adapter 0.55, 0.12, 6.5e3. (At its first shape, hidden 128: base 0.22, 0, 4.3e4; adapter
# 0.61, 0.16, 4.1e3. 800 steps reach exact match 0.99 in test_train.)
# The longest answer is 5 tokens with the EOS; 12 new tokens keep the base model,
# which never stops, from generating 32 per row (the eval uses the run's budget).
TRAIN = ["training.max_steps=200", "training.lr=3e-3", "training.logging_steps=50", "eval.max_rows=0",
         "eval.max_new_tokens=12"]


@pytest.fixture
def one_thread():
    """One intra-op thread for torch while the fixture is active. The suite runs two
    xdist workers on two cores; with torch's default (a thread per core) each
    worker's OpenMP threads spin-wait on cores the other worker holds (measured on
    this test on a busy machine: 18 min with two threads, 1.5 min with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_trained_run_table_shows_training_gain_and_faithful_exports_offline(tmp_path, capsys, one_thread, no_network):
    run = tmp_path / "run"
    args = [a for kv in TRAIN for a in ("--set", kv)]
    assert main(["train", "--run", str(run), *args]) == 0
    assert main(["merge", "--run", str(run)]) == 0
    assert main(["export", "--run", str(run), "--quant", "f16,q8_0,q4_k_m"]) == 0
    capsys.readouterr()

    assert main(["eval", "--run", str(run)]) == 0
    assert no_network == []          # lm-eval, datasets, transformers and llama.cpp never tried the network
    err = capsys.readouterr().err
    assert "bf16" not in err                                     # a type the export left out: no word
    assert err.count("[eval] [6/6] q4_k_m") == 1                 # one progress line per model

    table = pd.read_csv(run / "eval" / "comparison.csv")
    assert table.columns[0] == "model" and list(table["model"]) == ORDER
    row = table.set_index("model")
    # Training: the base is at (or below) chance on 4-way multiple choice and never
    # answers exactly; the adapter is far above both, and far less perplexed.
    assert row.loc["base", MC] <= 0.3 and row.loc["adapter", MC] >= row.loc["base", MC] + 0.25
    assert row.loc["base", GEN] == 0 and row.loc["adapter", GEN] >= 0.1
    assert row.loc["base", PPL] >= 2 * row.loc["adapter", PPL]
    # Export fidelity: merged, f16 and q8_0 reproduce the adapter and q4_k_m stays
    # close, all within the default tolerances (no flags); the base is never flagged.
    assert table["flags"].isna().all(), table[["model", "flags"]]
    for kind in ("merged", "f16", "q8_0", "q4_k_m"):
        limits = compare.DEFAULT_TOLERANCES[kind]
        assert abs(row.loc[kind, f"{MC} Δ"]) <= limits["score"] + compare.SLACK
        assert abs(row.loc[kind, f"{PPL} Δrel"]) <= limits["perplexity"]
    # The merge is exact in fp32: its scores are the adapter's, to the last digit of any score.
    assert row.loc["merged", MC] == row.loc["adapter", MC] and row.loc["merged", GEN] == row.loc["adapter", GEN]
    assert len((run / "eval" / "comparison.md").read_text().splitlines()) == 2 + len(ORDER)

    # lm-eval's own JSON per model, whose numbers are the table's.
    for kind in ORDER:
        results = json.loads((run / "eval" / kind / "results.json").read_text())
        assert results["n-samples"]["wb_synthetic_mc"]["effective"] == 156
        assert results["results"]["wb_synthetic_mc"]["acc,none"] == row.loc[kind, MC]
        assert results["results"]["wb_heldout_ppl"]["word_perplexity,none"] == pytest.approx(row.loc[kind, PPL])
        lines = (run / "eval" / kind / "samples_wb_synthetic_gen.jsonl").read_text().splitlines()
        sample = json.loads(lines[0])
        assert len(lines) == 156 and "filtered_resps" in sample
        # Prompted the way training formatted prompts: the chat template with the assistant turn opened.
        prompt, gen_kwargs = sample["arguments"][0]
        assert prompt == f"<|im_start|>user\n{sample['doc']['question']}<|im_end|>\n<|im_start|>assistant\n"
        assert gen_kwargs["max_gen_toks"] == 12   # the run's eval.max_new_tokens
        mc = json.loads((run / "eval" / kind / "samples_wb_synthetic_mc.jsonl").read_text().splitlines()[0])
        assert all(cont.endswith("<|im_end|>") for _, cont in mc["arguments"])   # whole replies are scored

    # The manifest record: what was evaluated (hashes), on what, how long, what was flagged.
    rec = manifest.require_stage(run, "eval", "")
    assert rec["models"] == ORDER and rec["skipped"] == {"bf16": rec["skipped"]["bf16"]}
    assert rec["tasks"] == list(suite.SHIPPED_TASKS)
    assert rec["input_hashes"]["adapter"] == manifest.hash_tree(run / "adapter")
    assert rec["input_hashes"]["q8_0"] == manifest.sha256_file(run / "export" / "model-q8_0.gguf")
    assert rec["flags"] == [] and set(rec["timings"]) >= {f"{k}_s" for k in ORDER} | {"total_s"}
    assert rec["metrics"]["adapter"][MC] == row.loc["adapter", MC]
    assert manifest.verify_outputs(run, "eval") == []
    assert {"eval/comparison.csv", "eval/comparison.md", "eval/f16/results.json"} <= set(rec["outputs"])


def test_missing_models_are_skipped_with_a_note_and_user_task_folders_are_used(tmp_path, capsys):
    run = build_run(tmp_path / "run", "llama")      # trained-like run: no merge, no export
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"q": f"Capital number {i}?", "a": str(i)}) + "\n" for i in range(5)))
    (tasks / "capitals.yaml").write_text(
        f"task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs:\n  until: []\n  do_sample: false\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--include", str(tasks), "--tasks", "capitals,wb_heldout_ppl",
                 "--limit", "3", "--no-chat-template"]) == 0
    err = capsys.readouterr().err
    for kind, stage in (("merged", "workbench merge"), ("f16", "workbench export")):
        assert f"[eval] skipping {kind}: no " in err and stage in err
    table = pd.read_csv(run / "eval" / "comparison.csv")
    assert list(table["model"]) == ["base", "adapter"]
    assert "capitals exact_match" in table.columns and "wb_heldout_ppl word_perplexity" in table.columns
    rec = manifest.require_stage(run, "eval", "")
    assert set(rec["skipped"]) == {"merged", "f16", "bf16", "q8_0", "q4_k_m"} and rec["limit"] == 3
    assert rec["include"] == [str(tasks)]
    results = json.loads((run / "eval" / "base" / "results.json").read_text())
    assert results["n-samples"]["capitals"]["effective"] == 3
    sample = json.loads((run / "eval" / "base" / "samples_capitals.jsonl").read_text().splitlines()[0])
    assert sample["arguments"][0][0] == "Capital number 0?" and rec["chat_template"] is False


def test_a_qlora_adapter_is_evaluated_on_the_nf4_base_it_was_trained_on(tmp_path, capsys):
    run = build_run(tmp_path / "run", "llama", qlora=True)
    args = ["eval", "--run", str(run), "--models", "adapter", "--tasks", "wb_heldout_ppl", "--limit", "8"]
    assert main(args) == 0
    assert "(on the NF4 base (QLoRA, as trained))" in capsys.readouterr().err
    nf4 = manifest.require_stage(run, "eval", "")["metrics"]["adapter"][PPL]
    # The same adapter recorded as plain LoRA is evaluated on the fp32 base instead.
    data = json.loads((run / "manifest.json").read_text())
    data["stages"]["train"]["quantization"] = None
    (run / "manifest.json").write_text(json.dumps(data))
    assert main(args) == 0
    fp32 = manifest.require_stage(run, "eval", "")["metrics"]["adapter"][PPL]
    # NF4 rounding of the base moves the word perplexity (measured +8.9%: 11597 vs
    # 10650), but it is the same model: far less than the base-vs-adapter gap.
    assert abs(nf4 / fp32 - 1) > 0.01 and abs(nf4 / fp32 - 1) < 0.5


# --------------------------------------------------------------------------- tasks and data
def test_task_documents_come_from_the_held_out_split():
    rows = synthetic.build()["test"]
    docs = suite.task_docs(rows, "<|im_end|>")
    assert "".join(d["text"] for d in docs[suite.PPL_TASK]) == synthetic.heldout_text()
    assert len(docs[suite.MC_TASK]) == len(docs[suite.GEN_TASK]) == len(rows)
    answers = {(synthetic.question(r), r["answer"]) for r in rows}
    assert {(d["question"], d["answer"]) for d in docs[suite.GEN_TASK]} == answers
    for d in docs[suite.MC_TASK]:
        # Each option is a whole reply: answer, then the turn end ("1" is no prefix of "12<|im_end|>").
        assert len(set(d["choices"])) == 4 and all(c.endswith("<|im_end|>") for c in d["choices"])
        assert (d["question"], d["choices"][d["gold"]].removesuffix("<|im_end|>")) in answers
    # Interleaved by skill, so --limit 3 already sees every skill.
    assert [d["skill"] for d in docs[suite.GEN_TASK][:3]] == ["add", "recall", "reverse"]


def test_the_turn_end_is_what_the_chat_template_writes_after_a_reply(tmp_path):
    from workbench.tokenizer import default_tokenizer, save_tokenizer

    save_tokenizer(default_tokenizer(), tmp_path / "tokenizer")
    assert suite.turn_end(tmp_path) == "<|im_end|>"
    assert suite.turn_end(tmp_path / "elsewhere") is None   # no tokenizer: options are scored bare


def test_shipped_tasks_are_written_with_absolute_data_and_load_in_lm_eval(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    rows = synthetic.build()["test"]
    counts = suite.materialize(tmp_path / "eval", rows)
    assert counts == {suite.MC_TASK: 156, suite.GEN_TASK: 156, suite.PPL_TASK: 156}
    monkeypatch.chdir(tmp_path / "eval" / "tasks")   # relative data_files would resolve against this
    manager = TaskManager(include_path=str(tmp_path / "eval" / "tasks"), include_defaults=False)
    loaded = manager.load(list(suite.SHIPPED_TASKS))["tasks"]
    assert {name: len(task.eval_docs) for name, task in loaded.items()} == counts
    assert loaded[suite.MC_TASK].config.output_type == "multiple_choice"
    assert loaded[suite.GEN_TASK].config.output_type == "generate_until"
    assert loaded[suite.PPL_TASK].config.output_type == "loglikelihood_rolling"


# --------------------------------------------------------------------------- table
def _metrics(mc, ppl):
    return {MC: mc, PPL: ppl}


def test_changes_are_absolute_for_scores_relative_for_perplexity_and_flagged_per_kind():
    rows = {"base": _metrics(0.20, 900.0), "adapter": _metrics(0.60, 100.0), "merged": _metrics(0.60, 100.0),
            "f16": _metrics(0.60, 100.6), "q8_0": _metrics(0.57, 101.0), "q4_k_m": _metrics(0.45, 104.0)}
    frame, flags = compare.table(rows, compare.DEFAULT_TOLERANCES)
    assert list(frame.columns) == ["model", PPL, MC, f"{PPL} Δrel", f"{MC} Δ", "flags"]
    row = frame.set_index("model")
    assert row.loc["q4_k_m", f"{MC} Δ"] == pytest.approx(-0.15)
    assert row.loc["f16", f"{PPL} Δrel"] == pytest.approx(0.006)
    # f16 perplexity +0.6% > 0.5%; q4_k_m score -0.15 > 0.10; q8_0 -0.03 sits exactly on
    # its tolerance (not beyond, despite 0.57 - 0.60 != -0.03 in floating point); base is never flagged.
    assert {(f["model"], f["metric"]) for f in flags} == {("f16", PPL), ("q4_k_m", MC)}
    assert row.loc["base", "flags"] == "" and "beyond ±0.1" in row.loc["q4_k_m", "flags"]
    md = compare.markdown(frame)
    assert md.splitlines()[0].startswith("| model |") and len(md.splitlines()) == 2 + len(rows)


def test_a_missing_or_non_finite_metric_is_flagged_not_passed():
    nan, inf = float("nan"), float("inf")
    rows = {"base": {MC: nan}, "adapter": _metrics(0.60, 100.0), "merged": {MC: 0.60},          # PPL missing
            "f16": _metrics(nan, 100.0), "q8_0": _metrics(0.60, inf), "q4_k_m": _metrics(0.60, 100.0)}
    frame, flags = compare.table(rows, compare.DEFAULT_TOLERANCES)
    assert {(f["model"], f["metric"]) for f in flags} == {("merged", PPL), ("f16", MC), ("q8_0", PPL)}
    row = frame.set_index("model")
    assert row.loc["merged", "flags"] == f"{PPL} missing (the adapter has it)"
    assert "not a finite number" in row.loc["f16", "flags"] and "not a finite number" in row.loc["q8_0", "flags"]
    assert row.loc["q4_k_m", "flags"] == row.loc["base", "flags"] == ""      # base has no tolerance


def test_without_the_adapter_there_are_no_deltas_and_no_flags():
    frame, flags = compare.table({"base": _metrics(0.2, 900.0), "f16": _metrics(0.6, 100.0)},
                                 compare.DEFAULT_TOLERANCES)
    assert flags == [] and list(frame.columns) == ["model", PPL, MC, "flags"]


def test_a_tolerances_file_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "tol.yaml"
    path.write_text("q4_k_m: {score: 0.2}\n")
    limits = compare.load_tolerances(path)
    assert limits["q4_k_m"] == {**compare.DEFAULT_TOLERANCES["q4_k_m"], "score": 0.2}
    assert {k: v for k, v in limits.items() if k != "q4_k_m"} == \
        {k: v for k, v in compare.DEFAULT_TOLERANCES.items() if k != "q4_k_m"}
