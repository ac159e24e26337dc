"""The qualify gate of the GGUF LoRA adapter, and the export stage's held-out windows
that the GGUF gates recompute on.

``adapter_gguf`` (thresholds in configs/gates.yaml): the export stage wrote
``export/adapter-f16.gguf`` (``workbench run`` does; ``workbench export
--adapter-gguf``), and llama.cpp applying it to each base GGUF (base-f16.gguf,
base-q8_0.gguf) stays within the limits against the HF adapter on its base — the
export stage's numbers, and the same comparison recomputed here when the files are
small. It fails when the adapter GGUF or a base GGUF is missing, when a number is
outside its limits, and when a file changed since the export measured it and is too
large to recompute. Not applicable when the run has no adapter (a merged model brought
with ``workbench export --merged``).

Every gate that compares logits (merge, gguf, adapter_gguf) does so on the ids that the
merge and export stages compared on: workbench.export.verify.heldout_windows, the run's
held-out rows through the chat template as training tokenizes them, one window per row.
The GGUF gates check the export stage's recorded fingerprint of those ids
(:func:`export_windows`), so a recomputed number measures what the recorded one measured
and the two agree to llama.cpp's run-to-run noise.
"""
from __future__ import annotations

import json

from workbench import manifest
from workbench.errors import UserError


def export_windows(ctx) -> list[list[int]]:
    """The ids the export stage compared logits on (checked against its recorded fingerprint)."""
    if "export_windows" not in ctx.cache:
        from workbench.export.verify import ids_sha256

        wins = ctx.windows()
        try:
            recorded = json.loads((ctx.run / "export" / "export_report.json").read_text()).get("eval") or {}
        except (OSError, json.JSONDecodeError):
            recorded = {}
        if recorded.get("ids_sha256") and recorded["ids_sha256"] != ids_sha256(wins):
            raise UserError("the export stage compared other held-out tokens than this checkout cuts (another "
                            "tokenizer or held-out text); rerun `workbench export --run DIR`.")
        ctx.cache["export_windows"] = wins
    return ctx.cache["export_windows"]


def windows_label(ctx) -> str:
    from workbench.export.verify import chat_rendered

    wins = export_windows(ctx)
    form = ("through the chat template, as training renders them" if chat_rendered(ctx.tokenizer())
            else "as plain question/answer text: the tokenizer has no chat template")
    return (f"recomputed on the export stage's {sum(len(w) for w in wins)} held-out tokens (the held-out rows "
            f"{form}), as the export measured them")


def merged_logits_on_export_windows(ctx):
    if "merged_logits_export" not in ctx.cache:
        from workbench.export.compare import hf_logits
        from workbench.models import load_base

        ctx.cache["merged_logits_export"] = hf_logits(load_base(ctx.merged_dir(), ctx.device), export_windows(ctx))
    return ctx.cache["merged_logits_export"]


def _adapter_logits(ctx, base):
    if "adapter_logits_export" not in ctx.cache:
        from workbench.export.compare import hf_logits
        from workbench.export.merge import require_adapter
        from workbench.models import load_base, with_adapter

        model = with_adapter(load_base(base, ctx.device), require_adapter(ctx.run))
        ctx.cache["adapter_logits_export"] = hf_logits(model, export_windows(ctx))
    return ctx.cache["adapter_logits_export"]


def gate_adapter_gguf(ctx):
    from workbench.export import adapter_export
    from workbench.export.compare import logit_metrics
    from workbench.export.merge import base_model_path
    from workbench.export.verify import LlamaCpp, failures
    from workbench.qualify import FAIL, NA, PASS, GateResult, item_check, combine, limits_text, log

    name = "adapter_gguf"
    why = adapter_export.not_applicable(ctx.run)
    if why:
        return GateResult(name, NA, "", "", f"not applicable: {why}")
    rec = manifest.stage(ctx.run, "export")
    if not rec:
        raise UserError(f"{ctx.run} has no export stage; run `workbench export --run DIR --adapter-gguf`.")
    gates = ctx.gates[name]
    limits_all = gates["thresholds"]
    threshold = "; ".join(f"on base {k}: {limits_text(v)}" for k, v in limits_all.items())
    entry = rec.get("adapter")
    if not entry:
        return GateResult(name, FAIL, "no adapter GGUF", threshold,
                          "the export stage wrote no adapter GGUF; run `workbench export --run DIR --adapter-gguf` "
                          "(`workbench run` writes it)")
    path = ctx.run / entry["path"]
    if not path.is_file():
        return GateResult(name, FAIL, f"{entry['path']} is missing", threshold,
                          f"{entry['path']} is missing; run `workbench export --run DIR --adapter-gguf`")
    adapter_same = manifest.sha256_file(path) == entry.get("sha256")
    checks = []
    for kind, base_entry in (entry.get("bases") or {}).items():
        item = f"{entry['path']} on {base_entry['path']}"
        limits = limits_all.get(kind)
        if limits is None:
            checks.append(item_check(item, FAIL, None, None, [f"the gates have no limits for base {kind}; add "
                                                          f"adapter_gguf.thresholds.{kind}"]))
            continue
        recorded = base_entry.get("llama_cpp") or {}
        problems = [f"export stage (llama.cpp): {p}" for p in failures(recorded, limits)] if recorded else \
            ["the export record has no llama.cpp numbers; rerun `workbench export --run DIR --adapter-gguf`"]
        measured = {f"export {k}": recorded[k] for k in limits if k in recorded}
        base_path = ctx.run / base_entry["path"]
        if not base_path.is_file():
            problems.append(f"{base_entry['path']} is missing; run `workbench export --run DIR --adapter-gguf`")
            checks.append(item_check(item, FAIL, measured, limits, problems))
            continue
        same = adapter_same and manifest.sha256_file(base_path) == base_entry.get("sha256")
        size = path.stat().st_size + base_path.stat().st_size
        if size <= gates["recompute_max_mib"] * 2**20:
            log(f"adapter_gguf: recomputing {item} in llama.cpp against the HF adapter on its base")
            wins = export_windows(ctx)
            try:
                llm = LlamaCpp(base_path, n_ctx=max(len(w) for w in wins), lora_path=path)
            except (ValueError, RuntimeError, OSError) as err:
                problems.append(f"llama.cpp cannot apply it ({str(err).splitlines()[0][:200]})")
            else:
                try:
                    ref = _adapter_logits(ctx, base_model_path(ctx.run, ctx.stage("train")))
                    now = logit_metrics(ref, llm.logits(wins), wins)
                finally:
                    llm.close()
                measured.update({f"now {k}": now[k] for k in limits})
                problems += [f"recomputed: {p}" for p in failures(now, limits)]
        elif not same:
            problems.append("the files changed since the export stage measured them (sha256 differs) and are larger "
                            f"than recompute_max_mib ({gates['recompute_max_mib']}); rerun `workbench export --run "
                            "DIR --adapter-gguf`")
        if not same:
            measured["note"] = "sha256 differs from the export record"
        checks.append(item_check(item, FAIL if problems else PASS, measured, limits, problems))
    if not checks:
        return GateResult(name, FAIL, "no base GGUF", threshold, "the export record names no base GGUF the adapter "
                          "was verified on; rerun `workbench export --run DIR --adapter-gguf`")
    note = windows_label(ctx) if any("now kl_mean" in (c["measured"] or {}) for c in checks) else \
        "the export stage's numbers"
    return combine(name, checks, threshold, note)
