"""The train stage: the built-in default learns, and the harness's switches do what
they say (seed, gradient accumulation, gradient checkpointing, rsLoRA, QLoRA, user
checkpoints and data)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench.offline import enforce_offline

enforce_offline()

import torch  # noqa: E402

from workbench import checks, config, data as data_mod, default, manifest, models, synthetic, tokenizer as wtok, train  # noqa: E402
from workbench import trainer as trainer_mod  # noqa: E402
from workbench.cli import main  # noqa: E402
from workbench.errors import UserError  # noqa: E402

@pytest.fixture(autouse=True)
def one_torch_thread_per_xdist_worker():
    """CI runs two xdist workers on two cores. With torch's default of one thread
    per core the workers' threads fight over the cores and spin: on this loaded
    2-core machine the built-in run's 800 steps took 938 s with 2 threads and 200 s
    with 1."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# fp32 training on any device (model.dtype auto is bf16 autocast on CUDA), for the
# tests that compare gradients with an fp32 reference computed here.
FP32 = ["model.dtype=float32"]

# Small runs for everything but the acceptance test: a few steps, no accuracy eval.
QUICK = ["training.max_steps=4", "training.logging_steps=1", "eval.max_rows=0", "data.builtin_rows=64"]


def quick_config(*overrides):
    return config.load(None, [*QUICK, *overrides])


def loss_rows(run):
    rows = [json.loads(line) for line in (run / "train" / "loss.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]


def test_default_run_lifts_heldout_accuracy_far_above_the_untrained_base(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run) in out

    rec = manifest.require_stage(run, "train", "")
    assert manifest.verify_outputs(run, "train") == []
    for rel in ("config.yaml", "base/config.json", "base/model.safetensors", "tokenizer/tokenizer.json",
                "tokenizer/tokenizer_config.json", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors", "train/loss.jsonl", "train/eval.json",
                "data/train.jsonl", "data/test.jsonl"):
        assert (run / rel).is_file(), rel
    assert rec["base_model"] == "base"   # inside the run: recorded relative to it (the run can move)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(run / "base")
    assert rec["family"] == "llama" and rec["quantization"] is None

    evals = json.loads((run / "train" / "eval.json").read_text())
    base, adapter = evals["base"]["accuracy"], evals["adapter"]["accuracy"]
    assert evals["adapter"]["rows"] == 156  # the whole held-out split: 100 add, 16 recall, 40 reverse
    # Measured on this CPU (800 steps, seed 0): base 0.0 (an untrained model never
    # produces an exact answer); adapter 1.0 with 2 torch threads and 0.99 with 1
    # (summation order differs), every skill >= 0.99. Shorter runs: 600 steps 0.96
    # (reverse 0.90), 300 steps 0.38. The bars leave room for seed and thread noise
    # and still fail a run that learned only the easy recall skill (16 of 156 rows)
    # or skipped one skill.
    assert base <= 0.05
    assert adapter >= 0.85 and adapter >= base + 0.4
    assert min(evals["adapter"]["by_skill"].values()) >= 0.7, evals["adapter"]["by_skill"]
    losses = [r["loss"] for r in loss_rows(run)]
    assert losses[-1] < losses[0] / 10


def test_same_seed_gives_identical_loss_log_and_adapter(tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train.run_train(quick_config(f"training.seed={seed}"), tmp_path / name)
        runs.append(tmp_path / name)
    a, b, c = runs
    assert loss_rows(a) == loss_rows(b)
    prints = [json.loads((r / "manifest.json").read_text())["stages"]["train"]["data_fingerprint"] for r in runs]
    assert prints[0] == prints[1] != prints[2]  # the seed shuffles the data: other first batches
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (b / "adapter" / "adapter_model.safetensors").read_bytes()
    # The seed matters (LoRA init, data order): another seed logs other losses.
    assert [r["loss"] for r in loss_rows(a)] != [r["loss"] for r in loss_rows(c)]


# --------------------------------------------------------------------------- gradients
def _tiny_peft_model(cfg):
    tok = wtok.default_tokenizer()
    model = default.build_model(tok)
    torch.manual_seed(0)  # LoRA's A is drawn from the global RNG
    model = models.attach_lora(cfg, model)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
            torch.nn.init.normal_(p, std=0.05)
    return model, tok


def _rows_of_unequal_length():
    """Four rows whose completions (with EOS) have 2, 3, 8 and 15 tokens: any two
    pairs hold different token counts, so averaging per micro-batch differs from
    averaging per token."""
    answers = ["1", "12", "a b c d e f g", "a b c d e f g h i j k l m n"]
    return [synthetic._row("all", f"Say {a}", a) for a in answers]


def _one_step_gradients(batch_size, grad_accum, tmp_path):
    from transformers import TrainerCallback

    cfg = quick_config(f"training.batch_size={batch_size}", f"training.grad_accum={grad_accum}",
                       "training.max_steps=1", "training.max_grad_norm=0", *FP32)
    model, tok = _tiny_peft_model(cfg)
    grads = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer = trainer_mod.make_trainer(cfg, model, tok, _rows_of_unequal_length(), str(tmp_path / f"out{batch_size}"),
                                 [Capture()])
    trainer.train()
    return grads, trainer.state.log_history[0]["loss"], trainer, model


def assert_same_gradient(got, ref):
    """float32 sums taken in another order (batch of 4 vs two of 2, other padded
    lengths, tiled kernels, 1 or 2 torch threads) differ by a few ulps (2^-24 ~ 6e-8)
    of the summed terms, so an element that cancels to near zero differs at the
    scale of the tensor, not of itself (seen: 2e-7 on an element of 5.6e-3 in a
    tensor whose largest is ~1e-2). Bound: 1e-5 relative per element plus 1e-5 of
    the tensor's largest magnitude, and 1e-5 in relative norm; the per-micro-batch
    average is off by more than 1e-2 (checked below), so this still separates right
    from wrong by three orders of magnitude."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5


def test_loss_log_appends_a_line_a_step_and_writes_the_whole_log_once(tmp_path, monkeypatch):
    """A logging step appends and flushes its line (readable as the run goes); the atomic
    write of the whole log (an fsync) happens once, at close, not at every step."""
    from types import SimpleNamespace

    writes = []
    real = trainer_mod.atomic.write_text
    monkeypatch.setattr(trainer_mod.atomic, "write_text", lambda path, text: writes.append(path) or real(path, text))
    path = tmp_path / "train" / "loss.jsonl"
    log = trainer_mod.LossLog(path, total_steps=3)
    for step in (1, 2, 3):
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        log.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 1e-4, "grad_norm": 0.5})
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, step + 1))
    assert writes == []
    log.close()
    assert writes == [path] and [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [1.0, 0.5, 1 / 3]


# TRL's loss, and ours (the fused loss alone: the other kernels take the interpreter ~100 s here).
@pytest.mark.parametrize("kernels", ["false", "{rms_norm: false, rope: false, mlp: false, lora: false}"])
def test_the_loss_guard_never_waits_for_a_backward(tmp_path, monkeypatch, kernels):
    """The non-finite guard checks each micro-batch's loss as compute_loss returns it, before its
    backward is issued, and reads the checks once per optimizer step, after the last backward was
    issued: on a GPU that read waits for the forwards only (trainer._LossCheck), where a check of
    the step's loss would wait for the backward."""
    from accelerate import Accelerator

    events = []
    check, read, backward = trainer_mod._LossCheck.__init__, trainer_mod._LossCheck.finite, Accelerator.backward
    monkeypatch.setattr(trainer_mod._LossCheck, "__init__", lambda self, loss: events.append("check") or check(self, loss))
    monkeypatch.setattr(trainer_mod._LossCheck, "finite", lambda self: events.append("read") or read(self))
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: events.append("backward") or backward(self, loss, **kw))
    cfg = quick_config("training.max_steps=2", "training.grad_accum=2", f"kernels={kernels}")
    rec = train.run_train(cfg, tmp_path / "run")
    assert events == ["check", "backward", "check", "backward", "read", "read"] * 2
    fused = (rec.get("kernels") or {}).get("calls_in_training", {}).get("fused_linear_cross_entropy", 0)
    assert fused == (0 if kernels == "false" else 4)  # our loss path, one call a micro-batch


def test_flop_count_and_clipping_walk_the_model_once_and_give_the_trainers_values(tmp_path, monkeypatch):
    """The trainer counts the model's parameters for its FLOPs once, not every micro-batch, and
    clips the parameters that train (listed once) instead of every parameter: the FLOP count,
    the gradient norm and the clipped gradients are the Trainer's own."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import PreTrainedModel, Trainer

    counts, clipped = [], []
    num_parameters, clip = PreTrainedModel.num_parameters, Accelerator.clip_grad_norm_
    monkeypatch.setattr(PreTrainedModel, "num_parameters",
                        lambda self, *a, **k: counts.append(1) or num_parameters(self, *a, **k))
    monkeypatch.setattr(Accelerator, "clip_grad_norm_",
                        lambda self, params, *a, **k: clipped.append(params) or clip(self, params, *a, **k))
    cfg = quick_config("training.max_steps=3", "training.batch_size=2", "training.max_grad_norm=0.01", *FP32)
    model, tok = _tiny_peft_model(cfg)
    trainer = trainer_mod.make_trainer(cfg, model, tok, _rows_of_unequal_length(), str(tmp_path / "out"))
    trainer.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(counts) == 1 and len(clipped) == 3
    assert all(isinstance(c, list) and len(c) == len(trained) and all(a is b for a, b in zip(c, trained))
               for c in clipped)
    assert 0 < len(trained) < len(list(model.parameters()))

    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    model.zero_grad()
    model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    grads = [p.grad.clone() for p in trained]
    ours = trainer._clip_grad_norm(model)
    ours_grads = [p.grad.clone() for p in trained]
    for p, g in zip(trained, grads):
        p.grad.copy_(g)
    theirs = Trainer._clip_grad_norm(trainer, model)
    assert ours.item() == theirs.item() > cfg.training.max_grad_norm  # (so the gradients were scaled)
    assert all(torch.equal(a, p.grad) for a, p in zip(ours_grads, trained))
    # Sharded or split parameters: the Trainer's own path.
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        fake = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=kind))
        assert trainer_mod._trained_parameters(fake, model) is None
    fake = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    assert trainer_mod._trained_parameters(fake, model) == trained


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big, big_loss, trainer, _ = _one_step_gradients(4, 1, tmp_path)
    acc, acc_loss, _, _ = _one_step_gradients(2, 2, tmp_path)

    # The reference: one batch of all four rows, loss averaged over every completion token.
    model, _ = _tiny_peft_model(quick_config())
    model.to(trainer.args.device)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    loss = model(**batch).loss
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    # What a harness that averages per micro-batch would compute instead.
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    naive = sum(model(**h).loss for h in halves) / 2
    naive.backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert set(big) == set(acc) == set(ref) and len(ref) > 0
    for name in ref:
        assert_same_gradient(big[name], ref[name])
        assert_same_gradient(acc[name], ref[name])
    assert big_loss == pytest.approx(loss.item(), rel=1e-5)
    assert acc_loss == pytest.approx(loss.item(), rel=1e-5)
    worst = max(((naive_grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
    assert worst > 1e-2, "the naive average is not distinguishable here; the test rows need unequal lengths"


def test_gradient_checkpointing_switch_recomputes_the_forward(tmp_path, count_forwards):
    calls = {}
    for on in (False, True):
        cfg = quick_config(f"training.gradient_checkpointing={str(on).lower()}", "training.max_steps=1",
                           "training.batch_size=2")
        model, tok = _tiny_peft_model(cfg)
        mlp = model.base_model.model.model.layers[0].mlp
        count = count_forwards(mlp)
        trainer = trainer_mod.make_trainer(cfg, model, tok, _rows_of_unequal_length(), str(tmp_path / str(on)))
        trainer.train()
        calls[on] = len(count)
    # Without checkpointing the layer runs once per step; with it, again during backward.
    assert calls == {False: 1, True: 2}


def test_rslora_switch_scales_by_alpha_over_sqrt_r():
    from peft.tuners.lora import LoraLayer

    for rs, expected in ((False, 16 / 8), (True, 16 / 8 ** 0.5)):
        cfg = quick_config("lora.r=8", "lora.alpha=16", f"lora.use_rslora={str(rs).lower()}")
        model, _ = _tiny_peft_model(cfg)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == 4 * 7
        assert [m.scaling["default"] for m in layers] == pytest.approx([expected] * len(layers))


# --------------------------------------------------------------------------- QLoRA, user inputs
def test_qlora_trains_an_nf4_double_quant_base(tmp_path):
    import bitsandbytes as bnb

    cfg = quick_config("quantization={type: nf4, double_quant: true}", "training.max_steps=3", "eval.max_rows=4")
    run = tmp_path / "run"
    rec = train.run_train(cfg, run)
    compute = "bfloat16" if torch.cuda.is_available() else "float32"  # model.dtype auto
    assert rec["quantization"] == {"type": "nf4", "double_quant": True, "compute_dtype": compute,
                                   "upcast_frozen": True}  # PEFT's fp32 norms, embeddings and head (the default)
    assert all(r["loss"] == r["loss"] and r["loss"] < 100 for r in loss_rows(run))  # finite
    # The base really was 4-bit NF4 with double quantization.
    model = models.load_model(cfg, str(manifest.resolve(run, rec["base_model"])))   # "base": inside the run
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 4 * 7  # every attention and MLP projection of the 4 layers
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in linears)
    # Gradients flowed through the frozen 4-bit layers into LoRA's B (which starts at zero).
    from safetensors.torch import load_file

    b = [t for k, t in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert b and all(torch.isfinite(t).all() for t in b) and any(t.abs().sum() > 0 for t in b)


def _write_checkpoint(folder):
    tok = wtok.default_tokenizer()
    default.build_model(tok).save_pretrained(folder, safe_serialization=True)
    wtok.save_tokenizer(tok, folder / "tok")
    for f in (folder / "tok").iterdir():
        f.rename(folder / f.name)
    (folder / "tok").rmdir()


def test_user_checkpoint_and_messages_jsonl(tmp_path):
    ckpt = tmp_path / "my-model"
    _write_checkpoint(ckpt)
    unique = {synthetic.question(r): r for r in synthetic.build()["train"]}  # train repeats add/recall rows
    rows = list(unique.values())[:40]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("model:\n  path: my-model\ndata:\n  train: chats.jsonl\n  eval_fraction: 0.1\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg_file), "--run", str(run), "--set", "training.max_steps=2",
                 "--set", "eval.max_rows=2"]) == 0
    rec = manifest.require_stage(run, "train", "")
    assert rec["base_model"] == str(ckpt) and not (run / "base").exists()
    assert rec["dataset"]["source"] == str(data)
    assert rec["dataset"]["train_rows"] + rec["dataset"]["test_rows"] == 40
    assert rec["input_hashes"]["base_model"] == manifest.hash_tree(ckpt)
    test_rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert len(test_rows) == 4 and all(r["completion"][0]["role"] == "assistant" for r in test_rows)


def test_parquet_rows_in_either_format_become_chat_rows(tmp_path):
    import pandas as pd

    path = tmp_path / "pc.parquet"
    pd.DataFrame({"prompt": ["What is 1 plus 1?", "Say hi."], "completion": ["2", "hi"]}).to_parquet(path)
    cfg = config.load(None, [f"data.train={path}", f"data.test={path}"])
    rows = data_mod.load_paths(cfg.data.train)
    assert rows[0] == {"prompt": [{"role": "user", "content": "What is 1 plus 1?"}],
                       "completion": [{"role": "assistant", "content": "2"}], "skill": "all", "answer": "2"}
    # A messages column (parquet stores it as arrays of structs) splits at the last assistant turn.
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    pd.DataFrame({"messages": [chat]}).to_parquet(path)
    (row,) = data_mod.load_paths(str(path))
    assert row["prompt"] == chat[:2] and row["completion"] == chat[2:] and row["answer"] == "Hello."


def test_user_train_rows_that_repeat_a_test_prompt_are_dropped(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[2]) + "\n")
    cfg = config.load(None, [f"data.train={tmp_path / 'train.jsonl'}", f"data.test={tmp_path / 'test.jsonl'}"])
    data = data_mod.load_data(cfg)
    assert [r["answer"] for r in data["train"]] == ["a0", "a1", "a3", "a4", "a5"]
    assert data["info"]["dropped_train_rows_in_test"] == 1


# --------------------------------------------------------------------------- config
def test_config_defaults_overrides_and_relative_paths(tmp_path):
    cfg = config.load(None)
    assert cfg.builtin_model and cfg.builtin_data and cfg.kernels == "auto" and cfg.quantization is None
    # "1e-4" without a dot is a string to YAML 1.1 (PyYAML); number keys accept it anyway.
    (tmp_path / "c.yaml").write_text("data:\n  train: [a.jsonl, sub/b.jsonl]\ntraining:\n  lr: 1e-4\n")
    cfg = config.load(tmp_path / "c.yaml", ["training.batch_size=3", "lora.use_rslora=true"])
    assert cfg.data.train == [str(tmp_path / "a.jsonl"), str(tmp_path / "sub" / "b.jsonl")]
    assert (cfg.training.lr, cfg.training.batch_size, cfg.lora.use_rslora) == (1e-4, 3, True)
    # What the run directory records reads back as the same config.
    again = config.from_dict(__import__("yaml").safe_load(config.dump(cfg)))
    assert again == cfg


def test_kernels_auto_means_on_with_cuda_and_off_without(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.kernels_enabled(config.load(None)) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from workbench import patch

    assert models.kernels_enabled(config.load(None)) == {**dict.fromkeys(patch.OPTIONS, True),
                                                          patch.FUSE_ADD_NORM: False,
                                                          patch.ADAPTER_AS_AUTOCAST: False}
    assert models.kernels_enabled(config.load(None, ["kernels=false"])) is None
    assert models.kernels_enabled(config.load(None, ["kernels={rope: false}"]))["rope"] is False


def test_shipped_example_configs_parse_and_the_default_one_is_the_default():
    from importlib.resources import files

    folder = files("workbench") / "configs"
    assert config.load(folder / "default.yaml") == config.load(None)
    qlora = config.load(folder / "qlora-local.yaml")
    assert qlora.quantization.type == "nf4" and qlora.lora.use_rslora and qlora.training.gradient_checkpointing


def test_default_base_is_a_small_deterministic_safetensors_llama(tmp_path):
    tok = wtok.default_tokenizer()
    a = default.write_base(tok, tmp_path / "a")
    b = default.write_base(tok, tmp_path / "b")
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert manifest.hash_tree(a) == manifest.hash_tree(b)
    model = default.build_model(tok)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) == 3_418_368   # the documented count
    # llama.cpp's k-quants take only rows of a multiple of 256 (QK_K): every matrix's input dim
    # is one, so the main job's q4_k_m is real Q4_K (issue 21).
    from workbench.export.quantize import QK_K

    assert all(p.shape[-1] % QK_K == 0 for p in model.parameters() if p.ndim == 2)
    # The widened head (see workbench/default.py); 0.02 would stall LoRA.
    assert model.lm_head.weight.std().item() == pytest.approx(default.LM_HEAD_STD, rel=0.05)


def test_trainer_takes_our_fused_loss_with_gradient_accumulation(tmp_path, monkeypatch):
    """With our loss patched in, TRL's plain NLL path (its own chunked LM head) is
    replaced by our fused linear cross-entropy, keeping TRL's reduction: the summed
    token NLL over the whole accumulated batch. Reference: the unpatched model on one
    batch of all four rows."""
    from workbench import patch

    cfg = quick_config("training.batch_size=2", "training.grad_accum=2", "training.max_steps=1",
                       "training.max_grad_norm=0", *FP32)
    model, tok = _tiny_peft_model(cfg)
    ref_model, _ = _tiny_peft_model(cfg)
    patch.patch_model(model, rms_norm=False, rope=False, mlp=False, lora=False, nf4=False)
    assert patch.fused_loss_patched(model)
    grads = {}

    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer = trainer_mod.make_trainer(cfg, model, tok, _rows_of_unequal_length(), str(tmp_path / "out"), [Capture()])
    # The trainer's loss reads no tensor into Python (TRL's token count does): the host would
    # wait there for the forward before launching the backward. (Reads in the model, such as
    # transformers' look at the attention mask or a kernel's CPU-only input check, are not the
    # trainer's.)
    scalars = []
    loss_of = trainer.compute_loss

    def watched(*args, **kwargs):
        with monkeypatch.context() as m:
            for name in ("item", "__int__", "__float__", "__bool__"):
                def read(t, _real=getattr(torch.Tensor, name), _name=name):
                    caller = sys._getframe(1).f_code.co_filename
                    if caller == trainer_mod.__file__ or "trl" in Path(caller).parts:
                        scalars.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
                    return _real(t)
                m.setattr(torch.Tensor, name, read)
            return loss_of(*args, **kwargs)

    trainer.compute_loss = watched
    before = patch.kernel_calls().get("fused_linear_cross_entropy", 0)
    trainer.train()
    assert patch.kernel_calls().get("fused_linear_cross_entropy", 0) == before + 2  # one per micro-batch
    assert scalars == []
    logged = trainer.state.log_history[0]
    assert "mean_token_accuracy" not in logged  # TRL's head (which computes it) did not run

    big = trainer_mod.make_trainer(quick_config("training.batch_size=4", *FP32), ref_model, tok,
                             _rows_of_unequal_length(), str(tmp_path / "ref"))
    ref_model.to(big.args.device)
    batch = next(iter(big.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    loss = ref_model(**batch).loss
    loss.backward()
    assert logged["num_tokens"] == batch["attention_mask"].sum().item()  # both micro-batches', counted at the log
    # float32 throughout; the fused kernel sums the vocab in tiles and the tokens in
    # another grouping than one torch GEMM (see assert_same_gradient); a wrong
    # normaliser (per micro-batch means) is off by percents.
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, p in ref_model.named_parameters():
        if p.requires_grad:
            assert_same_gradient(grads[name], p.grad)
    # (No unpatch: TRL wrapped the patched forward, and only the loss was patched,
    # which holds no module-level globals; the model dies with the test.)


def test_kernels_true_on_the_cpu_runs_our_kernels_in_training(tmp_path):
    """`workbench train` with kernels: true on a machine without CUDA switches Triton's
    interpreter on before triton loads (a fresh process, without TRITON_INTERPRET in
    its environment), and the record counts the kernel calls that ran in training."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path: on CUDA the kernels run without the interpreter")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "workbench", "train", "--run", str(run), "--set", "kernels=true",
           "--set", "training.max_steps=1", "--set", "training.batch_size=2", "--set", "eval.max_rows=0",
           "--set", "data.builtin_rows=16"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = manifest.stage(run, "train")["kernels"]["calls_in_training"]
    # One optimizer step of the 4-layer default: every norm, RoPE, MLP and LoRA kernel and
    # the fused loss (through the trainer's loss path, not TRL's own LM head) ran.
    assert {"rms_norm", "rope", "lora_qkv", "lora_o", "lora_mlp", "fused_linear_cross_entropy"} <= calls.keys(), calls
    assert calls["fused_linear_cross_entropy"] == 1


def torchrun_train(tmp_path, run, *sets):
    """`workbench train` of 3 steps (batch 2, 32 built-in rows) in two processes under torchrun,
    with ``sets`` as --set overrides; asserts that it succeeded and returns the process."""
    import subprocess
    import sys

    script = tmp_path / "launch.py"
    overrides = ["training.max_steps=3", "training.batch_size=2", "training.logging_steps=1", "eval.max_rows=0",
                 "data.builtin_rows=32", *sets]
    args = ["train", "--run", str(run)] + [a for kv in overrides for a in ("--set", kv)]
    script.write_text(f"import sys\nfrom workbench.cli import main\nsys.exit(main({args!r}))\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < 2:
        # Two ranks need two GPUs (rank 1 would ask for cuda:1); with fewer, both ranks
        # run on the CPU with gloo, as on CI.
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(torchrun, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_a_distributed_launch_trains_with_ddp_and_one_process_writes_the_run(tmp_path):
    """Two processes under torchrun (what `accelerate launch` starts on a multi-GPU
    host; gloo on this CPU), with our kernels: the Trainer trains with DDP through the
    patched model and our fused loss, and only the main process prints and writes the
    run directory, which ends complete and consistent."""
    run = tmp_path / "run"
    out = torchrun_train(tmp_path, run, "kernels=true")
    assert out.stderr.count("train: step 1/3") == 1 and out.stdout.count("run directory:") == 1, out.stderr[-2000:]
    rec = manifest.require_stage(run, "train", "")
    assert manifest.verify_outputs(run, "train") == []
    assert [r["step"] for r in loss_rows(run)] == [1, 2, 3]
    assert rec["processes"] == 2 and rec["steps"] == 3 and rec["tokens"] > 0
    assert rec["kernels"]["calls_in_training"]["fused_linear_cross_entropy"] == 3  # this rank's, one per step
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_wrapped_packing_fills_every_sequence_and_bad_values_are_refused(tmp_path):
    """training.packing: wrapped concatenates the rows and cuts them into sequences of
    exactly max_seq_len, so every step sees batch x max_seq_len tokens (what the train
    benchmark needs for its 4 x 2048 shape); unpacked rows are far shorter."""
    run = tmp_path / "run"
    train.run_train(quick_config("training.packing=wrapped", "training.max_seq_len=48", "training.batch_size=4",
                                 "training.max_steps=3"), run)
    tokens = [r["tokens"] for r in loss_rows(run)]
    per_step = [b - a for a, b in zip([0, *tokens], tokens)]
    # Every sequence is 48 tokens (the remainder of the cut is dropped).
    assert per_step == [4 * 48] * 3, per_step
    # The first micro-batches' fingerprints count what TRL counts, and fewer targets than
    # tokens (each sequence's first token is no target; the prompts are masked).
    prints = json.loads((run / "manifest.json").read_text())["stages"]["train"]["data_fingerprint"]
    assert [fp["tokens"] for fp in prints] == per_step[:data_mod.FINGERPRINT_BATCHES]
    assert all(0 < fp["targets"] < fp["tokens"] - 3 and fp["token_sum"] > 0 for fp in prints)
    unpacked = tmp_path / "unpacked"
    train.run_train(quick_config("training.max_seq_len=48", "training.batch_size=4", "training.max_steps=1"), unpacked)
    assert loss_rows(unpacked)[0]["tokens"] <= 3 * 48   # the built-in rows are short: ~25 tokens each
    with pytest.raises(UserError, match="training.packing"):
        quick_config("training.packing=greedy")


def test_wrapped_packing_fills_sequences_longer_than_a_thousand_rows():
    """At a max_seq_len beyond what 1000 rows hold (TRL's map batch; the built-in rows have
    ~27 tokens), TRL's own wrapping would leave only remainders of ~27K tokens: the context
    search at 131072 measured those. Every sequence here holds max_seq_len tokens: the rows
    concatenated, in order, labels alongside."""
    cfg = quick_config("training.packing=wrapped", "training.max_seq_len=40000", "data.builtin_rows=3200")
    rows = data_mod.load_data(cfg)["train"]
    tok = wtok.default_tokenizer()
    packed = data_mod.training_dataset(cfg, tok, rows)
    unpacked = data_mod.training_dataset(quick_config("training.max_seq_len=4096"), tok, rows)
    flat_ids = [i for r in unpacked["input_ids"] for i in r]
    flat_labels = [i for r in unpacked["labels"] for i in r]
    assert len(flat_ids) // 40000 >= 2 and len(flat_ids) % 40000  # two full sequences and a remainder
    assert [len(r) for r in packed["input_ids"]] == [40000] * (len(flat_ids) // 40000)
    assert [i for r in packed["input_ids"] for i in r] == flat_ids[:len(packed) * 40000]
    assert [i for r in packed["labels"] for i in r] == flat_labels[:len(packed) * 40000]


@pytest.mark.parametrize("sets", [["training.packing=wrapped", "training.max_seq_len=48"],
                                  ["training.packing=bfd", "training.max_seq_len=48"],
                                  ["training.max_seq_len=26"]], ids=["wrapped", "bfd", "unpacked-cut"])
def test_every_stack_gets_the_batches_trl_makes_of_the_text_rows(tmp_path, monkeypatch, sets):
    """make_trainer hands TRL the rows tokenized, labelled and packed (training_dataset), and
    no SFTTrainer._prepare_dataset runs on them (Unsloth's replacement packs elsewhere). The
    trainer then trains on exactly what TRL makes of the prompt/completion rows by itself:
    the same sequences, labels and collated batches. 1200 rows, so wrapped packing's
    1000-row map batches end inside the data; max_seq_len 26 cuts some answers and drops
    the rows it leaves without one."""
    import datasets
    from trl import SFTTrainer, pack_dataset

    cfg = quick_config("training.batch_size=4", "data.builtin_rows=1200", *sets)
    rows = data_mod.load_data(cfg)["train"]
    tok = wtok.default_tokenizer()
    text = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    with models.old_checkpointing_name():
        args = trainer_mod.sft_config(cfg, str(tmp_path / "trl"))
        args.dataset_kwargs = None  # TRL prepares the text rows itself
        wrapped = cfg.training.packing == "wrapped"
        if wrapped:  # TRL tokenizes and labels; the wrapping in one batch is ours (training_dataset)
            args.packing, args.max_length = False, None
        theirs = SFTTrainer(model=default.build_model(tok), args=args, train_dataset=text, processing_class=tok)
    if wrapped:
        rows_tokens = theirs.train_dataset.select_columns(["input_ids", "labels"])
        full = pack_dataset(rows_tokens, 48, "wrapped", map_kwargs={"batch_size": len(rows_tokens)})
        theirs.train_dataset = full.select(range(len(full) - 1))  # the remainder (1200 rows are not a multiple)
        assert len(full[len(full) - 1]["input_ids"]) < 48

    def prepare_again(*args, **kwargs):
        raise AssertionError("the trainer prepared the prepared dataset again")

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", prepare_again)
    ours = trainer_mod.make_trainer(cfg, default.build_model(tok), tok, rows, str(tmp_path / "ours"))
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in theirs.train_dataset.column_names]
    assert ours.train_dataset.column_names == columns
    for column in columns:
        assert list(ours.train_dataset.with_format(None)[column]) == list(theirs.train_dataset[column]), column
    # TRL's collator gets our token ids as arrays (one copy each, not a Python int at a time), theirs as lists;
    # the batches below are the same.
    row = ours.train_dataset[0]
    assert isinstance(row["input_ids"], np.ndarray) and isinstance(row["labels"], np.ndarray)
    assert isinstance(theirs.train_dataset[0]["input_ids"], list)
    if "seq_lengths" in columns:
        assert isinstance(row["seq_lengths"], list)
    for n, (a, b) in enumerate(zip(ours.get_train_dataloader(), theirs.get_train_dataloader())):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a), n
        assert data_mod.batch_fingerprint(a) == data_mod.batch_fingerprint(b)
        if n == 4:
            break


def test_a_max_seq_len_that_the_prompts_fill_is_refused():
    cfg = quick_config("training.max_seq_len=12")  # every built-in prompt is longer
    with pytest.raises(UserError, match="leaves no answer token in any training row"):
        data_mod.training_dataset(cfg, wtok.default_tokenizer(), data_mod.load_data(cfg)["train"])


# --------------------------------------------------------------------------- the larger built-in
def test_small_builtin_is_a_deterministic_gqa_llama_with_the_same_logit_ceiling():
    """builtin:small-llama (the GPU accuracy run's base): the documented shape, ~5.5x the
    tiny one's parameters, and its lm_head std scaled by its hidden size so that the largest
    logit LoRA can reach (std x hidden, workbench/default.py) stays the tiny one's."""
    tok = wtok.default_tokenizer()
    model = default.build_model(tok, "builtin:small-llama")
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.intermediate_size) == ("llama", 512, 6, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads) == (8, 2, 64)
    assert c.vocab_size == len(tok) and not c.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 18_635_264   # the documented count
    assert all(p.shape[-1] % 256 == 0 for p in model.parameters() if p.ndim == 2)   # k-quant rows
    assert default.LM_HEAD_STD == 0.075 and default.LM_HEAD_STD * 256 == pytest.approx(default.LOGIT_CEILING)
    assert default.lm_head_std(default.SMALL_ARCH) * 512 == pytest.approx(default.LOGIT_CEILING)
    assert model.lm_head.weight.std().item() == pytest.approx(default.lm_head_std(default.SMALL_ARCH), rel=0.05)
    again = default.build_model(tok, "builtin:small-llama").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="builtin:tiny-llama, builtin:small-llama"):
        default.build_model(tok, "builtin:nope")


def test_config_takes_every_builtin_model_and_names_them_for_an_unknown_one(tmp_path):
    cfg = config.load(None, ["model.path=builtin:small-llama"])
    assert cfg.builtin_model and cfg.model.path == "builtin:small-llama"  # a name, not resolved as a folder
    with pytest.raises(UserError, match="'builtin:nope'.*builtin:tiny-llama, builtin:small-llama"):
        config.load(None, ["model.path=builtin:nope"])
    # A missing folder's error names the built-in models too.
    with pytest.raises(UserError, match="builtin:tiny-llama.*builtin:small-llama"):
        checks.check_model_folder(tmp_path / "missing")


def test_shipped_accuracy_gpu_config_validates_and_uses_the_small_builtin():
    from importlib.resources import files

    cfg = config.load(files("workbench") / "configs" / "accuracy-gpu.yaml")
    assert cfg.builtin_model and cfg.model.path == "builtin:small-llama" and cfg.builtin_data
    assert cfg.lora.r == 16 and sorted(cfg.lora.target_modules) == sorted(config.DEFAULT_TARGET_MODULES)
    # The accuracy suite sets kernels per stack; auto here keeps a plain `workbench train` sensible.
    assert cfg.kernels == "auto" and cfg.eval.max_rows >= len(synthetic.build()["test"])


def test_a_run_on_the_small_builtin_writes_that_base(tmp_path):
    run = tmp_path / "run"
    train.run_train(quick_config("model.path=builtin:small-llama", "training.max_steps=1"), run)
    base = json.loads((run / "base" / "config.json").read_text())
    assert (base["hidden_size"], base["num_hidden_layers"]) == (512, 6)
    assert manifest.verify_outputs(run, "train") == []
