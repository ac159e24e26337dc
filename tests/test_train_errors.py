"""`workbench train` on bad input or a failing run: one clear sentence, exit 2, and
nothing left behind that looks like a finished adapter."""
import json
import sys

import pytest

from workbench.offline import enforce_offline

enforce_offline()

import torch  # noqa: E402

from workbench import atomic, manifest, tokenizer as wtok  # noqa: E402
from workbench.cli import main  # noqa: E402
from test_train import one_torch_thread_per_xdist_worker  # noqa: E402,F401  (an autouse fixture)

QUICK = ["--set", "training.max_steps=4", "--set", "eval.max_rows=0", "--set", "data.builtin_rows=64",
         "--set", "training.logging_steps=1"]


def run_cli(capsys, *args):
    code = main(["train", *args])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("workbench: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def write_config(tmp_path, text: str):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return str(path)


def test_missing_model_path(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", write_config(tmp_path, "model:\n  path: nowhere/model\n"),
                        "--run", str(tmp_path / "run"))
    assert code == 2
    assert f"model path {tmp_path / 'nowhere' / 'model'} does not exist" in error_line(err)
    assert not (tmp_path / "run").exists()  # nothing is written before the inputs check out


@pytest.mark.parametrize("stage", ["train", "merge"])
def test_a_run_holding_a_user_provided_stage_is_not_trained_into(tmp_path, capsys, stage):
    run = tmp_path / "run"
    manifest.record_stage(run, stage, {"user_provided": True, "inputs": {"adapter": "/somewhere"}})
    before = (run / "manifest.json").read_bytes()
    code, err = run_cli(capsys, *QUICK, "--run", str(run))
    assert code == 2
    line = error_line(err)
    assert f"holds a {stage} stage you brought (user-provided)" in line and "use a new --run directory" in line
    assert (run / "manifest.json").read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["manifest.json"]


def train_on_checkpoint(tmp_path, capsys, model_type: str, weights: str, content: bytes):
    """`workbench train` on a checkpoint folder holding a config of ``model_type`` and
    one ``weights`` file; returns the exit code and the error line."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": model_type}))
    (ckpt / weights).write_bytes(content)
    code, err = run_cli(capsys, "--config", write_config(tmp_path, f"model:\n  path: {ckpt}\n"),
                        "--run", str(tmp_path / "run"))
    return code, error_line(err)


def test_checkpoint_without_safetensors_is_refused(tmp_path, capsys):
    code, line = train_on_checkpoint(tmp_path, capsys, "llama", "pytorch_model.bin", b"pickle")
    assert code == 2
    assert "no *.safetensors weights" in line and "pytorch_model.bin" in line and "convert" in line


def test_unsupported_architecture_names_the_supported_families(tmp_path, capsys):
    code, line = train_on_checkpoint(tmp_path, capsys, "gpt2", "model.safetensors", b"")
    assert code == 2
    assert "'gpt2' is not supported" in line
    for fam in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2"):
        assert fam in line


def test_missing_dataset_file(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", write_config(tmp_path, "data:\n  train: missing.jsonl\n"),
                        "--run", str(tmp_path / "run"))
    assert code == 2
    assert f"dataset file {tmp_path / 'missing.jsonl'} does not exist" in error_line(err)


def test_dataset_with_wrong_columns_names_found_and_expected(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q", "reply": "a"}) + "\n")
    code, err = run_cli(capsys, "--config", write_config(tmp_path, "data:\n  train: d.jsonl\n"),
                        "--run", str(tmp_path / "run"))
    line = error_line(err)
    assert code == 2
    assert "has columns question, reply" in line
    assert "'messages'" in line and "'prompt' and 'completion'" in line


@pytest.mark.parametrize("text, message", [
    ("training:\n  learning_rate: 0.1\n", "unknown config key 'training.learning_rate'"),
    ("trainig:\n  lr: 0.1\n", "unknown config key 'trainig'"),
    ("training:\n  batch_size: big\n", "'training.batch_size' must be an integer"),
    ("training: [1, 2]\n", "must be a mapping"),
    ("model: {path: x\n", "not valid YAML"),
    ("model:\n  dtype: float8\n", "'model.dtype' is 'float8'; use one of"),
])
def test_bad_config_is_one_sentence(tmp_path, capsys, text, message):
    code, err = run_cli(capsys, "--config", write_config(tmp_path, text), "--run", str(tmp_path / "run"))
    assert code == 2
    assert message in error_line(err)


def test_kernels_unavailable_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import sys

    import workbench

    # First drop the package attribute an earlier import may have set (workbench's lazy
    # __getattr__ imports the module on the lookup, so this must precede the next line)...
    monkeypatch.delattr(workbench, "patch", raising=False)
    monkeypatch.setitem(sys.modules, "workbench.patch", None)  # ...then importing workbench.patch fails
    code, err = run_cli(capsys, *QUICK, "--set", "kernels=true", "--run", str(tmp_path / "run"))
    assert code == 2
    assert "kernels are unavailable" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_fuse_add_norm_without_rms_norm_is_a_clear_error(tmp_path, capsys):
    code, err = run_cli(capsys, *QUICK, "--set", "kernels={rms_norm: false, fuse_add_norm: true}",
                        "--run", str(tmp_path / "run"))
    assert code == 2
    assert "kernels: fuse_add_norm needs rms_norm" in error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("other", ["liger", "unsloth"])
def test_kernels_means_our_kernels_only(tmp_path, capsys, other):
    # The benchmarks' comparison stacks are no setting of the product (workbench.bench.stacks).
    code, err = run_cli(capsys, *QUICK, "--set", f"kernels={other}", "--run", str(tmp_path / "run"))
    assert code == 2
    assert f"config key 'kernels' is '{other}'; use auto, true, false or a mapping" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_and_keeps_the_last_finite_adapter(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    # lr 1e30 blows the adapter up on the first update, so the second step's loss is not finite.
    code, err = run_cli(capsys, *QUICK, "--set", "training.lr=1e30", "--set", "training.warmup_ratio=0",
                        "--run", str(run))
    line = error_line(err)
    assert code == 2
    assert "the loss became" in line and "lower training.lr" in line
    assert not (run / "adapter").exists()  # only a finished run writes adapter/
    rec = manifest.stage(run, "train")
    assert rec["status"] == "failed" and rec["last_good_adapter"] == "train/last_good_adapter"
    good_step = rec["last_good_step"]
    assert good_step == rec["failed_step"] - 2  # the weights that produced the step before's finite loss
    # The kept adapter is finite and gives a finite loss.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "train" / "last_good_adapter")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tok = wtok.default_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 1 plus 2?"},
                                   {"role": "assistant", "content": "3"}], return_tensors="pt", return_dict=True)
    assert torch.isfinite(model(**ids, labels=ids["input_ids"]).loss)
    with pytest.raises(Exception, match="no completed train stage"):
        manifest.require_stage(run, "train", "rerun it.")


def test_the_kept_adapter_is_the_one_from_before_the_first_non_finite_loss(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file
    from trl import SFTTrainer

    original = SFTTrainer.compute_loss
    micro = []

    def nan_on_third_step(self, *args, **kwargs):
        # Only the first of step 3's two micro-batches: the guard checks once per optimizer
        # step, and must not take the last micro-batch's finite loss for the step's.
        loss = original(self, *args, **kwargs)
        if self.state.global_step == 2:
            micro.append(1)
            return loss * float("nan") if len(micro) == 1 else loss
        return loss

    # Constant lr, no warmup: the first update is the same whatever the run's length.
    steady = [*QUICK, "--set", "training.schedule=constant", "--set", "training.warmup_ratio=0",
              "--set", "training.grad_accum=2"]
    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_on_third_step)
    code, err = run_cli(capsys, *steady, "--run", str(tmp_path / "nan"))
    assert code == 2 and "at step 3" in error_line(err) and "nan" in error_line(err), err
    assert len(micro) == 2  # both micro-batches ran; the optimizer did not step on them
    monkeypatch.setattr(SFTTrainer, "compute_loss", original)
    assert run_cli(capsys, *steady, "--set", "training.max_steps=1", "--run", str(tmp_path / "one"))[0] == 0

    # Step 3's weights gave the non-finite loss; step 2's were the last good ones,
    # i.e. the adapter after one update, which a 1-step run produces too.
    assert manifest.stage(tmp_path / "nan", "train")["last_good_step"] == 1
    kept = load_file(tmp_path / "nan" / "train" / "last_good_adapter" / "adapter_model.safetensors")
    one_step = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert kept.keys() == one_step.keys()
    for name in kept:
        assert torch.equal(kept[name], one_step[name]), name
    assert any(t.abs().sum() > 0 for n, t in kept.items() if "lora_B" in n)  # it did learn one step


def test_out_of_memory_says_what_to_reduce(tmp_path, capsys, monkeypatch):
    from trl import SFTTrainer

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "train", oom)
    run = tmp_path / "run"
    code, err = run_cli(capsys, *QUICK, "--run", str(run))
    line = error_line(err)
    assert code == 2
    for knob in ("training.batch_size", "training.max_seq_len", "gradient_checkpointing: true", "nf4"):
        assert knob in line
    assert not (run / "adapter").exists()
    assert manifest.stage(run, "train")["status"] == "failed"


def test_a_failed_writer_leaves_the_previous_folder_intact(tmp_path):
    target = tmp_path / "adapter"
    with atomic.directory(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left behind
    with atomic.directory(target) as tmp:
        (tmp / "weights2").write_text("new")
    assert [p.name for p in target.iterdir()] == ["weights2"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]

