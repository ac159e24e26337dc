"""`workbench eval`: lm-eval on every model of a run, offline, and one comparison table.

Writes under RUN/eval/:

    data/*.jsonl, tasks/*.yaml     the shipped tasks' documents and definitions (workbench.eval.suite)
    <model>/results.json           lm-eval's own results JSON for that model (without samples)
    <model>/samples_<task>.jsonl   lm-eval's per-document records (inputs, outputs, scores)
    comparison.csv, comparison.md  one row per model, metrics, changes vs the adapter, flags

and records the "eval" manifest stage (inputs and their hashes, tasks, the
table's flags, timings, outputs). Models are evaluated in pipeline order (base,
adapter, merged, then the GGUFs); each model's files are written as soon as it
is done, the table and the record last. A model that fails (or an interrupt)
leaves earlier stages and the finished models' results in place and records
the eval stage as "failed", since its files no longer match an earlier eval's
record. Folders of models from an earlier eval that this one did not cover are
removed at the end, so a completed RUN/eval always matches its record.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from workbench import atomic, console, manifest, stages
from workbench.envinfo import versions
from workbench.errors import UserError

from . import compare, models, suite

#: lm-eval's bootstrap for the standard error of non-mean metrics (none of the
#: shipped ones need it): 1000 resamples are plenty for an error bar and keep a
#: user's BLEU-style task from spending minutes on 100000.
BOOTSTRAP_ITERS = 1000


def log(msg: str) -> None:
    console.progress(f"[eval] {msg}")


def choose_models(artifacts: dict[str, models.Artifact], wanted: list[str] | None) -> list[str]:
    """The kinds to evaluate: all available ones (noting the rest), or exactly
    ``wanted`` (UserError naming the first that is missing)."""
    if wanted is not None:
        for kind in wanted:
            if artifacts[kind].path is None:
                raise UserError(f"--models asks for {kind}, but {artifacts[kind].missing}; "
                                "drop it from --models or make it first.")
        return wanted
    chosen = []
    exported = any(artifacts[k].path is not None for k in models.GGUF_KINDS)
    for kind in models.KINDS:
        if artifacts[kind].path is None:
            if kind in models.HF_KINDS or not exported:   # a type the export left out needs no word
                log(f"skipping {kind}: {artifacts[kind].missing}")
        else:
            chosen.append(kind)
    if not chosen:
        raise UserError("nothing to evaluate in this run: no base, adapter, merged model or GGUF was found; "
                        "run `workbench train --run DIR` first.")
    return chosen


def choose_tasks(requested: list[str] | None, counts: dict[str, int]) -> list[str]:
    if requested is None:
        return [t for t in suite.SHIPPED_TASKS if counts[t]]
    for name in requested:
        if name in counts and not counts[name]:
            raise UserError(f"task {name} has no documents in this run: its held-out rows are not built-in synthetic "
                            "skills (add, recall, reverse); use wb_synthetic_gen and wb_heldout_ppl instead.")
    return requested


def evaluate(lm, manager, tasks: list[str], limit: int | None, chat_template: bool) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                           apply_chat_template=chat_template, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True)


def write_results(folder: Path, results: dict) -> list[Path]:
    """lm-eval's results JSON (samples apart, one JSON line per document)."""
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", {}) or {}
    files = [atomic.write_text(folder / "results.json",
                               json.dumps(results, indent=2, default=handle_non_serializable) + "\n")]
    for task, docs in samples.items():
        lines = "".join(json.dumps(d, default=handle_non_serializable, ensure_ascii=False) + "\n" for d in docs)
        files.append(atomic.write_text(folder / f"samples_{task}.jsonl", lines))
    return files


def _lm_for(kind: str, run: Path, artifacts, state: dict, length: int | None):
    """The lm-eval LM for ``kind``. The base model, once loaded, is kept for the
    adapter that follows it (which wraps it in place, so it is handed over)."""
    base = state.pop("base", None)
    if kind in models.GGUF_KINDS:
        return models.gguflm(artifacts[kind].path, length)
    if "tokenizer" not in state:
        state["tokenizer"] = models.load_tokenizer(run)
    if kind == "base":
        state["base"] = models.load_hf(artifacts["base"].path)
        return models.hflm(state["base"], state["tokenizer"], length)
    if kind == "adapter":
        model = models.adapter_model(run, artifacts["base"].path, state["train"], base)
        return models.hflm(model, state["tokenizer"], length)
    return models.hflm(models.load_hf(artifacts["merged"].path), state["tokenizer"], length)


def run_eval(run: str | Path, tasks: list[str] | None = None, model_kinds: list[str] | None = None,
             include: list[str | Path] = (), limit: int | None = None, tolerances: str | Path | None = None,
             chat_template: bool = True) -> dict:
    """The eval stage; returns its manifest record."""
    from workbench.offline import enforce_offline

    enforce_offline()
    start = time.perf_counter()
    run = manifest.require_run(run)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}.")
    if tasks is not None and not tasks:
        raise UserError(f"--tasks names no task; give comma-separated names, e.g. {','.join(suite.SHIPPED_TASKS)}.")
    limits = compare.load_tolerances(tolerances)
    include = [Path(p).resolve() for p in include]
    suite.check_task_folders(include)
    with manifest.lock(run):
        return _run_eval(run, tasks, model_kinds, include, limit, limits, chat_template, start)


def _run_eval(run: Path, tasks, model_kinds, include, limit, limits, chat_template, start) -> dict:
    artifacts = models.locate(run)
    chosen = choose_models(artifacts, model_kinds)

    logging.getLogger("lm_eval").setLevel(logging.WARNING)   # its INFO lines would drown the progress
    train = manifest.stage(run, "train")
    rows, source = suite.load_test_rows(run, train)
    eval_dir = run / "eval"
    choice_end = (suite.turn_end(run) or "") if chat_template else ""
    counts = suite.materialize(eval_dir, rows, suite.max_new_tokens(run), choice_end)
    names = choose_tasks(tasks, counts)
    manager = suite.task_manager(names, [eval_dir / "tasks", *include])
    suite.load_tasks(manager, names)
    log(f"tasks {', '.join(names)} on {len(rows)} held-out rows from {source}; models {', '.join(chosen)}")

    settings = stages.Settings(eval_limit=limit, eval_tasks=names, eval_models=chosen, include=include,
                               chat_template=chat_template)
    found = STAGE.inputs(run, settings)
    hashed = stages.hashes(found)   # what was evaluated, before it can change
    timings = {"setup_s": round(time.perf_counter() - start, 3)}
    length = models.max_length(artifacts)
    state = {"train": train or {}}
    metrics = {}
    try:
        for i, kind in enumerate(chosen, 1):
            art = artifacts[kind]
            t0 = time.perf_counter()
            lm = _lm_for(kind, run, artifacts, state, length)
            results = evaluate(lm, manager, names, limit, chat_template)
            if hasattr(lm, "close"):
                lm.close()
            del lm
            shutil.rmtree(eval_dir / kind, ignore_errors=True)   # the folder holds this eval's results only
            write_results(eval_dir / kind, results)
            metrics[kind] = compare.metrics_of(results)
            timings[f"{kind}_s"] = round(time.perf_counter() - t0, 3)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics[kind].items())
            log(f"[{i}/{len(chosen)}] {kind}" + (f" ({art.note})" if art.note else "")
                + f": {shown} ({timings[f'{kind}_s']:.1f}s)")
    except BaseException as err:
        # Results files are being replaced: an earlier eval record no longer describes RUN/eval.
        manifest.record_stage(run, "eval", {"status": "failed", "error": f"{type(err).__name__}: {err}"[:500],
                                            "models": chosen, "finished_models": list(metrics)})
        raise
    finally:
        state.clear()

    frame, flags = compare.table(metrics, limits)
    atomic.write_text(eval_dir / "comparison.csv", frame.to_csv(index=False))
    atomic.write_text(eval_dir / "comparison.md", compare.markdown(frame))
    for stale in (eval_dir / k for k in models.KINDS if k not in chosen):
        shutil.rmtree(stale, ignore_errors=True)
    for flag in flags:
        log(f"{flag['model']}: {flag['metric']} changed by {flag['change']:+.4g} vs the adapter, "
            f"beyond its tolerance ±{flag['tolerance']:g}")
    timings["total_s"] = round(time.perf_counter() - start, 3)
    record = stages.record(run, STAGE, settings, {
        "models": chosen,
        "skipped": {k: a.missing for k, a in artifacts.items() if k not in chosen and a.missing},
        "tasks": names,
        "include": [str(p) for p in include],
        "data": {"source": source, "documents": {t: counts[t] for t in names if t in counts}},
        "limit": limit,
        "chat_template": chat_template,
        "max_length": length,
        "metrics": metrics,
        "tolerances": limits,
        "flags": flags,
        "timings": timings,
        "versions": versions("lm-eval", "llama-cpp-python", "transformers", "peft", "torch"),
    }, found=found, hashed=hashed)
    return record


class EvalStage(stages.Stage):
    """Reads every model it evaluates (the base, the adapter, the merged model, the GGUFs), the
    tasks, the limit and its options; writes eval/."""

    name = "eval"
    upstream = {"base": "train", "adapter": "train", "merged": "merge", **{k: "export" for k in models.GGUF_KINDS}}
    OPTIONS = ("tasks", "include", "chat_template")

    def inputs(self, run: Path, settings: stages.Settings) -> dict:
        artifacts = models.locate(run)
        kinds = settings.eval_models or [k for k in models.KINDS if artifacts[k].path is not None]
        return {"limit": settings.eval_limit, "tasks": list(settings.eval_tasks or suite.default_tasks(run)),
                "include": [str(Path(p).resolve()) for p in settings.include],
                "chat_template": settings.chat_template, **{k: artifacts[k].path for k in kinds}}

    def outputs(self, run: Path, settings: stages.Settings) -> list[Path]:
        found = self.inputs(run, settings)
        return [*(run / "eval" / k for k in models.KINDS if k in found), run / "eval" / "comparison.csv",
                run / "eval" / "comparison.md", run / "eval" / "data", run / "eval" / "tasks"]

    def reason(self, run: Path, changed: list[str], rec: dict, settings: stages.Settings) -> str:
        if "limit" in changed:
            return f"it ran with limit {rec.get('limit')}, this run asks for {settings.eval_limit}"
        if set(changed) & set(self.OPTIONS):
            return "it ran with other tasks or options than `workbench run` uses"
        now = [k for k in self.inputs(run, settings) if k in models.KINDS]
        if sorted(rec.get("models", [])) != sorted(now):
            return f"it evaluated {', '.join(rec.get('models', []))}; the run now has {', '.join(now)}"
        return f"the {changed[0]} model changed since the last eval"

    def run(self, run: Path, settings: stages.Settings) -> dict:
        return run_eval(run, tasks=settings.eval_tasks, model_kinds=settings.eval_models, include=settings.include,
                        limit=settings.eval_limit, tolerances=settings.tolerances,
                        chat_template=settings.chat_template)

    def summary(self, run: Path, rec: dict) -> str:
        flags = rec.get("flags", [])
        return f"{len(rec['models'])} models" + (f", {len(flags)} change(s) beyond tolerance" if flags else "")


STAGE = EvalStage()
