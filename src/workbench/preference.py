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

The loss seam: the fused trainers hand each batch to a loss function, ``loss(batch) ->
PreferenceOutput``, where ``batch`` is a :class:`PreferenceBatch` (the policy's last hidden
states at the scored positions, the lm_head weight, the targets, beta, and for DPO the
reference, computed when asked: its summed log-probs or its own last hidden states). The
default, :func:`fused_preference_loss`, is ours; ``make_preference_trainer(loss=...)`` takes
another (the benchmarks measure a peer's fused loss on the same trainer, data and reference
this way). A loss given there never falls back: where the fused path cannot run (the list
above), training stops with that reason instead of running TRL's loss under its name.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, NamedTuple

from workbench.errors import UserError
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


class PreferenceBatch(NamedTuple):
    """What a preference loss gets from the fused trainers, for one batch (TRL's concatenated
    layout: the B chosen rows first, then their B rejected twins)."""

    method: str                 # "dpo" or "orpo"
    hidden: Any                 # [2B, T, D] the policy's last hidden states; position t predicts labels[:, t]
    weight: Any                 # [V, D] the lm_head weight (hidden and weight in the dtype the lm_head computes in)
    labels: Any                 # [2B, T] int64 next tokens, -100 where not scored (DPO: the completion tokens;
    #                             ORPO: TRL's concatenated_labels, the completions)
    beta: float                 # DPO's beta; ORPO's lambda
    label_smoothing: float      # DPO's conservative eps (0: TRL's sigmoid loss); 0 for ORPO
    softcap: float | None       # the model's final logit soft cap (Gemma-2), else None
    nll_labels: Any = None      # ORPO: the chosen NLL's targets [2B, T], prompt included (TRL's); None for DPO
    reference: "Reference | None" = None   # DPO: the reference side; None for ORPO


#: A preference loss: ``loss(batch: PreferenceBatch) -> PreferenceOutput``
#: (workbench.kernels.fused_linear_preference.PreferenceOutput: the loss, differentiable with
#: respect to ``batch.hidden``; the chosen / rejected log-probs, sums for DPO and averages over
#: the scored tokens for ORPO; the rewards; ORPO's NLL term, None for DPO).
PreferenceLoss = Callable[[PreferenceBatch], Any]


class Reference:
    """DPO's reference for one batch, from the source TRL takes it from: the log-probs TRL
    precomputed into the batch (``precompute_ref_log_probs``), else a forward, under no_grad,
    of the reference model, or of the policy with its adapter disabled (its "ref" adapter
    where it has one). Nothing runs until a loss asks."""

    def __init__(self, trainer, inputs: dict):
        self._trainer, self._inputs = trainer, inputs

    @property
    def precomputed(self) -> bool:
        return bool(self._trainer.precompute_ref_logps)

    def logps(self):
        """(chosen [B], rejected [B]): the reference's log-probs summed over the completion tokens."""
        if self.precomputed:
            return self._inputs["ref_chosen_logps"], self._inputs["ref_rejected_logps"]
        t = self._trainer
        return t.compute_ref_log_probs(t.ref_model or t.model, self._inputs)

    def hidden(self):
        """(hidden [2B, T, D], weight [V, D]): the reference's last hidden states at the batch's
        scored positions and its lm_head weight, as the policy's are given (no gradient)."""
        if self.precomputed:
            raise UserError("this preference loss computes the reference's log-probs from its hidden states, which "
                            "precompute_ref_log_probs does not keep; leave precompute_ref_log_probs off.")
        t = self._trainer
        hidden, weight, _softcap = t.reference_hidden(t.ref_model or t.model, self._inputs)
        return hidden, weight


def fused_preference_loss(batch: PreferenceBatch):
    """Ours, the fused trainers' default loss: ``kernels/fused_linear_preference.py`` (DPO's
    reference log-probs from :meth:`Reference.logps`, so from the same kernel unless TRL
    precomputed them)."""
    from workbench.kernels.fused_linear_preference import fused_linear_preference
    from workbench.patch import note_call

    ref = batch.reference.logps() if batch.reference is not None else (None, None)
    out = fused_linear_preference(batch.hidden, batch.weight, batch.labels, *ref, nll_labels=batch.nll_labels,
                                  method=batch.method, beta=batch.beta, label_smoothing=batch.label_smoothing,
                                  softcap=batch.softcap)
    note_call("fused_linear_preference")
    return out


def _loss_name(loss) -> str:
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


def _dpo_inputs(inputs: dict):
    """The model's arguments and the shifted labels [2B, T - 1] of a DPO batch (TRL's collator:
    chosen rows, then rejected; completion_mask marks the scored tokens)."""
    model_kwargs = {k: v for k, v in inputs.items()
                    if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    return model_kwargs, labels


def _scored_hidden(model, inputs: dict):
    """(hidden [2B, T - 1, D], weight, softcap) of a DPO batch: the last hidden states at the
    positions that predict ``_dpo_inputs``' labels."""
    model_kwargs, labels = _dpo_inputs(inputs)
    hidden, weight, softcap = _last_hidden(model, model_kwargs)
    # Prompt-learning PEFT prepends virtual tokens to the outputs: keep the real tokens' positions (as TRL).
    return hidden[:, :-1][:, -labels.size(1):], weight, softcap


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

    from workbench.kernels.fused_linear_preference import fused_linear_sequence_logps

    class _Fused:
        """What both fused trainers share: the loss (``preference_loss``, ours unless
        make_preference_trainer was given another) and when it runs."""

        preference_loss = staticmethod(fused_preference_loss)

        def _fused(self) -> bool:
            """Whether the fused path computes this trainer's loss; False: TRL's own runs. A loss
            other than ours never gives way to TRL's: that would measure TRL's loss under its name."""
            problem = self.fused_loss_problem()
            if problem is None:
                return True
            if self.preference_loss is not fused_preference_loss:
                raise UserError(f"the preference loss {_loss_name(self.preference_loss)} cannot run here ({problem}), "
                                "and TRL's own loss would not be that loss; train without it.")
            return False

    class FusedDPOTrainer(_Fused, DPOTrainer):
        """TRL's DPOTrainer whose sigmoid loss runs in ``preference_loss`` (ours: fused_linear_preference)."""

        def fused_loss_problem(self) -> str | None:
            """Why this trainer's loss stays TRL's, or None when the fused kernel computes it."""
            if list(self.loss_types) != ["sigmoid"]:
                return f"loss_type {self.loss_types} (the fused loss is the sigmoid one)"
            if self.ld_alpha is not None or self.use_weighting or self.f_divergence_type != "reverse_kl":
                return "ld_alpha, WPO weighting or an f-divergence"
            if self.aux_loss_enabled or self._is_vision_dataset:
                return "a MoE auxiliary loss or vision data"
            return _head_problem(self.model)

        @contextlib.contextmanager
        def _reference_pass(self):
            """TRL's reference forward: no_grad, checkpointing off, the adapter disabled (or its
            "ref" adapter) when the policy is its own reference, under the trainer's autocast."""
            adapter = contextlib.nullcontext()
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.ref_model is None and is_peft_model(unwrapped):
                adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  adapter, self.accelerator.autocast()):
                yield

        def reference_hidden(self, model, inputs):
            """(hidden, weight, softcap) of ``model`` (a reference model, or the policy: then as
            its reference) in the reference pass, the hidden states at the scored positions."""
            with self._reference_pass():
                return _scored_hidden(model, inputs)

        def compute_ref_log_probs(self, model, inputs):
            """The reference's summed log-probs [B], [B], as TRL takes them: ``model`` (a reference
            model, or the policy: then with its adapter disabled, or its frozen "ref" copy)."""
            if not self._fused():
                return super().compute_ref_log_probs(model, inputs)
            with self._reference_pass():
                hidden, weight, softcap = _scored_hidden(model, inputs)
                labels = _dpo_inputs(inputs)[1]
                return fused_linear_sequence_logps(hidden, weight, labels, softcap=softcap).chunk(2, dim=0)

        def _compute_loss(self, model, inputs, return_outputs):
            if not self._fused():
                return super()._compute_loss(model, inputs, return_outputs)
            mode = "train" if self.model.training else "eval"
            model_kwargs, labels = _dpo_inputs(inputs)
            hidden, weight, softcap = _scored_hidden(model, inputs)
            out = self.preference_loss(PreferenceBatch(
                "dpo", hidden, weight, labels, beta=self.beta, label_smoothing=self.label_smoothing, softcap=softcap,
                reference=Reference(self, inputs)))
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

    class FusedORPOTrainer(_Fused, ORPOTrainer):
        """TRL's ORPOTrainer whose loss runs in ``preference_loss`` (ours: fused_linear_preference)."""

        def fused_loss_problem(self) -> str | None:
            if self.is_encoder_decoder:
                return "an encoder-decoder model"
            if self.aux_loss_enabled:
                return "a MoE auxiliary loss"
            return _head_problem(self.model)

        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            if not self._fused():
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
            out = self.preference_loss(PreferenceBatch("orpo", hidden[:, :-1], weight, labels, beta=self.beta,
                                                       label_smoothing=0.0, softcap=softcap, nll_labels=nll_labels))
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
                            loss: PreferenceLoss | None = None, eval_dataset=None, callbacks=(), mixins=(),
                            **config_overrides):
    """A TRL preference trainer for ``model`` (a PEFT model, or a plain causal LM: then DPO
    needs ``precompute_ref_log_probs=True`` or a reference model TRL can load).

    ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` or a list of rows with
    ``prompt``, ``chosen`` and ``rejected`` (conversational or plain text; other keys are
    left alone). ``method``: "dpo" or "orpo"; ``beta``; ``label_smoothing`` (DPO only,
    conservative DPO). ``fused``: the loss in our kernel (True) or TRL's trainer unmodified.
    ``loss``: the fused trainer's loss in place of ours (:data:`PreferenceLoss`, a function of a
    :class:`PreferenceBatch`; None: :func:`fused_preference_loss`); it needs ``fused``.
    ``mixins``: classes put in front of the trainer's class (workbench.trainer.Guarded: the
    non-finite-loss guard of `workbench train`).
    ``config_overrides``: fields of TRL's DPOConfig / ORPOConfig (:func:`preference_config`).
    Returns the trainer; ``trainer.train()`` runs it."""
    args = preference_config(method, output_dir, beta=beta, label_smoothing=label_smoothing, **config_overrides)
    import datasets

    def as_dataset(rows):
        return rows if rows is None or isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))

    if loss is not None and not fused:
        raise ValueError("a preference loss runs in the fused trainers: pass fused=True with loss.")
    if fused:
        dpo_cls, orpo_cls = _trainer_classes()
    else:
        from trl import DPOTrainer as dpo_cls
        from trl.experimental.orpo import ORPOTrainer as orpo_cls
    cls = dpo_cls if method == "dpo" else orpo_cls
    if mixins or loss is not None:
        cls = type(cls.__name__, (*mixins, cls), {} if loss is None else {"preference_loss": staticmethod(loss)})
    return cls(model=model, args=args, train_dataset=as_dataset(train_dataset),
               eval_dataset=as_dataset(eval_dataset), processing_class=tokenizer, callbacks=list(callbacks))
