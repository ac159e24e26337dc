"""`workbench run`: train -> merge -> export -> eval -> report in one run directory,
resumable stage by stage, and the artifacts a user brings instead of a stage.

Each stage is the same function its own command calls (``run_train``,
``run_merge``, ``run_export``, ``run_eval``, ``report.render``). Before running one,
the pipeline asks whether the stage's manifest record still describes the run:

* the record is ``complete`` (a stage that failed, was killed, or is still marked
  "running" is re-run; an export whose GGUF failed its verification is settled too,
  so it is not redone with the same inputs, and the pipeline still exits 1);
* its recorded ``input_hashes`` equal the hashes of what it would read now (train:
  the resolved config, and a user base model or data file; merge: the adapter,
  tokenizer and base model; export: the merged folder, the GGUF types and the thresholds; eval: every model
  it would evaluate, the tasks and the limit; report: the records of the stages it
  renders);
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

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench import atomic, console, manifest
from workbench.errors import UserError
from workbench.train import PICKLE_SUFFIXES

STAGES = ("train", "merge", "export", "eval", "report")
#: GGUF types `workbench run` exports: f16 is the lossless reference the eval
#: comparison and the report measure the quantized files against.
DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")
DEFAULT_RUN = Path("runs") / "default"

#: What `workbench export --merged` copies from a user's folder: weights, configs and
#: tokenizer files. Never Python (a checkpoint's modeling_*.py) and never pickles.
COPIED_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")

#: How a user brings the artifact of a stage, for messages.
_BRING = {"train": "workbench merge --run DIR --adapter FOLDER [--base FOLDER]",
          "merge": "workbench export --run DIR --merged FOLDER"}


def _say(text: str) -> None:
    console.say(text)


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _jsonl_sha256(rows: list[dict]) -> str:
    """The sha256 of ``rows`` as synthetic.write_jsonl writes them."""
    return _text_sha256("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------- up to date?
def _status_problem(rec: dict | None, name: str, settled: tuple[str, ...] = ("complete",)) -> str | None:
    if rec is None:
        return f"no {name} stage yet"
    status = rec.get("status")
    if status in settled:
        return None
    if status == "running":
        return f"the last {name} did not finish (killed or interrupted)"
    error = rec.get("error")
    return f"the last {name} ended {status}" + (f" ({str(error)[:200]})" if error else "")


def _outputs_problem(run: Path, name: str) -> str | None:
    problems = manifest.verify_outputs(run, name)
    return f"its outputs changed ({problems[0]})" if problems else None


def check_train(run: Path, cfg) -> str | None:
    """Why the train stage must run, or None when its record matches ``cfg``."""
    from workbench import config as config_mod

    rec = manifest.stage(run, "train")
    problem = _status_problem(rec, "train")
    if problem:
        return problem
    hashes = rec.get("input_hashes") or {}
    if hashes.get("config") != _text_sha256(config_mod.dump(cfg)):
        return "the config changed (--config / --set)" if hashes.get("config") else "its record has no config hash"
    if not cfg.builtin_model and hashes.get("base_model") != manifest.hash_tree(cfg.model.path):
        return f"the base model in {cfg.model.path} changed"
    if not cfg.builtin_data:
        from workbench.train import load_data

        data = load_data(cfg)
        if (hashes.get("train_data"), hashes.get("test_data")) != (_jsonl_sha256(data["train"]),
                                                                   _jsonl_sha256(data["test"])):
            return "the training or test data changed"
    return _outputs_problem(run, "train")


#: The stage that makes each input another stage records the hash of.
MADE_BY = {"merge": {"adapter": "train", "tokenizer": "train", "base_model": "train"},
           "export": {"merged": "merge"},
           "eval": {"base": "train", "adapter": "train", "merged": "merge",
                    **{kind: "export" for kind in ("f16", "bf16", "q8_0", "q4_k_m")}}}
_LABELS = {"base_model": "base model", "merged": "merged model"}


def _merge_base(run: Path) -> Path | None:
    """The base checkpoint merge folds the adapter into (the train record's base: RUN/base
    for the built-in default, else the user's folder), or None when it is unavailable."""
    from workbench.export.merge import base_model_path

    try:
        return base_model_path(run, manifest.stage(run, "train") or {})
    except (UserError, OSError, ValueError):   # ValueError: an adapter_config.json that is not JSON
        return None


def _current_hashes(run: Path, name: str) -> dict:
    """{input: a function giving the hash of what the stage would read now (None: unavailable)}."""
    def tree(path):
        return lambda: manifest.hash_tree(path) if path is not None and path.exists() else None

    if name == "merge":
        return {"adapter": tree(run / "adapter"), "tokenizer": tree(run / "tokenizer"),
                "base_model": lambda: tree(_merge_base(run))()}
    if name == "export":
        merge = manifest.stage(run, "merge") or {}
        return {"merged": tree(run / merge.get("merged_dir", "merge/merged"))}
    from workbench.eval import models

    artifacts = models.locate(run)
    return {kind: tree(a.path) for kind, a in artifacts.items()}


def changed_inputs(run: Path, name: str, *, strict: bool = True) -> list[str]:
    """The inputs of stage ``name`` (merge, export or eval) whose hash in its record is not
    the hash of what its upstream stage left in the run now. ``strict``: an input the
    record has no hash of counts as changed (the pipeline reruns the stage); otherwise it
    is not judged (the report, on records of older versions)."""
    rec = manifest.stage(run, name) or {}
    recorded = rec.get("input_hashes") or {}
    keys = list(MADE_BY[name])
    if name == "eval":
        keys = [k for k in keys if k in recorded or (strict and k in rec.get("models", []))]
    current = _current_hashes(run, name)
    changed = []
    for key in keys:
        if key not in recorded and not strict:
            continue
        now = current[key]() if key in current else None
        if now is None or recorded.get(key) != now:
            changed.append(key)
    return changed


def check_merge(run: Path) -> str | None:
    rec = manifest.stage(run, "merge")
    problem = _status_problem(rec, "merge")
    if problem:
        return problem
    changed = changed_inputs(run, "merge")
    if changed:
        key = changed[0]
        label = _LABELS.get(key, key)
        if key not in rec.get("input_hashes", {}):
            return f"its record has no hash of the {label} (made by an older workbench)"
        return f"the {label} changed since the last merge"
    return _outputs_problem(run, "merge")


def check_export(run: Path, quants: list[str], thresholds: str | Path | None = None) -> str | None:
    from workbench.export.verify import load_thresholds

    rec = manifest.stage(run, "export")
    # An export whose GGUF failed verification is settled too: redoing it with the same
    # inputs, types and thresholds fails the same way (the pipeline still exits 1).
    problem = _status_problem(rec, "export", ("complete", "failed_verification"))
    if problem:
        return problem
    if sorted(rec.get("files", {})) != sorted(quants):
        return f"it exported {', '.join(rec.get('files', {})) or 'nothing'}, this run asks for {', '.join(quants)}"
    if changed_inputs(run, "export"):
        return "the merged model changed since the last export"
    try:
        verified = json.loads((run / "export" / "export_report.json").read_text()).get("thresholds")
    except (OSError, json.JSONDecodeError):
        verified = None
    if verified != load_thresholds(thresholds):
        return "it was verified against other thresholds" + (f" than {thresholds}" if thresholds else
                                                             " than the defaults")
    from workbench.export.adapter_export import problem as adapter_problem

    return adapter_problem(run, rec, thresholds) or _outputs_problem(run, "export")


def _expected_tasks(run: Path) -> list[str]:
    from workbench.eval import suite

    rows, _ = suite.load_test_rows(run, manifest.stage(run, "train"))
    counts = {name: len(docs) for name, docs in suite.task_docs(rows).items()}
    return [t for t in suite.SHIPPED_TASKS if counts.get(t)]


def check_eval(run: Path, limit: int | None) -> str | None:
    from workbench.eval import models

    rec = manifest.stage(run, "eval")
    problem = _status_problem(rec, "eval")
    if problem:
        return problem
    if rec.get("limit") != limit:
        return f"it ran with limit {rec.get('limit')}, this run asks for {limit}"
    if rec.get("include") or rec.get("chat_template") is False or rec.get("tasks") != _expected_tasks(run):
        return "it ran with other tasks or options than `workbench run` uses"
    artifacts = models.locate(run)
    available = [k for k, a in artifacts.items() if a.path is not None]
    if sorted(rec.get("models", [])) != sorted(available):
        return f"it evaluated {', '.join(rec.get('models', []))}; the run now has {', '.join(available)}"
    changed = changed_inputs(run, "eval")
    if changed:
        return f"the {changed[0]} model changed since the last eval"
    return _outputs_problem(run, "eval")


def check_report(run: Path) -> str | None:
    from workbench import report

    rec = manifest.stage(run, "report")
    problem = _status_problem(rec, "report")
    if problem:
        return problem
    if rec.get("input_hashes") != report.input_hashes(run):
        return "the stage records it renders changed"
    return _outputs_problem(run, "report")


# --------------------------------------------------------------------------- the pipeline
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


def _user_provided(run: Path) -> int | None:
    """Index in STAGES of the last stage a user brought (train or merge), if any."""
    last = None
    for i, name in enumerate(STAGES[:2]):
        rec = manifest.stage(run, name)
        if rec and rec.get("user_provided"):
            last = i
    return last


def _require_dir_or_nothing(run: Path) -> None:
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a run directory; pass a directory (a new one, or one that "
                        "`workbench run` made).")


def _export_failures(run: Path) -> list[str]:
    """The GGUF types the export record says failed their verification."""
    rec = manifest.stage(run, "export") or {}
    adapter = ["adapter"] if not (rec.get("adapter") or {}).get("passed", True) else []
    return [k for k, e in (rec.get("files") or {}).items() if not e.get("passed", True)] + adapter


def _mark_failed(run: Path, name: str, err: BaseException) -> None:
    """Make sure the manifest does not describe the stage by an earlier record (or as
    still running) after it failed midway. Train and eval record their own failures,
    with details, which are kept; merge, export and report do not."""
    if name == "train":
        return   # run_train notes its own tries, and keeps a previous complete record
    rec = manifest.stage(run, name)
    if (rec or {}).get("status") != "failed":
        message = str(err) or type(err).__name__
        manifest.record_stage(run, name, {"status": "failed", "error": f"{type(err).__name__}: {message}"[:500]})


def run_pipeline(cfg, run: str | Path, *, force: str | None = None, quants=DEFAULT_QUANTS,
                 eval_limit: int | None = None, thresholds: str | Path | None = None, config_given: bool = False,
                 command: str | None = None) -> PipelineResult:
    """Every stage in order, each skipped when its record is up to date. Returns
    what each stage did; ``exit_code`` is 1 when a GGUF failed its verification."""
    from workbench.offline import enforce_offline

    enforce_offline()
    run = Path(run).resolve()
    if force is not None and force not in STAGES:
        raise UserError(f"--force {force!r} is not a stage; use one of {', '.join(STAGES)}.")
    quants = [q for q in ("f16", "bf16", "q8_0", "q4_k_m") if q in set(quants) | {"f16"}]
    if eval_limit is not None and eval_limit < 1:
        raise UserError(f"--eval-limit must be at least 1, got {eval_limit}.")
    _require_dir_or_nothing(run)
    with manifest.lock(run):
        return _run_pipeline(cfg, run, force, quants, eval_limit, thresholds, config_given, command)


def _run_pipeline(cfg, run: Path, force, quants, eval_limit, thresholds, config_given, command) -> PipelineResult:
    # What a killed command left (temp names, a train's staging folder, tries noted as
    # running) is no one's now that we hold the lock.
    manifest.settle_attempts(run)
    cleaned = manifest.clean_leftovers(run)
    if cleaned:
        _say(f"removed what an interrupted command left: {', '.join(cleaned[:5])}"
             + (f" and {len(cleaned) - 5} more" if len(cleaned) > 5 else ""))
    brought = _user_provided(run)
    if brought is not None:
        what = STAGES[brought]
        if config_given:
            raise UserError(f"the {what} stage of {run} was brought by you, so there is nothing to train with "
                            "--config/--set; drop them, or use a new --run directory for a training run.")
        if force is not None and STAGES.index(force) <= brought:
            raise UserError(f"the {what} stage of {run} was brought by you, so --force {force} has nothing to "
                            f"redo; bring it again, or force a later stage ({', '.join(STAGES[brought + 1:])}).")

    result = PipelineResult(run)
    rerun_because = None   # once a stage runs, every later one runs too
    total = len(STAGES)
    for i, name in enumerate(STAGES):
        head = f"[{i + 1}/{total}] {name}"
        if brought is not None and i < brought:
            reason = (f"skipped: not needed, the {STAGES[brought]} stage was brought by you"
                      if manifest.stage(run, name) is None else "skipped: kept (the user-provided stage after it)")
            _say(f"{head}: {reason}")
            result.stages.append(StageResult(name, "skipped", reason))
            continue
        if brought is not None and i == brought:
            problem = _outputs_problem(run, name)
            if problem:
                raise UserError(f"the {name} stage you brought into {run} is no longer as recorded: {problem}; "
                                f"bring it again ({_BRING[name]}).")
            source = manifest.stage(run, name).get("inputs", {}).get("adapter" if name == "train" else "merged")
            reason = f"skipped: brought by you (from {source})"
            _say(f"{head}: {reason}")
            result.stages.append(StageResult(name, "skipped", reason))
            continue

        if force == name:
            why = f"--force {name}"
        elif rerun_because:
            why = f"{rerun_because} just ran"
        else:
            why = {"train": lambda: check_train(run, cfg), "merge": lambda: check_merge(run),
                   "export": lambda: check_export(run, quants, thresholds), "eval": lambda: check_eval(run, eval_limit),
                   "report": lambda: check_report(run)}[name]()
        if why is None:
            reason = "skipped: up to date (complete, same input hashes, outputs intact)"
            if name == "export" and manifest.stage(run, name).get("status") == "failed_verification":
                failed = _export_failures(run)
                reason = (f"skipped: verified before: {len(failed)} GGUF(s) failed ({', '.join(failed)}; same "
                          "inputs, types and thresholds, so exporting again would fail the same way)")
                if failed:
                    result.exit_code = 1
            _say(f"{head}: {reason}")
            result.stages.append(StageResult(name, "skipped", reason))
            continue

        _say(f"{head}: running ({why})")
        start = time.perf_counter()
        try:
            note = _run_stage(name, run, cfg, quants, eval_limit, thresholds, command)
        except BaseException as err:
            # A UserError is a refusal: the stage checked its inputs and stopped (a stage
            # that had started writing records that itself, and its outputs' hashes no
            # longer match). Anything else is a crash midway: mark the stage failed.
            if not isinstance(err, UserError):
                _mark_failed(run, name, err)
            seconds = time.perf_counter() - start
            _say(f"{head}: failed after {seconds:.1f}s; the earlier stages are intact, and `workbench run` "
                 f"resumes at {name}.")
            result.stages.append(StageResult(name, "failed", why, seconds))
            raise
        seconds = time.perf_counter() - start
        if note.startswith("FAILED"):
            result.exit_code = 1
        _say(f"{head}: done in {seconds:.1f}s" + (f" ({note})" if note else ""))
        result.stages.append(StageResult(name, "ran", why, seconds, note))
        rerun_because = name
    return result


def _run_stage(name: str, run: Path, cfg, quants: list[str], eval_limit: int | None, thresholds, command) -> str:
    if name == "train":
        from workbench.train import run_train

        rec = run_train(cfg, run)
        ev, parts = rec.get("eval", {}), [f"{rec.get('steps')} steps"]
        if rec.get("final_loss") is not None:
            parts.append(f"final loss {rec['final_loss']:.4g}")
        if "adapter" in ev:
            parts.append(f"held-out accuracy {ev['base']:.3f} -> {ev['adapter']:.3f}")
        return ", ".join(parts)
    if name == "merge":
        from workbench.export.merge import run_merge

        m = run_merge(run)["merged"]
        return f"KL mean {m['kl_mean']:.3g}, top-1 {m['top1_agreement']:.4f} vs the unmerged adapter"
    if name == "export":
        from workbench.export.stage import run_export

        report = run_export(run, quants, thresholds=thresholds, adapter_gguf=True)
        # Remembered for a bare `workbench run --run DIR` (as --quant: the record's files).
        rec = manifest.stage(run, "export")
        manifest.record_stage(run, "export", {**rec, "thresholds_file": str(Path(thresholds).resolve())
                                              if thresholds else None})
        failed = [k for k, e in report["files"].items() if not e["passed"]]
        failed += ["adapter"] if not (report.get("adapter") or {}).get("passed", True) else []
        notes = "".join(f"; {e['fallback_note']}" for e in report["files"].values() if e.get("fallback_note"))
        if failed:
            return (f"FAILED verification: {', '.join(failed)} (see {run / 'export' / 'export_report.json'}); "
                    f"evaluating and reporting anyway{notes}")
        shipped = [*report["files"], *(["adapter"] if (report.get("adapter") or {}).get("passed") else [])]
        return f"{', '.join(shipped)} written and verified{notes}"
    if name == "eval":
        from workbench.eval.run import run_eval

        rec = run_eval(run, limit=eval_limit)
        flags = rec.get("flags", [])
        return f"{len(rec['models'])} models" + (f", {len(flags)} change(s) beyond tolerance" if flags else "")
    from workbench import report

    paths = report.render(run, command=command)
    return f"{paths['md']}"


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
    from workbench.train import check_model_folder

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
    from workbench.envinfo import _version

    with atomic.directory(run / "adapter") as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / name, tmp / name)
    wtok.save_tokenizer(tok, run / "tokenizer")
    record = {
        "user_provided": True,
        "inputs": {"adapter": str(adapter), "base_model": str(base), "tokenizer": str(tok_src)},
        "input_hashes": {"adapter": manifest.hash_tree(run / "adapter"), "base_model": manifest.hash_tree(base)},
        "base_model": str(base),
        "family": base_config["family"],
        "quantization": None,
        "lora": {"r": acfg.get("r"), "alpha": acfg.get("lora_alpha"), "dropout": acfg.get("lora_dropout"),
                 "target_modules": acfg.get("target_modules"), "use_rslora": acfg.get("use_rslora", False)},
        "versions": {d: _version(d) for d in ("torch", "transformers", "peft", "parity-workbench")},
        "outputs": manifest.outputs_record(run, [run / "adapter", run / "tokenizer"]),
    }
    return manifest.record_stage(run, "train", record)


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
    from workbench.envinfo import _version

    target = run / "merge" / "merged"
    with atomic.directory(target) as tmp:
        for f in sorted(merged.iterdir()):   # data only: never code (*.py) or pickles
            if f.is_file() and f.suffix in COPIED_SUFFIXES:
                shutil.copy2(f, tmp / f.name)
    wtok.save_tokenizer(tok, run / "tokenizer")
    record = {
        "user_provided": True,
        "inputs": {"merged": str(merged)},
        "input_hashes": {"merged": manifest.hash_tree(target)},
        "dtype": dtype,
        "quantization": None,
        "merged_dir": "merge/merged",
        "metrics": {},
        "versions": {d: _version(d) for d in ("torch", "transformers", "parity-workbench")},
        "outputs": manifest.outputs_record(run, [target, run / "tokenizer"]),
    }
    return manifest.record_stage(run, "merge", record)


def summary(result: PipelineResult) -> str:
    """The short table `workbench run` ends with: each stage, then each model's key numbers."""
    from workbench import report

    lines = ["| stage | result | time | note |", "|---|---|---|---|"]
    for s in result.stages:
        when = f"{s.seconds:.1f}s" if s.action != "skipped" else ""
        note = s.note if s.action == "ran" else s.reason.removeprefix("skipped: ")
        lines.append(f"| {s.name} | {s.action} | {when} | {note} |")
    models = report.summary_table(result.run)
    return "\n".join(lines) + ("\n\n" + models if models else "")
