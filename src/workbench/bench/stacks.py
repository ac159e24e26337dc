"""The comparison stacks of the benchmarks, as strategies.

A stack is the product's :class:`workbench.models.Stack` (how the training recipe loads the
base, attaches the LoRA, applies kernels and sets the trainer's arguments) with what a
comparison needs on top: ``hf`` is transformers + PEFT as they come, ``ours`` adds our
kernels, ``liger`` and ``unsloth`` are the peers'. The train, context and accuracy suites
hand a stack to the training recipe in a child process (``python -m
workbench.bench.train_child``); the step suite builds the model with the same steps and runs
its own plain loop around it (:meth:`Stack.build`). The product's training path knows none of
the peers: the config's ``kernels:`` means our kernels only.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

from workbench import models
from workbench.errors import UserError


class Stack(models.Stack):
    """transformers + PEFT as they come (``hf``), optionally with checkpointing; ``ours``
    differs only by its config (``kernels: true``, :func:`workbench.bench.train.config_for`)."""

    def __init__(self, name: str, label: str, checkpointing: bool | str = False):
        self.name, self.label = name, label
        #: False, True (transformers' checkpointing) or "offload" (workbench.offload).
        self.checkpointing = checkpointing

    def prepare(self, cfg=None) -> None:
        """What must happen in the measuring process before transformers is imported (with the
        run's config, when there is one)."""

    # ---- the step suite's plain loop
    def config(self, checkpoint: Path, mode: str, seq: int, seed: int):
        from workbench import config
        from workbench.bench.train import config_for

        raw = config_for(checkpoint, mode, self.name, 1, 1, seed, seq)
        raw["data"] = {}  # no data is read: the loop feeds random tokens
        return config.from_dict(raw)

    def build(self, checkpoint: Path, mode: str, seq: int, seed: int):
        """(the PEFT model in training mode, what was applied to it), as the recipe builds it."""
        import transformers

        cfg = self.config(checkpoint, mode, seq, seed)
        transformers.logging.set_verbosity_error()
        transformers.set_seed(seed)
        model = self.load(cfg, str(checkpoint))
        transformers.set_seed(seed)  # the LoRA init draws from the global RNG, as in run_train
        model = self.attach(cfg, model)
        info = {"checkpointing": self.enable_checkpointing(model), "kernels": self.loop_kernels(cfg, model)}
        model.config.use_cache = False  # a training step has no use for a KV cache
        model.train()
        return model, info

    def loop_kernels(self, cfg, model) -> dict | None:
        """The kernels of a plain loop (no Trainer to apply them): the recipe's."""
        return self.kernels(cfg, model)

    def enable_checkpointing(self, model) -> str | None:
        """As the Trainer does for a PEFT model (TRL adds the input grads): the Trainer's kwargs,
        reentrant for offloading, whose hooks see only what reentrant checkpointing saves."""
        if not self.checkpointing:
            return None
        offload = self.checkpointing == "offload"
        with models.old_checkpointing_name():
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True} if offload
                                                else None)
        func = next((getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()
                     if getattr(m, "gradient_checkpointing", False)), None)
        how = f"transformers, use_reentrant={(getattr(func, 'keywords', None) or {}).get('use_reentrant')}"
        if not offload:
            return how
        from workbench import offload as offload_mod

        hooks = offload_mod.ActivationOffload()
        try:
            hooks.modules = offload_mod.install(model, hooks)
        except ValueError as err:
            raise UserError(f"offloaded checkpointing cannot work here: {err}") from None
        if not hooks.modules:
            raise UserError("offloaded checkpointing found no checkpointing layer in this model.")
        model.activation_offload = hooks  # step.py reports what it moved
        return how + f", inputs offloaded to host memory ({hooks.modules} checkpointing modules)"

    def frozen_weights_in(self, model, dtype) -> None:
        """Without autocast: the frozen float weights in ``dtype`` (for QLoRA,
        prepare_model_for_kbit_training upcast the norms, embeddings and head to fp32 for the
        Trainer's autocast; a loop without autocast would run them in fp32). The adapters stay
        as PEFT leaves them; the 4-bit weights are not float."""
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


class Liger(Stack):
    """Liger-Kernel. In the recipe, TRL's trainer applies Liger's RMSNorm, RoPE and SwiGLU when
    training starts (``use_liger_kernel``), for SFT, DPO and ORPO alike. Under SFT the loss stays
    TRL's own: TRL 1.16's SFT trainer refuses Liger's fused linear cross-entropy (it would replace
    the forward it gives its chunked LM head). Under DPO and ORPO the loss is Liger's fused linear
    preference loss (``liger_kernel.chunked_loss``, :class:`LigerPreferenceLoss`), which no TRL
    1.16 trainer reaches: it runs in workbench.preference's fused trainer (TRL's DPOTrainer /
    ORPOTrainer with the loss replaced) in place of ours, through the trainer's loss seam
    (:meth:`preference_loss`), on the same hidden states, targets and reference as ours.
    In the step suite's plain loop, Liger's defaults for the model's family (for Llama and Qwen3:
    RoPE, RMSNorm, SwiGLU and the fused linear cross-entropy), the patch a user of a plain loop
    applies."""

    #: The trainer whose ``use_liger_kernel`` applies the layer kernels, per method.
    TRAINERS = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "orpo": "ORPOTrainer"}

    def prepare(self, cfg=None) -> None:
        liger_version()

    def check(self, cfg) -> None:
        liger_version()

    def trainer_args(self, cfg) -> dict:
        # The fused linear cross-entropy off for every method: TRL's SFT and DPO trainers set it so
        # themselves; ORPO's would keep Liger's default, a forward of Liger's that, called without
        # labels, forms the logits all the same. So every method gets the same layer kernels.
        return {"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": False}}

    def preference_loss(self, cfg):
        method = cfg.training.method
        return LigerPreferenceLoss(method) if method in LigerPreferenceLoss.CLASSES else None

    def kernels(self, cfg, model) -> dict | None:
        method = cfg.training.method
        layers = f"TRL {self.TRAINERS[method]} use_liger_kernel (layer kernels, fused linear cross-entropy off)"
        if method not in LigerPreferenceLoss.CLASSES:
            return {"engine": "liger-kernel", "version": liger_version(),
                    "applied_by": f"{layers}; TRL's chunked LM-head loss"}
        loss = LigerPreferenceLoss(method)
        return {"engine": "liger-kernel", "version": liger_version(), "loss": loss.name,
                "applied_by": f"{layers}; the loss Liger's {loss.name} ({loss.semantics}) in workbench.preference's "
                              f"fused {method.upper()} trainer"}

    def loop_kernels(self, cfg, model) -> dict | None:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model())  # what transformers' Trainer calls
        return {"engine": "liger-kernel", "version": importlib.metadata.version("liger-kernel"),
                "applied_by": "_apply_liger_kernel_to_instance with Liger's defaults (RoPE, RMSNorm, SwiGLU, "
                              "fused linear cross-entropy)"}


class LigerPreferenceLoss:
    """Liger-Kernel's fused linear DPO / ORPO loss behind workbench.preference's loss seam
    (``loss(batch: PreferenceBatch) -> PreferenceOutput``), set to what TRL's trainers compute:

    * DPO, ``LigerFusedLinearDPOLoss``: ``loss_type="sigmoid"``; the completion log-probs summed
      (``average_log_prob=False``: TRL sums them; Liger's preference base averages by default);
      no NLL term; the reference's log-probs computed by Liger, under no_grad, from the
      reference's last hidden states and lm_head weight (``use_ref_model``, ``ref_input`` /
      ``ref_weight``), which the trainer takes where TRL takes its reference (the policy with its
      adapter disabled, for the recipe's LoRA). It takes no precomputed reference log-probs, so
      ``precompute_ref_log_probs`` is refused (the recipe never sets it).
    * ORPO, ``LigerFusedLinearORPOLoss``: the completions' log-probs averaged (Liger's default,
      as TRL's), the chosen NLL over ``nll_target``, prompt included (TRL's), one mean over its
      tokens; ``loss = nll - beta * mean(logsigmoid(log_odds))``. Its log-odds take
      ``log1p(-exp(A))`` where TRL's ``log1mexp`` switches to ``log(-expm1(A))`` above -ln 2: the
      same value, fewer correct digits only where an average log-prob nears 0.

    Both: ``ignore_index`` -100, no lm_head bias; Liger's defaults otherwise (``compiled=True``,
    ``chunk_size=1``: one chosen/rejected pair per chunk). Liger has no final-logit soft cap and
    no conservative-DPO label smoothing: a batch that asks for either is refused."""

    CLASSES = {"dpo": "LigerFusedLinearDPOLoss", "orpo": "LigerFusedLinearORPOLoss"}
    SEMANTICS = {"dpo": "sigmoid, summed completion log-probs, reference log-probs from the reference's hidden "
                        "states",
                 "orpo": "averaged completion log-probs, chosen NLL over prompt and completion"}

    def __init__(self, method: str):
        self.method = method
        self.name = f"liger_kernel.chunked_loss.{self.CLASSES[method]}"
        self.semantics = self.SEMANTICS[method]

    def module(self, beta: float):
        """Liger's loss module, with TRL's semantics."""
        from liger_kernel import chunked_loss

        cls = getattr(chunked_loss, self.CLASSES[self.method])
        if self.method == "orpo":
            return cls(ignore_index=-100, beta=beta, compute_nll_loss=True)
        try:
            return cls(ignore_index=-100, beta=beta, compute_nll_loss=False, use_ref_model=True,
                       average_log_prob=False, loss_type="sigmoid")
        except TypeError as err:  # a liger-kernel from before these options averages the log-probs
            raise UserError(f"this liger-kernel's {self.CLASSES['dpo']} takes no average_log_prob or loss_type "
                            f"({err}), so it would average the completion log-probs where TRL's DPO sums them; "
                            "install a newer liger-kernel (0.8.x takes both), or leave the liger stack out.") from None

    def __call__(self, batch):
        from workbench.kernels.fused_linear_preference import PreferenceOutput

        if batch.method != self.method:
            raise ValueError(f"{self.name} got a {batch.method} batch.")
        if batch.softcap is not None:
            raise UserError(f"{self.name} has no final-logit soft cap, and this model caps its logits at "
                            f"{batch.softcap:g}; leave the liger stack out for this model.")
        if batch.label_smoothing:
            raise UserError(f"{self.name}'s sigmoid loss has no label smoothing (conservative DPO); set it to 0 "
                            "or leave the liger stack out.")
        loss_fn = self.module(batch.beta)
        if self.method == "dpo":
            ref_hidden, ref_weight = batch.reference.hidden()
            loss, aux = loss_fn(batch.weight, batch.hidden, batch.labels, ref_input=ref_hidden, ref_weight=ref_weight)
            nll = None
        else:
            loss, aux = loss_fn(batch.weight, batch.hidden, batch.labels, nll_target=batch.nll_labels)
            nll = aux[4]
        # Liger's aux outputs: chosen and rejected log-probs, their logits' means, the NLL, the rewards (then
        # ORPO's log-odds terms).
        chosen, rejected, _, _, _, chosen_rewards, rejected_rewards = aux[:7]
        return PreferenceOutput(loss, chosen, rejected, chosen_rewards.detach(), rejected_rewards.detach(), nll)


class Unsloth(Stack):
    """Unsloth's FastLanguageModel loads the base (NF4 with double quant for QLoRA, as ours) and
    attaches the LoRA, with its own patched model, LoRA kernels and loss, and its own offloaded
    checkpointing for ``-gc`` (``use_gradient_checkpointing="unsloth"``); the recipe's TRL loop
    trains it. Its trainer replaces TRL's data preparation with its own (unsloth_zoo's
    ``sft_prepare_dataset``), which the recipe's pre-tokenized rows skip: without them it would
    pack in worker processes, each wrapping its share of the rows on its own, and so cut the
    sequences elsewhere. Unsloth wants to be imported before transformers, TRL and PEFT
    (:meth:`prepare`)."""

    own_checkpointing = True
    packages = ("unsloth",)

    def prepare(self, cfg=None) -> None:
        if cfg is not None:
            self.check(cfg)   # imports unsloth too
        else:
            unsloth_version()

    def check(self, cfg) -> None:
        if cfg.eval.max_rows:
            raise UserError("the unsloth stack trains only (Unsloth's model generates after its own for_inference "
                            "switch, which this harness does not drive); set eval.max_rows: 0 and score the "
                            "adapter with workbench eval.")
        unsloth_version()

    def check_model(self, cfg, tok) -> None:
        from workbench.checks import check_model_fits

        check_model_fits(cfg, tok, build=False)  # Unsloth builds its own model; get_peft_model names what it lacks

    def _common(self, cfg) -> dict:
        """Arguments Unsloth's load and attach both take: its checkpointing, switched per run
        (off, or its offloaded "unsloth" mode), the sequence length and the seed."""
        return {"use_gradient_checkpointing": "unsloth" if cfg.training.gradient_checkpointing else False,
                "max_seq_length": cfg.training.max_seq_len or 2048, "random_state": cfg.training.seed}

    def load(self, cfg, base: str):
        """The base through Unsloth: bf16 for LoRA, bitsandbytes NF4 (double quant) for QLoRA."""
        from unsloth import FastLanguageModel

        q = models.quantization_record(cfg)
        model, _tok = FastLanguageModel.from_pretrained(
            model_name=base, dtype=models.dtype(cfg.model.dtype), load_in_4bit=q is not None,
            load_in_16bit=q is None, full_finetuning=False, trust_remote_code=False, **self._common(cfg))
        return model

    def attach(self, cfg, model):
        from unsloth import FastLanguageModel

        from workbench.checks import check_target_modules

        check_target_modules(cfg, model)
        lc = cfg.lora
        return FastLanguageModel.get_peft_model(
            model, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
            bias="none", use_rslora=lc.use_rslora, **self._common(cfg))

    def kernels(self, cfg, model) -> dict | None:
        return {"engine": "unsloth", "version": importlib.metadata.version("unsloth"),
                "applied_by": "Unsloth FastLanguageModel.from_pretrained + get_peft_model (its model, LoRA "
                              "kernels and loss)" + (", its offloaded gradient checkpointing"
                                                    if cfg.training.gradient_checkpointing else "")}

    def enable_checkpointing(self, model) -> str | None:
        return "unsloth (offloaded)" if self.checkpointing else None  # switched on by get_peft_model

    def frozen_weights_in(self, model, dtype) -> None:
        """As Unsloth loads them: its kernels expect its own dtypes."""


def liger_version() -> str:
    """Liger-Kernel's version, after checking that it and a CUDA device are here."""
    import torch

    try:
        version = importlib.metadata.version("liger-kernel")
        importlib.import_module("liger_kernel.transformers")
    except (ImportError, importlib.metadata.PackageNotFoundError) as err:
        raise UserError(f"the liger stack needs the liger-kernel package ({err}); pip install liger-kernel, or "
                        "leave the stack out.") from None
    if not torch.cuda.is_available():
        raise UserError("the liger stack needs a CUDA device (Liger-Kernel has no CPU path); leave it out here.")
    return version


def unsloth_version() -> str:
    """Unsloth's version, after importing it (before transformers, TRL and PEFT) on a CUDA device."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        raise UserError("the unsloth stack needs the unsloth package, which pins trl <= 1.15 and datasets < 5 (ours: "
                        "trl 1.16, datasets 5): install it in its own environment, or build its site with "
                        "scripts/build_wheelhouse.sh .site-unsloth scripts/unsloth-host-packages.txt and name it "
                        "in WORKBENCH_UNSLOTH_SITE; or leave the stack out.")
    try:
        import torch
        if not torch.cuda.is_available():
            raise UserError("the unsloth stack needs a CUDA device (Unsloth has no CPU path); leave it out here.")
        importlib.import_module("unsloth")
        return importlib.metadata.version("unsloth")
    except UserError:
        raise
    except Exception as err:  # Unsloth checks its environment at import and raises many kinds
        raise UserError(f"the unsloth stack could not import unsloth ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); check its versions against "
                        "scripts/unsloth-host-packages.txt, or leave the stack out.") from None


STACKS = {s.name: s for s in (
    Stack("hf", "HF + SDPA (transformers + PEFT)"),
    Stack("hf-gc", "HF + SDPA + gradient checkpointing", checkpointing=True),
    Stack("ours", "ours (workbench.patch)"),
    Stack("ours-gc", "ours + gradient checkpointing", checkpointing=True),
    Stack("ours-offload", "ours + offloaded checkpointing", checkpointing="offload"),
    Stack("ours-bf16", "ours, bf16 where PEFT keeps fp32 (adapter_as_autocast; QLoRA: upcast_frozen false)"),
    Liger("liger", "Liger-Kernel (its defaults, fused linear CE)"),
    Unsloth("unsloth", "Unsloth (FastLanguageModel)"),
    Unsloth("unsloth-gc", "Unsloth + its offloaded checkpointing", checkpointing=True),
)}
