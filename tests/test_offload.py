"""Offloaded gradient checkpointing (training.gradient_checkpointing: offload): the layers'
inputs go to host memory and come back exactly, every layer's, and nothing else changes.

On the CPU the "host copy" is a plain copy, so these tests check the wiring (which
tensors move, that the backward reads the copies, that training is unchanged to the bit);
the test at the end checks on CUDA that the inputs leave the GPU and that the side-stream
copies give the same gradients."""
import pytest

from workbench.offline import enforce_offline

enforce_offline()

import torch  # noqa: E402

from workbench import config, manifest, models, offload as offload_mod, train, trainer as trainer_mod  # noqa: E402
from workbench.errors import UserError  # noqa: E402

from test_train import (_rows_of_unequal_length, _tiny_peft_model, one_torch_thread_per_xdist_worker,  # noqa: E402,F401
                        quick_config, torchrun_train)

LAYERS = 4  # the built-in tiny Llama's decoder layers


def _two_steps(tmp_path, checkpointing: str):
    """Two optimizer steps of the tiny default in fp32 (no clipping): every step's
    gradients, the losses, and the trainer."""
    from transformers import TrainerCallback

    cfg = quick_config(f"training.gradient_checkpointing={checkpointing}", "training.max_steps=2",
                       "training.batch_size=2", "training.max_grad_norm=0", "model.dtype=float32")
    model, tok = _tiny_peft_model(cfg)
    grads = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer = trainer_mod.make_trainer(cfg, model, tok, _rows_of_unequal_length(), str(tmp_path / checkpointing),
                                 [Capture()])
    trainer.train()
    return grads, [r["loss"] for r in trainer.state.log_history if "loss" in r], trainer


def test_offloading_moves_every_layer_input_and_trains_bit_for_bit_as_checkpointing(tmp_path):
    ref, ref_losses, plain = _two_steps(tmp_path, "true")
    got, losses, trainer = _two_steps(tmp_path, "offload")
    assert plain.activation_offload is None
    offload = trainer.activation_offload
    # One input per decoder layer and step went to the host, and each came back once.
    assert offload.first_step["tensors"] == LAYERS
    assert offload.tensors == offload.restored == 2 * LAYERS
    assert offload.modules >= LAYERS
    # The same arithmetic on exact copies: equal to the bit, not within a tolerance.
    assert losses == ref_losses and len(ref) == len(got) == 2
    for step_ref, step_got in zip(ref, got):
        assert step_ref.keys() == step_got.keys() and step_ref
        for name in step_ref:
            assert torch.equal(step_ref[name], step_got[name]), name


def test_the_backward_reads_the_host_copies(tmp_path, monkeypatch):
    """A planted fault in the copy back (zeros instead of the saved input) must change the
    gradients: the recompute reads what the hooks return, not a tensor kept elsewhere."""
    ref, _, _ = _two_steps(tmp_path, "offload")
    real = offload_mod.ActivationOffload.unpack
    monkeypatch.setattr(offload_mod.ActivationOffload, "unpack",
                        lambda self, packed: torch.zeros_like(real(self, packed)))
    got, _, _ = _two_steps(tmp_path, "offload")
    assert any(not torch.equal(ref[0][n], got[0][n]) for n in ref[0])


def test_non_reentrant_checkpointing_is_refused_and_a_model_without_checkpointing_wraps_nothing():
    import functools

    from torch.utils.checkpoint import checkpoint

    cfg = quick_config()
    model, _ = _tiny_peft_model(cfg)
    offload = offload_mod.ActivationOffload()
    assert offload_mod.install(model, offload) == 0  # checkpointing is off
    with models.old_checkpointing_name():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="not reentrant"):
        offload_mod.install(model, offload)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    n = offload_mod.install(model, offload)
    assert n >= LAYERS and offload_mod.install(model, offload) == n  # a second install wraps nothing twice
    other = offload_mod.ActivationOffload()  # another's install replaces the hooks, not stacks them
    assert offload_mod.install(model, other) == n
    layer = model.base_model.model.model.layers[0]
    assert layer._gradient_checkpointing_func.workbench_offload is other
    assert isinstance(layer._gradient_checkpointing_func.wrapped, functools.partial)
    assert layer._gradient_checkpointing_func.wrapped.func is checkpoint


def test_the_train_stage_records_what_it_offloaded_and_the_config_takes_only_known_values(tmp_path):
    cfg = quick_config("training.gradient_checkpointing=offload", "training.max_steps=1", "training.batch_size=2",
                       "data.builtin_rows=16")
    rec = train.run_train(cfg, tmp_path / "run")
    assert rec["offload"]["first_step"]["tensors"] == LAYERS
    assert rec["offload"]["total"]["restored"] == LAYERS
    assert manifest.stage(tmp_path / "run", "train")["offload"] == rec["offload"]
    assert train.run_train(quick_config("training.max_steps=1", "data.builtin_rows=16"),
                           tmp_path / "plain")["offload"] is None
    with pytest.raises(UserError, match="training.gradient_checkpointing.*use one of False, True, offload"):
        config.load(None, ["training.gradient_checkpointing=sometimes"])
    hint = trainer_mod.oom_message(quick_config("training.gradient_checkpointing=true"))
    assert "gradient_checkpointing: offload" in hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host memory is only elsewhere there")
def test_on_cuda_the_inputs_leave_the_gpu_and_the_gradients_are_unchanged():
    """A bf16 Llama of 4 layers at 8192 tokens (eager attention, whose backward has no
    atomics, so two runs can be compared to the bit): after the forward, the offloaded run holds
    less GPU memory than plain reentrant checkpointing by at least three of the four layer
    inputs (8192 x 1024 x 2 bytes each; the last may still be in flight on the side
    stream), and its gradients equal plain checkpointing's to the bit."""
    import transformers

    from workbench.families import tiny_config

    hidden, seq = 1024, 8192
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config(
        "llama", vocab_size=1024, hidden_size=hidden, intermediate_size=2048, num_hidden_layers=LAYERS,
        num_attention_heads=8, num_key_value_heads=8, head_dim=128,
        attn_implementation="eager")).to("cuda", torch.bfloat16)  # eager: a deterministic backward
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 1024, (1, seq), device="cuda")
    results = {}
    for name in ("plain", "offload"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        offload = offload_mod.ActivationOffload()
        if name == "offload":
            assert offload_mod.install(model, offload) >= LAYERS
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        results[name] = (held, {n: p.grad.clone() for n, p in model.named_parameters()}, offload)
    layer_input = seq * hidden * 2
    assert results["offload"][2].tensors == LAYERS
    assert results["plain"][0] - results["offload"][0] >= (LAYERS - 1) * layer_input
    for n, g in results["plain"][1].items():
        assert torch.equal(g, results["offload"][1][n]), n


def test_offloaded_checkpointing_trains_under_a_distributed_launch(tmp_path):
    """Two processes under torchrun (gloo on this CPU, as `accelerate launch` starts DDP):
    reentrant checkpointing with the offload hooks inside DDP's backward. Both ranks train the
    same 3 steps; the record is the main rank's, one input per layer and step moved."""
    run = tmp_path / "run"
    torchrun_train(tmp_path, run, "kernels=false", "training.gradient_checkpointing=offload")
    rec = manifest.require_stage(run, "train", "")
    assert rec["processes"] == 2 and rec["steps"] == 3
    assert rec["offload"]["first_step"]["tensors"] == LAYERS
    assert rec["offload"]["total"]["tensors"] == rec["offload"]["total"]["restored"] == 3 * LAYERS
