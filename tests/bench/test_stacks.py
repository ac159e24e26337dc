"""The benchmarks' comparison stacks (workbench.bench.stacks): what each hands the training
recipe, and the child process that trains on one (workbench.bench.train_child). The peers'
packages need CUDA, so their loaders are checked against stand-ins here."""
import sys
import types

import pytest
import torch

from workbench import config as config_mod, trainer
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
    starts: Liger's RMSNorm, RoPE and SwiGLU under TRL's own loss (TRL 1.16 has no Liger
    preference loss). No Liger kernel runs here: transformers' apply_liger_kernel is a stand-in."""
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
    # The train record says which trainer applied them and whose loss ran.
    monkeypatch.setattr("workbench.bench.stacks.liger_version", lambda: "0.8.5")
    record = STACKS["liger"].kernels(cfg, liger.model)
    assert record["version"] == "0.8.5" and f"TRL {type(liger).__name__}" in \
        record["applied_by"] and f"TRL's {method.upper()} loss" in record["applied_by"]


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
    modules = ["train.py", "trainer.py", "data.py", "checks.py", "models.py", "heldout.py", "distributed.py",
               "config.py", "cli/train.py"]
    for name in modules:
        text = (root / name).read_text().lower()
        assert "unsloth" not in text and "liger" not in text, name
