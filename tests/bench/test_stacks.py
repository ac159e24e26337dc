"""The benchmarks' comparison stacks (workbench.bench.stacks): what each hands the training
recipe, and the child process that trains on one (workbench.bench.train_child). The peers'
packages need CUDA, so their loaders are checked against stand-ins here."""
import math
import sys
import types

import pytest
import torch

from workbench import config as config_mod, models, trainer
from workbench.bench import train_child
from workbench.bench.stacks import STACKS

QUICK = ["training.max_steps=2", "eval.max_rows=0", "data.builtin_rows=64"]


def _child(capsys, tmp_path, stack, *sets):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(config_mod.dump(config_mod.load(None, list(sets))))
    code = train_child.main(["--stack", stack, "--config", str(cfg), "--run", str(tmp_path / "run")])
    return code, capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is about machines without CUDA")
def test_a_peer_stack_that_cannot_run_here_is_one_sentence_and_trains_nothing(tmp_path, capsys):
    # A stack never quietly trains plain HF in its place: its numbers would be HF's.
    code, err = _child(capsys, tmp_path, "liger", *QUICK)
    assert code == 2 and "the liger stack needs" in err and "Traceback" not in err
    code, err = _child(capsys, tmp_path, "unsloth", *QUICK)
    assert code == 2 and "the unsloth stack needs" in err and "unsloth-host-packages.txt" in err
    # Unsloth's model generates only after its own for_inference switch: no in-run accuracy eval.
    code, err = _child(capsys, tmp_path, "unsloth", "training.max_steps=2", "eval.max_rows=4")
    assert code == 2 and "set eval.max_rows: 0" in err
    assert not (tmp_path / "run").exists()


def test_liger_reaches_trl_as_use_liger_kernel_and_the_product_never_does():
    cfg = config_mod.load(None, ["kernels=false"])
    assert trainer.sft_config(cfg, "/tmp/x", STACKS["liger"]).use_liger_kernel is True
    assert trainer.sft_config(config_mod.load(None, ["kernels=true"]), "/tmp/x").use_liger_kernel is False
    assert trainer.sft_config(cfg, "/tmp/x", STACKS["hf"]).use_liger_kernel is False


class _LigerApplied(Exception):
    """Raised by the stand-in for transformers' apply_liger_kernel: training stops where Liger's
    kernels would be applied (they need CUDA)."""


@pytest.mark.usefixtures("one_cpu_thread")
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_liger_reaches_trls_preference_trainer_as_its_layer_kernels(method, monkeypatch, tmp_path):
    """The DPO / ORPO trainer the recipe builds for the liger stack carries use_liger_kernel, and
    TRL hands Liger the PEFT model's base with the fused linear cross-entropy off when training
    starts: Liger's RMSNorm, RoPE and SwiGLU, as under SFT (the loss, Liger's too, is the next
    test's). No Liger kernel runs here: transformers' apply_liger_kernel is a stand-in."""
    import peft
    import transformers
    import transformers.trainer

    from workbench import data, synthetic
    from workbench.families import tiny_config
    from workbench.tokenizer import default_tokenizer

    cfg = config_mod.load(None, ["kernels=false", f"training.method={method}", "training.max_steps=1",
                                 "training.batch_size=2", "eval.max_rows=0"])
    tok = default_tokenizer()
    dataset = data.preference_dataset(cfg, tok, synthetic.build_preference(train_rows=2)["train"])

    def build(stack):
        torch.manual_seed(0)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok))),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        return trainer.make_preference_trainer(cfg, model, tok, dataset, str(tmp_path / stack), stack=STACKS[stack])

    liger = build("liger")
    assert type(liger.args).__name__ == {"dpo": "DPOConfig", "orpo": "ORPOConfig"}[method]
    assert liger.args.use_liger_kernel is True
    assert liger.args.liger_kernel_config == {"fused_linear_cross_entropy": False}
    applied = []

    def apply_liger_kernel(model, kernel_config):
        applied.append((model, kernel_config))
        raise _LigerApplied

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", apply_liger_kernel)
    with pytest.raises(_LigerApplied):
        liger.train()
    [(model, kernel_config)] = applied
    assert model is liger.model and kernel_config == {"fused_linear_cross_entropy": False}
    hf = build("hf")
    assert hf.args.use_liger_kernel is False and not hf.args.liger_kernel_config
    # The train record says which trainer applied them (the fused trainer is TRL's, its loss replaced).
    from trl import DPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    assert isinstance(liger, {"dpo": DPOTrainer, "orpo": ORPOTrainer}[method])
    monkeypatch.setattr("workbench.bench.stacks.liger_version", lambda: "0.8.5")
    record = STACKS["liger"].kernels(cfg, liger.model)
    assert record["version"] == "0.8.5" and f"TRL {method.upper()}Trainer use_liger_kernel" in record["applied_by"]


# --------------------------------------------------------------------------- Liger's preference losses
def _liger_sequence_logps(x, weight, bias, target, ignore_index, average):
    """Liger's chunk_forward (chunked_loss/fused_linear_preference.py): logits in the input's
    dtype, log_softmax in fp32, the targets' log-probs summed or averaged over the unignored."""
    logits = x @ weight.t()
    if bias is not None:
        logits = logits + bias
    log_probs = torch.nn.functional.log_softmax(logits.float(), dim=-1)
    mask = target != ignore_index
    per_token = log_probs.gather(-1, torch.where(mask, target, 0).unsqueeze(-1)).squeeze(-1)
    summed = (per_token * mask).sum(-1)
    return (summed / mask.sum(-1) if average else summed), log_probs


class _FakeLigerDPOLoss(torch.nn.Module):
    """A stand-in for liger_kernel.chunked_loss.LigerFusedLinearDPOLoss (which needs Triton on
    CUDA): its constructor and forward signatures and its sigmoid loss, in plain PyTorch over the
    whole batch (Liger: the same per chunk of pairs). Records what it was given."""

    made: list = []
    calls: list = []

    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True,
                 average_log_prob=False, chunk_size=1, loss_type="sigmoid"):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                            compiled=compiled, use_ref_model=use_ref_model, average_log_prob=average_log_prob,
                            chunk_size=chunk_size, loss_type=loss_type)
        type(self).made.append(self.options)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        o = self.options
        type(self).calls.append(dict(weight=lin_weight, input=_input, target=target, bias=bias, ref_input=ref_input,
                                     ref_weight=ref_weight, ref_bias=ref_bias))
        assert o["loss_type"] == "sigmoid" and not o["compute_nll_loss"]
        n = target.shape[0] // 2
        logps, _ = _liger_sequence_logps(_input, lin_weight, bias, target, o["ignore_index"], o["average_log_prob"])
        ref = torch.zeros_like(logps)
        if o["use_ref_model"]:
            with torch.no_grad():
                ref, _ = _liger_sequence_logps(ref_input, ref_weight, ref_bias, target, o["ignore_index"],
                                               o["average_log_prob"])
        chosen_ratio, rejected_ratio = logps[:n] - ref[:n], logps[n:] - ref[n:]
        loss = -torch.nn.functional.logsigmoid(o["beta"] * (chosen_ratio - rejected_ratio)).sum() / n
        zero = torch.zeros(())
        return loss, (logps[:n].detach(), logps[n:].detach(), zero, zero, zero, o["beta"] * chosen_ratio.detach(),
                      o["beta"] * rejected_ratio.detach())


class _FakeLigerORPOLoss(torch.nn.Module):
    """A stand-in for liger_kernel.chunked_loss.LigerFusedLinearORPOLoss, as the DPO one above:
    average log-probs, Liger's log-odds (log1p(-exp)), the chosen NLL over ``nll_target``."""

    made: list = []
    calls: list = []

    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, chunk_size=1):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                            compiled=compiled, chunk_size=chunk_size)
        type(self).made.append(self.options)

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        o = self.options
        type(self).calls.append(dict(weight=lin_weight, input=_input, target=target, bias=bias, nll_target=nll_target))
        n = target.shape[0] // 2
        logps, log_probs = _liger_sequence_logps(_input, lin_weight, bias, target, o["ignore_index"], True)
        chosen, rejected = logps[:n], logps[n:]
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        ratio = torch.nn.functional.logsigmoid(log_odds)
        nll = torch.zeros(())
        if o["compute_nll_loss"]:
            nll_labels = (nll_target if nll_target is not None else target)[:n]
            nll = torch.nn.functional.nll_loss(log_probs[:n].reshape(-1, log_probs.shape[-1]), nll_labels.reshape(-1),
                                               reduction="sum", ignore_index=o["ignore_index"])
            nll = nll / (nll_labels != o["ignore_index"]).sum()
        loss = nll - o["beta"] * ratio.sum() / n
        zero = torch.zeros(())
        return loss, (chosen.detach(), rejected.detach(), zero, zero, nll.detach(), o["beta"] * chosen.detach(),
                      o["beta"] * rejected.detach(), ratio.mean().detach(), log_odds.mean().detach())


@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel.chunked_loss as the stand-ins above; Liger's layer kernels (transformers'
    apply_liger_kernel, at train start) left out; the stack's version check passed."""
    import importlib.machinery

    import transformers.trainer

    chunked = types.ModuleType("liger_kernel.chunked_loss")
    chunked.LigerFusedLinearDPOLoss, chunked.LigerFusedLinearORPOLoss = _FakeLigerDPOLoss, _FakeLigerORPOLoss
    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    package.chunked_loss = chunked
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", chunked)
    monkeypatch.setattr("workbench.bench.stacks.liger_version", lambda: "0.8.5")
    layer_kernels = []
    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", lambda model, config: layer_kernels.append(config))
    for fake in (_FakeLigerDPOLoss, _FakeLigerORPOLoss):
        monkeypatch.setattr(fake, "made", [])
        monkeypatch.setattr(fake, "calls", [])
    return layer_kernels


class _Ours(models.Stack):
    """The product's stack with our fused loss and no backbone kernels (the loss alone differs
    from the hf stack's)."""

    def kernels(self, cfg, model):
        return None

    def preference_loss(self, cfg):
        from workbench import preference

        return preference.fused_preference_loss


#: Per-step agreement of the losses (tests/test_preference.py's BAND: ~170 fp32 roundoffs over
#: three AdamW steps; a lost term, a sum taken as a mean or another reference moves them by far more).
BAND = 1e-5


@pytest.mark.usefixtures("one_cpu_thread")
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_liger_stack_trains_with_ligers_preference_loss_on_ours_and_trls_terms(method, fake_liger, tmp_path):
    """The liger stack's DPO / ORPO trainer sends every loss to liger_kernel.chunked_loss (here a
    stand-in with Liger's signatures), built with TRL's semantics (beta, sigmoid, summed DPO
    log-probs, the reference as hidden states from the adapter-disabled policy, ORPO's NLL over
    prompt and completion), and its per-step losses follow TRL's own trainer and our fused loss
    on the same tiny model, seed and data."""
    import peft
    import transformers

    from workbench import data, synthetic
    from workbench.families import tiny_config
    from workbench.tokenizer import default_tokenizer

    cfg = config_mod.load(None, ["kernels=false", f"training.method={method}", "training.max_steps=3",
                                 "training.batch_size=2", "training.logging_steps=1", "training.warmup_ratio=0",
                                 "training.beta=0.5", "eval.max_rows=0"])
    tok = default_tokenizer()
    dataset = data.preference_dataset(cfg, tok, synthetic.build_preference(train_rows=6)["train"])
    fake = {"dpo": _FakeLigerDPOLoss, "orpo": _FakeLigerORPOLoss}[method]

    def train(stack):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(tok), initializer_range=0.1))
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        t = trainer.make_preference_trainer(cfg, model, tok, dataset, str(tmp_path / type(stack).__name__),
                                            stack=stack)
        t.train()
        return t, [h["loss"] for h in t.state.log_history if "loss" in h]

    liger, liger_losses = train(STACKS["liger"])
    assert fake_liger == [{"fused_linear_cross_entropy": False}]   # Liger's layer kernels: asked for, stood in for
    assert liger.args.use_liger_kernel is True and len(fake.calls) == 3 and len(fake.made) == 3
    expected = {"ignore_index": -100, "beta": 0.5, "compiled": True, "chunk_size": 1}
    expected.update({"compute_nll_loss": False, "use_ref_model": True, "average_log_prob": False,
                     "loss_type": "sigmoid"} if method == "dpo" else {"compute_nll_loss": True})
    assert all(made == expected for made in fake.made)
    head = liger.model.get_base_model().lm_head.weight
    for step, call in enumerate(fake.calls):
        assert call["bias"] is None and torch.equal(call["weight"], head)
        assert call["input"].requires_grad and call["input"].shape[:2] == call["target"].shape
        assert call["input"].shape[0] == 2 * cfg.training.batch_size
        scored = call["target"] != -100
        assert bool(scored.any(dim=1).all())  # every sequence scores some tokens
        if method == "dpo":
            # The reference: the policy's hidden states with the adapter disabled, no gradient, the same head.
            assert not call["ref_input"].requires_grad and call["ref_input"].shape == call["input"].shape
            assert call["ref_bias"] is None and torch.equal(call["ref_weight"], head)
            # A fresh LoRA adds exactly 0: at step 1 the reference is the policy; then it moved.
            assert torch.equal(call["ref_input"], call["input"].detach()) == (step == 0)
        else:
            # TRL's ORPO NLL: every attended token of the chosen half, prompt included; the log-odds: completions.
            nll = call["nll_target"] != -100
            assert nll.shape == scored.shape and bool((nll | ~scored).all()) and int(nll.sum()) > int(scored.sum())
            assert torch.equal(call["nll_target"][scored], call["target"][scored])
    assert all(math.isfinite(v) for v in liger_losses) and len(liger_losses) == 3
    if method == "dpo":
        assert liger_losses[0] == pytest.approx(math.log(2.0), rel=1e-7)   # policy == reference at step 1
    theirs = train(STACKS["hf"])[1]
    ours_trainer, ours = train(_Ours())
    assert ours_trainer.preference_loss is not liger.preference_loss and len(fake.calls) == 3   # not Liger's
    for step, (a, b, c) in enumerate(zip(liger_losses, theirs, ours)):
        assert a == pytest.approx(b, rel=BAND), f"step {step + 1}: liger {a} vs TRL {b}"
        assert a == pytest.approx(c, rel=BAND), f"step {step + 1}: liger {a} vs ours {c}"
    assert len(set(liger_losses)) == 3   # it trains: every step moved the adapter
    # The train record names whose loss ran.
    record = STACKS["liger"].kernels(cfg, liger.model)
    name = f"liger_kernel.chunked_loss.{fake.__name__.replace('_FakeLiger', 'LigerFusedLinear')}"
    assert record["loss"] == name and f"the loss Liger's {name}" in record["applied_by"]
    assert f"TRL {method.upper()}Trainer use_liger_kernel (layer kernels" in record["applied_by"]
    assert f"fused {method.upper()} trainer" in record["applied_by"] and "TRL's" not in record["applied_by"]


def test_ligers_loss_refuses_what_it_cannot_compute(fake_liger, monkeypatch):
    """No soft cap, no conservative DPO, no precomputed reference log-probs; a liger-kernel
    whose DPO loss lacks average_log_prob (it would average where TRL sums) is refused, not run."""
    from workbench import preference
    from workbench.bench.stacks import LigerPreferenceLoss
    from workbench.errors import UserError

    h, w, labels = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long)
    dpo = LigerPreferenceLoss("dpo")
    with pytest.raises(UserError, match="no final-logit soft cap, and this model caps its logits at 30"):
        dpo(preference.PreferenceBatch("dpo", h, w, labels, 0.1, 0.0, 30.0))
    with pytest.raises(UserError, match="no label smoothing"):
        dpo(preference.PreferenceBatch("dpo", h, w, labels, 0.1, 0.1, None))
    precomputed = preference.Reference(types.SimpleNamespace(precompute_ref_logps=True), {})
    with pytest.raises(UserError, match="leave precompute_ref_log_probs off"):
        dpo(preference.PreferenceBatch("dpo", h, w, labels, 0.1, 0.0, None, reference=precomputed))
    assert not _FakeLigerDPOLoss.calls

    class OldDPOLoss(torch.nn.Module):
        def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, use_ref_model=False):
            super().__init__()

    monkeypatch.setattr(sys.modules["liger_kernel.chunked_loss"], "LigerFusedLinearDPOLoss", OldDPOLoss)
    with pytest.raises(UserError, match="would average the completion log-probs where TRL's DPO sums them"):
        dpo.module(0.1)
    assert STACKS["liger"].preference_loss(config_mod.load(None, [])) is None   # SFT: TRL's loss
    assert models.Stack().preference_loss(config_mod.load(None, ["training.method=dpo"])) is None


class _FakeFastLanguageModel:
    """Records what the stack asks of Unsloth (its real package needs CUDA)."""
    calls: list = []

    @classmethod
    def from_pretrained(cls, **kwargs):
        cls.calls.append(("from_pretrained", kwargs))
        model = torch.nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            model.add_module(name, torch.nn.Identity())
        return model, "tokenizer"

    @classmethod
    def get_peft_model(cls, model, **kwargs):
        cls.calls.append(("get_peft_model", kwargs))
        return ("peft", model)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_unsloth_loads_and_attaches_as_configured(monkeypatch, quantized, checkpointing):
    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=_FakeFastLanguageModel))
    _FakeFastLanguageModel.calls = []
    sets = ["kernels=false", "eval.max_rows=0", f"training.gradient_checkpointing={str(checkpointing).lower()}",
            "training.max_seq_len=512", "training.seed=7", "lora.r=8", "lora.alpha=32", "model.dtype=bfloat16"]
    if quantized:
        sets.append("quantization={type: nf4}")
    cfg = config_mod.load(None, sets)
    stack = STACKS["unsloth-gc" if checkpointing else "unsloth"]
    base = stack.load(cfg, "/base")
    assert stack.attach(cfg, base) == ("peft", base)
    (_, load), (_, attach) = _FakeFastLanguageModel.calls
    mode = "unsloth" if checkpointing else False
    assert load["model_name"] == "/base" and load["max_seq_length"] == 512 and load["dtype"] is torch.bfloat16
    assert (load["load_in_4bit"], load["load_in_16bit"]) == (quantized, not quantized)
    assert load["use_gradient_checkpointing"] == attach["use_gradient_checkpointing"] == mode
    assert load["trust_remote_code"] is False and attach["random_state"] == load["random_state"] == 7
    assert (attach["r"], attach["lora_alpha"], attach["lora_dropout"]) == (8, 32, cfg.lora.dropout)
    assert attach["target_modules"] == list(cfg.lora.target_modules) and attach["bias"] == "none"
    # Unsloth's own checkpointing is switched in get_peft_model; TRL's would replace it.
    assert trainer.sft_config(cfg, "/tmp/x", stack).gradient_checkpointing is False
    assert trainer.sft_config(cfg, "/tmp/x").gradient_checkpointing is checkpointing
    assert "offload" not in trainer.oom_message(cfg, stack)
    assert stack.packages == ("unsloth",)


def test_the_child_prepares_the_stack_before_the_recipe_imports_anything(monkeypatch, tmp_path):
    """Unsloth patches transformers, TRL and PEFT when imported, so it must come first."""
    import workbench.train as recipe

    order = []
    stack = STACKS["unsloth"]
    monkeypatch.setattr(type(stack), "prepare", lambda self, cfg=None: order.append(("prepare", cfg.eval.max_rows)))
    monkeypatch.setattr(recipe, "run_train", lambda cfg, run, stack: order.append(("train", stack.name)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("eval: {max_rows: 0}\n")
    assert train_child.main(["--stack", "unsloth", "--config", str(cfg), "--run", str(tmp_path / "run")]) == 0
    assert order == [("prepare", 0), ("train", "unsloth")]


def test_the_product_training_path_names_no_peer():
    """The training recipe and its modules know our kernels only: the peers live in bench/stacks.py."""
    from pathlib import Path

    import workbench

    root = Path(workbench.__file__).parent
    modules = ["train.py", "trainer.py", "preference.py", "data.py", "checks.py", "models.py", "heldout.py",
               "distributed.py", "config.py", "cli/train.py"]
    for name in modules:
        text = (root / name).read_text().lower()
        assert "unsloth" not in text and "liger" not in text, name
