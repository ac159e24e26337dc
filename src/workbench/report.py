"""`workbench report`: one run's results as Markdown, JSON and PNG plots in RUN/report/.

Everything comes from the run directory: the manifest's stage records (each carries
the ``environment`` it ran in: device, torch/transformers/peft versions; most also a
``versions`` map), train/loss.jsonl, merge/merge_report.json and
export/export_report.json. Sections:

* Training: the loss curve, tokens/s, peak memory, held-out accuracy, the device.
* Merge: the merged model against the unmerged adapter (KL, top-1, logits, perplexity).
* Export: each GGUF against the merged model, through llama.cpp and transformers; the
  GGUF LoRA adapter on the base GGUFs against the HF adapter; the Ollama Modelfiles.
* Evaluation: lm-eval's metrics per model, the change of each quantized GGUF against
  the lossless f16 GGUF, and a chart of scores and perplexity across base, adapter,
  merged and each GGUF.

The qualify verdict is linked at the top when RUN/qualify/verdict.json exists (and
said to be of earlier artifacts when their hashes changed since). What the
perplexities are over is explained under Evaluation.

A stage that is missing, failed, or was brought by the user is said so in its
section; the others render regardless. A section made from an earlier version of an
upstream stage (its recorded input hashes no longer match what that stage left in the
run, as the pipeline checks them, or an upstream section is itself stale, failed or
unfinished) is labelled stale, on the "Stages:" line too. llama.cpp numbers (GGUF
verification and GGUF evaluation) are labelled as llama.cpp on the CPU. The folder is
written under a temp name and renamed, and the "report" stage record lists its files and the hashes of the stage
records it rendered (what `workbench run` compares to skip it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from workbench import atomic, manifest, report_adapter, stages
from workbench.envinfo import versions
from workbench.errors import UserError
from workbench.eval.models import GGUF_KINDS, KINDS as MODEL_ORDER
from workbench.markdown import num as _num, table

#: The stages the report renders: every stage before it.
SECTIONS = stages.NAMES[:stages.NAMES.index("report")]
TITLES = {"train": "Training", "merge": "Merge", "export": "Export (GGUF)", "eval": "Evaluation"}
HOW = {"train": "`workbench train --run DIR` (or bring an adapter: `workbench merge --run DIR --adapter FOLDER`)",
       "merge": "`workbench merge --run DIR` (or bring a merged model: `workbench export --run DIR --merged FOLDER`)",
       "export": "`workbench export --run DIR`", "eval": "`workbench eval --run DIR`"}
#: Stage states whose numbers are rendered (an export that failed verification has numbers worth seeing).
RENDERED = ("complete", "user_provided", "failed_verification")
VERIFY_KEYS = (("kl_mean", "KL mean"), ("kl_max", "KL max"), ("top1_agreement", "top-1"),
               ("max_abs_logit_diff", "max abs Δlogit"), ("ppl", "ppl"), ("ppl_ref", "ppl ref"),
               ("ppl_rel_delta", "ppl Δrel"))


# --------------------------------------------------------------------------- collecting
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _env(rec: dict) -> dict:
    env = rec.get("environment") or {}
    versions = {k: env.get(k) for k in ("python", "torch", "cuda", "triton", "transformers", "peft") if env.get(k)}
    versions.update({k: v for k, v in (rec.get("versions") or {}).items() if v})
    return {"device": env.get("device", "unknown device"), "finished_utc": rec.get("finished_utc"),
            "versions": versions}


def _state(rec: dict | None) -> str:
    if rec is None:
        return "missing"
    if rec.get("user_provided"):
        return "user_provided"
    return rec.get("status", "unknown")


def _train(run: Path, rec: dict) -> dict:
    if rec.get("user_provided"):
        return {"user_provided": True, **{k: rec.get("inputs", {}).get(k) for k in ("adapter", "base_model")},
                "lora": rec.get("lora")}
    loss = []
    path = run / "train" / "loss.jsonl"
    if path.is_file():
        loss = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    t = rec.get("timings", {})
    return {
        "steps": rec.get("steps"), "final_loss": rec.get("final_loss"), "train_loss_mean": rec.get("train_loss"),
        "tokens": rec.get("tokens"), "tokens_per_s": rec.get("tokens_per_s"), "train_s": t.get("train_s"),
        "total_s": t.get("total_s"), "peak_memory_gib": rec.get("peak_memory_gib"),
        "peak_rss_mib": rec.get("peak_rss_mib"), "heldout_accuracy": rec.get("eval", {}),
        "base_model": str(manifest.resolve(run, rec["base_model"])) if rec.get("base_model") else None,
        "family": rec.get("family"), "quantization": rec.get("quantization"),
        "method": rec.get("method") or "sft", "beta": rec.get("beta"),
        "lora": rec.get("lora"), "dataset": rec.get("dataset"), "kernels": bool(rec.get("kernels")),
        "loss_curve": [{k: r.get(k) for k in ("step", "loss", "lr", "tokens", "elapsed")} for r in loss],
    }


def _merge(run: Path, rec: dict) -> dict:
    if rec.get("user_provided"):
        return {"user_provided": True, "merged": rec.get("inputs", {}).get("merged"), "dtype": rec.get("dtype")}
    report = _read_json(run / "merge" / "merge_report.json") or {}
    artifacts = {k: v for k, v in (rec.get("metrics") or {}).items() if k in ("merged", "merged_from_nf4")}
    return {"dtype": rec.get("dtype"), "quantization": rec.get("quantization"), "reference": report.get("reference"),
            "eval_tokens": (report.get("eval") or {}).get("tokens"), "artifacts": artifacts,
            "nf4_vs_16bit": (rec.get("metrics") or {}).get("nf4_vs_16bit")}


def _export(run: Path, rec: dict) -> dict:
    report = _read_json(run / "export" / "export_report.json") or {}
    files = {}
    for kind, entry in (rec.get("files") or {}).items():
        full = (report.get("files") or {}).get(kind, {})
        files[kind] = {"file": entry.get("path"), "bytes": entry.get("bytes"), "passed": entry.get("passed"),
                       "llama_cpp": entry.get("llama_cpp"), "transformers": entry.get("transformers"),
                       "tokenizer_mismatches": entry.get("tokenizer_mismatches"),
                       "failures": full.get("failures", []), "fallbacks": full.get("fallbacks"),
                       "fallback_note": full.get("fallback_note") or entry.get("fallback_note"),
                       "thresholds": (report.get("thresholds") or {}).get(kind)}
    return {"arch": report.get("arch"), "reference": "the merged HF model in fp32 on the same held-out tokens",
            "eval_tokens": (report.get("eval") or {}).get("tokens"), "passed": report.get("passed"), "files": files,
            **report_adapter.export_extras(run, rec, report)}


def _eval(rec: dict, exported: list[str]) -> dict:
    from workbench.eval import compare

    metrics = rec.get("metrics") or {}
    vs_f16 = {}
    if "f16" in metrics:
        for kind in GGUF_KINDS[1:]:
            if kind in metrics:
                vs_f16[kind] = {c: compare.change(v, metrics["f16"][c], compare.metric_kind(c))
                                for c, v in metrics[kind].items() if metrics["f16"].get(c) is not None}
    return {"models": rec.get("models", []), "tasks": rec.get("tasks", []), "limit": rec.get("limit"),
            "documents": (rec.get("data") or {}).get("documents"), "metrics": metrics,
            "change_vs_f16": vs_f16, "flags": rec.get("flags", []),
            "skipped": report_adapter.skipped_worth_saying(rec.get("skipped", {}), exported),
            "tolerances": rec.get("tolerances")}


def collect(run: str | Path, command: str | None = None) -> dict:
    """The report's data (what report.json holds)."""
    run = Path(run)
    records = manifest.read(run).get("stages", {})
    data = {"run": str(run.resolve()), "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command, "stages": {}, "missing": [], "sections": {}}
    for name in SECTIONS:
        rec = records.get(name)
        state = _state(rec)
        if name == "train" and rec is None and (records.get("merge") or {}).get("user_provided"):
            state = "not_needed"   # the user brought a merged model: nothing was trained here
        data["stages"][name] = state
        if state == "not_needed":
            continue
        if state not in RENDERED:
            data["missing"].append(name)
            if rec is not None:
                data["sections"][name] = {"status": state, "error": rec.get("error"), **_env(rec)}
            continue
        body = {"train": lambda: _train(run, rec), "merge": lambda: _merge(run, rec),
                "export": lambda: _export(run, rec),
                "eval": lambda: _eval(rec, list((records.get("export") or {}).get("files") or {}))}[name]()
        data["sections"][name] = {"status": state, **_env(rec), **body}
    data["qualify"] = report_adapter.verdict(run)
    data["stale"] = _stale(run, records, data["stages"])
    for name, root in data["stale"].items():
        data["stages"][name] = "stale"
        data["sections"][name]["stale"] = (f"made from an earlier {root}; rerun `workbench run --run "
                                           f"{data['run']}`")
    return data


def _stale(run: Path, records: dict, states: dict) -> dict:
    """{stage: the earliest stage it was made from an earlier version of}, for each rendered
    stage whose recorded input hashes no longer match what its upstream stages left in the
    run (the pipeline's own check), or whose upstream stage is stale, failed or unfinished."""
    stale: dict[str, str] = {}
    for name in SECTIONS[1:]:
        if states[name] not in RENDERED or states[name] == "user_provided":
            continue
        stage = stages.get(name)
        roots = [stage.upstream[key] for key in stages.changed_inputs(run, stage, strict=False, upstream_only=True)]
        for up in SECTIONS[:SECTIONS.index(name)]:
            if up in stale:
                roots.append(stale[up])
            elif records.get(up) is not None and states[up] not in RENDERED:
                roots.append(up)   # failed or still running: what this stage used came from an earlier one
        if roots:
            stale[name] = min(roots, key=stages.NAMES.index)
    return stale


# --------------------------------------------------------------------------- formatting
def _provenance(sec: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in sec["versions"].items())
    return f"*Device: {sec['device']}; {versions}; finished {sec.get('finished_utc') or '?'}.*"


def _short(metric: str) -> str:
    return metric.removeprefix("wb_")


def _size(n) -> str:
    return "—" if n is None else f"{n / 2**20:.2f} MiB"


def markdown(data: dict, plots: dict[str, str]) -> str:
    run = data["run"]
    out = [f"# Run report: `{run}`", "",
           f"Generated {data['generated_utc']}" + (f" by `{data['command']}`" if data.get("command") else "")
           + ". Every number below carries the device and library versions of the stage that produced it.", ""]
    status = ", ".join(f"{n} {s.replace('_', '-')}" for n, s in data["stages"].items())
    out += [f"Stages: {status}.", ""]
    out += report_adapter.md_verdict(data.get("qualify"), run)
    if data["missing"]:
        out += [f"**Missing stages: {', '.join(data['missing'])}.** Their sections say how to make them.", ""]
    for name in SECTIONS:
        out += [f"## {TITLES[name]}", ""]
        sec = data["sections"].get(name)
        state = (sec or {}).get("status", data["stages"][name])
        if state == "not_needed" or data["stages"][name] == "not_needed":
            out += ["Not needed: the merged model was brought by the user, so nothing was trained in this run.", ""]
            continue
        if sec is None or state not in RENDERED:
            why = "has not run" if sec is None else f"is {state}" + (f" ({sec['error']})" if sec.get("error") else "")
            out += [f"Missing: the {name} stage {why}. Make it with {HOW[name].replace('DIR', run)}.", ""]
            continue
        if sec.get("stale"):
            out += [f"**Stale: {sec['stale']}.** These numbers describe the earlier artifacts.", ""]
        out += [_provenance(sec), ""]
        out += {"train": _md_train, "merge": _md_merge, "export": _md_export, "eval": _md_eval}[name](sec, plots)
    return "\n".join(out).rstrip() + "\n"


def _md_train(sec: dict, plots: dict) -> list[str]:
    if sec.get("user_provided"):
        return [f"The adapter was brought by the user from `{sec['adapter']}` (base `{sec['base_model']}`); no training "
                "ran in this run, so there is no loss curve.", ""]
    acc = sec["heldout_accuracy"] or {}
    memory = (f"{sec['peak_memory_gib']:.3f} GiB (CUDA, allocated)" if sec.get("peak_memory_gib") is not None
              else f"{sec['peak_rss_mib']:.0f} MiB (process RSS, CPU)" if sec.get("peak_rss_mib") is not None else "—")
    method = sec.get("method") or "sft"
    rows = [["method", method if sec.get("beta") is None else f"{method}, beta {sec['beta']:g}"],
            ["steps", sec["steps"]], ["final loss (last logged step)", sec["final_loss"]],
            ["mean training loss", sec["train_loss_mean"]], ["tokens trained", sec["tokens"]],
            ["throughput (tokens/s)", sec["tokens_per_s"]], ["training time (s)", sec["train_s"]],
            ["peak memory", memory], ["our Triton kernels", sec["kernels"]]]
    if "adapter" in acc:
        rows.append(["held-out exact-match accuracy, base → adapter", f"{acc['base']:.3f} → {acc['adapter']:.3f}"])
    ds = sec.get("dataset") or {}
    lora = sec.get("lora") or {}
    text = [f"Base `{sec['base_model']}` ({sec['family']}"
            + (f", {sec['quantization']['type']} QLoRA" if sec.get("quantization") else "") + f"); LoRA r {lora.get('r')},"
            f" alpha {lora.get('alpha')}; data {ds.get('source')} ({ds.get('train_rows')} train / "
            f"{ds.get('test_rows')} held-out rows).", ""]
    text += table(["training", "value"], rows) + [""]
    if "loss" in plots:
        text += [f"![training loss]({plots['loss']})", ""]
    return text


def _md_merge(sec: dict, plots: dict) -> list[str]:
    if sec.get("user_provided"):
        return [f"The merged model was brought by the user from `{sec['merged']}` (stored as {sec['dtype']}); "
                "no merge ran in this run, so there is no merge verification.", ""]
    text = [f"Saved as {sec['dtype']}. Reference: {sec.get('reference')}, on {sec.get('eval_tokens')} held-out "
            "tokens (the held-out rows through the chat template, as training renders them; *ppl* is token "
            "perplexity there, see \"About the perplexities\" under Evaluation).", ""]
    rows = [[k, *(m.get(key) for key, _ in VERIFY_KEYS)] for k, m in sec["artifacts"].items()]
    text += table(["artifact", *(label for _, label in VERIFY_KEYS)], rows) + [""]
    if sec.get("nf4_vs_16bit"):
        n = sec["nf4_vs_16bit"]
        text += [f"QLoRA: perplexity merged into 16-bit {_num(n['ppl_merged_16bit'])}, merged into the dequantized "
                 f"NF4 weights {_num(n['ppl_merged_from_nf4'])} (relative difference {_num(n['ppl_rel_diff'])}).", ""]
    return text


def _md_export(sec: dict, plots: dict) -> list[str]:
    text = [f"Each GGUF against {sec['reference']} ({sec.get('eval_tokens')} tokens), run through llama.cpp "
            f"(and read back by transformers where it can). The llama.cpp numbers come from llama.cpp on the CPU; "
            f"the reference and the transformers read-back ran on {sec['device']}.", ""]
    rows = []
    for kind, f in sec["files"].items():
        m = f.get("llama_cpp") or {}
        status = "passed" if f["passed"] else "FAILED: " + "; ".join(f.get("failures") or [])
        rows.append([f"`{Path(f['file']).name}`", _size(f["bytes"]), *(m.get(key) for key, _ in VERIFY_KEYS),
                     f.get("tokenizer_mismatches"), status])
    text += table(["file", "size", *(f"llama.cpp {label}" for _, label in VERIFY_KEYS), "tokenizer mismatches",
                    "verification"], rows) + [""]
    tf_rows = [[kind, *((f.get("transformers") or {}).get(key) for key, _ in VERIFY_KEYS[:4])]
               for kind, f in sec["files"].items() if (f.get("transformers") or {}).get("supported")]
    if tf_rows:
        text += ["Read back by transformers (gguf loader):", ""]
        text += table(["type", *(label for _, label in VERIFY_KEYS[:4])], tf_rows) + [""]
    notes = [f["fallback_note"] for f in sec["files"].values() if f.get("fallback_note")]
    if notes:
        text += [f"**Quantization fell back:** {'; '.join(notes)}. The file is named after the type asked for, but "
                 "its numbers are those of the types it holds.", ""]
    text += report_adapter.md_adapter(sec, _num, _size)
    if "verification" in plots:
        text += [f"![verification]({plots['verification']})", ""]
    return text


def _md_eval(sec: dict, plots: dict) -> list[str]:
    metrics = sec["metrics"]
    columns = sorted({c for m in metrics.values() for c in m})
    limit = f"the first {sec['limit']} documents of each task" if sec.get("limit") else "every held-out document"
    text = [f"lm-eval on {limit}; tasks {', '.join(sec['tasks'])}. The full table with changes against the "
            "adapter is `eval/comparison.md`.", ""]
    ggufs = [m for m in _ordered(metrics) if m in GGUF_KINDS]
    if ggufs:
        others = [m for m in _ordered(metrics) if m not in GGUF_KINDS]
        text += [f"The GGUF rows ({', '.join(ggufs)}) come from llama.cpp on the CPU"
                 + (f"; {', '.join(others)} ran on {sec['device']}." if others else "."), ""]
    flags = {}
    for f in sec["flags"]:
        flags.setdefault(f["model"], []).append(f"{_short(f['metric'])} {f['change']:+.3g} beyond ±{f['tolerance']:g}")
    rows = [[m, *(metrics[m].get(c) for c in columns), "; ".join(flags.get(m, []))] for m in _ordered(metrics)]
    text += table(["model", *map(_short, columns), "flags (vs adapter)"], rows) + [""]
    if sec["change_vs_f16"]:
        text += ["Change of each quantized GGUF against the lossless f16 GGUF (same runtime, so this is the "
                 "quantization alone; scores absolute, perplexities relative):", ""]
        vs = sec["change_vs_f16"]
        text += table(["GGUF", *map(_short, columns)], [[k, *(vs[k].get(c) for c in columns)] for k in vs]) + [""]
    if sec.get("skipped"):
        text += ["Not evaluated: " + "; ".join(f"{k} ({v})" for k, v in sec["skipped"].items()) + ".", ""]
    if any(c.endswith("perplexity") for c in columns):
        text += [report_adapter.PERPLEXITY_NOTE, ""]
    if "eval" in plots:
        text += [f"![evaluation]({plots['eval']})", ""]
    return text


def _ordered(metrics: dict) -> list[str]:
    return [m for m in MODEL_ORDER if m in metrics] + [m for m in metrics if m not in MODEL_ORDER]


# --------------------------------------------------------------------------- plots
def _figure_bytes(fig, tight: bool = True) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plot_loss(sec: dict) -> bytes | None:
    import matplotlib.pyplot as plt

    curve = [r for r in sec.get("loss_curve", []) if r.get("loss") is not None]
    if not curve:
        return None
    steps, loss = [r["step"] for r in curve], [r["loss"] for r in curve]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, loss, marker="o" if len(steps) <= 40 else None, markersize=3, color="tab:blue")
    if min(loss) > 0 and max(loss) / min(loss) > 20:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title(f"Training loss: {sec['steps']} steps on {sec['device']}")
    ax.grid(True, alpha=0.3, which="both")
    memory = (f"peak {sec['peak_memory_gib']:.2f} GiB" if sec.get("peak_memory_gib") is not None
              else f"peak RSS {sec['peak_rss_mib']:.0f} MiB" if sec.get("peak_rss_mib") is not None else "")
    info = f"final loss {_num(sec.get('final_loss'))}\n{_num(sec.get('tokens_per_s'))} tokens/s\n{memory}"
    ax.text(0.98, 0.95, info, transform=ax.transAxes, ha="right", va="top", fontsize=9,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    v = sec["versions"]
    fig.text(0.01, 0.01, f"torch {v.get('torch')}, transformers {v.get('transformers')}, trl {v.get('trl')}",
             fontsize=7, color="gray")
    return _figure_bytes(fig)


def _merge_limits(merge: dict) -> dict:
    """qualify's merge limits for the merged model's stored dtype (the gates' defaults)."""
    try:
        from workbench.qualify import load_gates

        return load_gates(None)["merge"].get(merge.get("dtype") or "float32") or {}
    except Exception:   # the plot is drawn without the limit rather than not at all
        return {}


def _plot_verification(merge: dict | None, export: dict | None) -> bytes | None:
    """KL and top-1 of every verified artifact against its reference, each with its limit."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = []   # (label, group, metrics, limits)
    for k, m in ((merge or {}).get("artifacts") or {}).items():
        rows.append((k, "merge", m, _merge_limits(merge)))
    for k, f in ((export or {}).get("files") or {}).items():
        if f.get("llama_cpp"):
            rows.append((f"{k} GGUF", "gguf", f["llama_cpp"], f.get("thresholds") or {}))
    for k, b in (((export or {}).get("adapter") or {}).get("bases") or {}).items():
        if b.get("llama_cpp"):
            rows.append((f"adapter GGUF\non {k} base", "adapter", b["llama_cpp"], b.get("thresholds") or {}))
    if not rows:
        return None
    colors = {"merge": "tab:blue", "gguf": "tab:purple", "adapter": "tab:green"}
    what = {"merge": "merged model vs the HF adapter", "gguf": "GGUF (llama.cpp) vs the HF merged model",
            "adapter": "base GGUF + adapter GGUF (llama.cpp) vs the HF adapter"}
    x = list(range(len(rows)))
    names = [r[0] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12.5, 5.2))
    kl = [r[2]["kl_mean"] for r in rows]
    bars = a.bar(x, [max(v, 1e-16) for v in kl], color=[colors[r[1]] for r in rows])
    a.bar_label(bars, labels=[f"{v:.2g}" for v in kl], fontsize=8, padding=1)
    report_adapter.draw_limits(a, x, [r[3].get("kl_mean") for r in rows], "limit (KL fails above, top-1 below)")
    a.set_yscale("log")
    a.set_ylabel("mean KL(reference ‖ artifact), nats/token (log)")
    a.set_title("Distribution shift (lower is better)")
    top1 = [r[2]["top1_agreement"] for r in rows]
    bars = b.bar(x, top1, color=[colors[r[1]] for r in rows])
    b.bar_label(bars, fmt="%.3f", fontsize=8, padding=1)
    report_adapter.draw_limits(b, x, [r[3].get("top1_agreement") for r in rows], "limit")
    b.set_ylim(0, 1.12)   # the whole scale: the dashed limits show how much room each artifact has
    b.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    b.set_ylabel("top-1 agreement with the reference (fraction)")
    b.set_title("Same next token as the reference (higher is better)")
    for ax in (a, b):
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3, which="both")
    handles = [Patch(color=colors[g], label=what[g]) for g in colors if any(r[1] == g for r in rows)]
    handles += [a.get_legend_handles_labels()[0][0]] if a.get_legend_handles_labels()[0] else []
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    where = [f"HF on {d}" for d in {(merge or {}).get("device"), (export or {}).get("device")} if d]
    fig.suptitle(f"Merge and export verification on {(export or merge or {}).get('eval_tokens')} held-out tokens "
                 f"({', '.join(where)}; llama.cpp on the CPU). Dashed: the limit each artifact must meet "
                 "(export thresholds; qualify's merge limit)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return _figure_bytes(fig, tight=False)


def _compact(v: float) -> str:
    if v != v:
        return ""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def _plot_eval(sec: dict) -> bytes | None:
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = sec["metrics"]
    models = _ordered(metrics)
    if not models:
        return None
    columns = sorted({c for m in metrics.values() for c in m})
    scores = [c for c in columns if not c.split(" ")[1].endswith("perplexity") and " bits_per_byte" not in c
              and not c.endswith("acc_norm")]
    ppl = [c for c in columns if c.endswith("word_perplexity")]
    fig, axes = plt.subplots(1, 2 if ppl else 1, figsize=(12 if ppl else 7, 4.6),
                             gridspec_kw={"width_ratios": [1.7, 1]} if ppl else None)
    a = axes[0] if ppl else axes
    x = np.arange(len(models))
    width = 0.8 / max(1, len(scores))
    for i, c in enumerate(scores):
        values = [metrics[m].get(c, np.nan) for m in models]
        bars = a.bar(x + (i - (len(scores) - 1) / 2) * width, values, width, label=_short(c))
        a.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    a.set_xticks(x, models)
    a.set_ylim(0, 1.22)   # room above 1.0 for the value labels and the legend
    a.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a.set_xlabel("model")
    a.set_ylabel("score (fraction of documents)")
    limit = f", first {sec['limit']} docs/task" if sec.get("limit") else ""
    a.set_title(f"Held-out accuracy across models{limit}")
    a.grid(True, axis="y", alpha=0.3)
    if scores:
        a.legend(fontsize=8, loc="upper center", ncol=min(3, len(scores)), frameon=False)
    if ppl:
        _plot_ppl_change(axes[1], sec, models, ppl[0])
    v = sec["versions"]
    hf = [m for m in models if m not in GGUF_KINDS]
    where = ", ".join(([f"HF models on {sec['device']}"] if hf else [])
                      + (["GGUFs: llama.cpp on the CPU"] if len(hf) < len(models) else []))
    fig.suptitle(f"lm-eval: {where} (lm-eval {v.get('lm-eval')}, llama-cpp-python "
                 f"{v.get('llama-cpp-python')}, torch {v.get('torch')})", fontsize=10)
    return _figure_bytes(fig)


def _plot_ppl_change(ax, sec: dict, models: list[str], column: str) -> None:
    """Each merged/exported model's word perplexity relative to the adapter's, with its
    eval tolerance: the absolute values (~1e4) would hide differences of a few percent."""
    metrics, tolerances = sec["metrics"], sec.get("tolerances") or {}
    ref = metrics.get("adapter", {}).get(column)
    shown = [m for m in models if m not in ("base", "adapter") and metrics[m].get(column) is not None]
    if not ref or not shown:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no adapter perplexity to compare with", ha="center", transform=ax.transAxes)
        return
    x = list(range(len(shown)))
    rel = [100 * (metrics[m][column] / ref - 1) for m in shown]
    tol = [100 * tolerances[m]["perplexity"] if m in tolerances else None for m in shown]
    bars = ax.bar(x, rel, color=["tab:gray" if m == "merged" else "tab:purple" for m in shown])
    ax.bar_label(bars, labels=[f"{v:+.2f}%" for v in rel], fontsize=7, padding=2)
    report_adapter.draw_limits(ax, x, tol, "eval tolerance (±)", color="dimgray")
    report_adapter.draw_limits(ax, x, [-t if t is not None else None for t in tol], None, color="dimgray")
    ax.axhline(0, color="black", linewidth=0.8)
    span = max([abs(v) for v in rel] + [t for t in tol if t is not None] + [0.01]) * 1.35
    ax.set_ylim(-span, span)
    ax.set_xticks(x, shown, rotation=30)
    ax.set_xlabel("model")
    ax.set_ylabel("word perplexity vs the adapter (%)")
    base = metrics.get("base", {}).get(column)
    ax.set_title(f"Word perplexity vs the adapter\n(adapter {_compact(ref)}"
                 + (f"; untrained base {_compact(base)}" if base else "") + ")", fontsize=10)
    if any(t is not None for t in tol):
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.grid(True, axis="y", alpha=0.3)


# --------------------------------------------------------------------------- rendering
def render(run: str | Path, command: str | None = None) -> dict:
    """Write RUN/report/{report.md, report.json, *.png} and record the report stage.
    Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")

    run = manifest.require_run(run, "of a `workbench run` or `workbench train`")
    if not (run / manifest.MANIFEST).is_file():
        raise UserError(f"{run} has no {manifest.MANIFEST}, so no stage has run there; run `workbench run --run "
                        f"{run}` first.")
    with manifest.lock(run):
        return _render(run, command)


def _render(run: Path, command: str | None) -> dict:
    found = STAGE.inputs(run, stages.Settings())   # the stage records it renders, as they are now
    data = collect(run, command)
    secs = data["sections"]
    done = {n: s for n, s in secs.items() if s.get("status") in RENDERED}
    images = {}
    if "train" in done and not done["train"].get("user_provided"):
        images["loss"] = _plot_loss(done["train"])
    if "merge" in done or "export" in done:
        images["verification"] = _plot_verification(done.get("merge"), done.get("export"))
    if "eval" in done:
        images["eval"] = _plot_eval(done["eval"])
    plots = {k: f"{k}.png" for k, v in images.items() if v}
    data["plots"] = plots
    folder = run / "report"
    with atomic.directory(folder) as tmp:
        for key, name in plots.items():
            (tmp / name).write_bytes(images[key])
        (tmp / "report.md").write_text(markdown(data, plots), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    stages.record(run, STAGE, None, {"rendered": list(found), "missing": data["missing"],
                                     "versions": versions("matplotlib", "parity-workbench")}, found=found)
    return {"md": folder / "report.md", "json": folder / "report.json",
            "png": [folder / name for name in plots.values()], "missing": data["missing"]}


class ReportStage(stages.Stage):
    """Reads the records of the stages it renders; writes report/."""

    name = "report"
    upstream = {name: name for name in SECTIONS}

    def inputs(self, run: Path, settings: stages.Settings) -> dict:
        records = manifest.read(run).get("stages", {})
        return {name: records[name] for name in SECTIONS if name in records}

    def outputs(self, run: Path, settings: stages.Settings) -> list[Path]:
        return [run / "report"]

    def reason(self, run: Path, changed: list[str], rec: dict, settings: stages.Settings) -> str:
        return "the stage records it renders changed"

    def drift(self, run: Path, rec: dict, hash_tree=manifest.hash_tree) -> list[str]:
        now = stages.hashes(self.inputs(run, stages.Settings()))
        return [f"the report predates the current {name} record (rerun `workbench report --run DIR`)"
                for name, want in (rec.get("input_hashes") or {}).items() if now.get(name) != want]

    def run(self, run: Path, settings: stages.Settings) -> dict:
        return render(run, command=settings.command)

    def summary(self, run: Path, paths: dict) -> str:
        return f"{paths['md']}"


STAGE = ReportStage()


def _nominal(kind: str) -> set:
    from workbench.export.quantize import QUANTS

    return QUANTS[kind][1] if kind in QUANTS else set()


def summary_table(run: str | Path) -> str:
    """A short Markdown table of each evaluated model's key numbers (and each GGUF's
    verification), or "" when nothing was evaluated or exported."""
    stages = manifest.read(run).get("stages", {})
    ev = stages.get("eval") if (stages.get("eval") or {}).get("status") == "complete" else None
    export = stages.get("export") or {}
    files = export.get("files", {}) if export.get("status") in ("complete", "failed_verification") else {}
    metrics = (ev or {}).get("metrics", {})
    if not metrics and not files:
        return ""
    columns = sorted({c for m in metrics.values() for c in m})
    keep = [c for c in columns if c.endswith(" acc") or "exact_match" in c or c.endswith("word_perplexity")]
    models = _ordered(metrics) + [k for k in GGUF_KINDS if k in files and k not in metrics]
    checked = ((_read_json(Path(run) / "export" / "export_report.json") or {}).get("files") or {}) if files else {}
    rows = []
    for m in models:
        check = ""
        if m in files:
            f = files[m]
            kl = (f.get("llama_cpp") or {}).get("kl_mean")
            check = ("ok" if f.get("passed") else "FAILED") + (f", KL {kl:.2g}" if kl is not None else "")
            if f.get("fallback_note"):
                check += ", fallback types (not " + "/".join(sorted(_nominal(m))) + ")"
            elif _nominal(m) and checked.get(m, {}).get("fallbacks") == {}:   # the export read every matrix's type
                check += ", all " + "/".join(sorted(_nominal(m)))
        rows.append([m, *(metrics.get(m, {}).get(c) for c in keep), check])
    adapter = export.get("adapter") if files else None
    if adapter:
        kls = ", ".join(f"KL {(b.get('llama_cpp') or {}).get('kl_mean', float('nan')):.2g} on the {k} base"
                        for k, b in (adapter.get("bases") or {}).items())
        rows.append(["adapter GGUF", *([None] * len(keep)), ("ok, " if adapter.get("passed") else "FAILED, ") + kls])
    return "\n".join(table(["model", *map(_short, keep), "GGUF verification"], rows))
