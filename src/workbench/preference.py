"""Preference training (DPO, ORPO) through TRL's trainers, with the loss in our fused kernel.

:func:`make_preference_trainer` builds TRL's ``DPOTrainer`` or (``trl.experimental.orpo``)
``ORPOTrainer`` for a (PEFT) model, a tokenizer and prompt/chosen/rejected rows
(``synthetic.build_preference``'s format, or any TRL preference dataset). With
``fused=True`` (the default) it is a subclass whose loss comes from
``kernels/fused_linear_preference.py``: the model runs up to its last hidden state, and
the lm_head, the log-softmax over the vocab, the per-sequence log-probs and the DPO / ORPO
loss run inside the kernel, chunk by chunk, so the [2B, T, V] logits are never formed
(TRL's DPO never forms them either, with its own chunked head; TRL's ORPO does). The rest
is TRL's: datasets, collators, the reference log-probs' source (an adapter disabled, a
reference model, or precomputed), the optimizer loop. ``fused=False`` gives TRL's trainer
unmodified, for comparison.

What each fused loss computes (the kernel's docstring has the formulas):

* DPO: TRL's ``loss_type=["sigmoid"]`` on the completion tokens (``completion_mask``), with
  ``label_smoothing`` as conservative DPO (TRL's sigmoid loss before 1.0; TRL 1.16's own
  sigmoid loss ignores label_smoothing, so with it the two differ). The reference log-probs
  come from the kernel as well, under no_grad. Other loss types, ``ld_alpha``, WPO
  weighting, f-divergences, MoE aux losses, vision data, a logit scale or an lm_head that is
  not a plain bias-free ``nn.Linear`` (a LoRA head): TRL's own loss runs.
* ORPO: TRL's odds-ratio loss plus the chosen NLL over prompt and completion, as its
  ``concatenated_forward`` computes them. Encoder-decoders and MoE aux losses: TRL's own.

Logged metrics: TRL's names; those that need the logits (DPO's ``entropy``,
``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``; ORPO's ``logits/*``) are not
logged by the fused path, which never forms them.

How the last hidden state is reached: the HF model (inside PEFT) gets a forward wrapper, as
TRL's own ``add_fused_lm_head`` does: ``model(..., workbench_hidden_states=True)`` returns the
backbone's output instead of logits. The call goes through the wrapped model (PEFT, DDP,
accelerate's autocast), and every other call reaches the forward that was there before.
"""
from __future__ import annotations

import contextlib
import functools
import types

from workbench.offline import enforce_offline

METHODS = ("dpo", "orpo")
_FLAG = "workbench_hidden_states"
#: Config attributes that scale the logits (TRL's add_fused_lm_head reads them): the fused path does not.
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _hf_model(model):
    """The transformers model inside accelerate/DDP wrappers and a PEFT wrapper."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _install_hidden_forward(hf) -> None:
    """Give ``hf`` (a CausalLM) the ``workbench_hidden_states=True`` switch; idempotent."""
    if hf.__dict__.get("_workbench_hidden_forward"):
        return
    previous = hf.forward

    @functools.wraps(type(hf).forward)
    def forward(self, *args, workbench_hidden_states=False, **kwargs):
        if not workbench_hidden_states:
            return previous(*args, **kwargs)
        # What PEFT and TRL pass along that the backbone does not take.
        for key in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        return getattr(self, self.base_model_prefix)(*args, **kwargs)

    hf.forward = types.MethodType(forward, hf)
    hf.__dict__["_workbench_hidden_forward"] = True


def _head_problem(model) -> str | None:
    """Why the fused loss cannot replace this model's lm_head, or None."""
    import torch.nn as nn

    hf = _hf_model(model)
    head = hf.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"the lm_head is a {type(head).__name__}, not a plain nn.Linear (a LoRA or quantized head)"
    if head.bias is not None:
        return "the lm_head has a bias"
    text = hf.config.get_text_config()
    scaled = [k for k in _LOGIT_SCALES if getattr(text, k, None) not in (None, 1.0)]
    if scaled:
        return f"the model scales its logits ({scaled[0]})"
    return None


def _last_hidden(model, model_kwargs: dict):
    """(hidden [N, T, D], lm_head weight, softcap), hidden and weight in the dtype HF's
    lm_head computes in right now: autocast's, else the weight's."""
    import torch

    hf = _hf_model(model)
    _install_hidden_forward(hf)
    hidden = model(**model_kwargs, **{_FLAG: True}).last_hidden_state
    weight = hf.get_output_embeddings().weight
    dev = hidden.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    softcap = getattr(hf.config.get_text_config(), "final_logit_softcapping", None)
    return hidden.to(weight.device, compute), weight.to(compute), softcap


def _dpo_inputs(inputs: dict):
    """The model's arguments and the shifted labels [2B, T - 1] of a DPO batch (TRL's collator:
    chosen rows, then rejected; completion_mask marks the scored tokens)."""
    model_kwargs = {k: v for k, v in inputs.items()
                    if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    return model_kwargs, labels


@functools.lru_cache(maxsize=None)
def _trainer_classes():
    """(FusedDPOTrainer, FusedORPOTrainer): built on first use, so that importing this module
    imports neither TRL nor torch."""
    enforce_offline()
    import torch
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.orpo.orpo_trainer import log1mexp
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    from workbench.kernels.fused_linear_preference import fused_linear_preference, fused_linear_sequence_logps
    from workbench.patch import note_call

    class FusedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer whose sigmoid loss runs in fused_linear_preference."""

        def fused_loss_problem(self) -> str | None:
            """Why this trainer's loss stays TRL's, or None when the fused kernel computes it."""
            if list(self.loss_types) != ["sigmoid"]:
                return f"loss_type {self.loss_types} (the fused loss is the sigmoid one)"
            if self.ld_alpha is not None or self.use_weighting or self.f_divergence_type != "reverse_kl":
                return "ld_alpha, WPO weighting or an f-divergence"
            if self.aux_loss_enabled or self._is_vision_dataset:
                return "a MoE auxiliary loss or vision data"
            return _head_problem(self.model)

        def _sequence_logps(self, model, inputs):
            model_kwargs, labels = _dpo_inputs(inputs)
            hidden, weight, softcap = _last_hidden(model, model_kwargs)
            # Prompt-learning PEFT prepends virtual tokens to the outputs: keep the real tokens' positions (as TRL).
            hidden = hidden[:, :-1][:, -labels.size(1):]
            return fused_linear_sequence_logps(hidden, weight, labels, softcap=softcap)

        def compute_ref_log_probs(self, model, inputs):
            """The reference's summed log-probs [B], [B], as TRL takes them: ``model`` (a reference
            model, or the policy: then with its adapter disabled, or its frozen "ref" copy)."""
            if self.fused_loss_problem() is not None:
                return super().compute_ref_log_probs(model, inputs)
            adapter = contextlib.nullcontext()
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.ref_model is None and is_peft_model(unwrapped):
                adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  adapter, self.accelerator.autocast()):
                return self._sequence_logps(model, inputs).chunk(2, dim=0)

        def _compute_loss(self, model, inputs, return_outputs):
            if self.fused_loss_problem() is not None:
                return super()._compute_loss(model, inputs, return_outputs)
            mode = "train" if self.model.training else "eval"
            model_kwargs, labels = _dpo_inputs(inputs)
            hidden, weight, softcap = _last_hidden(model, model_kwargs)
            hidden = hidden[:, :-1][:, -labels.size(1):]
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
            out = fused_linear_preference(hidden, weight, labels, ref_chosen, ref_rejected, method="dpo",
                                          beta=self.beta, label_smoothing=self.label_smoothing, softcap=softcap)
            note_call("fused_linear_preference")
            loss = out.loss

            metrics = self._metrics[mode]
            if mode == "train":
                seen = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += seen // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
            chosen = self.accelerator.gather(out.chosen_rewards)
            rejected = self.accelerator.gather(out.rejected_rewards)
            metrics["rewards/chosen"].append(chosen.mean().item())
            metrics["rewards/rejected"].append(rejected.mean().item())
            metrics["rewards/accuracies"].append((chosen > rejected).float().mean().item())
            metrics["rewards/margins"].append((chosen - rejected).mean().item())
            metrics["logps/chosen"].append(self.accelerator.gather(out.chosen_logps.detach()).mean().item())
            metrics["logps/rejected"].append(self.accelerator.gather(out.rejected_logps.detach()).mean().item())
            if return_outputs:  # as TRL: the logits compute_metrics wants, from one more forward
                with torch.no_grad():
                    outputs = model(**model_kwargs)
                return loss, outputs
            return loss

    class FusedORPOTrainer(ORPOTrainer):
        """TRL's ORPOTrainer whose loss runs in fused_linear_preference."""

        def fused_loss_problem(self) -> str | None:
            if self.is_encoder_decoder:
                return "an encoder-decoder model"
            if self.aux_loss_enabled:
                return "a MoE auxiliary loss"
            return _head_problem(self.model)

        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            if self.fused_loss_problem() is not None:
                return super().get_batch_loss_metrics(model, batch, train_eval)
            cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                           device=self.accelerator.device)
            ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
            hidden, weight, softcap = _last_hidden(model, {"input_ids": ids, "attention_mask": mask,
                                                           "use_cache": False})
            # TRL's targets: the completions' labels for the log-odds; for the chosen NLL every
            # attended token, prompt included (its concatenated_forward's cross_entropy_loss).
            labels = cat["concatenated_labels"][:, 1:]
            nll_labels = torch.where(mask == 1, ids, -100)[:, 1:]
            out = fused_linear_preference(hidden[:, :-1], weight, labels, nll_labels=nll_labels, method="orpo",
                                          beta=self.beta, softcap=softcap)
            note_call("fused_linear_preference")
            with torch.no_grad():
                chosen, rejected = out.chosen_logps.float(), out.rejected_logps.float()
                log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
                ratio = torch.nn.functional.logsigmoid(log_odds)
            prefix = "eval_" if train_eval == "eval" else ""
            gather = self.accelerator.gather_for_metrics
            metrics = {
                f"{prefix}rewards/chosen": gather(out.chosen_rewards).mean(),
                f"{prefix}rewards/rejected": gather(out.rejected_rewards).mean(),
                f"{prefix}rewards/accuracies": gather((out.chosen_rewards > out.rejected_rewards).float()).mean(),
                f"{prefix}rewards/margins": gather(out.chosen_rewards - out.rejected_rewards).mean(),
                f"{prefix}logps/rejected": gather(rejected).mean(),
                f"{prefix}logps/chosen": gather(chosen).mean(),
                f"{prefix}nll_loss": gather(out.nll_loss.detach()).mean(),
                f"{prefix}log_odds_ratio": gather(ratio.mean()).mean(),
                f"{prefix}log_odds_chosen": gather(log_odds.mean()).mean(),
            }
            return out.loss, {k: v.item() for k, v in metrics.items()}

    return FusedDPOTrainer, FusedORPOTrainer


def preference_config(method: str, output_dir: str, beta: float = 0.1, label_smoothing: float = 0.0, **overrides):
    """TRL's DPOConfig or ORPOConfig for ``method``: ``beta`` (ORPO's lambda), DPO's
    ``label_smoothing``; no hub, no checkpoints, no reports, the CPU when there is no GPU, and
    neither bf16 mixed precision nor gradient checkpointing unless asked (TRL's configs turn
    both on by default). ``overrides`` are the config's own fields (max_steps, learning_rate,
    seed, bf16, ...)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if label_smoothing and method != "dpo":
        raise ValueError("label_smoothing is conservative DPO's; ORPO has none: leave it at 0.")
    enforce_offline()
    import torch

    common = dict(output_dir=output_dir, beta=beta, report_to="none", save_strategy="no", push_to_hub=False,
                  disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                  bf16=False, gradient_checkpointing=False)
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**{**common, "label_smoothing": label_smoothing, **overrides})
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**{**common, **overrides})


def make_preference_trainer(model, tokenizer, train_dataset, *, method: str = "dpo", beta: float = 0.1,
                            label_smoothing: float = 0.0, output_dir: str, fused: bool = True,
                            eval_dataset=None, callbacks=(), mixins=(), **config_overrides):
    """A TRL preference trainer for ``model`` (a PEFT model, or a plain causal LM: then DPO
    needs ``precompute_ref_log_probs=True`` or a reference model TRL can load).

    ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` or a list of rows with
    ``prompt``, ``chosen`` and ``rejected`` (conversational or plain text; other keys are
    left alone). ``method``: "dpo" or "orpo"; ``beta``; ``label_smoothing`` (DPO only,
    conservative DPO). ``fused``: the loss in our kernel (True) or TRL's trainer unmodified.
    ``mixins``: classes put in front of the trainer's class (workbench.trainer.Guarded: the
    non-finite-loss guard of `workbench train`).
    ``config_overrides``: fields of TRL's DPOConfig / ORPOConfig (:func:`preference_config`).
    Returns the trainer; ``trainer.train()`` runs it."""
    args = preference_config(method, output_dir, beta=beta, label_smoothing=label_smoothing, **config_overrides)
    import datasets

    def as_dataset(rows):
        return rows if rows is None or isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))

    if fused:
        dpo_cls, orpo_cls = _trainer_classes()
    else:
        from trl import DPOTrainer as dpo_cls
        from trl.experimental.orpo import ORPOTrainer as orpo_cls
    cls = dpo_cls if method == "dpo" else orpo_cls
    if mixins:
        cls = type(cls.__name__, (*mixins, cls), {})
    return cls(model=model, args=args, train_dataset=as_dataset(train_dataset),
               eval_dataset=as_dataset(eval_dataset), processing_class=tokenizer, callbacks=list(callbacks))
