"""The training recipe: fine-tune a LoRA (or QLoRA) adapter, top to bottom.

``run_train(cfg, run)`` reads as three steps, in torchtune's manner:

    set-up   check everything that needs no weights (the model folder, the data, the config
             against the model's config); load the tokenizer, the base, the LoRA and the
             kernels, as the stack says (workbench.models.Stack: ours, per ``kernels:``)
    train    TRL's SFTTrainer, or its DPO / ORPO trainer for training.method dpo / orpo
             (workbench.trainer), every logging step in train/loss.jsonl
    save     the adapter, its held-out accuracy against the base's, the train record

It writes into the run directory:

    config.yaml          the resolved config
    base/                the generated base (built-in model only)
    tokenizer/           the tokenizer the model was trained with
    data/train.jsonl     the training rows, normalised to chat prompt/completion (dpo, orpo:
                         prompt/chosen/rejected pairs)
    data/test.jsonl      the held-out rows (what later stages evaluate on; dpo, orpo: the chosen
                         reply is the expected answer)
    train/loss.jsonl     one line per logging step: step, loss, lr, grad_norm, tokens, elapsed
    train/eval.json      greedy-generation accuracy on the test split, base and adapter
    adapter/             the PEFT adapter

Nothing is written before every check passed. The outputs are built in RUN/.train.partial
and renamed into place only when training and saving succeeded, so a refused, failed or
killed retrain leaves the previous complete train (record and files) as it was; the try is
noted under the manifest's "attempts". SFT is completion-only: the loss covers the
assistant's answer and its closing EOS, never the prompt (DPO scores the replies alone too;
ORPO's NLL term covers the prompt as well, as TRL's does). A non-finite loss stops training
and keeps the last adapter whose loss was finite in train/last_good_adapter/; running out of
GPU memory names the knobs that reduce memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
from pathlib import Path

from workbench import atomic, config as config_mod, distributed, manifest, stages, synthetic
from workbench.checks import check_model_folder
from workbench.config import Config
from workbench.data import load_data
from workbench.distributed import log
from workbench.envinfo import versions
from workbench.errors import UserError
from workbench.models import Stack

#: Where a train stage builds its outputs until they are complete (one at a time: RUN/.lock).
STAGING = ".train.partial"
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "bitsandbytes",
            "parity-workbench")


class TrainStage(stages.Stage):
    """Reads the config, a user's base model and a user's data; writes the adapter and the run's
    tokenizer, data and config."""

    name = "train"
    notes_own_failures = True

    def inputs(self, run: Path, settings: stages.Settings) -> dict:
        cfg = settings.cfg or config_mod.of_run(run)
        found = {"config": config_mod.dump(cfg)}
        if not cfg.builtin_model:
            found["base_model"] = Path(cfg.model.path)
        if not cfg.builtin_data:
            data = load_data(cfg)
            found.update(train_data=synthetic.jsonl_text(data["train"]), test_data=synthetic.jsonl_text(data["test"]))
        return found

    def outputs(self, run: Path, settings: stages.Settings) -> list[Path]:
        builtin = (settings.cfg or config_mod.of_run(run)).builtin_model
        return [run / p for p in ("config.yaml", *(["base"] if builtin else []), "tokenizer", "data", "adapter",
                                  "train/loss.jsonl", "train/eval.json")]

    def reason(self, run: Path, changed: list[str], rec: dict, settings: stages.Settings) -> str:
        if changed[0] == "config":
            return "the config changed (--config / --set)" if "config" in rec.get("input_hashes", {}) else \
                "its record has no config hash"
        if changed[0] == "base_model":
            return f"the base model in {settings.cfg.model.path} changed"
        return "the training or test data changed"

    def run(self, run: Path, settings: stages.Settings) -> dict:
        return run_train(settings.cfg, run)

    def summary(self, run: Path, rec: dict) -> str:
        ev, parts = rec.get("eval", {}), [f"{rec.get('steps')} steps"]
        if rec.get("final_loss") is not None:
            parts.append(f"final loss {rec['final_loss']:.4g}")
        if "adapter" in ev:
            parts.append(f"held-out accuracy {ev['base']:.3f} -> {ev['adapter']:.3f}")
        return ", ".join(parts)


STAGE = TrainStage()


def run_train(cfg: Config, run_dir: str | os.PathLike, stack: Stack | None = None) -> dict:
    """Train a LoRA adapter as ``cfg`` says (built by ``stack``, default: ours), write it and its
    records into ``run_dir``, and return the manifest's train record."""
    from workbench.offline import enforce_offline

    enforce_offline()
    stack = stack or Stack()
    state = distributed.setup()
    run = Path(run_dir).resolve()
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a run directory; pass a directory (a new one, or one that "
                        "`workbench train` made).")
    refuse_brought(run)

    # ---- set-up: every check that needs no weights, before the run directory is touched
    stack.check(cfg)
    model_info = None if cfg.builtin_model else check_model_folder(cfg.model.path)
    data = load_data(cfg)
    import transformers

    from workbench import models, tokenizer as wtok
    from workbench.data import training_dataset

    transformers.logging.set_verbosity_error()
    tok = wtok.default_tokenizer() if cfg.builtin_model else models.load_tokenizer(cfg, cfg.model.path)
    family = "llama" if cfg.builtin_model else model_info["family"]
    stack.check_model(cfg, tok)
    stats: dict = {}
    dataset = training_dataset(cfg, tok, data["train"], stats)

    main = distributed.is_main()
    with manifest.lock(run) if main else contextlib.nullcontext():
        refuse_brought(run)   # again, now that no other process can change the run
        staging = run / STAGING
        if main:
            manifest.clean_leftovers(run)   # a killed train's staging folder (.train.partial) among them
            staging.mkdir(parents=True)
            manifest.note_attempt(run, "train", "running", pid=os.getpid())
        kept = manifest.has_complete(run, "train")
        try:
            return _train(cfg, stack, run, staging, state, tok, family, data, dataset, stats)
        except BaseException as err:
            if main:
                after_failure(run, staging, kept, err)
            raise


def _train(cfg: Config, stack: Stack, run: Path, staging: Path, state, tok, family: str, data: dict, dataset,
           stats: dict) -> dict:
    import importlib

    import torch
    import transformers

    from workbench import default, heldout, models, tokenizer as wtok, trainer as trainer_mod

    main, start, timings, evals = distributed.is_main(), time.perf_counter(), {}, {}
    log("preparing tokenizer, base model and data", detail=True)
    base = base_record = cfg.model.path
    if cfg.builtin_model:
        base = str(default.write_base(tok, staging / "base", cfg.model.path) if main else staging / "base")
        base_record = "base"   # inside the run: recorded relative to it, so the run can move
    if main:
        atomic.write_text(staging / "config.yaml", config_mod.dump(cfg))
        wtok.save_tokenizer(tok, staging / "tokenizer")
        synthetic.write_jsonl(data["train"], staging / "data" / "train.jsonl")
        synthetic.write_jsonl(data["test"], staging / "data" / "test.jsonl")
    distributed.wait_for_everyone(state)  # the other processes load the base the main one wrote
    test_rows = data["test"][:cfg.eval.max_rows] if main else []

    transformers.set_seed(cfg.training.seed)
    t0 = time.perf_counter()
    model = stack.load(cfg, base)
    timings["load_s"] = round(time.perf_counter() - t0, 3)
    log(f"loaded {family} base {cfg.model.path if cfg.builtin_model else base} "
        f"({sum(p.numel() for p in model.parameters()):,} parameters{', NF4' if cfg.quantization else ''})")
    if test_rows:
        evals["base"] = heldout.timed_accuracy(model, tok, test_rows, cfg.eval.max_new_tokens, timings, "base")
    transformers.set_seed(cfg.training.seed)  # the LoRA init draws from the global RNG
    model = stack.attach(cfg, model)
    kernel_report = stack.kernels(cfg, model)
    ours = bool(kernel_report) and "swapped" in kernel_report   # workbench.patch's report: count what ran

    # ---- train
    steps = trainer_mod.total_steps(cfg, len(data["train"]))
    (staging / "train").mkdir(exist_ok=True)
    loss_log = trainer_mod.LossLog(staging / "train" / "loss.jsonl", steps)
    snapshots = trainer_mod.Snapshots(model)
    scratch = staging / "trainer"   # nothing is saved there (save_strategy "no"); removed with the staging folder
    trainer = trainer_mod.make_trainer(cfg, model, tok, data["train"], str(scratch), [loss_log, snapshots],
                                       dataset=dataset, stack=stack)
    stack.trainer_made(trainer)
    log(f"training {steps} steps on {len(data['train'])} rows (batch {cfg.training.batch_size} x accumulation "
        f"{cfg.training.grad_accum})")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    kernel_calls = importlib.import_module("workbench.patch").kernel_calls if ours else dict
    calls_before = kernel_calls()
    t0 = time.perf_counter()
    try:
        try:
            result = trainer.train()
        finally:
            loss_log.close()  # the whole log, written atomically once
    except trainer_mod.NonFiniteLoss as err:
        trainer_mod.keep_last_good_adapter(cfg, run, model, snapshots, err)
    except torch.OutOfMemoryError:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if main:
            manifest.note_attempt(run, "train", "failed", error="out of memory")
        raise UserError(trainer_mod.oom_message(cfg, stack)) from None
    timings["train_s"] = round(time.perf_counter() - t0, 3)
    if ours:  # what actually ran during training (a patched module can still fall back per call)
        kernel_report["calls_in_training"] = {k: n - calls_before.get(k, 0) for k, n in
                                              sorted(kernel_calls().items()) if n > calls_before.get(k, 0)}
        log(f"kernel calls in training: {kernel_report['calls_in_training'] or 'none (every call fell back)'}",
            detail=True)
    offload = trainer_mod.offload_record(trainer)
    if offload and offload["first_step"]:
        log(f"offloaded checkpointing: {offload['first_step']['tensors']} layer inputs, "
            f"{offload['first_step']['gib']:.3f} GiB a step, waited in host memory")
    if not main:
        distributed.wait_for_everyone(state)  # until the main process has written the adapter and the record
        return manifest.stage(run, "train")

    # ---- save: the adapter, its held-out accuracy, then everything renamed into place, config last
    trainer_mod.save_adapter(model, staging / "adapter", run, cfg)
    if test_rows:
        evals["adapter"] = heldout.timed_accuracy(model, tok, test_rows, cfg.eval.max_new_tokens, timings, "adapter")
    atomic.write_json(staging / "train" / "eval.json", evals or {"skipped": "eval.max_rows is 0"})
    shutil.rmtree(scratch, ignore_errors=True)
    # A kill between the renames leaves the old record, whose output hashes no longer match.
    atomic.move_in(staging, run, ["base", "tokenizer", "data", "train/loss.jsonl", "train/eval.json", "adapter",
                                  "config.yaml"])
    shutil.rmtree(run / "train" / "last_good_adapter", ignore_errors=True)  # from an earlier failed run
    (run / "train" / "failed_loss.jsonl").unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = round(time.perf_counter() - start, 3)
    tokens = loss_log.rows[-1]["tokens"] if loss_log.rows else None   # None: the trainer counts none (ORPO)
    cuda = torch.cuda.is_available()
    record = stages.record(run, STAGE, stages.Settings(cfg=cfg), {
        "base_model": base_record,
        "family": family,
        "method": cfg.training.method, "beta": None if cfg.training.method == "sft" else cfg.training.beta,
        "quantization": models.quantization_record(cfg),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": list(cfg.lora.target_modules), "use_rslora": cfg.lora.use_rslora},
        "dataset": {**data["info"], "train_rows": len(data["train"]), "test_rows": len(data["test"]),
                    "train": "data/train.jsonl", "test": "data/test.jsonl",
                    "rows_longer_than_max_seq_len": stats.get("longer_than_max_seq_len", 0),
                    "rows_left_out_no_answer_token": stats.get("dropped_no_answer_token", 0)},
        "kernels": kernel_report,
        "processes": state.num_processes if state is not None else 1,  # data-parallel ranks
        "steps": result.global_step,
        "final_loss": loss_log.rows[-1]["loss"] if loss_log.rows else None,
        "data_fingerprint": getattr(trainer, "batch_fingerprints", None),  # this process's first micro-batches
        "offload": offload,  # offloaded checkpointing: what it moved to host memory
        "train_loss": result.training_loss,
        "eval": {k: v["accuracy"] for k, v in evals.items()},
        "tokens": None if tokens is None else int(tokens),
        "tokens_per_s": round(tokens / timings["train_s"], 1) if tokens and timings.get("train_s") else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "timings": timings,
        "versions": versions(*PACKAGES, *stack.packages),
    })
    log(f"done in {timings['total_s']:.1f}s; adapter in {run / 'adapter'}", detail=True)
    distributed.wait_for_everyone(state)
    return record


# --------------------------------------------------------------------------- failing
def refuse_brought(run: Path) -> None:
    brought = [name for name, rec in manifest.read(run).get("stages", {}).items()
               if rec.get("user_provided")] if run.is_dir() else []
    if brought:
        raise UserError(f"{run} holds a {' and a '.join(brought)} stage you brought (user-provided), so training "
                        "there would mix a new adapter with it; use a new --run directory for a training run.")


def after_failure(run: Path, staging: Path, kept: bool, err: BaseException) -> None:
    """A train that stopped: note how (unless it noted it itself, as a non-finite loss or
    running out of memory do). With a previous complete train kept, its files stay and the
    staged ones go; a first train's staged files are moved in (there is nothing to keep),
    so its tokenizer, data and base sit next to train/last_good_adapter."""
    try:
        now = manifest.attempt(run, "train") if kept else manifest.stage(run, "train")
        if (now or {}).get("status") == "running":
            if isinstance(err, UserError):
                status, error = "refused", str(err)
            elif isinstance(err, KeyboardInterrupt):
                status, error = "interrupted", "interrupted (Ctrl-C)"
            else:
                status, error = "failed", f"{type(err).__name__}: {err}"
            manifest.note_attempt(run, "train", status, error=error[:500])
        if not kept:   # everything but the adapter, which only a finished train writes
            atomic.move_in(staging, run, ["config.yaml", "base", "tokenizer", "data", "train/loss.jsonl"])
        elif (staging / "train" / "loss.jsonl").is_file():
            atomic.replace(staging / "train" / "loss.jsonl", run / "train" / "failed_loss.jsonl")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
