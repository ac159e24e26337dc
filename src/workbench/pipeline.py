"""`workbench run`: train -> merge -> export -> eval -> report in one run directory,
resumable stage by stage, and the artifacts a user brings instead of a stage.

The pipeline is a loop over the declared stages (workbench.stages: each stage's module
says what it reads, what it writes, how it runs and its summary line); each runs the same
function its own command calls. Before running one, the loop asks the stage contract
(:func:`workbench.stages.why_run`) whether the stage's manifest record still describes the run:

* the record is settled: ``complete`` (a stage that failed, was killed, or is still
  marked "running" is re-run; an export whose GGUF failed its verification is settled
  too, so it is not redone with the same inputs, and the pipeline still exits 1);
* its recorded ``input_hashes`` equal the hashes of what the stage declares it would
  read now;
* its recorded ``outputs`` are on disk with the recorded hashes.

Then it is skipped, with the reason printed. Once a stage runs, every stage after it
runs too (its inputs are new), and ``--force STAGE`` starts that chain at STAGE. A
stage that crashes is marked "failed" in the manifest (train and eval record their
own failures, with details) and the pipeline stops; one that refuses its inputs
(a UserError) leaves its record as it was. Either way the earlier stages'
artifacts and records are untouched, and the next ``workbench run`` resumes at the
failed stage: its record is not complete, or its outputs no longer match it.

Bring your own (``workbench merge --adapter``, ``workbench export --merged``): the
folder is checked (safetensors only, a supported family, a tokenizer; never
``trust_remote_code``), copied into the run, and recorded as the stage that would
have made it, marked ``"user_provided": true`` with its hashes. The pipeline never
redoes a user-provided stage (nor the stages before it): it checks that the copy
is unchanged and carries on from there.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench import atomic, console, manifest, stages
from workbench.checks import PICKLE_SUFFIXES
from workbench.envinfo import versions
from workbench.errors import UserError
from workbench.export import DEFAULT_TYPES, GGUF_TYPES

DEFAULT_RUN = Path("runs") / "default"

#: What `workbench export --merged` copies from a user's folder: weights, configs and
#: tokenizer files. Never Python (a checkpoint's modeling_*.py) and never pickles.
COPIED_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")

#: How a user brings the artifact of a stage, for messages.
_BRING = {"train": "workbench merge --run DIR --adapter FOLDER [--base FOLDER]",
          "merge": "workbench export --run DIR --merged FOLDER"}


@dataclass
class StageResult:
    name: str
    action: str                   # "ran", "skipped", "failed"
    reason: str
    seconds: float = 0.0
    note: str = ""


@dataclass
class PipelineResult:
    run: Path
    stages: list[StageResult] = field(default_factory=list)
    exit_code: int = 0


def _user_provided(run: Path, names: tuple[str, ...]) -> int | None:
    """Index in ``names`` of the last stage a user brought (train or merge), if any."""
    last = None
    for i, name in enumerate(names):
        rec = manifest.stage(run, name) if name in _BRING else None
        if rec and rec.get("user_provided"):
            last = i
    return last


def _require_dir_or_nothing(run: Path) -> None:
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a run directory; pass a directory (a new one, or one that "
                        "`workbench run` made).")


def _mark_failed(run: Path, stage: stages.Stage, err: BaseException) -> None:
    """Make sure the manifest does not describe the stage by an earlier record (or as
    still running) after it failed midway (a stage that notes its own failures, train, is
    left alone: it keeps a previous complete record and notes the try)."""
    if stage.notes_own_failures:
        return
    rec = manifest.stage(run, stage.name)
    if (rec or {}).get("status") != "failed":
        message = str(err) or type(err).__name__
        manifest.record_stage(run, stage.name, {"status": "failed",
                                                "error": f"{type(err).__name__}: {message}"[:500]})


def run_pipeline(cfg, run: str | Path, *, force: str | None = None, quants=DEFAULT_TYPES,
                 eval_limit: int | None = None, thresholds: str | Path | None = None, config_given: bool = False,
                 command: str | None = None) -> PipelineResult:
    """Every stage in order, each skipped when its record is up to date. Returns
    what each stage did; ``exit_code`` is 1 when a GGUF failed its verification."""
    from workbench.offline import enforce_offline

    enforce_offline()
    run = Path(run).resolve()
    if force is not None and force not in stages.NAMES:
        raise UserError(f"--force {force!r} is not a stage; use one of {', '.join(stages.NAMES)}.")
    quants = [q for q in GGUF_TYPES if q in set(quants) | {"f16"}]   # f16: the lossless reference
    if eval_limit is not None and eval_limit < 1:
        raise UserError(f"--eval-limit must be at least 1, got {eval_limit}.")
    _require_dir_or_nothing(run)
    settings = stages.Settings(cfg=cfg, quants=quants, thresholds=thresholds, adapter_gguf=True, eval_limit=eval_limit,
                               command=command)
    with manifest.lock(run):
        return run_stages(run, stages.pipeline(), settings, force=force, config_given=config_given)


def run_stages(run: Path, pipeline: list[stages.Stage], settings: stages.Settings, *, force: str | None = None,
               config_given: bool = False) -> PipelineResult:
    """The generic loop (the caller holds the run's lock): each stage of ``pipeline`` in order,
    skipped when :func:`workbench.stages.why_run` finds its record up to date; once a stage
    runs, every later one runs too (its inputs are new), and ``force`` starts that chain there."""
    names = tuple(s.name for s in pipeline)
    # What a killed command left (temp names, a train's staging folder, tries noted as
    # running) is no one's now that we hold the lock.
    manifest.settle_attempts(run)
    cleaned = manifest.clean_leftovers(run)
    if cleaned:
        console.say(f"removed what an interrupted command left: {', '.join(cleaned[:5])}"
                    + (f" and {len(cleaned) - 5} more" if len(cleaned) > 5 else ""))
    brought = _user_provided(run, names)
    if brought is not None:
        what = names[brought]
        if config_given:
            raise UserError(f"the {what} stage of {run} was brought by you, so there is nothing to train with "
                            "--config/--set; drop them, or use a new --run directory for a training run.")
        if force is not None and names.index(force) <= brought:
            raise UserError(f"the {what} stage of {run} was brought by you, so --force {force} has nothing to "
                            f"redo; bring it again, or force a later stage ({', '.join(names[brought + 1:])}).")

    result = PipelineResult(run)
    rerun_because = None   # once a stage runs, every later one runs too
    for i, stage in enumerate(pipeline):
        name, head = stage.name, f"[{i + 1}/{len(pipeline)}] {stage.name}"
        if brought is not None and i <= brought:
            reason = _brought_reason(run, names, brought, i)
            console.say(f"{head}: {reason}")
            result.stages.append(StageResult(name, "skipped", reason))
            continue
        if force == name:
            why = f"--force {name}"
        elif rerun_because:
            why = f"{rerun_because} just ran"
        else:
            why = stages.why_run(run, stage, settings)
        if why is None:
            reason, code = stage.skipped(run, manifest.stage(run, name)) or (
                "skipped: up to date (complete, same input hashes, outputs intact)", 0)
            result.exit_code = max(result.exit_code, code)
            console.say(f"{head}: {reason}")
            result.stages.append(StageResult(name, "skipped", reason))
            continue

        console.say(f"{head}: running ({why})")
        start = time.perf_counter()
        try:
            note = stage.summary(run, stage.run(run, settings))
        except BaseException as err:
            # A UserError is a refusal: the stage checked its inputs and stopped (a stage
            # that had started writing records that itself, and its outputs' hashes no
            # longer match). Anything else is a crash midway: mark the stage failed.
            if not isinstance(err, UserError):
                _mark_failed(run, stage, err)
            seconds = time.perf_counter() - start
            console.say(f"{head}: failed after {seconds:.1f}s; the earlier stages are intact, and `workbench run` "
                        f"resumes at {name}.")
            result.stages.append(StageResult(name, "failed", why, seconds))
            raise
        seconds = time.perf_counter() - start
        if note.startswith("FAILED"):
            result.exit_code = 1
        console.say(f"{head}: done in {seconds:.1f}s" + (f" ({note})" if note else ""))
        result.stages.append(StageResult(name, "ran", why, seconds, note))
        rerun_because = name
    return result


def _brought_reason(run: Path, names: tuple[str, ...], brought: int, i: int) -> str:
    """Why a stage up to the one a user brought is skipped (a brought one must be as recorded)."""
    name = names[i]
    if i < brought:
        return (f"skipped: not needed, the {names[brought]} stage was brought by you"
                if manifest.stage(run, name) is None else "skipped: kept (the user-provided stage after it)")
    problem = stages.outputs_problem(run, name)
    if problem:
        raise UserError(f"the {name} stage you brought into {run} is no longer as recorded: {problem}; "
                        f"bring it again ({_BRING[name]}).")
    source = (manifest.stage(run, name).get("source") or {}).get("adapter" if name == "train" else "merged")
    return f"skipped: brought by you (from {source})"


# --------------------------------------------------------------------------- artifacts a user brings


def _refuse_over_pipeline_run(run: Path, stages: tuple[str, ...], what: str) -> None:
    for name in stages:
        rec = manifest.stage(run, name)
        if rec is not None and not rec.get("user_provided"):
            raise UserError(f"{run} already holds a {name} stage made by the pipeline; bring your {what} into a new "
                            "--run directory so the two are not mixed.")


def _load_tokenizer(folder: Path, flag: str):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is not a folder; pass the folder that holds tokenizer.json.")
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"could not load a tokenizer from {folder} ({str(err).splitlines()[0][:200]}); pass "
                        "--tokenizer FOLDER with tokenizer.json + tokenizer_config.json.") from None


def _check_checkpoint(folder: Path, flag: str) -> dict:
    """config.json (plus "family") of a safetensors checkpoint folder of a supported family."""
    from workbench.checks import check_model_folder

    return check_model_folder(folder, flag, "pass a local Hugging Face checkpoint folder (config.json + "
                                            "*.safetensors)")


def bring_adapter(run: str | Path, adapter: str | Path, base: str | Path | None = None,
                  tokenizer: str | Path | None = None) -> dict:
    """Copy a user's PEFT LoRA adapter (and its tokenizer) into ``run`` and record a
    user-provided train stage, so that ``workbench merge`` and later stages run on it."""
    run, adapter = Path(run).resolve(), Path(adapter).resolve()
    if not adapter.is_dir() or not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter} is not a PEFT adapter folder (no adapter_config.json); pass the "
                        "folder that save_pretrained wrote (adapter_config.json + adapter_model.safetensors).")
    if not (adapter / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in adapter.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no adapter_model.safetensors"
        raise UserError(f"--adapter {adapter} has {found}; only safetensors are loaded (pickles can run code), so "
                        "re-save it with save_pretrained(..., safe_serialization=True).")
    try:
        acfg = json.loads((adapter / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{adapter / 'adapter_config.json'} is not valid JSON ({getattr(err, 'msg', err)}); fix or "
                        "re-save it.") from None
    if not isinstance(acfg, dict):
        raise UserError(f"{adapter / 'adapter_config.json'} is not a JSON object; fix or re-save the adapter.")
    if acfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--adapter {adapter} is a {acfg.get('peft_type')} adapter; merge folds LoRA adapters "
                        "only, so bring a LoRA adapter.")
    if base is None:
        named = acfg.get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise UserError(f"the adapter's base_model_name_or_path {named!r} is not a local folder; pass --base "
                            "FOLDER, the Hugging Face checkpoint it was trained on (merge runs offline).")
        base = named
    base = Path(base).resolve()
    base_config = _check_checkpoint(base, "--base")
    tok_src = Path(tokenizer).resolve() if tokenizer else next(
        (f for f in (adapter, base) if (f / "tokenizer.json").is_file() or (f / "tokenizer_config.json").is_file()),
        None)
    if tok_src is None:
        raise UserError(f"neither {adapter} nor {base} holds a tokenizer; pass --tokenizer FOLDER (tokenizer.json "
                        "+ tokenizer_config.json).")
    tok = _load_tokenizer(tok_src, "--tokenizer")
    from workbench.export.merge import check_adapter_covers

    check_adapter_covers(adapter, base)
    _require_dir_or_nothing(run)
    if run.exists():
        _refuse_over_pipeline_run(run, ("train",), "adapter")
    with manifest.lock(run):
        _refuse_over_pipeline_run(run, ("train",), "adapter")
        return _copy_adapter(run, adapter, acfg, base, base_config, tok_src, tok)


def _copy_adapter(run: Path, adapter: Path, acfg: dict, base: Path, base_config: dict, tok_src: Path, tok) -> dict:
    from workbench import tokenizer as wtok

    with atomic.directory(run / "adapter") as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / name, tmp / name)
    wtok.save_tokenizer(tok, run / "tokenizer")
    return stages.record(run, stages.get("train"), None, {
        "user_provided": True,
        "source": {"adapter": str(adapter), "base_model": str(base), "tokenizer": str(tok_src)},
        "base_model": str(base),
        "family": base_config["family"],
        "quantization": None,
        "lora": {"r": acfg.get("r"), "alpha": acfg.get("lora_alpha"), "dropout": acfg.get("lora_dropout"),
                 "target_modules": acfg.get("target_modules"), "use_rslora": acfg.get("use_rslora", False)},
        "versions": versions("torch", "transformers", "peft", "parity-workbench"),
    }, found={"adapter": run / "adapter", "base_model": base}, outputs=[run / "adapter", run / "tokenizer"])


def bring_merged(run: str | Path, merged: str | Path) -> dict:
    """Copy a user's merged (or any full) HF checkpoint into ``run`` as merge/merged and
    record a user-provided merge stage, so that ``workbench export`` and later stages run on it."""
    from workbench.export.merge import stored_dtype

    run, merged = Path(run).resolve(), Path(merged).resolve()
    _check_checkpoint(merged, "--merged")
    if not (merged / "tokenizer.json").is_file():
        raise UserError(f"--merged {merged} has no tokenizer.json; export writes the tokenizer into the GGUF, so save "
                        "it next to the weights (tokenizer.save_pretrained(FOLDER)).")
    tok = _load_tokenizer(merged, "--merged")
    dtype = stored_dtype(merged)
    _require_dir_or_nothing(run)
    if run.exists():
        _refuse_over_pipeline_run(run, ("train", "merge"), "merged model")
    with manifest.lock(run):
        _refuse_over_pipeline_run(run, ("train", "merge"), "merged model")
        return _copy_merged(run, merged, tok, dtype)


def _copy_merged(run: Path, merged: Path, tok, dtype: str) -> dict:
    from workbench import tokenizer as wtok

    target = run / "merge" / "merged"
    with atomic.directory(target) as tmp:
        for f in sorted(merged.iterdir()):   # data only: never code (*.py) or pickles
            if f.is_file() and f.suffix in COPIED_SUFFIXES:
                shutil.copy2(f, tmp / f.name)
    wtok.save_tokenizer(tok, run / "tokenizer")
    return stages.record(run, stages.get("merge"), None, {
        "user_provided": True,
        "source": {"merged": str(merged)},
        "dtype": dtype,
        "quantization": None,
        "merged_dir": "merge/merged",
        "metrics": {},
        "versions": versions("torch", "transformers", "parity-workbench"),
    }, found={"merged": target}, outputs=[target, run / "tokenizer"])


def summary(result: PipelineResult) -> str:
    """The short table `workbench run` ends with: each stage, then each model's key numbers."""
    from workbench import report
    from workbench.markdown import table

    rows = [[s.name, s.action, f"{s.seconds:.1f}s" if s.action != "skipped" else "",
             s.note if s.action == "ran" else s.reason.removeprefix("skipped: ")] for s in result.stages]
    models = report.summary_table(result.run)
    return "\n".join(table(["stage", "result", "time", "note"], rows)) + ("\n\n" + models if models else "")
