"""Regression comparison of two benchmark reports of one suite (``workbench regress``).

The nightly job compares tonight's report with the last one. Each metric of each
row is matched by its key and read as a ratio new / old:

* kernels: ``(kernel, shape, stack)`` -> ``fwd_ms``, ``fwd_bwd_ms`` (lower is
  better) and ``peak_extra_gib`` (lower is better); reports timed differently (CUDA
  graphs or events) are refused, and a row timed differently in the two is not compared.
  Either side may be the report's JSON or the ``pytest bench/ --benchmark-json`` file it
  was made from (the benchmarks' medians and extra_info);
* train: ``(mode, stack)`` -> ``steady_step_s``, ``step_s`` and ``peak_memory_gib``
  (lower is better), ``steady_tokens_per_s`` and ``tokens_per_s`` (higher is better)
  and ``final_loss`` (must not move); a metric one of the reports lacks is skipped;
* context: ``(mode, stack)`` -> ``max_fit``, the longest sequence that fitted (any
  shrink is a regression: with the same start and granularity the search visits the same
  lengths), and ``peak_memory_gib@L`` for every length L that fitted in both reports
  (lower is better); the searches' start, limit and granularity must match;
* step: ``(shape, mode, autocast, stack)`` -> ``step_s``, ``peak_alloc_gib`` and
  ``peak_reserved_gib`` (lower is better), ``tokens_per_s`` (higher is better) and
  ``final_loss`` (must not move).

A time or memory that got worse by more than its threshold, a loss that moved by
more than its band, a row that ran before and fails or is missing now: each is a
regression. Ratios between different devices or shapes say nothing, so such a pair
is refused unless the caller allows it explicitly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import UserError
from workbench.markdown import table

#: metric -> +1 when higher is worse (times, memory), -1 when lower is worse.
METRICS = {
    "kernels": {"fwd_ms": 1, "fwd_bwd_ms": 1, "peak_extra_gib": 1},
    "train": {"steady_step_s": 1, "steady_tokens_per_s": -1, "step_s": 1, "tokens_per_s": -1, "peak_memory_gib": 1,
              "final_loss": 0},
    "context": {"max_fit": -1},  # and peak_memory_gib@L per length (_context_metrics)
    "step": {"step_s": 1, "tokens_per_s": -1, "peak_alloc_gib": 1, "peak_reserved_gib": 1, "final_loss": 0},
}
KEYS = {"kernels": ("kernel", "shape", "stack"), "train": ("mode", "stack"), "context": ("mode", "stack"),
        "step": ("shape", "mode", "autocast", "stack")}

#: Default thresholds. The same command run twice repeats a kernel row within a few
#: percent (the kernels regress reports and their notes say how much, per timing mode),
#: so 10 % flags a real slowdown; a row that does not repeat that well is flagged rather
#: than hidden by a wider threshold. Peak memory is deterministic for a given code path,
#: so 2 % (allocator rounding) is enough. The final loss of a seeded run moves only with
#: the arithmetic (the train suite's stacks agree far inside its LOSS_BAND), so a 1 %
#: move means the numbers changed.
DEFAULT_THRESHOLDS = {"time": 0.10, "memory": 0.02, "loss": 0.01}
#: A context search's longest fit may not shrink at all (both searches visit the same lengths).
FIT_THRESHOLD = 0.0
#: Growth of a peak below this is not a regression whatever its ratio: the
#: caching allocator rounds blocks to 2 MiB, so a near-zero peak can double.
MEMORY_FLOOR_GIB = 4 / 1024


@dataclass
class Change:
    key: tuple
    metric: str
    old: float | None
    new: float | None
    ratio: float | None
    regression: bool
    note: str = ""


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"benchmark report {path} does not exist; pass the .json that `workbench bench` wrote.")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}); pass the .json that `workbench bench` wrote.") from None
    if isinstance(doc, dict) and "benchmarks" in doc and "machine_info" in doc:
        from workbench.bench import kernels  # `pytest bench/ --benchmark-json`: the kernels report it makes

        return kernels.from_benchmark_json(doc, str(path))
    if not isinstance(doc, dict) or doc.get("suite") not in METRICS:
        raise UserError(f"{path} is not a kernels, train, context or step benchmark report "
                        f"(suite {doc.get('suite')!r}).")
    return doc


def _kind(metric: str) -> str:
    if metric == "final_loss":
        return "loss"
    if metric == "max_fit":
        return "fit"
    return "memory" if "gib" in metric else "time"


def _rows(doc: dict) -> dict[tuple, dict]:
    suite = doc["suite"]
    rows = doc["runs"] if suite == "train" else doc["rows"]
    if suite == "context":
        rows = [_context_metrics(r) for r in rows]
    return {tuple(r.get(k) for k in KEYS[suite]): r for r in rows}


def _context_metrics(row: dict) -> dict:
    """A context row with its peak at every length that fitted, as ``peak_memory_gib@L``."""
    out = dict(row)
    for t in row.get("trials") or []:
        if t.get("fits"):
            out[f"peak_memory_gib@{t['seq']}"] = t.get("peak_memory_gib")
    return out


def _metrics(suite: str, row: dict, now: dict) -> dict[str, int]:
    metrics = dict(METRICS[suite])
    if suite == "context":
        lengths = sorted({int(k.split("@")[1]) for k in row if k.startswith("peak_memory_gib@")}
                         & {int(k.split("@")[1]) for k in now if k.startswith("peak_memory_gib@")})
        metrics.update({f"peak_memory_gib@{n}": 1 for n in lengths})
    return metrics


def _failed(row: dict) -> bool:
    return bool(row.get("error")) or row.get("exit_code", 0) != 0


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def compare(old: dict, new: dict, thresholds: dict | None = None, allow_other_device: bool = False) -> list[Change]:
    """Every metric of every row of ``old`` against ``new``."""
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    if old["suite"] != new["suite"]:
        raise UserError(f"cannot compare a {old['suite']} report with a {new['suite']} report.")
    suite = old["suite"]
    for what in ("device", "shape"):
        a = old["environment"].get("device") if what == "device" else old.get("shape")
        b = new["environment"].get("device") if what == "device" else new.get("shape")
        if a != b and not allow_other_device:
            raise UserError(f"the reports were measured on different {what}s ({a!r} vs {b!r}); ratios across them "
                            "say nothing about a regression. Compare runs of one device and shape, or pass "
                            "--allow-other-device to see the ratios anyway.")
    if suite == "context":
        search = ("start", "limit", "granularity", "steps")
        if any(old.get(k) != new.get(k) for k in search):
            raise UserError("the context searches differ in " + ", ".join(
                f"{k} ({old.get(k)} vs {new.get(k)})" for k in search if old.get(k) != new.get(k))
                + "; their longest fits are not comparable. Compare searches run with the same options.")
    if suite == "kernels" and _timing(old) != _timing(new) and not allow_other_device:
        raise UserError(f"the reports were timed differently ({_timing(old)} vs {_timing(new)}: CUDA graphs leave "
                        "out the launch overhead that CUDA events include); compare runs of one timing, or pass "
                        "--allow-other-device to see the ratios anyway.")
    before, after = _rows(old), _rows(new)
    changes: list[Change] = []
    for key, row in before.items():
        if _failed(row):
            continue
        if suite == "context" and row.get("searching"):
            changes.append(Change(key, "-", None, None, None, False,
                                  "search not finished in the baseline (stopped midway): not compared"))
            continue
        if key not in after:
            changes.append(Change(key, "-", None, None, None, True, "row missing from the new report"))
            continue
        now = after[key]
        if _failed(now):
            reason = now.get("error") or f"exit code {now.get('exit_code')}"
            changes.append(Change(key, "-", None, None, None, True, f"ran before, fails now: {reason}"))
            continue
        if suite == "kernels" and row.get("timing") != now.get("timing"):
            changes.append(Change(key, "-", None, None, None, False,
                                  f"timed with {row.get('timing')} before and {now.get('timing')} now: not compared"))
            continue
        if suite == "context" and now.get("searching"):
            changes.append(Change(key, "-", None, None, None, True,
                                  "search not finished in the new report (stopped midway): not compared"))
            continue
        if suite == "context" and row.get("max_fit") is not None and now.get("max_fit") is None:
            changes.append(Change(key, "max_fit", row["max_fit"], None, None, True,
                                  f"fitted {row['max_fit']} tokens before, not even the start now"))
            continue
        for metric, worse in _metrics(suite, row, now).items():
            a, b = _number(row.get(metric)), _number(now.get(metric))
            if a is None or b is None or a == 0:
                continue
            ratio = b / a
            limit = FIT_THRESHOLD if _kind(metric) == "fit" else limits[_kind(metric)]
            if worse == 0:
                bad = abs(ratio - 1) > limit
            else:
                bad = (ratio - 1) * worse > limit
            if bad and _kind(metric) == "memory" and b - a <= MEMORY_FLOOR_GIB:
                bad = False  # a few allocator blocks on a near-zero peak
            changes.append(Change(key, metric, a, b, ratio, bad))
    # What the new report has and the baseline lacks (a stopped baseline, a new stack) is
    # checked by nothing: say so, so that a passing verdict does not stand for it.
    changes += [Change(key, "-", None, None, None, False, "not in the baseline: not compared")
                for key in after if key not in before]
    return changes


def complete(doc: dict) -> bool:
    """Whether a report's command finished: a report written midway (and left so by a stop)
    says ``"complete": false`` or carries ``incomplete`` (how far it got)."""
    return doc.get("complete") is not False and "incomplete" not in doc


def _stopped(doc: dict) -> str | None:
    """How far a report that stopped midway got ("1 of 2 planned"), or None for a complete one."""
    if complete(doc):
        return None
    part = doc.get("incomplete") or {}
    return f"{part.get('done', '?')} of {part.get('planned', '?')} planned" if part else "stopped midway"


def _timing(doc: dict) -> str:
    """How a kernels report was timed; reports from before the choice existed used CUDA events."""
    return doc.get("timing") or "events"


def markdown(changes: list[Change], old_path: str, new_path: str, old: dict, new: dict, thresholds: dict) -> str:
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    bad = [c for c in changes if c.regression]
    lines = [f"# Benchmark regression check ({old['suite']})", "",
             f"- **Baseline:** `{old_path}` ({old['environment'].get('device')}, {old['environment'].get('date')})",
             f"- **Current:** `{new_path}` ({new['environment'].get('device')}, {new['environment'].get('date')})",
             (f"- **Thresholds:** memory +{limits['memory']:.0%}; the longest fit may not shrink"
              if old["suite"] == "context" else
              f"- **Thresholds:** time +{limits['time']:.0%}, memory +{limits['memory']:.0%}, "
              f"final loss ±{limits['loss']:.0%}"),
             f"- **Verdict:** {'REGRESSION (' + str(len(bad)) + ')' if bad else 'no regression'}"]
    if _stopped(old):
        lines.append(f"- **The baseline is incomplete** ({_stopped(old)}): what it lacks is not compared, "
                     "and the verdict does not cover it.")
    lines.append("")
    rows = []
    for c in changes:
        row = " / ".join(str(k) for k in c.key)
        if c.ratio is None:
            rows.append([row, c.metric, "", "", "", f"**{c.note}**" if c.regression else c.note])
        else:
            spec = ".0f" if c.metric == "max_fit" else ".4g"
            rows.append([row, c.metric, f"{c.old:{spec}}", f"{c.new:{spec}}", f"{c.ratio:.3f}×",
                         "**regression**" if c.regression else ""])
    lines += table(["row", "metric", "baseline", "current", "ratio", ""], rows, align="llrrrl")
    return "\n".join(lines) + "\n"


#: Settings that decide what a report measured, besides the device: two reports that
#: differ in one of them are not a baseline for each other (kernels: shape, dtype, timing;
#: train: shape, batch, seq, steps, seed, modes, the preference method; context: shape, steps and
#: the search's start, limit and granularity; step: also the warm-up and the autocast settings). A
#: key absent from both matches.
SETUP = ("shape", "dtype", "timing", "batch", "seq", "steps", "seed", "modes", "method", "start", "limit",
         "granularity", "warmup", "autocast")


def _comparable(old: dict, new: dict) -> bool:
    """Same suite, device and setup: what :func:`compare` needs for its ratios to mean something."""
    a, b = old.get("environment") or {}, new.get("environment") or {}
    return (old.get("suite") == new.get("suite") and a.get("device") == b.get("device")
            and a.get("device_slug") == b.get("device_slug") and all(old.get(k) == new.get(k) for k in SETUP))


def _when(doc: dict) -> tuple[str, str]:
    env = doc.get("environment") or {}
    time_utc = env.get("time_utc") or ""
    return env.get("date") or time_utc[:10], time_utc


def previous_report(report_dir: Path, doc: dict, current_name: str | None = None) -> Path | None:
    """The newest report in ``report_dir`` of ``doc``'s suite, device and setup that was
    measured no later than ``doc``, other than ``current_name``; by ``time_utc``, else date. A report
    stopped midway (``complete`` false) or marked ``superseded_by`` a later one is never the baseline."""
    skip = Path(current_name).name if current_name else None
    now_date, now_time = _when(doc)
    best: tuple[tuple, Path] | None = None
    for path in Path(report_dir).glob("*.json"):
        if path.name == skip:
            continue
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (not isinstance(other, dict) or not _comparable(other, doc) or not complete(other)
                or other.get("superseded_by")):
            continue  # another setup, a run stopped midway (its missing rows are no baseline), or superseded
        date, time_utc = _when(other)
        if now_date and (date > now_date or (date == now_date and now_time and time_utc > now_time)):
            continue  # measured after doc: not a previous report
        key = (date, time_utc, path.name)
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None


def previous_section(report_dir: Path, doc: dict, current_name: str | None = None,
                     thresholds: dict | None = None) -> tuple[str, bool]:
    """A report's "Against the previous report" Markdown section, and whether it found a regression."""
    heading = "## Against the previous report"
    previous = previous_report(report_dir, doc, current_name)
    if previous is None:
        setup = ", ".join(f"{k} {doc[k]}" for k in SETUP if doc.get(k) is not None)
        return (f"{heading}\n\nNo earlier {doc['suite']} report in `{report_dir}` from this device "
                f"({doc['environment'].get('device')}) with the same setup ({setup}); nothing to compare "
                "with yet.\n", False)
    old = load(previous)
    changes = compare(old, doc, thresholds)
    text = markdown(changes, previous.name, Path(current_name).name if current_name else "this report", old, doc,
                    thresholds)
    return heading + "\n" + text.partition("\n")[2], any(c.regression for c in changes)
