"""`workbench run` and `workbench report` (light: stages load their stack when they run)."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from workbench import console
from workbench.errors import UserError

STAGE_NAMES = ("train", "merge", "export", "eval", "report")


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
        from workbench.errors import UserError

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
    from workbench.pipeline import DEFAULT_QUANTS

    export = (manifest.stage(run, "export") or {}) if run.is_dir() else {}
    if args.quant is not None:
        quants = parse_quants(args.quant)
    elif export.get("files"):
        quants = parse_quants(",".join(export["files"]))
        print(f"GGUF types: {', '.join(quants)}, as in this run's last export (pass --quant to change)")
    else:
        quants = list(DEFAULT_QUANTS)
    thresholds = args.thresholds
    if thresholds is None and export.get("thresholds_file"):
        if Path(export["thresholds_file"]).is_file():
            thresholds = export["thresholds_file"]
            print(f"thresholds: {thresholds}, as in this run's last export (pass --thresholds to change)")
        else:
            print(f"thresholds: the defaults ({export['thresholds_file']}, which this run's last export used, "
                  "is gone)")
    return quants, thresholds


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.cli import _ensure_interpreter_if_no_gpu

    _ensure_interpreter_if_no_gpu()  # `kernels: true` on a CPU runs them in Triton's interpreter
    from workbench.pipeline import DEFAULT_RUN, run_pipeline, summary

    run = Path(args.run) if args.run else DEFAULT_RUN
    quants, thresholds = _export_settings(args, run)
    cfg, limit = _settings(args, run)
    # The libraries' own messages (warnings, progress bars, llama.cpp's log) go to a log
    # file, kept in RUN/logs/ when the run directory exists; the stage lines stay on screen.
    fd, tmp = tempfile.mkstemp(prefix="workbench-run-", suffix=".log")
    os.close(fd)
    try:
        with console.quiet(tmp):
            result = run_pipeline(cfg, run, force=args.force, quants=quants, eval_limit=limit,
                                  thresholds=thresholds, config_given=bool(args.config or args.overrides),
                                  command=args.command_line)
    except Exception as err:
        log = _keep_log(Path(tmp), run)
        if log is not None and not isinstance(err, UserError):
            console.progress(f"workbench: the libraries' messages of this run are in {log}")
        raise
    log = _keep_log(Path(tmp), run)
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


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: train, merge, export, eval, report (resumable; default: "
                                   "the built-in tiny run on the CPU in minutes)")
    p.add_argument("--config", metavar="YAML", help="training config (default: the run's own config.yaml when it "
                   "has one, else the built-in default run)")
    p.add_argument("--run", metavar="DIR", help="run directory (default: runs/default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of --config (or of the built-in default), e.g. --set "
                        "training.max_steps=50 (repeatable)")
    p.add_argument("--force", choices=STAGE_NAMES, metavar="STAGE",
                   help="redo this stage and every one after it (train, merge, export, eval, report)")
    p.add_argument("--quant", help="GGUF types to export (default: as in the run's last export, else "
                   "f16,q8_0,q4_k_m; f16, the lossless reference, is always made)")
    p.add_argument("--thresholds", metavar="YAML", help="export verification limits per GGUF type, overriding the "
                   "defaults (as `workbench export --thresholds`; default: as in the run's last export)")
    p.add_argument("--eval-limit", type=int, metavar="N", help="evaluate only the first N documents of each task "
                   "(0: every document; default: as in the run's last eval, else every document)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="render a run's report (Markdown, JSON, PNG plots) into RUN/report/")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from workbench import report

    paths = report.render(args.run, command=args.command_line)
    print(f"report: {paths['md']} (and {paths['json'].name}, {', '.join(p.name for p in paths['png']) or 'no plots'})")
    if paths["missing"]:
        print(f"missing stages: {', '.join(paths['missing'])} (the report says how to make them)")
    return 0
