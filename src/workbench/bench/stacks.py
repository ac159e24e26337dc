"""The stacks of the step suite (bench/step.py) as small strategies.

Each stack knows how to load the base, attach the LoRA, and apply its kernels and its
checkpointing, for a plain training loop that is not the product's. Loading and attaching
go through the product's own loaders (``workbench.train.load_model`` / ``attach_lora``),
configured by the train suite's per-stack config (``bench.train._config``): a stack here is
the model the train suite trains, built the same way; only the loop around it differs.
What the Trainer would add (checkpointing, Liger's patch) is done here, not in the product.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stack:
    """transformers + PEFT as they come (``hf``), optionally with checkpointing."""

    name: str
    label: str
    #: False, True (transformers' checkpointing) or "offload" (workbench.offload).
    checkpointing: bool | str = False

    def prepare(self) -> None:
        """What must happen before transformers is imported in the measuring process."""

    def config(self, checkpoint: Path, mode: str, seq: int, seed: int):
        from workbench import config
        from workbench.bench.train import _config

        raw = _config(checkpoint, mode, self.name, 1, 1, seed, seq)
        raw["data"] = {}  # no data is read: the loop feeds random tokens
        return config.from_dict(raw)

    def build(self, checkpoint: Path, mode: str, seq: int, seed: int):
        """(the PEFT model in training mode, what was applied to it)."""
        import transformers

        from workbench.train import attach_lora, load_model

        cfg = self.config(checkpoint, mode, seq, seed)
        transformers.logging.set_verbosity_error()
        transformers.set_seed(seed)
        model = load_model(cfg, str(checkpoint))
        transformers.set_seed(seed)  # the LoRA init draws from the global RNG, as in run_train
        model = attach_lora(cfg, model)
        info = {"checkpointing": self.enable_checkpointing(model), "kernels": self.apply_kernels(cfg, model)}
        model.config.use_cache = False  # a training step has no use for a KV cache
        model.train()
        return model, info

    def enable_checkpointing(self, model) -> str | None:
        """As the Trainer does for a PEFT model (TRL adds the input grads): the Trainer's kwargs,
        reentrant for offloading, whose hooks see only what reentrant checkpointing saves."""
        if not self.checkpointing:
            return None
        from workbench.train import _old_checkpointing_name

        offload = self.checkpointing == "offload"
        with _old_checkpointing_name():
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True} if offload
                                                else None)
        func = next((getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()
                     if getattr(m, "gradient_checkpointing", False)), None)
        how = f"transformers, use_reentrant={(getattr(func, 'keywords', None) or {}).get('use_reentrant')}"
        if not offload:
            return how
        from workbench import offload as offload_mod
        from workbench.errors import UserError

        hooks = offload_mod.ActivationOffload()
        try:
            hooks.modules = offload_mod.install(model, hooks)
        except ValueError as err:
            raise UserError(f"offloaded checkpointing cannot work here: {err}") from None
        if not hooks.modules:
            raise UserError("offloaded checkpointing found no checkpointing layer in this model.")
        model.activation_offload = hooks  # step.py reports what it moved
        return how + f", inputs offloaded to host memory ({hooks.modules} checkpointing modules)"

    def apply_kernels(self, cfg, model) -> dict | None:
        return None

    def frozen_weights_in(self, model, dtype) -> None:
        """Without autocast: the frozen float weights in ``dtype`` (for QLoRA,
        prepare_model_for_kbit_training upcast the norms, embeddings and head to fp32 for the
        Trainer's autocast; a loop without autocast would run them in fp32). The adapters stay
        as PEFT leaves them; the 4-bit weights are not float."""
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


class Ours(Stack):
    """``workbench.patch`` on the PEFT model, as ``workbench train`` applies it."""

    def apply_kernels(self, cfg, model) -> dict | None:
        from workbench.train import apply_kernels, kernels_enabled

        return apply_kernels(model, kernels_enabled(cfg))


class Liger(Stack):
    """Liger-Kernel with its own defaults for the model's family (for Llama and Qwen3: RoPE,
    RMSNorm, SwiGLU and the fused linear cross-entropy), the patch a user of a plain loop
    applies; the train suite's TRL path refuses the fused loss and keeps TRL's."""

    def prepare(self) -> None:
        from workbench.train import liger_check

        liger_check()

    def apply_kernels(self, cfg, model) -> dict | None:
        import importlib.metadata

        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model())  # what transformers' Trainer calls
        return {"engine": "liger-kernel", "version": importlib.metadata.version("liger-kernel"),
                "applied_by": "_apply_liger_kernel_to_instance with Liger's defaults (RoPE, RMSNorm, SwiGLU, "
                              "fused linear cross-entropy)"}


class Unsloth(Stack):
    """Unsloth's FastLanguageModel: its model, LoRA kernels and loss, its own checkpointing
    (offloaded, ``use_gradient_checkpointing="unsloth"``) for ``-gc``. The product's loaders
    call it when the config says ``kernels: unsloth``."""

    def prepare(self) -> None:
        from workbench.train import unsloth_check

        unsloth_check()  # imports unsloth, which must come before transformers and PEFT

    def enable_checkpointing(self, model) -> str | None:
        return "unsloth (offloaded)" if self.checkpointing else None  # switched on by get_peft_model

    def apply_kernels(self, cfg, model) -> dict | None:
        import importlib.metadata

        return {"engine": "unsloth", "version": importlib.metadata.version("unsloth"),
                "applied_by": "FastLanguageModel.from_pretrained + get_peft_model"}

    def frozen_weights_in(self, model, dtype) -> None:
        """As Unsloth loads them: its kernels expect its own dtypes."""


STACKS = {s.name: s for s in (
    Stack("hf", "HF + SDPA (transformers + PEFT)"),
    Stack("hf-gc", "HF + SDPA + gradient checkpointing", checkpointing=True),
    Ours("ours", "ours (workbench.patch)"),
    Ours("ours-gc", "ours + gradient checkpointing", checkpointing=True),
    Ours("ours-offload", "ours + offloaded checkpointing", checkpointing="offload"),
    Ours("ours-bf16", "ours, adapter in the base's dtype (adapter_as_autocast)"),
    Liger("liger", "Liger-Kernel (its defaults, fused linear CE)"),
    Unsloth("unsloth", "Unsloth (FastLanguageModel)"),
    Unsloth("unsloth-gc", "Unsloth + its offloaded checkpointing", checkpointing=True),
)}
