"""Loading models: the base a run trains (16-bit, or NF4 for QLoRA), its LoRA and our
kernels; the fp32 and NF4 bases with the trained adapter that merge, eval and qualify
measure against; and :class:`Stack`, how the training recipe builds what it trains.

Nothing here runs code that came with a checkpoint (``trust_remote_code=False``) or loads
pickles (``use_safetensors=True``).
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from pathlib import Path

from workbench.config import Config
from workbench.distributed import log
from workbench.errors import UserError


def dtype(name: str):
    """A config dtype as torch's: "auto" is bf16 on a CUDA device that has it, else fp32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def quantization_record(cfg: Config) -> dict | None:
    q = cfg.quantization
    if q is None:
        return None
    compute = dtype(cfg.model.dtype if q.compute_dtype == "auto" else q.compute_dtype)
    return {"type": q.type, "double_quant": q.double_quant, "compute_dtype": str(compute).removeprefix("torch."),
            "upcast_frozen": q.upcast_frozen}


def keep_portable_4bit_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first
    no-grad forward (an accuracy eval) into its own CPU layout, whose kernel computes
    in bf16 whatever the compute dtype, cannot take in_features that are not a
    multiple of the blocksize, and which our NF4 kernels do not read. Keep the
    dequantize-then-matmul path, the same on every CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(cfg: Config, base: str):
    """The base causal LM, quantized to NF4 when configured (QLoRA), ready for PEFT."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # On the GPU from the start, so that the base's accuracy eval runs there too.
    kwargs = dict(dtype=dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation,
                  use_safetensors=True, trust_remote_code=False,
                  device_map={"": 0 if torch.cuda.is_available() else "cpu"})
    q = quantization_record(cfg)
    if q is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]))
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if q is not None:
        keep_portable_4bit_layout(model)
        prepare_kbit(model, q["upcast_frozen"], bool(cfg.training.gradient_checkpointing))
    return model


def prepare_kbit(model, upcast_frozen: bool, checkpointing: bool):
    """A 4-bit base made ready for LoRA training. ``upcast_frozen``: PEFT's
    prepare_model_for_kbit_training as it comes (every frozen 16-bit weight, i.e. the
    norms, embeddings and lm_head, cast to fp32). Otherwise the same steps without that
    cast: the weights frozen and, with checkpointing, the input gradients switched on, so
    that the residual stream stays in the compute dtype as on a 16-bit base."""
    if upcast_frozen:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        with old_checkpointing_name():
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable()
    return model


def load_tokenizer(cfg: Config, base: str):
    """The tokenizer a run trains with: the checkpoint's, with a chat template and a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from {base} ({str(err).splitlines()[0]}); the checkpoint "
                        "folder needs its tokenizer files (tokenizer.json, tokenizer_config.json).") from None
    if cfg.model.chat_template:
        tok.chat_template = cfg.model.chat_template
    if not tok.chat_template:
        raise UserError(f"the tokenizer in {base} has no chat template; set model.chat_template to a Jinja chat "
                        "template whose assistant turn ends with the EOS token.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def attach_lora(cfg: Config, model):
    """``model`` with a fresh LoRA as ``cfg.lora`` says (its init draws from the global RNG)."""
    from peft import LoraConfig, get_peft_model

    from workbench.checks import check_target_modules

    lc = cfg.lora
    check_target_modules(cfg, model)
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                        use_rslora=lc.use_rslora, task_type="CAUSAL_LM", bias="none")
    with old_checkpointing_name():
        return get_peft_model(model, config)


@contextlib.contextmanager
def old_checkpointing_name():
    """transformers 5.23 renames gradient_checkpointing to activation_checkpointing and
    warns when PEFT, TRL or we use the old name; the GPU image's 5.17 knows only the
    old name, so we keep it and hide that notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def kernels_enabled(cfg: Config) -> dict | None:
    """patch_model switches, or None for no kernels. "auto" means on with CUDA and
    off on the CPU, where Triton only runs in its (slow) interpreter."""
    import torch

    value = cfg.kernels
    if value == "auto":
        value = torch.cuda.is_available()
    if value is False:
        return None
    try:
        patch = importlib.import_module("workbench.patch")
    except ImportError as err:
        raise UserError(f"kernels are unavailable in this install ({err}); set kernels: false.") from None
    return patch.options_from_config(value)


def apply_kernels(model, options: dict) -> dict:
    """workbench.patch on ``model`` with ``options``; its report (what was swapped, what not and why)."""
    report = importlib.import_module("workbench.patch").patch_model(model, **options)
    log(str(report).replace("\n", "\n       "), detail=True)
    return report.to_dict()


def with_adapter(model, adapter: Path):
    """``model`` with the PEFT adapter in ``adapter`` on it, for inference (not trainable)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"the adapter in {adapter} does not fit the base model ({str(err).splitlines()[0]}); "
                        "merge it with the base it was trained on.") from None


def load_base(base: Path, device: str):
    """A checkpoint in fp32 on ``device``, for inference: merge's arithmetic and every reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, use_safetensors=True).to(device).eval()


def load_nf4_base(base: Path, quant: dict, device: str):
    """A checkpoint quantized to NF4 as a QLoRA train record's ``quant`` says, for inference."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.get("type", "nf4"),
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, quant.get("compute_dtype") or "float32"),
    )
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=config, dtype=torch.float32,
                                                 device_map={"": device}, use_safetensors=True).eval()
    keep_portable_4bit_layout(model)  # the reference is the dequantize-then-matmul that training ran
    return model


class Stack:
    """How the training recipe builds and trains its model: the product's own way, with our
    kernels as the config's ``kernels:`` says. The benchmarks' comparison stacks
    (workbench.bench.stacks) override these steps; the recipe calls nothing else."""

    #: True when the stack brings its own gradient checkpointing (the trainer's stays off,
    #: and there is no offloaded checkpointing of ours).
    own_checkpointing = False
    #: Packages whose versions the train record names besides the training stack's own.
    packages: tuple[str, ...] = ()

    def check(self, cfg: Config) -> None:
        """What must hold before anything is read or loaded (our kernels are importable)."""
        kernels_enabled(cfg)

    def check_model(self, cfg: Config, tok) -> None:
        """The config against the model's config, before its weights load."""
        from workbench.checks import check_model_fits

        check_model_fits(cfg, tok)

    def load(self, cfg: Config, base: str):
        return load_model(cfg, base)

    def attach(self, cfg: Config, model):
        return attach_lora(cfg, model)

    def kernels(self, cfg: Config, model) -> dict | None:
        """Apply the stack's kernels to the PEFT model; what was applied (None: nothing)."""
        options = kernels_enabled(cfg)
        return apply_kernels(model, options) if options else None

    def trainer_args(self, cfg: Config) -> dict:
        """SFTConfig arguments the stack sets on top of the recipe's."""
        return {}

    def trainer_made(self, trainer) -> None:
        """The trainer the recipe made, before it trains (the train suite's loop profiler,
        workbench.bench.loop_profile, hooks in here)."""

    def preference_loss(self, cfg: Config):
        """The DPO / ORPO loss the fused preference trainer runs in place of ours
        (workbench.preference's ``loss``: a function of a PreferenceBatch), or None: ours where
        our kernels are on, else TRL's own."""
        return None
