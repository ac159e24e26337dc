"""What a patched LoRA / QLoRA training forward keeps alive for the backward, against HF's.

Mirrors the GPU training setup on the CPU, at a tiny Llama-3.2-like shape (tied
embeddings): a bf16 checkpoint, for QLoRA loaded as bitsandbytes NF4 with double
quantization and passed through ``prepare_model_for_kbit_training`` (which casts
every non-4-bit parameter -- norms, embeddings, the tied lm_head -- to fp32), a PEFT
LoRA adapter on all seven projections (fp32 adapter weights, PEFT's default), and
one training forward under bf16 autocast, as the Trainer's ``bf16=True`` runs it,
with and without gradient checkpointing.

The HF stack is what TRL's SFTTrainer runs for it: the loss from TRL's chunked LM
head (``add_fused_lm_head``, ``model(..., fused_lm_head=True)``), which never forms
the [tokens, vocab] logits. Ours is what workbench.train's trainer runs when the
patch is applied: ``model(..., labels=...)`` through the patched causal-LM forward.

Measured (``torch.autograd.graph.saved_tensors_hooks``): the bytes of the tensors
saved for backward, deduplicated by storage, parameters excluded. The bound: ours
saves no more than HF's stack, and nothing with a vocabulary-sized dimension.

The bug this pins (H200, Llama-3.2-1B shape, 4 x 2048 tokens: QLoRA peak 34.9 GiB
ours vs 23.3 GiB HF; 14.9 vs 4.6 GiB with checkpointing): under autocast the
QLoRA hidden states and the fp32 head failed the patched loss's dtype checks, so it
fell back to HF's full-logits forward -- saving the fp32 log-softmax of the
[tokens, vocab] logits (3.9 GiB there) and the bf16 cast of the head (0.5 GiB), with
the logits, their fp32 upcast and their gradients (another ~6-8 GiB) alive around
the loss -- where the HF stack's loss came from TRL's chunked head.
"""
import pytest
import torch

from workbench.offline import enforce_offline

enforce_offline()

import peft  # noqa: E402
import transformers  # noqa: E402

from workbench.families import tiny_config  # noqa: E402
from workbench.patch import kernel_calls, patch_model, unpatch_model  # noqa: E402

pytest.importorskip("bitsandbytes")
trl_utils = pytest.importorskip("trl.trainer.utils")

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Feature sizes multiples of 64: bitsandbytes' CPU dequantize_4bit is wrong otherwise
# (see tests/test_model_parity.py::_qlora_pair).
HIDDEN, INTER, VOCAB, LAYERS = 128, 256, 1024, 2
BATCH, SEQ = 2, 32
AUTOCAST = torch.bfloat16


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         initializer_range=0.05, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("qlora-memory") / "base"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _load(path, mode: str, checkpointing: bool, upcast_frozen: bool = True):
    """As workbench.models' load_model + attach_lora build it for training."""
    from workbench.models import keep_portable_4bit_layout, prepare_kbit

    if mode == "qlora":
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=AUTOCAST)
        model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=AUTOCAST,
                                                              device_map={"": "cpu"})
        keep_portable_4bit_layout(model)
        model = prepare_kbit(model, upcast_frozen, checkpointing)
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=AUTOCAST)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=list(PROJS), task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained adapter: PEFT's zero B would hide the LoRA branch
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    return model


def _batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def _step(model, call) -> dict:
    """One training forward under bf16 autocast and its backward: the tensors saved
    for backward (storage -> (bytes, dtype, shape)), the loss and the LoRA gradients."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
        return t

    model.zero_grad(set_to_none=True)
    before = kernel_calls()
    with torch.autocast("cpu", dtype=AUTOCAST), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = call().loss
    loss.backward()
    ran = {k: n - before.get(k, 0) for k, n in kernel_calls().items() if n > before.get(k, 0)}
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"saved": saved, "bytes": sum(b for b, _, _ in saved.values()), "loss": loss.detach().float(),
            "grads": grads, "ran": ran}


def _describe(saved: dict) -> str:
    big = sorted(saved.values(), key=lambda v: -v[0])[:6]
    return ", ".join(f"{b / 1024:.1f} KiB {str(d).removeprefix('torch.')} {list(s)}" for b, d, s in big)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_patched_training_forward_saves_no_more_than_hf(base, mode, checkpointing):
    model = _load(base, mode, checkpointing)
    trl_utils.add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    inputs, labels = _batch()
    hf = _step(model, lambda: model(**inputs, labels=labels, use_cache=False, fused_lm_head=True))
    patch_model(model)
    try:
        ours = _step(model, lambda: model(**inputs, labels=labels, use_cache=False))
    finally:
        unpatch_model(model)

    detail = (f"\n  ours {ours['bytes'] / 1024:.1f} KiB: {_describe(ours['saved'])}"
              f"\n  hf   {hf['bytes'] / 1024:.1f} KiB: {_describe(hf['saved'])}\n  ran {ours['ran']}")
    assert ours["bytes"] <= hf["bytes"], detail
    vocab_sized = [v for v in ours["saved"].values() if VOCAB in v[2]]
    assert not vocab_sized, f"logits- or head-sized tensors saved for backward: {vocab_sized}" + detail
    # The loss came from our fused kernel, not from HF's full-logits fallback; and the fused
    # LoRA groups ran in QLoRA too, on the fp32 norm outputs (their mixed mode: workbench.patch._mixed_dtype).
    assert ours["ran"].get("fused_linear_cross_entropy") == 1, detail
    assert ours["ran"].get("lora_qkv") == ours["ran"].get("lora_mlp") == LAYERS * (1 + checkpointing), detail

    # The measured step is a whole training step: the gradient reaches every adapter
    # tensor through the loss kernel. Its numbers are judged against fp64 by the
    # tolerance doctrine in tests/test_patch_autocast.py (this QLoRA setup under bf16
    # autocast) and tests/test_model_parity.py, not with a bound measured here.
    assert torch.isfinite(ours["loss"]) and ours["grads"].keys() == hf["grads"].keys()
    for name, g in ours["grads"].items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{name}: no finite, non-zero gradient"


def test_fused_loss_under_autocast_with_fp32_head_matches_hf():
    """The loss path QLoRA takes under the Trainer's bf16 autocast: after
    prepare_model_for_kbit_training the final norm, and so the hidden states, and
    the lm_head are fp32; HF's lm_head then computes bf16 logits from autocast's
    casts, and ForCausalLMLoss takes their cross-entropy in fp32. The patched loss
    (alone: the other kernels stay out of this comparison) does the same without
    forming the logits. Judged by the doctrine at bf16's roundoff, against the
    unpatched model under autocast (baseline) and in fp64 (exact)."""
    import copy

    from workbench.kernels._tolerance import compare

    torch.manual_seed(7)
    config = tiny_config("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         initializer_range=0.1, tie_word_embeddings=True)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJS)))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    exact_model = copy.deepcopy(model).double()
    inputs, labels = _batch()

    def run(m):
        m.zero_grad(set_to_none=True)
        out = m(**inputs, labels=labels, use_cache=False)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    with torch.autocast("cpu", dtype=AUTOCAST):
        base_out, base_grads = run(model)
        before = kernel_calls()
        patch_model(model, rms_norm=False, rope=False, mlp=False, lora=False)
        try:
            kern_out, kern_grads = run(model)
        finally:
            unpatch_model(model)
    ran = {k: n - before.get(k, 0) for k, n in kernel_calls().items() if n > before.get(k, 0)}
    exact_out, exact_grads = run(exact_model)

    assert ran == {"fused_linear_cross_entropy": 1}
    assert kern_out.logits is None and base_out.logits.dtype == AUTOCAST
    # The loss is a statistic of bf16 logits: judged at bf16's roundoff (as test_model_parity's judge_loss).
    results = [compare("loss", kern_out.loss.detach().to(AUTOCAST), base_out.loss.detach().to(AUTOCAST),
                       exact_out.loss, AUTOCAST)]
    results += [compare(f"grad {n}", kern_grads[n], base_grads[n], exact_grads[n], AUTOCAST) for n in exact_grads]
    bad = [r.line() for r in results if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_qlora_without_upcast_keeps_the_residual_stream_in_bf16(base, checkpointing):
    """``quantization.upcast_frozen: false``: the norms, embeddings and head stay bf16 (no
    fp32 copy of them), the patched step then saves less than the upcast one (bf16
    instead of fp32 hidden states around every norm and residual add), the fused kernels
    run in their 16-bit mode, and the gradient reaches every adapter tensor."""
    inputs, labels = _batch()
    steps = {}
    for upcast in (True, False):
        model = _load(base, "qlora", checkpointing, upcast_frozen=upcast)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        assert frozen == ({torch.float32} if upcast else {torch.bfloat16}), frozen
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        patch_model(model)
        try:
            steps[upcast] = _step(model, lambda: model(**inputs, labels=labels, use_cache=False))
        finally:
            unpatch_model(model)
    on, off = steps[True], steps[False]
    detail = (f"\n  upcast     {on['bytes'] / 1024:.1f} KiB: {_describe(on['saved'])}"
              f"\n  not upcast {off['bytes'] / 1024:.1f} KiB: {_describe(off['saved'])}")
    assert off["bytes"] < 0.8 * on["bytes"], detail
    assert not [v for v in off["saved"].values() if v[1] == torch.float32 and HIDDEN in v[2]], detail
    assert off["ran"].get("fused_linear_cross_entropy") == 1 and off["ran"].get("lora_mlp") == LAYERS * (1 + checkpointing)
    for name, g in off["grads"].items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{name}: no finite, non-zero gradient"
    # The same model and batch: the two numerics differ by bf16 roundings of the hidden states.
    assert abs(float(off["loss"]) - float(on["loss"])) <= 2e-2 * abs(float(on["loss"]))


def test_upcast_frozen_must_be_a_bool():
    from workbench import config
    from workbench.errors import UserError

    with pytest.raises(UserError, match="upcast_frozen"):
        config.from_dict({"quantization": {"type": "nf4", "upcast_frozen": "no"}})
