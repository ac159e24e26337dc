"""The comparison table: one row per evaluated model, one column per task metric,
and each metric's change against the adapter (the model that was trained),
flagged where it exceeds that model kind's tolerance.

Two kinds of metric, two kinds of change:

* perplexities (``*perplexity``, ``bits_per_byte``): relative change,
  ``value / adapter - 1``, because they are ratios whose scale depends on the text;
* everything else (acc, acc_norm, exact_match, ...): absolute change, in the
  metric's own unit. Scores on a 0-100 scale (e.g. BLEU) need their own
  tolerance file.

``DEFAULT_TOLERANCES`` says how far each kind may move before it is flagged. The
base model has none: it is not meant to match (its row shows what training
changed). The values come from measurements, noted next to them. A YAML file
with the same shape overrides them (``workbench eval --tolerances FILE``).
Tolerances assume the full held-out split: with ``--limit N`` one document moves
a score by 1/N.
"""
from __future__ import annotations

import math
from pathlib import Path

from workbench.errors import UserError

REFERENCE = "adapter"

#: Largest change against the adapter that is not flagged, per model kind:
#: "score" absolute, "perplexity" relative. Measured on the tiny CPU runs (156
#: held-out rows; a 200-step and a 300-step training of the built-in default):
#:   merged   scores identical, word perplexity within 6e-9 (fp32 merge of an fp32 base)
#:   f16      scores identical, word perplexity within 3.5e-4
#:   q8_0     scores within one row (0.0064), word perplexity within 1.2e-3
#:   q4_k_m   scores within four rows (0.026), word perplexity +2.6% to +4.7%
#: Word perplexity moves most of the three perplexities (a word spans several
#: bytes), so it is the one these limits bind. The limits leave room for one to
#: three flipped near-tie rows and for larger models' rounding, and are still
#: far below what a broken export does (scores at chance, perplexity x10).
#: bf16 sits between f16 and q8_0 in the export stage's measurements; it gets q8_0's.
DEFAULT_TOLERANCES = {
    "merged": {"score": 0.01, "perplexity": 0.001},
    "f16": {"score": 0.02, "perplexity": 0.005},
    "bf16": {"score": 0.03, "perplexity": 0.02},
    "q8_0": {"score": 0.03, "perplexity": 0.02},
    "q4_k_m": {"score": 0.10, "perplexity": 0.10},
}
KINDS_OF_METRIC = ("score", "perplexity")
#: Scores are fractions of a document count: 0.45 - 0.55 is -0.10000000000000003
#: in floating point, which must not count as beyond a tolerance of 0.1.
SLACK = 1e-9


def load_tolerances(path: str | Path | None) -> dict:
    """DEFAULT_TOLERANCES with a YAML file's values (same shape) on top."""
    from workbench.config import read_yaml_file

    tolerances = {k: dict(v) for k, v in DEFAULT_TOLERANCES.items()}
    if path is None:
        return tolerances
    path = Path(path)
    data = read_yaml_file(path, "tolerances file", "pass a readable YAML mapping like "
                          "{q4_k_m: {score: 0.1, perplexity: 0.1}}.")
    if not isinstance(data, dict):
        raise UserError(f"tolerances file {path} must be a mapping of model kind -> {{score: x, perplexity: y}}.")
    for kind, limits in data.items():
        if kind not in tolerances or not isinstance(limits, dict) or set(limits) - set(KINDS_OF_METRIC):
            raise UserError(f"tolerances file {path}: {kind!r}: {limits!r} is not understood; kinds: "
                            f"{', '.join(tolerances)}; each maps score and/or perplexity to a number.")
        for key, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise UserError(f"tolerances file {path}: {kind}.{key} must be a finite number >= 0, got {value!r}.")
            tolerances[kind][key] = float(value)
    return tolerances


def metric_kind(column: str) -> str:
    """"score" or "perplexity" for a column named "<task> <metric>[ [<filter>]]"."""
    name = column.split(" ")[1]
    return "perplexity" if name.endswith("perplexity") or name == "bits_per_byte" else "score"


def metrics_of(results: dict) -> dict[str, float]:
    """{"<task> <metric>" (plus " [<filter>]" for a filter other than none): value}
    from lm-eval's results dict; stderr entries, document counts (sample_len)
    and non-numbers are left out."""
    out = {}
    for task, values in sorted(results.get("results", {}).items()):
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            out[f"{task} {metric}" + (f" [{filt}]" if filt and filt != "none" else "")] = float(value)
    return out


def finite(value) -> bool:
    """Whether ``value`` is a number and neither NaN nor infinite."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def change(value: float, reference: float, kind: str) -> float:
    if kind == "perplexity":
        return value / reference - 1.0 if reference else math.inf
    return value - reference


def table(rows: dict[str, dict[str, float]], tolerances: dict):
    """The comparison as a pandas DataFrame (model first; metrics; changes vs the
    adapter; flags) and the list of flags. A model with a tolerance is flagged where
    a change is beyond it, and where a metric the adapter has is missing or not a
    finite number (its change is NaN then): neither is within tolerance."""
    import pandas as pd

    columns = sorted({c for metrics in rows.values() for c in metrics})
    frame = pd.DataFrame([{"model": m, **{c: metrics.get(c) for c in columns}} for m, metrics in rows.items()])
    flags = []
    if REFERENCE not in rows:
        frame["flags"] = ""
        return frame, flags
    ref = rows[REFERENCE]
    deltas = {}
    for c in columns:
        kind = metric_kind(c)
        name = f"{c} {'Δrel' if kind == 'perplexity' else 'Δ'}"
        deltas[name] = []
        for m, metrics in rows.items():
            ok = metrics.get(c) is not None and ref.get(c) is not None
            deltas[name].append(change(metrics[c], ref[c], kind) if ok else None)
    row_flags = []
    for i, (m, metrics) in enumerate(rows.items()):
        mine = []
        for c, name in zip(columns, deltas):
            d, limit = deltas[name][i], tolerances.get(m, {}).get(metric_kind(c))
            if limit is None or ref.get(c) is None:   # no tolerance (base, adapter) or nothing to compare with
                continue
            if d is None:   # the adapter has the metric, this model does not: not within tolerance
                mine.append(f"{c} missing (the adapter has it)")
                flags.append({"model": m, "metric": c, "change": math.nan, "tolerance": limit})
            elif not finite(metrics[c]) or not finite(ref[c]):
                mine.append(f"{c} is {metrics[c]} (adapter {ref[c]}): not a finite number")
                flags.append({"model": m, "metric": c, "change": math.nan, "tolerance": limit})
            elif not abs(d) <= limit + SLACK:   # a NaN change fails too
                mine.append(f"{c} {d:+.4g} beyond ±{limit:g}")
                flags.append({"model": m, "metric": c, "change": d, "tolerance": limit})
        row_flags.append("; ".join(mine))
    frame = pd.concat([frame, pd.DataFrame(deltas)], axis=1)
    frame["flags"] = row_flags
    return frame, flags


def markdown(frame) -> str:
    """A GitHub-style table (pandas' to_markdown needs the optional tabulate): numbers to 4
    significant digits, a missing value empty."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    from workbench.markdown import table

    return "\n".join(table(list(frame.columns), [[cell(v) for v in row] for row in frame.itertuples(index=False)])) \
        + "\n"
