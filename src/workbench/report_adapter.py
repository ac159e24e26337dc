"""Parts of the run report (workbench.report) added for issue 23: the GGUF LoRA
adapter and the Modelfiles in the export section, the qualify verdict at the top, what
the perplexities are over, and the limits drawn on the plots."""
from __future__ import annotations

import json
from pathlib import Path

from workbench import manifest
from workbench.markdown import table

#: What every perplexity in the report is over, and why it is large (Markdown).
PERPLEXITY_NOTE = (
    "**About the perplexities.** *ppl* in the merge and export tables is token perplexity on 512 tokens of "
    "the held-out rows as training tokenizes them (prompt and reply through the chat template, one window per "
    "row, the skills in turn). The evaluation's *word* and *byte perplexity* (lm-eval's wb_heldout_ppl) are over all "
    "of the held-out rows written as plain text (\"question\\nanswer\", no chat template), per "
    "whitespace-separated word and per byte (a word is one or more tokens, so word perplexity is the "
    "largest). Both are large by construction, not a sign of a broken model: the adapter was trained with "
    "the loss on the replies only, so it never learned to predict the prompts, and the questions are mostly "
    "unpredictable (random letter strings to reverse, random digits, invented planet names) for a model of a "
    "few million parameters. Measured on the built-in default run (800 steps, held-out accuracy 0.99): "
    "token perplexity about 2,200 on the chat-rendered rows, of which about 5,700 on the prompt tokens and "
    "1.04 on the reply tokens it was trained on; about 2,400 on the plain text. Read them as a comparison: "
    "how much a merged or exported model moves perplexity against the adapter (the relative changes, and "
    "the eval chart), not as a quality score; the accuracy columns say what the adapter learned.")


# --------------------------------------------------------------------------- collecting
def export_extras(run: Path, rec: dict, report: dict) -> dict:
    """The adapter GGUF and the Modelfiles of the export stage, for report.json."""
    out = {}
    entry = rec.get("adapter")
    section = report.get("adapter") or {}
    if entry:
        bases = {}
        for kind, b in (entry.get("bases") or {}).items():
            full = (section.get("bases") or {}).get(kind, {})
            bases[kind] = {"file": b.get("path"), "bytes": b.get("bytes"), "passed": b.get("passed"),
                           "llama_cpp": b.get("llama_cpp"), "without_adapter": full.get("without_adapter"),
                           "failures": full.get("failures", []),
                           "thresholds": (section.get("thresholds") or {}).get(kind)}
        out["adapter"] = {"file": entry.get("path"), "bytes": entry.get("bytes"), "alpha": entry.get("alpha"),
                          "ranks": entry.get("ranks"), "passed": entry.get("passed"), "bases": bases,
                          "reference": section.get("reference")}
    elif section.get("skipped"):
        out["adapter"] = {"skipped": section["skipped"]}
    mf = report.get("modelfiles") or {}
    if rec.get("modelfiles"):
        out["modelfiles"] = {"files": rec["modelfiles"], "template": mf.get("template"),
                             "template_note": mf.get("template_note"), "stops": mf.get("stops")}
    return out


def verdict(run: Path) -> dict | None:
    """The qualify verdict of the run, if any: status, summary, time, and whether it was
    made on the artifacts the run holds now (every recorded output of train, merge,
    export and eval has the sha256 the verdict saw)."""
    path = run / "qualify" / "verdict.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    records = manifest.read(run).get("stages", {})
    seen = doc.get("artifacts") or {}
    current = True
    from workbench.report import SECTIONS   # (report imports this module)

    for name in SECTIONS:
        outputs = (records.get(name) or {}).get("outputs") or {}
        if {rel: r.get("sha256") for rel, r in (seen.get(name) or {}).items()} != \
                {rel: r.get("sha256") for rel, r in outputs.items()}:
            current = False
    return {"verdict": doc.get("verdict"), "summary": doc.get("summary"), "md": "../qualify/verdict.md",
            "time_utc": (doc.get("environment") or {}).get("time_utc"), "current": current}


# --------------------------------------------------------------------------- Markdown
def md_verdict(v: dict | None, run: str) -> list[str]:
    if v is None:
        return [f"**Qualification: not run yet.** `workbench qualify --run {run}` gates this run (kernel parity, "
                "merge, GGUFs, the adapter GGUF, eval, tokenizer, hashes) and writes qualify/verdict.md; "
                f"`workbench report --run {run}` then shows its verdict here.", ""]
    line = (f"**Qualification: {v['verdict']}** ({v['summary']}) — [qualify/verdict.md]({v['md']}), "
            f"`workbench qualify` at {v['time_utc']}")
    if not v["current"]:
        line += (f". **It was made on earlier artifacts** (their hashes differ from the run's now); rerun "
                 f"`workbench qualify --run {run}`")
    return [line + ".", ""]


def md_adapter(sec: dict, num, size) -> list[str]:
    """The export section's adapter GGUF and Modelfile paragraphs."""
    out = []
    adapter = sec.get("adapter")
    if adapter and adapter.get("skipped"):
        out += [f"No GGUF LoRA adapter: {adapter['skipped']}.", ""]
    elif adapter:
        ranks = ", ".join(map(str, adapter.get("ranks") or []))
        out += ["### GGUF LoRA adapter", "",
                f"`{Path(adapter['file']).name}` ({size(adapter['bytes'])}; rank {ranks}, adapter.lora.alpha "
                f"{num(adapter['alpha'])}) is the adapter as llama.cpp and Ollama apply it to a base GGUF at load "
                f"time. llama.cpp on the CPU loaded each base GGUF with it applied; the reference is "
                f"{adapter.get('reference') or 'the HF adapter on its base'}, on the same held-out tokens. "
                "*Without adapter* is the same base GGUF alone: how far the adapter moves the model, against how "
                "closely llama.cpp reproduces it.", ""]
        rows = []
        for kind, b in adapter["bases"].items():
            m, w, lim = b.get("llama_cpp") or {}, b.get("without_adapter") or {}, b.get("thresholds") or {}
            status = "passed" if b.get("passed") else "FAILED: " + "; ".join(b.get("failures") or [])
            rows.append([f"`{Path(b['file']).name}`", size(b.get("bytes")), m.get("kl_mean"), lim.get("kl_mean"),
                         m.get("top1_agreement"), lim.get("top1_agreement"), m.get("ppl_rel_delta"),
                         w.get("kl_mean"), w.get("top1_agreement"), status])
        out += table(["base GGUF + adapter", "base size", "KL mean", "KL limit", "top-1", "top-1 limit",
                      "ppl Δrel", "KL without adapter", "top-1 without adapter", "verification"], rows) + [""]
    mf = sec.get("modelfiles")
    if mf:
        names = ", ".join(f"`{Path(p).name}`" for p in mf["files"].values())
        out += [f"Ollama Modelfiles next to the GGUFs: {names} (`ollama create NAME -f FILE`). "
                + ("Their TEMPLATE is the chat template translated into Ollama's syntax and checked against "
                   "transformers' rendering" if mf.get("template") else
                   f"They have no TEMPLATE: {mf.get('template_note')}")
                + (f"; stop tokens {', '.join(f'`{s}`' for s in mf.get('stops') or [])}." if mf.get("stops")
                   else "."), ""]
    return out


def skipped_worth_saying(skipped: dict, exported: list[str]) -> dict:
    """The eval's "not evaluated" entries a reader needs: a GGUF type the export was
    not asked for is no news (unless nothing was exported at all); an exported one the
    eval skipped is."""
    from workbench.eval.models import GGUF_KINDS

    return {k: v for k, v in skipped.items() if k not in GGUF_KINDS or k in exported or not exported}


# --------------------------------------------------------------------------- plots
def draw_limits(ax, xs, limits, label: str | None, color: str = "black") -> None:
    """A dashed tick across each bar at its limit (None: no limit for that bar)."""
    first = True
    for x, limit in zip(xs, limits):
        if limit is None:
            continue
        ax.hlines(limit, x - 0.42, x + 0.42, colors=color, linewidths=1.4, linestyles="--",
                  label=label if first else None, zorder=3)
        first = False
