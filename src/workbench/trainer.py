"""The trainer: TRL's SFTTrainer for one run's config (or, for training.method dpo / orpo,
TRL's preference trainer: workbench.preference), guarded against non-finite losses,
logging each step to train/loss.jsonl, keeping the last finite adapter, taking our fused
loss where TRL would compute its plain one, and offloading checkpointed activations when
the config asks.

Imported by the training recipe when it trains (it imports torch, transformers and TRL).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from workbench import atomic, distributed, manifest
from workbench.config import Config
from workbench.data import FINGERPRINT_BATCHES, batch_fingerprint, packing_strategy, training_dataset
from workbench.distributed import log
from workbench.errors import UserError
from workbench.host_copy import HostCopy
from workbench.models import Stack, dtype, old_checkpointing_name


class NonFiniteLoss(Exception):
    """Raised from the training step, before the optimizer could apply the step's
    non-finite gradients; run_train turns it into a UserError."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss {value} at step {step}")
        self.step, self.value = step, value


class LossLog(TrainerCallback):
    """Writes train/loss.jsonl and prints a progress line at the first logging step and then
    about every fifth of the run (the file has every logging step; the screen needs only the
    trend). A logging step appends its line and flushes it, no more: the GPU waits for the host
    between steps, and rewriting the whole log (with an fsync) each step costs more the longer
    the run. :meth:`close` writes the whole log atomically once training ends or fails."""

    def __init__(self, path: Path, total_steps: int):
        self.path, self.total, self.rows, self.start = path, total_steps, [], time.perf_counter()
        self.shown_fifth = -1
        self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.rows:
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
               "grad_norm": logs.get("grad_norm"), "tokens": logs.get("num_tokens"),
               "elapsed": round(time.perf_counter() - self.start, 3)}
        self.rows.append(row)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        fifth = 5 * row["step"] // max(self.total, 1)
        if fifth == self.shown_fifth:
            return
        self.shown_fifth = fifth
        # (TRL's ORPO trainer counts no tokens: then none are shown)
        tokens = "" if row["tokens"] is None else \
            f"tokens {int(row['tokens'])} ({row['tokens'] / max(row['elapsed'], 1e-9):.0f} tok/s) "
        log(f"step {row['step']}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
            f"grad_norm {float(row['grad_norm'] or 0):.3f} {tokens}{row['elapsed']:.1f}s")


class Snapshots(TrainerCallback):
    """Keeps a copy of the trainable (adapter) weights as they were at the start
    of the last step whose loss was finite: the last good adapter."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pending = self.good = None
        self.good_step = None
        # Two sets of buffers, allocated once, swapped each step: the copy is one multi-tensor
        # launch where a clone per parameter is hundreds of allocations and launches a step.
        self._spare: list | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        buffers = self._spare or [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(buffers, [p.detach() for p in self.params])
        self.pending, self._spare = buffers, None

    def on_step_end(self, args, state, control, **kwargs):
        self._spare = self.good  # the older copy is free to take the next step's
        self.good, self.good_step = self.pending, state.global_step - 1

    def restore(self) -> bool:
        if self.good is None:
            return False
        for p, saved in zip(self.params, self.good):
            p.data.copy_(saved)
        return True


def trainer_args(cfg: Config, output_dir: str, stack: Stack | None = None) -> dict:
    """The training arguments every trainer of a run shares (TRL's SFTConfig, DPOConfig and
    ORPOConfig all take them): steps, batch, optimizer and schedule, checkpointing, precision;
    no hub, no checkpoints; and what the stack sets on top."""
    stack = stack or Stack()
    t = cfg.training
    cuda = torch.cuda.is_available()
    model_dtype = dtype(cfg.model.dtype)
    args = dict(
        output_dir=output_dir,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.epochs if t.epochs is not None else 1.0,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        # A stack with checkpointing of its own switches it on itself; TRL's would replace it.
        gradient_checkpointing=bool(t.gradient_checkpointing) and not stack.own_checkpointing,
        # offload moves what reentrant checkpointing saves (workbench.offload); otherwise the default
        gradient_checkpointing_kwargs={"use_reentrant": True} if offloads(cfg, stack) else None,
        # DDP's unused-parameter search marks the checkpointed layers' parameters (out of sight in
        # a reentrant forward) ready, and their gradients in the recompute mark them again; every
        # LoRA parameter takes part in every step, so the search is off there.
        ddp_find_unused_parameters=False if offloads(cfg, stack) else None,
        max_length=t.max_seq_len,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        use_cpu=not cuda,
        bf16=cuda and model_dtype == torch.bfloat16,
        fp16=cuda and model_dtype == torch.float16,
        report_to="none",
        save_strategy="no",
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Guarded raises on a non-finite loss before the Trainer's filter could replace it,
        # and the filter waits for the GPU at every micro-batch.
        logging_nan_inf_filter=False,
    )
    return {**args, **stack.trainer_args(cfg)}


def sft_config(cfg: Config, output_dir: str, stack: Stack | None = None):
    """TRL's SFTConfig for this run: :func:`trainer_args` and a completion-only loss. The data
    comes tokenized and packed (:func:`training_dataset`), so the trainer leaves it as it is;
    ``packing`` still picks the collator (padding-free for bfd)."""
    t = cfg.training
    sft = dict(packing=bool(t.packing), packing_strategy=packing_strategy(t.packing),
               dataset_kwargs={"skip_prepare_dataset": True},  # training_dataset prepared it
               completion_only_loss=True)
    return SFTConfig(**{**sft, **trainer_args(cfg, output_dir, stack)})  # the stack's arguments win


def offloads(cfg: Config, stack: Stack | None = None) -> bool:
    """Offloaded checkpointing by workbench.offload (not where the stack brings its own)."""
    return cfg.training.gradient_checkpointing == "offload" and not (stack or Stack()).own_checkpointing


class _LossCheck:
    """Whether one micro-batch's loss is finite: tested on the device where the loss is made and
    brought to the host as a :class:`workbench.host_copy.HostCopy`, queued right after that
    forward. Reading it once the backward has been issued then waits for the forward only, not
    for the backward the GPU is still running: the host goes on to the optimizer step and the
    next batch while the GPU works."""

    def __init__(self, loss: torch.Tensor):
        self.loss = loss.detach()
        self._finite = HostCopy(torch.isfinite(self.loss).all())

    def finite(self) -> bool:
        return self._finite.value() is not False  # (None: under CUDA-graph capture, unread)


class Guarded:
    """A trainer mixin: the training step raises NonFiniteLoss before a non-finite loss can
    reach the optimizer, and fingerprints the first micro-batches (those with input_ids).

    Each micro-batch's loss is checked as it is computed (``compute_loss``, before its backward
    is issued; :class:`_LossCheck`), and the checks are read once per optimizer step, after the
    last micro-batch's backward has been issued (``accelerator.sync_gradients``; True outside
    the Trainer's loop, so a lone call checks): the host never waits for a backward here. A
    trainer whose step computes its loss elsewhere is checked on the step's returned loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self._check_loss(out[0] if return_outputs else out)
        return out

    # The Trainer walks the whole model (about 1,300 modules and 370 parameters for a 1B LoRA
    # model, most of them frozen) several times a step. The loop is bound by the host for small
    # models, so the two walks that are per-step bookkeeping, not training, are done once.
    def floating_point_ops(self, inputs) -> int:
        """The Trainer's count, 6 x input tokens x non-embedding parameters, with the parameters
        counted once per model instead of at every micro-batch."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        counted = self.__dict__.get("_counted_params")
        if counted is None or counted[0] is not self.model:
            counted = self._counted_params = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main].numel() * counted[1]

    def _clip_grad_norm(self, model):
        """The Trainer's clipping, given the parameters that train (listed once per model)
        instead of every parameter: a frozen one has no gradient, so the norm and the clipped
        gradients are the same. Where the parameters are sharded or split (FSDP, DeepSpeed,
        tensor parallelism) the Trainer's own path runs."""
        listed = self.__dict__.get("_trained_params")
        if listed is None or listed[0] is not model:
            listed = self._trained_params = (model, _trained_parameters(self, model))
        if listed[1] is None:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(listed[1], self.args.max_grad_norm)

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Queue the finiteness check of a loss the current training step computed."""
        if self.__dict__.get("_in_training_step"):
            self.__dict__.setdefault("_loss_checks", []).append(_LossCheck(loss))

    def training_step(self, model, inputs, num_items_in_batch=None):
        prints = self.__dict__.setdefault("batch_fingerprints", [])
        if len(prints) < FINGERPRINT_BATCHES and "input_ids" in inputs:
            prints.append(batch_fingerprint(inputs))
        checks = self.__dict__.setdefault("_loss_checks", [])
        before = len(checks)
        self._in_training_step = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False
        if len(checks) == before:  # compute_loss was not called: the step's own loss
            checks.append(_LossCheck(loss))
        if getattr(self.accelerator, "sync_gradients", True):
            pending = list(checks)
            checks.clear()
            for check in pending:
                if not check.finite():
                    values = check.loss.reshape(-1)
                    raise NonFiniteLoss(self.state.global_step + 1, float(values[~torch.isfinite(values)][0]))
        return loss


def _trained_parameters(trainer, model) -> list | None:
    """``model``'s parameters that require a gradient, where clipping them alone is the
    Trainer's clipping (one process or DDP, no DTensor); else None."""
    from accelerate.utils import DistributedType
    from transformers.utils import is_sagemaker_mp_enabled

    if is_sagemaker_mp_enabled() or trainer.accelerator.distributed_type not in (
            DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (a torch without DTensor has no tensor parallelism)
        return params
    return None if any(isinstance(p, DTensor) for p in params) else params


class OldCheckpointingName:
    """A trainer mixin: TRL's DPO trainer asks the model ``is_gradient_checkpointing`` at every
    reference pass, a name transformers 5.23 deprecates with a warning each time; training runs
    inside models.old_checkpointing_name, which hides that notice."""

    def train(self, *args, **kwargs):
        with old_checkpointing_name():
            return super().train(*args, **kwargs)


class GuardedSFTTrainer(Guarded, SFTTrainer):
    """An SFTTrainer, :class:`Guarded`, that takes our fused loss where TRL would compute its
    plain one."""

    def _our_loss_applies(self) -> bool:
        """TRL computes its plain NLL loss through its own chunked LM head
        (``fused_lm_head=True``), which bypasses our fused linear cross-entropy.
        When our loss is patched in and TRL would take that plain path, take
        ours instead; every other TRL loss (custom compute_loss_func, label
        smoothing, DFT, MoE aux loss, sequence parallelism) stays TRL's."""
        patch = sys.modules.get("workbench.patch")
        sp = getattr(self.accelerator, "parallelism_config", None)
        return (patch is not None and patch.fused_loss_patched(self.model)
                and self.compute_loss_func is None and self.label_smoother is None
                and self.args.loss_type == "nll" and not self.aux_loss_enabled
                and not (sp is not None and getattr(sp, "sp_enabled", False)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._our_loss_applies():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Same reduction as TRL's plain path: summed token NLL / num_items_in_batch
        # (all ranks' tokens under gradient accumulation), else the mean over
        # this batch's labelled tokens. TRL's entropy/token-accuracy metrics need
        # the logits this path never forms, so they are not logged.
        outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._count_tokens(inputs)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        self._check_loss(loss)
        return (loss, outputs) if return_outputs else loss

    def _count_tokens(self, inputs):
        """TRL's count of the tokens trained on (the attention mask's, or the padding-free
        batch's length), kept on the device and added up in :meth:`log`: TRL's ``.item()``
        here would make the host wait for the forward before it launches the backward."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            return
        seen = self.accelerator.gather_for_metrics(local).sum() // self._tp_size
        pending = self.__dict__.get("_uncounted_tokens")
        self._uncounted_tokens = seen if pending is None else pending + seen

    def log(self, logs, start_time=None):
        pending = self.__dict__.pop("_uncounted_tokens", None)
        if pending is not None:
            self._total_train_tokens += int(pending)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


def make_trainer(cfg: Config, model, tok, train_rows: list[dict], output_dir: str, callbacks=(), dataset=None,
                 stack: Stack | None = None):
    """A :class:`GuardedSFTTrainer` over ``train_rows`` (or the ``dataset`` training_dataset
    made of them), with offloaded checkpointing when the config asks for it; for
    training.method dpo or orpo, :func:`make_preference_trainer`."""
    data = dataset if dataset is not None else training_dataset(cfg, tok, train_rows)
    if cfg.training.method != "sft":
        return make_preference_trainer(cfg, model, tok, data, output_dir, callbacks, stack)
    callbacks = list(callbacks)
    offload = None
    if offloads(cfg, stack):
        from workbench import offload as offload_mod

        offload = offload_mod.ActivationOffload()
        callbacks.append(offload_mod.trainer_callback(offload))
    with old_checkpointing_name():
        trainer = GuardedSFTTrainer(model=model, args=sft_config(cfg, output_dir, stack), train_dataset=data,
                                    processing_class=tok, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # our LossLog prints one line per logging step instead
    trainer.activation_offload = offload
    _collate_from_arrays(trainer)
    return trainer


def _collate_from_arrays(trainer) -> None:
    """Hands TRL's language-modelling collator each row's input_ids and labels as numpy arrays
    instead of Python lists: it makes a tensor of each, from a list one Python int at a time
    (on the host, every step) or from an array in one copy; the batch is the same, bit for bit.
    Only where the collator is TRL's own, unchanged."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator, data = trainer.data_collator, trainer.train_dataset
    if (type(collator) is not DataCollatorForLanguageModeling
            or DataCollatorForLanguageModeling.torch_call.__module__ != "trl.trainer.sft_trainer"
            or not hasattr(data, "with_format") or data.format["type"] is not None):
        return
    columns = [c for c in ("input_ids", "labels") if c in data.column_names]
    trainer.train_dataset = data.with_format("numpy", columns=columns, output_all_columns=True)


def make_preference_trainer(cfg: Config, model, tok, dataset, output_dir: str, callbacks=(),
                            stack: Stack | None = None):
    """TRL's DPO or ORPO trainer (workbench.preference), :class:`Guarded`, over the preference
    ``dataset`` (:func:`workbench.data.preference_dataset`), with :func:`trainer_args` and the
    config's beta. The loss runs in our fused kernel when the model runs our loss kernel
    (``kernels:``), in the stack's when it brings one (``Stack.preference_loss``: the same fused
    trainer, another loss), else it is TRL's own. DPO's reference is the base: with ref_model
    None and a PEFT model, TRL takes the policy with its adapter disabled."""
    from workbench import preference

    patch = sys.modules.get("workbench.patch")
    loss = (stack or Stack()).preference_loss(cfg)
    fused = loss is not None or (patch is not None and patch.fused_loss_patched(model))
    args = {k: v for k, v in trainer_args(cfg, output_dir, stack).items() if k != "output_dir"}
    with old_checkpointing_name():
        trainer = preference.make_preference_trainer(
            model, tok, dataset, method=cfg.training.method, beta=cfg.training.beta, output_dir=output_dir,
            fused=fused, loss=loss, callbacks=callbacks, mixins=(Guarded, OldCheckpointingName), **args)
    trainer.remove_callback(PrinterCallback)  # our LossLog prints one line per logging step instead
    trainer.activation_offload = None  # (the config refuses offloaded checkpointing here)
    return trainer


def total_steps(cfg: Config, n_rows: int) -> int:
    t = cfg.training
    if t.max_steps is not None:
        return t.max_steps
    return math.ceil(math.ceil(n_rows / t.batch_size) / t.grad_accum * t.epochs)


def oom_message(cfg: Config, stack: Stack | None = None) -> str:
    """What to reduce after running out of GPU memory, in one sentence."""
    t, ours = cfg.training, not (stack or Stack()).own_checkpointing   # (offloading is our checkpointing's)
    hints = [f"training.batch_size (now {t.batch_size}; raise training.grad_accum to keep the effective batch)",
             f"training.max_seq_len (now {t.max_seq_len})"]
    if not t.gradient_checkpointing:
        hints.append("set training.gradient_checkpointing: true" + (" (or offload)" if ours else ""))
    elif t.gradient_checkpointing is True and ours:
        hints.append("set training.gradient_checkpointing: offload (the layers' inputs wait in host memory)")
    if cfg.quantization is None:
        hints.append("load the base in 4 bits with quantization: {type: nf4} (QLoRA)")
    return "ran out of GPU memory while training; reduce " + ", or ".join(hints) + "."


def offload_record(trainer) -> dict | None:
    """What offloaded checkpointing moved to host memory (None: it was off)."""
    offload = getattr(trainer, "activation_offload", None)
    if offload is None:
        return None
    from workbench.offload import record

    return record(offload)


# --------------------------------------------------------------------------- the adapter
def save_adapter(model, folder: Path, run: Path, cfg: Config) -> None:
    """``model``'s adapter into ``folder``, naming the base where it lies in ``run`` (PEFT names the
    folder the base was loaded from, the staging folder for the built-in base)."""
    model.save_pretrained(folder, safe_serialization=True)
    acfg = json.loads((folder / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(run / "base") if cfg.builtin_model else cfg.model.path
    (folder / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")


def keep_last_good_adapter(cfg: Config, run: Path, model, snapshots, err) -> None:
    """After a non-finite loss: save the last adapter whose loss was finite (if any), note the
    failed try, and stop with a UserError."""
    extra = {"failed_step": err.step}
    where = "no step had a finite loss, so there is no adapter to keep"
    if snapshots.restore() and distributed.is_main():
        with atomic.directory(run / "train" / "last_good_adapter") as tmp:
            save_adapter(model, tmp, run, cfg)
        extra.update(last_good_adapter="train/last_good_adapter", last_good_step=snapshots.good_step)
        where = (f"the adapter after {snapshots.good_step} step(s), the last with a finite loss, is in "
                 f"{run / 'train' / 'last_good_adapter'}")
    if distributed.is_main():
        manifest.note_attempt(run, "train", "failed", error=f"non-finite loss at step {err.step}", **extra)
    raise UserError(f"training stopped: the loss became {err.value} at step {err.step}; {where}; lower "
                    f"training.lr (now {cfg.training.lr:g}) or check the data for broken rows.") from None
