"""``workbench run``: the whole pipeline, resumable (workbench.pipeline)."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from workbench import console, stages
from workbench.cli.common import command, ensure_interpreter_if_no_gpu
from workbench.errors import UserError
from workbench.export import DEFAULT_TYPES, GGUF_TYPES


def add_parser(sub) -> None:
    p = command(sub, "run", help="the whole pipeline: train, merge, export, eval, report (resumable; default: "
                                 "the built-in tiny run on the CPU in minutes)",
                description="Run train, merge, export, eval and report into one run directory. Each stage is "
                "skipped when its record still describes the run (complete, the same input hashes, its outputs "
                "intact), so the same command resumes where a run stopped; once a stage runs, every stage after "
                "it runs too. A bare `workbench run --run DIR` takes the run's own config, GGUF types, thresholds "
                "and eval limit. The libraries' messages go to RUN/logs/.",
                writes=["everything `workbench train`, `merge`, `export`, `eval` and `report` write, into RUN",
                        "RUN/logs/<time>-run.log: the libraries' messages"],
                exits=["0  every stage is complete", "1  a GGUF failed its export verification (the report says "
                       "which; not fit to ship)"],
                example="workbench run --run runs/default --set training.max_steps=50")
    p.add_argument("--config", metavar="YAML", help="training config (default: the run's own config.yaml when it "
                   "has one, else the built-in default run)")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of --config (or of the built-in default), e.g. --set "
                        "training.max_steps=50 (repeatable)")
    p.add_argument("--force", choices=stages.NAMES, metavar="STAGE",
                   help=f"redo this stage and every one after it ({', '.join(stages.NAMES)})")
    p.add_argument("--quant", help="GGUF types to export (default: as in the run's last export, else "
                   f"{','.join(DEFAULT_TYPES)}; f16, the lossless reference, is always made; any of "
                   f"{', '.join(GGUF_TYPES)})")
    p.add_argument("--thresholds", metavar="YAML", help="export verification limits per GGUF type, overriding the "
                   "defaults (as `workbench export --thresholds`; default: as in the run's last export)")
    p.add_argument("--eval-limit", type=int, metavar="N", help="evaluate only the first N documents of each task "
                   "(0: every document; default: as in the run's last eval, else every document)")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace, run: Path):
    """The config and eval limit of this run: what the command line says, else what
    the run used last (its config.yaml, its eval record's limit), else the defaults.
    So a bare `workbench run --run DIR` resumes DIR as it was set up."""
    from workbench import config, manifest

    train = manifest.stage(run, "train") if run.is_dir() else None
    if args.config or args.overrides:
        cfg = config.load(args.config, args.overrides)
    elif train and not train.get("user_provided") and (run / "config.yaml").is_file():
        cfg = config.load(run / "config.yaml")
        print(f"config: {run / 'config.yaml'} (this run's own; pass --config or --set to change it)")
    else:
        cfg = config.load(None)
    if args.eval_limit is None:
        limit = (manifest.stage(run, "eval") or {}).get("limit") if run.is_dir() else None
        if limit:
            print(f"eval limit: {limit} documents per task, as in this run's last eval (--eval-limit 0 for all)")
    elif args.eval_limit < 0:
        raise UserError(f"--eval-limit must be 0 (every document) or more, got {args.eval_limit}.")
    else:
        limit = args.eval_limit or None
    return cfg, limit


def _export_settings(args: argparse.Namespace, run: Path):
    """The GGUF types and the thresholds file of this run, as _settings does the config:
    the command line, else what the run's last export used (its files; the thresholds
    file the pipeline recorded), else the defaults."""
    from workbench import manifest
    from workbench.export.stage import parse_quants

    export = (manifest.stage(run, "export") or {}) if run.is_dir() else {}
    if args.quant is not None:
        quants = parse_quants(args.quant)
    elif export.get("files"):
        quants = parse_quants(",".join(export["files"]))
        print(f"GGUF types: {', '.join(quants)}, as in this run's last export (pass --quant to change)")
    else:
        quants = list(DEFAULT_TYPES)
    thresholds = args.thresholds
    if thresholds is None and export.get("thresholds_file"):
        if Path(export["thresholds_file"]).is_file():
            thresholds = export["thresholds_file"]
            print(f"thresholds: {thresholds}, as in this run's last export (pass --thresholds to change)")
        else:
            print(f"thresholds: the defaults ({export['thresholds_file']}, which this run's last export used, "
                  "is gone)")
    return quants, thresholds


def run(args: argparse.Namespace) -> int:
    ensure_interpreter_if_no_gpu()  # `kernels: true` on a CPU runs them in Triton's interpreter
    from workbench.pipeline import DEFAULT_RUN, run_pipeline, summary

    run_dir = Path(args.run) if args.run else DEFAULT_RUN
    quants, thresholds = _export_settings(args, run_dir)
    cfg, limit = _settings(args, run_dir)
    # The libraries' own messages (warnings, progress bars, llama.cpp's log) go to a log
    # file, kept in RUN/logs/ when the run directory exists; the stage lines stay on screen.
    fd, tmp = tempfile.mkstemp(prefix="workbench-run-", suffix=".log")
    os.close(fd)
    try:
        with console.quiet(tmp):
            result = run_pipeline(cfg, run_dir, force=args.force, quants=quants, eval_limit=limit,
                                  thresholds=thresholds, config_given=bool(args.config or args.overrides),
                                  command=args.command_line)
    except Exception as err:
        log = _keep_log(Path(tmp), run_dir)
        if log is not None and not isinstance(err, UserError):
            console.progress(f"workbench: the libraries' messages of this run are in {log}")
        raise
    log = _keep_log(Path(tmp), run_dir)
    console.say()
    console.say(summary(result))
    console.say()
    if log is not None:
        console.say(f"libraries' messages: {log}")
    console.say(f"run directory: {result.run} (manifest.json lists every artifact with its hash)")
    if result.exit_code:
        console.say("workbench: a GGUF failed its export verification (see the report); it is not fit to ship.")
    console.say(f"report: {result.run / 'report' / 'report.md'}")
    return result.exit_code


def _keep_log(tmp: Path, run: Path) -> Path | None:
    """Move the run's log into RUN/logs/ (a new file each time); an empty one, or one of a
    run directory that was never made, is dropped."""
    try:
        if tmp.stat().st_size == 0 or not run.is_dir():
            return None
        (run / "logs").mkdir(exist_ok=True)
        dest = run / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-run.log"
        shutil.move(str(tmp), dest)
        return dest.resolve()
    except OSError:
        return None
    finally:
        tmp.unlink(missing_ok=True)
