"""Accuracy against the baseline: one config fine-tuned with and without our kernels.

For every seed and stack, ``workbench train`` fine-tunes the same config on the same
data in its OWN process, then ``workbench eval --models adapter`` scores the adapter
with lm-eval in another (the shipped offline tasks on the run's held-out split). The
eval itself is vanilla HF + PEFT for every adapter, so any difference comes from
training. Stacks:

  ``hf``    ``kernels: false`` (transformers + PEFT as they come).
  ``ours``  ``kernels: true`` (``workbench.patch`` after the adapter is attached; a
            base config whose ``kernels`` is a mapping of switches keeps them).

Only ``training.seed`` (LoRA init, data order) changes between seeds; ``data.seed``
stays the base config's, so every adapter is scored on the same held-out documents.
The difference between hf and ours at one seed must sit within the run-to-run noise,
measured as the difference between hf's seeds (ours' is reported; see :func:`compare`).

Per run: exit codes and the last stderr line of a failed stage (the suite goes on),
tokens/s, step time, peak GPU memory, final loss, the train stage's held-out accuracy
and lm-eval's metrics; speed, VRAM and accuracy go into one report (:func:`markdown`).
``run(jobs=N)`` (``--jobs N``) runs up to N (seed, stack) pipelines at once: the same
rows in the same order, but their times are taken while the runs share the device, so
such a report gives no speed numbers and says so.

Device: on a CPU our kernels run in Triton's interpreter (tens of tokens/s on the tiny
default at batch 16, :data:`INTERPRETER_TOKENS_PER_S`; HF ~7000 there at hidden 256), so a
CPU run of the default 800 steps with ``ours`` is impractical; pass a small ``steps`` there
(the smoke test uses 2). The measurement is meant for a GPU, where the speed and memory
columns mean something.

Files read per run (``OUT/<stack>-seed<seed>/``): ``manifest.json`` (stages.train:
tokens_per_s, peak_memory_gib, final_loss, steps, timings.train_s, eval.adapter,
kernels), ``train/eval.json`` (adapter.rows: how many rows the held-out accuracy
counts) and ``eval/adapter/results.json`` (lm-eval's results: the metrics via
``workbench.eval.compare.metrics_of`` and each task's document count, ``n-samples``).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from workbench.bench import child
from workbench.errors import UserError
from workbench.markdown import table

STACKS = {"hf": "HF (transformers + PEFT, kernels off)", "ours": "ours (workbench.patch, kernels on)"}
SEEDS = (0, 1)

#: The train stage's own metrics, next to lm-eval's "<task> <metric>[ [<filter>]]".
HELDOUT = "train heldout_accuracy"
FINAL_LOSS = "train final_loss"

#: Verdicts. Only WITHIN passes; everything else fails the suite.
WITHIN = "within noise"
OUTSIDE = "outside noise"
MISSING = "missing"                      # a run failed, or a metric is absent, NaN or infinite
UNMEASURED = "noise not measured"        # hf lacks two seeds with finite values

#: Floor of the allowed difference for continuous metrics (perplexities, bits per
#: byte, loss), relative. They have no counting resolution, so their floor is the
#: numerical band this project already accepts between hf and ours within ONE run
#: (bench/train.py LOSS_BAND: seeded hf and ours losses differed by at most 2.1e-3
#: relative on the H100; 1e-2 leaves room for that reordering).
RELATIVE_FLOOR = 1e-2
#: Scores are fractions of a document count; 0.45 - 0.55 must not exceed 0.1.
SLACK = 1e-9

#: Our kernels in Triton's interpreter on the CPU (tiny default, batch 16): tokens/s. 27 was
#: measured at its first shape (hidden 128); at hidden 256 the interpreter ran at 0.82x that
#: shape's speed side by side (36 against 44 tokens/s, 2-core CPU, 2026-12-07): 27 x 0.82.
INTERPRETER_TOKENS_PER_S = 22


# --------------------------------------------------------------------------- configs
def base_config(config: dict | str | os.PathLike | None) -> dict:
    """The validated base config as a full dict (every key, paths absolute): None is
    the built-in default; a path is read as YAML (relative paths against its folder);
    a dict's relative paths resolve against the working directory."""
    from workbench import config as wconfig

    base_dir: Path = Path.cwd()
    if config is None:
        raw = {}
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        path = Path(config)
        raw = wconfig.read_yaml_file(path, "config file", "pass a YAML training config (or none for the "
                                     "built-in default).") or {}
        base_dir = path.resolve().parent
    return wconfig.from_dict(raw, base_dir).to_dict()


def run_config(base: dict, stack: str, seed: int, steps: int | None = None) -> dict:
    """One run's config: ``base`` (a full dict from :func:`base_config`) with kernels
    off (hf) or on (ours), ``training.seed`` = ``seed`` and, if given, ``max_steps``."""
    if stack not in STACKS:
        raise UserError(f"unknown stack {stack!r}; use {', '.join(STACKS)}.")
    cfg = copy.deepcopy(base)
    if stack == "hf":
        cfg["kernels"] = False
    else:
        cfg["kernels"] = base["kernels"] if isinstance(base.get("kernels"), dict) else True
    cfg["training"]["seed"] = seed
    if steps is not None:
        cfg["training"]["max_steps"] = steps
    return cfg


# --------------------------------------------------------------------------- running
def _metrics_of_run(run_dir: Path, record: dict) -> dict:
    """What one finished run's train ``record`` and files say (see the module docstring for the files)."""
    steps, train_s = record.get("steps"), (record.get("timings") or {}).get("train_s")
    row = {"tokens_per_s": record.get("tokens_per_s"), "peak_memory_gib": record.get("peak_memory_gib"),
           "train_s": train_s, "steps": steps, "step_s": round(train_s / steps, 4) if steps and train_s else None,
           "final_loss": record.get("final_loss"), "kernels": record.get("kernels")}
    # eval.max_rows: 0 skips the train stage's own eval (then no run has the metric, and it is not compared).
    if "adapter" in (record.get("eval") or {}):
        evals = run_dir / "train" / "eval.json"
        row["heldout_accuracy"] = record["eval"]["adapter"]
        row["heldout_rows"] = ((json.loads(evals.read_text()).get("adapter") or {}).get("rows")
                               if evals.is_file() else None)
    return row


def _eval_metrics(run_dir: Path) -> tuple[dict, dict]:
    """lm-eval's metrics for the adapter and each task's evaluated document count."""
    from workbench.eval.compare import metrics_of

    results = json.loads((run_dir / "eval" / "adapter" / "results.json").read_text())
    docs = {task: (n or {}).get("effective") for task, n in (results.get("n-samples") or {}).items()}
    return metrics_of(results), docs


def _child_env(workers: int) -> tuple[dict | None, int | None]:
    """The environment of every train/eval process and the CPU threads it gets: with one
    pipeline at a time, None (the processes inherit ours, as they always have); with
    ``workers`` at once, ours with OMP_NUM_THREADS and MKL_NUM_THREADS set to
    max(1, cpu count // workers), which torch reads at start-up for its intra-op threads,
    so that the concurrent processes do not fight over the cores."""
    if workers <= 1:
        return None, None
    threads = max(1, (os.cpu_count() or 1) // workers)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}, threads


def run(config: dict | str | os.PathLike | None = None, out: str | os.PathLike = "runs/bench-accuracy",
        seeds=SEEDS, stacks=tuple(STACKS), steps: int | None = None,
        progress: Callable[[str], None] = print, tasks: list[str] | None = None, limit: int | None = None,
        jobs: int = 1) -> dict:
    """Train and evaluate every (seed, stack), each stage in its own process, seeds in
    the outer loop (an interrupted suite leaves whole hf/ours pairs). A failed stage is
    recorded in its row and the suite goes on. ``OUT/<stack>-seed<seed>/`` is replaced.

    ``jobs``: how many (seed, stack) pipelines (train, then eval of that run) run at
    once, started in the serial order; the rows come back in that order whatever order
    they finish in. Above 1 each process gets max(1, cpu count // pipelines at once) CPU
    threads (:func:`_child_env`), and the runs' timings are taken while others share the
    device: they are no speed measurement, so :func:`speed` gives no speed ratio and the
    result says so (``speed_measured``, ``speed_note``).

    Returns the base config, the rows, :func:`compare`'s rows and :func:`speed`'s."""
    import torch
    import yaml

    seeds, stacks = [int(s) for s in seeds], list(stacks)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be distinct and at least one, got {seeds}; two measure the run-to-run noise.")
    if not stacks or set(stacks) - set(STACKS):
        raise UserError(f"stacks take {', '.join(STACKS)}, got {', '.join(map(str, stacks)) or 'none'}.")
    if steps is not None and steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}.")
    if limit is not None and limit < 1:
        raise UserError(f"the eval limit must be at least 1, got {limit}.")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"jobs (--jobs) must be a whole number of at least 1, got {jobs!r}; pass 1 to run the "
                        "(seed, stack) pipelines one after another or N > 1 to run N of them at once.")
    base = base_config(config)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_steps = steps if steps is not None else base["training"]["max_steps"]
    if device == "cpu" and "ours" in stacks and max_steps:
        rows = max_steps * base["training"]["batch_size"] * base["training"]["grad_accum"]
        hours = rows * 27 / INTERPRETER_TOKENS_PER_S / 3600   # ~27 tokens per built-in row
        if hours > 0.25:
            progress(f"[bench accuracy] warning: no CUDA device; our kernels run in Triton's interpreter "
                     f"(~{INTERPRETER_TOKENS_PER_S} tokens/s): about {hours:.1f} h per ours run. Pass small steps "
                     "on the CPU; the measurement is meant for a GPU.")

    eval_args = (["--tasks", ",".join(tasks)] if tasks else []) + (["--limit", str(limit)] if limit else [])
    pairs = [(seed, stack) for seed in seeds for stack in stacks]
    workers = min(jobs, len(pairs))
    env, threads = _child_env(workers)
    lock = threading.Lock()

    def say(line: str) -> None:                        # one line at a time, whichever pipeline speaks
        with lock:
            progress(line)

    if workers > 1:
        say(f"[bench accuracy] {len(pairs)} pipelines, up to {workers} at once, {threads} CPU thread(s) per "
            "process; speed is not measured in this run (the runs share the device).")

    def pipeline(seed: int, stack: str) -> dict:
        name = f"{stack}-seed{seed}"
        run_dir, cfg_path = out / name, out / f"{name}.yaml"
        shutil.rmtree(run_dir, ignore_errors=True)   # nothing of an earlier invocation can be read as this one's
        cfg_path.write_text(yaml.safe_dump(run_config(base, stack, seed, steps), sort_keys=False))
        row = {"stack": stack, "label": STACKS[stack], "seed": seed, "run_dir": str(run_dir),
               "config": str(cfg_path), "train_exit_code": None, "eval_exit_code": None, "exit_code": None}
        say(f"[bench accuracy] seed {seed} {stack}: train {max_steps or base['training']['epochs']} "
            f"{'steps' if max_steps else 'epochs'}")
        trained = child.train(cfg_path, run_dir, env=env)
        row["train_wall_s"], row["train_exit_code"] = trained.wall_s, trained.exit_code
        if trained.error:
            row["error"] = f"train: {trained.error}"
        else:
            try:
                row.update(_metrics_of_run(run_dir, trained.record))
            except (OSError, ValueError, KeyError, TypeError) as err:
                row["error"] = f"train: unreadable record ({type(err).__name__}: {err})"
        if "error" not in row:
            say(f"[bench accuracy] seed {seed} {stack}: lm-eval on the adapter")
            t0 = time.perf_counter()
            proc = child.run_child([sys.executable, "-m", "workbench", "eval", "--run", str(run_dir),
                                    "--models", "adapter", *eval_args], env=env)
            row["eval_wall_s"], row["eval_exit_code"] = round(time.perf_counter() - t0, 1), proc.returncode
            if proc.returncode != 0:
                row["error"] = f"eval: {child.last_line(proc.stderr)}"
            else:
                try:
                    row["metrics"], row["documents"] = _eval_metrics(run_dir)
                except (OSError, ValueError, KeyError, TypeError) as err:
                    row["error"] = f"eval: unreadable results ({type(err).__name__}: {err})"
        codes = [c for c in (row["train_exit_code"], row["eval_exit_code"]) if c is not None]
        row["exit_code"] = next((c for c in codes if c != 0), 1 if "error" in row else 0)
        if "error" in row:
            say(f"[bench accuracy] seed {seed} {stack}: failed: {row['error']}")
        return row

    if workers == 1:
        results = [pipeline(seed, stack) for seed, stack in pairs]
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-accuracy")
        try:
            futures = [pool.submit(pipeline, seed, stack) for seed, stack in pairs]
            results = [f.result() for f in futures]   # the serial order, whatever order they finished in
        finally:
            pool.shutdown(wait=True, cancel_futures=True)   # on an error, start no further pipeline
    comparisons = compare(results)
    timed = workers == 1
    note = None if timed else (
        f"not measured: up to {workers} (seed, stack) pipelines ran at once (jobs {jobs}), so every run's step "
        "time and tokens/s were taken while other runs shared the device and the CPU; rerun with jobs 1 to "
        "measure speed")
    return {"config": base, "seeds": seeds, "stacks": stacks, "steps": max_steps, "tasks": tasks, "limit": limit,
            "device": device, "jobs": jobs, "threads_per_process": threads, "speed_measured": timed,
            "speed_note": note, "runs": results, "comparisons": comparisons, "speed": speed(results, timed=timed),
            "ok": passed(results, comparisons)}


# --------------------------------------------------------------------------- comparison
def run_metrics(row: dict) -> dict[str, tuple[float | None, int | None]]:
    """{metric: (value, documents it counts or None)} of one run row: lm-eval's metrics
    (documents from the task's ``n-samples``) and the train stage's held-out accuracy
    and final loss."""
    docs = row.get("documents") or {}
    out = {name: (value, docs.get(name.split(" ")[0])) for name, value in (row.get("metrics") or {}).items()}
    if "heldout_accuracy" in row:
        out[HELDOUT] = (row["heldout_accuracy"], row.get("heldout_rows"))
    if "final_loss" in row:
        out[FINAL_LOSS] = (row["final_loss"], None)
    return out


def metric_kind(name: str) -> str:
    """"relative" for continuous metrics (perplexities, bits per byte, losses), whose
    differences are ratios; "score" for fractions of documents (acc, exact_match, ...),
    whose differences are absolute."""
    metric = name.split(" ")[1] if " " in name else name
    return "relative" if metric.endswith(("perplexity", "loss")) or metric == "bits_per_byte" else "score"


def lower_is_better(name: str) -> bool:
    return metric_kind(name) == "relative"


def _finite(value) -> bool:
    """A number (not a bool, not a numeric string), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def difference(value: float, reference: float, kind: str) -> float:
    """``value`` against ``reference``: absolute for scores, ``value / reference - 1``
    for relative metrics (inf when the reference is 0 and the value is not)."""
    if kind == "relative":
        if value == reference:
            return 0.0
        return value / reference - 1.0 if reference else math.inf
    return value - reference


def floor(kind: str, hf: float, ours: float, documents: int | None) -> float:
    """The smallest difference the measurement can resolve, below which a difference is
    not evidence of anything (see :func:`compare`). Scores in [0, 1] over n documents:
    max(2 sqrt(p (1 - p) / n), 1 / n) with p the mean of the two values; other scores,
    or an unknown n: 0 (the seed noise alone decides). Relative metrics: RELATIVE_FLOOR."""
    if kind == "relative":
        return RELATIVE_FLOOR
    if not documents or not (0.0 <= hf <= 1.0 and 0.0 <= ours <= 1.0):
        return 0.0
    p = (hf + ours) / 2
    return max(2.0 * math.sqrt(p * (1.0 - p) / documents), 1.0 / documents)


def compare(runs: list[dict]) -> list[dict]:
    """One row per metric: per seed, ours against hf (``per_seed``: values, difference,
    floor); each stack's seed spread (``noise``: the largest difference between two of
    its seeds); ``noise_used``; a verdict.

    The rule: ``within noise`` when, at EVERY seed, |ours - hf| <= max(hf's seed
    spread, floor). (Relative metrics compare ratios: ours / hf - 1 against
    seed b / seed a - 1.)

    Why this rule:
    * hf and ours at one seed share the init, the data and its order, so with correct
      kernels they differ only by floating-point reordering, which training can amplify
      at most into what another seed does. A difference larger than the baseline's
      seed-to-seed difference is a change in what was learned.
    * The noise is hf's spread only. ours' spread is reported but never widens the
      band: a stack that is wrong at one seed (ours s0 = hf s0, ours s1 far off) has a
      spread about as large as its error and would excuse itself.
    * Two seeds give ONE sample of the noise, which by chance can be far below its
      typical size, or exactly 0 (both seeds at accuracy 1.0). The floor keeps a
      difference the measurement cannot resolve from failing: for a score in [0, 1]
      over n documents, 2 standard errors of a proportion, 2 sqrt(p (1 - p) / n) with
      p the mean of hf and ours (about a 95% band; this is the eval's own sampling
      error), and at least 1/n (one document; where p is 0 or 1 that error is 0). For
      continuous metrics (perplexities, bits per byte, loss) RELATIVE_FLOOR. More seeds
      (run(seeds=(0, 1, 2))) make the noise estimate the largest of more spreads.
    * Fails closed: a failed run, or a metric missing, NaN, infinite or not a number at
      any seed of either stack, is ``missing``; without two seeds of hf with finite
      values (or with a non-finite spread, e.g. a relative change from 0) the noise is
      not measured: ``noise not measured``. Neither passes.
    """
    by = {(r["stack"], r["seed"]): run_metrics(r) for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    names = sorted({m for metrics in by.values() for m in metrics})
    out = []
    for name in names:
        kind = metric_kind(name)

        def value(stack, seed, name=name):
            v = by.get((stack, seed), {}).get(name, (None, None))
            return (float(v[0]), v[1]) if _finite(v[0]) else (None, v[1])

        per_seed, missing = [], []
        for seed in seeds:
            (hf, n_hf), (ours, n_ours) = value("hf", seed), value("ours", seed)
            if hf is None or ours is None:
                missing += [f"{stack} seed {seed}" for stack, v in (("hf", hf), ("ours", ours)) if v is None]
                per_seed.append({"seed": seed, "hf": hf, "ours": ours, "diff": None, "floor": None, "documents": None})
                continue
            docs = min((n for n in (n_hf, n_ours) if n), default=None)
            per_seed.append({"seed": seed, "hf": hf, "ours": ours, "diff": difference(ours, hf, kind),
                             "floor": floor(kind, hf, ours, docs), "documents": docs})
        noise = {}
        for stack in ("hf", "ours"):
            values = [(s, value(stack, s)[0]) for s in seeds]
            values = [(s, v) for s, v in values if v is not None]
            if len(values) >= 2:
                noise[stack] = max(abs(difference(b, a, kind)) for (_, a), (_, b) in itertools.combinations(values, 2))
        used = noise["hf"] if math.isfinite(noise.get("hf", math.nan)) else None
        diffs = [abs(p["diff"]) for p in per_seed if p["diff"] is not None]
        row = {"metric": name, "kind": kind, "lower_is_better": lower_is_better(name), "per_seed": per_seed,
               "noise": noise, "noise_used": used, "max_abs_diff": max(diffs) if diffs else None,
               "missing": missing}
        if missing or not per_seed:
            row["verdict"] = MISSING
        elif used is None:
            row["verdict"] = UNMEASURED
        elif all(abs(p["diff"]) <= max(used, p["floor"]) + SLACK for p in per_seed):
            row["verdict"] = WITHIN
        else:
            row["verdict"] = OUTSIDE
        if row["verdict"] == OUTSIDE:
            worst = max(per_seed, key=lambda p: abs(p["diff"]))
            better = (worst["diff"] < 0) == row["lower_is_better"]
            row["direction"] = "ours better" if better else "ours worse"
        out.append(row)
    return out


def speed(runs: list[dict], timed: bool = True) -> list[dict]:
    """Per seed, ours against hf in the same invocation: speedup (hf step time / ours),
    tokens/s ratio (ours / hf) and peak memory ratio (ours / hf). ``timed=False`` (the
    runs shared the device, ``run(jobs > 1)``): the memory ratio only, no speed keys at
    all. Each process's peak is its own (torch.cuda.max_memory_allocated), which the
    others do not change; its times are not a speed measurement."""
    by = {(r["stack"], r["seed"]): r for r in runs}
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        hf, ours = by.get(("hf", seed)), by.get(("ours", seed))
        if not hf or not ours:
            continue

        def ratio(a, b):
            return a / b if _finite(a) and _finite(b) and b else None

        memory = ratio(ours.get("peak_memory_gib"), hf.get("peak_memory_gib"))
        if timed:
            out.append({"seed": seed, "speedup": ratio(hf.get("step_s"), ours.get("step_s")),
                        "tokens_per_s_ratio": ratio(ours.get("tokens_per_s"), hf.get("tokens_per_s")),
                        "memory_ratio": memory})
        else:
            out.append({"seed": seed, "memory_ratio": memory})
    return out


def passed(runs: list[dict], comparisons: list[dict]) -> bool:
    """Every run finished, there is something to compare, and every metric is within noise."""
    return (bool(runs) and all(r.get("exit_code") == 0 for r in runs) and bool(comparisons)
            and all(c["verdict"] == WITHIN for c in comparisons))


# --------------------------------------------------------------------------- report
def _fmt(v, spec=".4g"):
    return "—" if v is None else format(v, spec)


def _diff_fmt(v, kind):
    if v is None:
        return "—"
    if kind == "relative":
        return f"{v:+.2%}" if v == 0 or abs(v) >= 1e-4 or not math.isfinite(v) else f"{v:+.1e}"
    return f"{v:+.4f}"


def markdown(result: dict, env: dict, command: str, png_name: str | None = None) -> str:
    """The report. A result of ``run(jobs > 1)`` (``speed_measured`` false) shows no
    step time, tokens/s or speed ratio, and says so: those runs shared the device."""
    cfg, t = result["config"], result["config"]["training"]
    timed = result.get("speed_measured", True)
    jobs = result.get("jobs", 1)
    lines = [
        f"# Accuracy against the baseline — {env['device']} — {env['date']}",
        "",
        f"- **Command:** `{command}`",
        f"- **Config:** model `{cfg['model']['path']}`, data `{cfg['data']['train']}` "
        f"(data seed {cfg['data']['seed']}), "
        f"LoRA r{cfg['lora']['r']} alpha {cfg['lora']['alpha']}"
        + (", QLoRA NF4" if cfg.get("quantization") else "")
        + f"; {result['steps'] or t.get('epochs')} {'steps' if result['steps'] else 'epochs'}, batch {t['batch_size']}"
        f" x accumulation {t['grad_accum']}, lr {t['lr']:g} {t['schedule']}.",
        f"- **Runs:** stacks {', '.join(result['stacks'])} x training seeds {', '.join(map(str, result['seeds']))}; "
        "each training and each eval in its own process"
        + ("" if timed else f", up to {jobs} (seed, stack) pipelines at once (`--jobs {jobs}`), "
           f"{result.get('threads_per_process')} CPU thread(s) per process")
        + ". `hf` is `kernels: false`, `ours` `kernels: true`; the eval is the same (HF + PEFT) for every adapter.",
        f"- **Eval:** lm-eval{' ' + env['lm_eval'] if env.get('lm_eval') else ''} on the run's held-out split, tasks "
        f"{', '.join(result['tasks']) if result.get('tasks') else 'wb_synthetic_mc, wb_synthetic_gen, wb_heldout_ppl'}"
        + (f", first {result['limit']} documents per task" if result.get("limit") else "")
        + "; plus the train stage's held-out accuracy (greedy, exact match) and final logged loss.",
        f"- **Versions:** torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, trl {env.get('trl')}",
    ]
    if result.get("device") == "cpu":
        lines.append(f"- **CPU:** our kernels ran in Triton's interpreter (~{INTERPRETER_TOKENS_PER_S} tokens/s); "
                     "speed and memory here say nothing about the kernels.")
    # Under --jobs > 1 the runs' times were taken while others shared the device: not shown.
    rows = []
    for r in result["runs"]:
        k = r.get("kernels") or {}
        swapped = ", ".join(f"{name} ×{sum(per.values())}" for name, per in (k.get("swapped") or {}).items())
        times = [_fmt(r.get("step_s"), ".4f"), _fmt(r.get("tokens_per_s"), ".0f")] if timed else []
        rows.append([str(r["seed"]), r["stack"], _fmt(r.get("exit_code"), ""), _fmt(r.get("steps"), ""), *times,
                     _fmt(r.get("peak_memory_gib"), ".2f"), _fmt(r.get("final_loss"), ".4f"),
                     _fmt(r.get("heldout_accuracy"), ".3f"), r.get("error") or swapped])
    lines += ["", "## Runs", "",
              *table(["seed", "stack", "exit", "steps", *(["step s", "tokens/s"] if timed else []), "peak GiB",
                      "final loss", "held-out acc", "note"], rows, align="rlrr" + ("rr" if timed else "") + "rrrl")]
    if not timed:
        lines += ["", "## Speed: not measured in this run", "",
                  f"Up to {jobs} (seed, stack) pipelines ran at once (`--jobs {jobs}`), so every run's step time and "
                  "tokens/s were taken while other runs shared the device and the CPU. They are not a speed "
                  "measurement, and neither they nor any speed ratio is given here; rerun with `--jobs 1` to "
                  "measure speed."]
        memory = [s for s in result.get("speed") or [] if s.get("memory_ratio") is not None]
        if memory:
            lines += ["", "Peak GPU memory is each process's own (`torch.cuda.max_memory_allocated`), which the "
                      "other processes do not change:", "",
                      *table(["seed", "peak memory (ours/hf)"],
                             [[str(s["seed"]), _fmt(s["memory_ratio"], ".2f")] for s in memory], align="rr")]
    elif result.get("speed"):
        lines += ["", "## Speed and memory (ours against hf, same seed)", "",
                  *table(["seed", "speed (hf/ours step time)", "tokens/s (ours/hf)", "peak memory (ours/hf)"],
                         [[str(s["seed"]), f"{_fmt(s['speedup'], '.2f')}x", _fmt(s["tokens_per_s_ratio"], ".2f"),
                           _fmt(s["memory_ratio"], ".2f")] for s in result["speed"]], align="rrrr")]
    seeds = result["seeds"]
    lines += ["", "## Accuracy (ours against hf)", "",
              "A metric is within noise when, at every seed, |ours − hf| ≤ max(seed noise, floor): the seed noise "
              "is "
              "the largest difference between hf's seeds (ours' spread is shown, not used: a stack that is off at "
              "one seed would excuse itself); the floor is what the eval can "
              "resolve: 2·sqrt(p(1−p)/n), at least 1/n, for a score over n documents; "
              f"{RELATIVE_FLOOR:.0%} relative for perplexities and losses (their differences are relative). A failed "
              "run or a missing/NaN value is `missing`, a single seed `noise not measured`; neither passes.", ""]
    rows = []
    for c in result["comparisons"]:
        kind, cells = c["kind"], []
        for p in c["per_seed"]:
            cells += [_fmt(p["hf"]), _fmt(p["ours"]), _diff_fmt(p["diff"], kind)]
        floors = [p["floor"] for p in c["per_seed"] if p["floor"] is not None]
        verdict = c["verdict"] if c["verdict"] == WITHIN else f"**{c['verdict'].upper()}**"
        if c.get("direction"):
            verdict += f" ({c['direction']})"
        rows.append([c["metric"], *cells, _diff_fmt(c["noise"].get("hf"), kind).lstrip("+"),
                     _diff_fmt(c["noise"].get("ours"), kind).lstrip("+"),
                     _diff_fmt(max(floors), kind).lstrip("+") if floors else "—", verdict])
    lines += table(["metric", *(f"{stack} s{s}" for s in seeds for stack in ("hf", "ours", "Δ")), "noise hf",
                    "noise ours", "floor", "verdict"],
                   rows, align="l" + "rrr" * len(seeds) + "rrrl")
    ok = result.get("ok", passed(result["runs"], result["comparisons"]))
    lines += ["", f"**Result:** {'every metric within run-to-run noise' if ok else 'NOT within noise (see above)'}."]
    if png_name:
        lines += ["", f"![hf and ours per seed]({png_name})"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """Per metric, grouped bars hf and ours per seed; the black interval on each ours
    bar is where ours must end to be within noise (hf ± max(hf's seed spread, floor))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["comparisons"]
    cols = min(4, max(1, len(rows)))
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    width = 0.38
    for ax, c in zip(axes.flat, rows):
        values = []
        for i, p in enumerate(c["per_seed"]):
            for j, stack in enumerate(("hf", "ours")):
                if p[stack] is not None:
                    values.append(p[stack])
                    ax.bar(i + (j - 0.5) * width, p[stack], width, color=("tab:blue", "tab:orange")[j],
                           label=stack if i == 0 else None)
            if p["hf"] is not None and p["floor"] is not None and c["noise_used"] is not None:
                tol = max(c["noise_used"], p["floor"])
                half = abs(p["hf"]) * tol if c["kind"] == "relative" else tol
                ax.errorbar(i + 0.5 * width, p["hf"], yerr=half, fmt="none", ecolor="black", capsize=4,
                            label="allowed for ours" if i == 0 else None)
        if values and min(values) >= 0:
            ax.set_ylim(bottom=0)
        ax.set_xlim(-0.6, len(c["per_seed"]) - 0.4)
        ax.set_xticks(range(len(c["per_seed"])), [f"seed {p['seed']}" for p in c["per_seed"]])
        ax.set_title(f"{c['metric']}\n{c['verdict']}", fontsize=9,
                     color="black" if c["verdict"] == WITHIN else "tab:red")
        ax.grid(alpha=0.3, axis="y")
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * nrows)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
