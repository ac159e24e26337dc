"""`workbench export`: GGUF files from the merged model, each verified numerically.

Order: the 16-bit GGUFs (our writer), then the quantized ones (llama.cpp's
quantizer, from the f16 file — or bf16 when only bf16 was asked for; when only
quantized types are asked for, an f16 is written as their source and kept), then
verification of every file against the HF merged model. Every file is written
under a temp name and renamed when complete, so a killed export leaves only
``.*.partial`` names (removed by the next export) and a failed quantization leaves
the 16-bit files intact. The manifest's "export" record lists every file (hash,
size, type, verification numbers); it is "complete" only when every file passed
its thresholds, otherwise "failed_verification" (the report says which metric).

With ``adapter_gguf`` (``workbench export --adapter-gguf``; ``workbench run`` always
asks for it) the run's LoRA adapter is also written as a GGUF LoRA adapter, with the
base model's f16/q8_0 GGUFs it applies to, and verified in llama.cpp against the HF
adapter on its base; and every GGUF gets an Ollama Modelfile next to it
(workbench.export.adapter_export, workbench.export.modelfile).
"""
from __future__ import annotations

import json
from pathlib import Path

from workbench import atomic, console, manifest, stages
from workbench.envinfo import versions
from workbench.errors import UserError

from . import DEFAULT_TYPES, GGUF_TYPES, adapter_export, archs, gguf_writer, quantize, verify
from .compare import hf_logits


def log(msg: str) -> None:
    console.progress(f"[export] {msg}", detail=True)


def parse_quants(text: str) -> list[str]:
    wanted = [q.strip().lower() for q in text.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in GGUF_TYPES]
    if unknown or not wanted:
        raise UserError(f"unknown --quant value(s) {', '.join(unknown) or '(none)'}; choose from "
                        f"{', '.join(GGUF_TYPES)}.")
    return [q for q in GGUF_TYPES if q in wanted]


def planned(quants) -> list[str]:
    """The GGUF types an export of ``quants`` writes, in order: those asked for, and f16 as the
    quantized types' source when no 16-bit type is asked for."""
    wanted = set(quants)
    if wanted - set(gguf_writer.FLOAT_TYPES) and not wanted & set(gguf_writer.FLOAT_TYPES):
        wanted.add("f16")
    return [q for q in GGUF_TYPES if q in wanted]


def _merged_folder(run: Path) -> Path:
    rec = manifest.require_stage(run, "merge", "run `workbench merge --run DIR` first, or bring your own merged "
                                 "model with `workbench export --run DIR --merged FOLDER`.")
    problems = manifest.verify_outputs(run, "merge")
    if problems:
        raise UserError(f"the merge stage's files changed since it ran ({problems[0]}); rerun `workbench merge`.")
    merged = run / rec.get("merged_dir", "merge/merged")
    if not (merged / "config.json").is_file():
        raise UserError(f"{merged} has no config.json; rerun `workbench merge`.")
    if not (merged / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer in {merged} (tokenizer.json is missing); rerun `workbench merge`, "
                        "which copies the run's tokenizer next to the merged weights.")
    return merged


def run_export(run: str | Path, quants: list[str], thresholds: str | Path | None = None,
               adapter_gguf: bool = False) -> dict:
    """The export stage; returns the report (``report["passed"]`` says whether every
    file met its thresholds). Every file is compared on the run's held-out rows as
    training renders them (verify.heldout_windows). ``adapter_gguf``: also the LoRA
    adapter as a GGUF adapter with its base GGUFs, verified in llama.cpp
    (workbench.export.adapter_export)."""
    from workbench.offline import enforce_offline

    enforce_offline()
    run = manifest.require_run(run)
    with manifest.lock(run):
        return _run_export(run, quants, thresholds, adapter_gguf)


def _run_export(run: Path, quants: list[str], thresholds, adapter_gguf: bool = False) -> dict:
    merged = _merged_folder(run)
    limits = verify.load_thresholds(thresholds)
    settings = stages.Settings(quants=quants, thresholds=thresholds, adapter_gguf=adapter_gguf)
    found = STAGE.inputs(run, settings)   # what this export reads, hashed before it is read
    config = json.loads((merged / "config.json").read_text())
    archs.check_exportable(config)   # refuse before writing anything
    if "adapter" in found:
        adapter_export.refuse_early(run)
    out = run / "export"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial"):   # a killed export's (we hold the run's lock)
        stale.unlink(missing_ok=True)

    floats = [q for q in planned(quants) if q in gguf_writer.FLOAT_TYPES]
    quantized = [q for q in planned(quants) if q in quantize.QUANTS]
    files: dict[str, Path] = {}
    facts = {}
    for kind in floats:
        files[kind] = out / f"model-{kind}.gguf"
        log(f"writing {files[kind].name}")
        facts = gguf_writer.write(merged, files[kind], kind)
    source = files["f16"] if "f16" in files else files.get("bf16")
    types = {}
    for q in quantized:
        files[q] = out / f"model-{q}.gguf"
        log(f"quantizing {source.name} -> {files[q].name} (llama.cpp)")
        quantize.quantize(source, files[q], q)
        types[q] = quantize.tensor_types(files[q])

    report = {"arch": facts.get("arch"), "gguf_arch": facts.get("gguf_arch"),
              "pre_tokenizer": facts.get("pre_tokenizer"), "notes": facts.get("notes", []),
              "source_for_quants": source.name if quantized else None, "thresholds": limits, "files": {}}
    report.update(_verify_all(run, merged, files, types, limits))
    extra, extra_paths = adapter_export.extend(run, out, merged, files, report, adapter_gguf, thresholds)
    atomic.write_json(out / "export_report.json", report)

    entries = {}
    for kind, path in files.items():
        entry = report["files"][kind]
        entries[kind] = {"path": path.relative_to(run).as_posix(), **manifest.file_record(path), "type": kind,
                         "passed": entry["passed"], "llama_cpp": entry["llama_cpp"],
                         "tokenizer_mismatches": len(entry["tokenizer"]["mismatches"]),
                         "transformers": entry["transformers"],
                         **({"fallback_note": entry["fallback_note"]} if entry.get("fallback_note") else {})}
    stages.record(run, STAGE, settings, {
        "status": "complete" if report["passed"] else "failed_verification",
        "files": entries,
        **extra,
        # A bare `workbench run --run DIR` exports with these thresholds again.
        "thresholds_file": str(Path(thresholds).resolve()) if thresholds else None,
        "versions": versions("gguf", "llama-cpp-python", "transformers", "torch", "parity-workbench"),
    }, found=found, outputs=[*files.values(), *extra_paths, out / "export_report.json"])
    return report


def _verify_all(run: Path, merged: Path, files: dict, types: dict, limits: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    rows, source = verify.heldout_rows(run)
    wins, window = verify.heldout_windows(tokenizer, json.loads((merged / "config.json").read_text())
                                          ["max_position_embeddings"], rows)
    heldout = "\n".join(verify.heldout_texts(tokenizer, rows))   # joins the tokenizer round trip's corpus
    device = "cuda" if torch.cuda.is_available() else "cpu"   # llama.cpp itself runs on the CPU here
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32, use_safetensors=True)
    model = model.to(device).eval()
    ref = hf_logits(model, wins)
    result, passed = {}, True
    for kind, path in files.items():
        checks = verify.verify(path, model, tokenizer, wins, ref, heldout)
        problems = [f"llama.cpp {p}" for p in verify.failures(checks["llama_cpp"], limits[kind])]
        if checks["transformers"]["supported"]:
            problems += [f"transformers {p}" for p in verify.failures(checks["transformers"], limits[kind])]
        if checks["tokenizer"]["mismatches"]:
            problems.append(f"tokenizer: {len(checks['tokenizer']['mismatches'])} of "
                            f"{checks['tokenizer']['strings']} strings encode differently in llama.cpp")
        entry = {"file": path.name, "bytes": path.stat().st_size, **checks, "failures": problems,
                 "passed": not problems}
        if kind in types:
            entry["tensor_types"] = {n: t["type"] for n, t in types[kind].items()}
            entry["fallbacks"] = quantize.fallbacks(types[kind], kind)
            entry["matrices"] = sum(len(t["shape"]) > 1 for t in types[kind].values())
            note = quantize.fallback_note(kind, entry)
            if note:
                entry["fallback_note"] = note
                log(f"note: {note}")
        m = checks["llama_cpp"]
        log(f"{path.name}: KL mean {m['kl_mean']:.3g}, top-1 {m['top1_agreement']:.4f}, max |dlogit| "
            f"{m['max_abs_logit_diff']:.3g}, ppl delta {m['ppl_rel_delta']:+.2e}"
            + ("" if not problems else f"  FAILED: {'; '.join(problems)}"))
        result[kind] = entry
        passed &= not problems
    return {"files": result, "passed": passed,
            "eval": {"tokens": sum(len(w) for w in wins), "window": window, "ids_sha256": verify.ids_sha256(wins),
                     "text": verify.heldout_label(tokenizer, source)}}


class ExportStage(stages.Stage):
    """Reads the merged model, the GGUF types asked for and the verification thresholds, and
    for the adapter GGUF (``workbench run``) the adapter, its base and its limits; writes export/."""

    name = "export"
    #: The adapter GGUF's inputs (the adapter, its base) are judged stale through the merge they
    #: also feed: the report asks without knowing whether the export wrote one.
    upstream = {"merged": "merge"}
    labels = {"merged": "merged model", "base_model": "base model", "adapter_thresholds": "adapter GGUF limits"}
    #: An export whose GGUF failed verification is settled too: redoing it with the same inputs,
    #: types and thresholds fails the same way (the pipeline still exits 1).
    settled = ("complete", "failed_verification")

    def inputs(self, run: Path, settings: stages.Settings) -> dict:
        merge = manifest.stage(run, "merge") or {}
        found = {"merged": run / merge.get("merged_dir", "merge/merged"),
                 "types": planned(settings.quants or DEFAULT_TYPES),
                 "thresholds": verify.load_thresholds(settings.thresholds)}
        if settings.adapter_gguf and not adapter_export.not_applicable(run):
            found.update(adapter_export.inputs(run, settings.thresholds))
        return found

    def outputs(self, run: Path, settings: stages.Settings) -> list[Path]:
        out = run / "export"
        return [*(out / f"model-{q}.gguf" for q in planned(settings.quants or DEFAULT_TYPES)),
                *adapter_export.outputs(run, out, planned(settings.quants or DEFAULT_TYPES), settings.adapter_gguf),
                out / "export_report.json"]

    def reason(self, run: Path, changed: list[str], rec: dict, settings: stages.Settings) -> str:
        if "types" in changed:
            asked = planned(settings.quants or DEFAULT_TYPES)
            return f"it exported {', '.join(rec.get('files', {})) or 'nothing'}, this run asks for {', '.join(asked)}"
        if changed[0] in ("thresholds", "adapter_thresholds"):
            return "it was verified against other thresholds" + (f" than {settings.thresholds}" if settings.thresholds
                                                                 else " than the defaults")
        if changed[0] in adapter_export.INPUTS and changed[0] not in (rec.get("input_hashes") or {}):
            return "it wrote no adapter GGUF (this run ships one)"
        return super().reason(run, changed, rec, settings)

    def skipped(self, run: Path, rec: dict) -> tuple[str, int] | None:
        failed = [k for k, e in (rec.get("files") or {}).items() if not e.get("passed", True)]
        failed += ["adapter"] if not (rec.get("adapter") or {}).get("passed", True) else []
        if rec.get("status") != "failed_verification":
            return None
        return (f"skipped: verified before: {len(failed)} GGUF(s) failed ({', '.join(failed)}; same inputs, types "
                "and thresholds, so exporting again would fail the same way)", 1 if failed else 0)

    def run(self, run: Path, settings: stages.Settings) -> dict:
        return run_export(run, list(settings.quants or DEFAULT_TYPES), thresholds=settings.thresholds,
                          adapter_gguf=settings.adapter_gguf)

    def summary(self, run: Path, report: dict) -> str:
        adapter = report.get("adapter") or {}
        failed = [k for k, e in report["files"].items() if not e["passed"]]
        failed += ["adapter"] if not adapter.get("passed", True) else []
        notes = "".join(f"; {e['fallback_note']}" for e in report["files"].values() if e.get("fallback_note"))
        if failed:
            return (f"FAILED verification: {', '.join(failed)} (see {run / 'export' / 'export_report.json'}); "
                    f"evaluating and reporting anyway{notes}")
        shipped = [*report["files"], *(["adapter"] if adapter.get("passed") else [])]
        return f"{', '.join(shipped)} written and verified{notes}"


STAGE = ExportStage()
