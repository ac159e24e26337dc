"""The export stage's adapter part: the LoRA adapter as a GGUF LoRA file, the base
GGUFs it is applied to, its numeric verification in llama.cpp, and the Ollama
Modelfiles of every shipped GGUF.

Files (all in RUN/export/, each written under a temp name and renamed):

    base-f16.gguf, base-q8_0.gguf   the run's base model (our writer; q8_0 by llama.cpp's quantizer)
    adapter-f16.gguf                the adapter (workbench.export.adapter_gguf)
    adapter-f16.Modelfile           FROM ./base-f16.gguf + ADAPTER ./adapter-f16.gguf
    model-<type>.Modelfile          FROM ./model-<type>.gguf, one per merged GGUF

Verification: llama.cpp (llama-cpp-python, CPU) loads each base GGUF with the adapter
applied (``Llama(model_path=base, lora_path=adapter)``) and its logits on the export
stage's held-out windows are compared with the HF model the adapter was trained as
— the PEFT adapter on its 16-bit base, unmerged, in fp32 — with the merged GGUFs'
metrics (KL, top-1, perplexity delta). The same base GGUF *without* the adapter is
measured too, so the report shows what the adapter changes against how closely
llama.cpp reproduces it. A QLoRA adapter is compared on its 16-bit base (what the
GGUF base is), not the NF4 base it was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

from workbench import atomic, console, manifest
from workbench.errors import UserError

from . import adapter_gguf, archs, gguf_writer, modelfile, quantize, verify

ADAPTER_FILE = "adapter-f16.gguf"
BASE_TYPES = ("f16", "q8_0")
#: Written by this module; removed when an export does not write them again.
OWN_GLOBS = ("base-*.gguf", "adapter-*.gguf", "*.Modelfile")

#: Limits per base GGUF type, on llama.cpp's logits of base + adapter against the HF
#: adapter on its base (fp32). Measured with llama-cpp-python 0.3.36 on the CPU, on the
#: merged GGUFs' ids (verify.heldout_windows: 512 tokens of the held-out rows as
#: training tokenizes them, one window per row):
#:
#:                      KL mean   top-1   ppl delta   (without the adapter: KL)
#:   the built-in default run (tiny llama, hidden 256, r 16, 800 steps), f16 adapter:
#:     base f16         2.2e-6    0.997   +4.8e-5     (5.18)
#:     base q8_0        4.2e-4    0.997   +7.2e-3     (5.18)
#:   tiny llama test run (tests/_export_run.py, hidden 64, r 4, random B):
#:     base f16         3.9e-7    0.997   +3.0e-5     (0.18)
#:     base q8_0        2.6e-4    0.967   -2.7e-3     (0.18)
#:
#: i.e. the merged GGUFs' errors (verify.DEFAULT_THRESHOLDS documents those): the
#: adapter adds no error of its own beyond f16 rounding of A and B. The limits are
#: the merged GGUFs' of the same base type; a conversion mistake is orders of
#: magnitude above them (measured on the f16 base, tests/test_adapter_gguf.py plants
#: both: B scaled by 10, KL 0.62 and top-1 0.003 on the test run, 5.4 and 0.19 on the
#: default; q/k rows of B not reordered for the llama rope, KL 0.038 and top-1 0.55 on
#: the test run, 2.8 and 0.51 on the default).
DEFAULT_THRESHOLDS = {kind: dict(verify.DEFAULT_THRESHOLDS[kind]) for kind in BASE_TYPES}

def log(msg: str) -> None:
    console.progress(f"[export] {msg}", detail=True)


def load_thresholds(path: str | Path | None) -> dict:
    """DEFAULT_THRESHOLDS with a --thresholds file's ``adapter:`` mapping (base type -> {metric: limit}) on top."""
    import math

    from workbench.config import read_yaml_file

    limits = {k: dict(v) for k, v in DEFAULT_THRESHOLDS.items()}
    if path is None:
        return limits
    data = read_yaml_file(Path(path), "thresholds file", "pass a readable YAML mapping.")
    extra = data.get("adapter") if isinstance(data, dict) else None
    if extra is None:
        return limits
    metrics = set(verify.DEFAULT_THRESHOLDS["f16"])
    if not isinstance(extra, dict) or any(k not in BASE_TYPES or not isinstance(v, dict) or set(v) - metrics
                                          for k, v in extra.items()):
        raise UserError(f"thresholds file {path}: adapter must map a base GGUF type ({', '.join(BASE_TYPES)}) to "
                        f"{{metric: limit}} with metrics {', '.join(sorted(metrics))}.")
    for kind, values in extra.items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (key == "top1_agreement" and value > 1):
                raise UserError(f"thresholds file {path}: adapter.{kind}.{key} must be a finite number >= 0"
                                + (" and at most 1 (a fraction)" if key == "top1_agreement" else "")
                                + f", got {value!r}.")
            limits[kind][key] = float(value)
    return limits


def not_applicable(run: Path) -> str | None:
    """Why this run has no adapter to export (a merged model the user brought), or None."""
    train = manifest.stage(run, "train")
    if train is None:
        return "the run has no adapter (the merged model was brought with `workbench export --merged`)"
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        return f"{adapter} holds no PEFT adapter (adapter_config.json + adapter_model.safetensors)"
    return None


def _base(run: Path) -> Path:
    from .merge import base_model_path

    return base_model_path(run, manifest.stage(run, "train") or {})


#: The export stage's inputs when it writes the adapter GGUF (:func:`inputs`).
INPUTS = ("adapter", "base_model", "adapter_thresholds")


def inputs(run: Path, thresholds: str | Path | None) -> dict:
    """What the adapter GGUF is made from and verified against (the export stage declares these
    when it writes one): the adapter, its base model (None when unavailable) and the limits."""
    try:
        base = _base(run)
    except UserError:
        base = None
    return {"adapter": run / "adapter", "base_model": base, "adapter_thresholds": load_thresholds(thresholds)}


def outputs(run: Path, out: Path, types: list[str], wanted: bool) -> list[Path]:
    """The files this module writes into ``out``: a Modelfile per merged GGUF, and with the adapter
    GGUF its base GGUFs and its Modelfile."""
    paths = [out / f"model-{t}.Modelfile" for t in types]
    if wanted and not not_applicable(run):
        paths += [out / ADAPTER_FILE, *(out / f"base-{t}.gguf" for t in BASE_TYPES),
                  out / f"{Path(ADAPTER_FILE).stem}.Modelfile"]
    return paths


def refuse_early(run: Path) -> None:
    """Check before anything is written that the adapter can be exported (UserError otherwise)."""
    cfg = adapter_gguf.read_config(run / "adapter")
    adapter_gguf.check_config(cfg)
    base = _base(run)
    config = json.loads((base / "config.json").read_text())
    archs.check_exportable(config)
    adapter_gguf.tensors(run / "adapter", config, adapter_gguf.base_shapes(base))


def export(run: Path, out: Path, thresholds: str | Path | None) -> tuple[dict, dict, list[Path]]:
    """Write and verify the adapter GGUF and its base GGUFs. Returns (the export report's
    "adapter" section, the manifest record's "adapter" entry, the files written)."""
    limits = load_thresholds(thresholds)
    adapter = run / "adapter"
    base = _base(run)
    bases = {}
    log(f"writing base-f16.gguf (the base model {manifest.relative(run, base)}, for the adapter)")
    bases["f16"] = out / "base-f16.gguf"
    gguf_writer.write(base, bases["f16"], "f16", tokenizer_dir=run / "tokenizer")
    log("quantizing base-f16.gguf -> base-q8_0.gguf (llama.cpp)")
    bases["q8_0"] = out / "base-q8_0.gguf"
    quantize.quantize(bases["f16"], bases["q8_0"], "q8_0")
    path = out / ADAPTER_FILE
    log(f"writing {path.name} (the LoRA adapter, llama.cpp's GGUF LoRA format)")
    facts = adapter_gguf.write(adapter, base, path, "f16")
    checks = verify_adapter(run, base, path, bases, limits)
    section = {"file": path.name, "bytes": path.stat().st_size, **facts,
               "reference": "the PEFT adapter on its base in transformers, unmerged, fp32"
                            + (" (the 16-bit base: the adapter was trained on its NF4 quantization)"
                               if (manifest.stage(run, "train") or {}).get("quantization") else ""),
               "thresholds": limits, "bases": checks["bases"], "eval": checks["eval"],
               "passed": all(b["passed"] for b in checks["bases"].values())}
    record = {"path": manifest.relative(run, path), **manifest.file_record(path), "type": "f16",
              "alpha": facts["alpha"], "ranks": facts["ranks"], "passed": section["passed"],
              "bases": {kind: {"path": manifest.relative(run, p), **manifest.file_record(p),
                               "llama_cpp": checks["bases"][kind]["llama_cpp"],
                               "passed": checks["bases"][kind]["passed"]} for kind, p in bases.items()}}
    return section, record, [path, *bases.values()]


def verify_adapter(run: Path, base: Path, path: Path, bases: dict, limits: dict) -> dict:
    """llama.cpp with the adapter on each base GGUF against the HF adapter on its base, on the
    merged GGUFs' held-out windows (verify.heldout_windows)."""
    import torch
    from transformers import AutoTokenizer

    from .compare import hf_logits, logit_metrics
    from workbench.models import load_base, with_adapter

    tokenizer = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    config = json.loads((base / "config.json").read_text())
    rows, source = verify.heldout_rows(run)
    wins, window = verify.heldout_windows(tokenizer, config["max_position_embeddings"], rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = hf_logits(with_adapter(load_base(base, device), run / "adapter"), wins)
    out = {}
    for kind, base_path in bases.items():
        llm = verify.LlamaCpp(base_path, n_ctx=max(len(w) for w in wins), lora_path=path)
        try:
            m = logit_metrics(ref, llm.logits(wins), wins)
        finally:
            llm.close()
        plain = verify.LlamaCpp(base_path, n_ctx=max(len(w) for w in wins))
        try:
            without = logit_metrics(ref, plain.logits(wins), wins)
        finally:
            plain.close()
        problems = [f"llama.cpp {p}" for p in verify.failures(m, limits[kind])]
        out[kind] = {"file": base_path.name, "bytes": base_path.stat().st_size, "llama_cpp": m,
                     "without_adapter": {k: without[k] for k in ("kl_mean", "top1_agreement", "ppl")},
                     "failures": problems, "passed": not problems}
        log(f"{path.name} on {base_path.name}: KL mean {m['kl_mean']:.3g}, top-1 {m['top1_agreement']:.4f}, "
            f"ppl delta {m['ppl_rel_delta']:+.2e} (without the adapter: KL {without['kl_mean']:.3g})"
            + ("" if not problems else f"  FAILED: {'; '.join(problems)}"))
    return {"bases": out, "eval": {"tokens": sum(len(w) for w in wins), "window": window,
                                   "ids_sha256": verify.ids_sha256(wins),
                                   "text": verify.heldout_label(tokenizer, source)}}


def write_modelfiles(run: Path, out: Path, files: dict[str, Path], merged: Path, adapter: dict | None) -> dict:
    """One Modelfile per merged GGUF (and the adapter's); returns {kind: path} plus the template's note."""
    from transformers import AutoTokenizer

    from workbench.eval import suite

    tok = AutoTokenizer.from_pretrained(str(merged))
    rows, _ = suite.load_test_rows(run, manifest.stage(run, "train"))
    translation = modelfile.translate(tok, rows, add_bos=bool(getattr(tok, "add_bos_token", False)))
    config = json.loads((merged / "config.json").read_text())
    common = {"num_ctx": config.get("max_position_embeddings"), "max_new_tokens": suite.max_new_tokens(run)}
    written = {}
    for kind, path in files.items():
        text = modelfile.render(path.name, translation, what=f" (the merged model, {kind})", **common)
        written[kind] = atomic.write_text(out / f"{path.stem}.Modelfile", text)
    if adapter is not None:
        q8 = (adapter.get("bases") or {}).get("q8_0") or {}
        notes = (f"{q8['file']} (smaller) was verified with this adapter too (KL "
                 f"{q8['llama_cpp']['kl_mean']:.2g}, top-1 {q8['llama_cpp']['top1_agreement']:.3f} against the HF "
                 "adapter); change FROM to use it.",) if q8.get("passed") else ()
        text = modelfile.render("base-f16.gguf", translation, adapter=adapter["file"],
                                what=" on the base model's f16 GGUF", notes=notes, **common)
        written["adapter"] = atomic.write_text(out / f"{Path(adapter['file']).stem}.Modelfile", text)
    log(f"Ollama Modelfiles: {', '.join(p.name for p in written.values())}"
        + ("" if translation.template else f" (no TEMPLATE: {translation.note})"))
    return {"files": written, "template": translation.template is not None, "template_note": translation.note,
            "stops": translation.stops}


def remove_stale(out: Path, keep: list[Path]) -> None:
    """Remove this module's files that the export did not write this time (we hold the run's lock)."""
    keep_names = {p.name for p in keep}
    for pattern in OWN_GLOBS:
        for p in out.glob(pattern):
            if p.name not in keep_names:
                p.unlink(missing_ok=True)


def extend(run: Path, out: Path, merged: Path, files: dict[str, Path], report: dict, adapter_gguf_wanted: bool,
           thresholds) -> tuple[dict, list[Path]]:
    """The export stage's additions: the adapter GGUF (when wanted and the run has an
    adapter) and the Modelfiles. Updates ``report`` in place (its "adapter" and
    "modelfiles" sections, and "passed"); returns the manifest record's extra keys
    and the extra output files."""
    record, paths = {}, []
    section = None
    if adapter_gguf_wanted:
        why = not_applicable(run)
        if why:
            log(f"no adapter GGUF: {why}")
            report["adapter"] = {"skipped": why}
        else:
            section, record["adapter"], paths = export(run, out, thresholds)
            report["adapter"] = section
            report["passed"] = report["passed"] and section["passed"]
    mf = write_modelfiles(run, out, files, merged, section)
    report["modelfiles"] = {"files": {k: p.name for k, p in mf["files"].items()}, "template": mf["template"],
                            "template_note": mf["template_note"], "stops": mf["stops"]}
    record["modelfiles"] = {k: manifest.relative(run, p) for k, p in mf["files"].items()}
    paths += list(mf["files"].values())
    remove_stale(out, paths)
    return record, paths


def summary_lines(report: dict) -> list[str]:
    """What `workbench export` prints about the adapter GGUF and the Modelfiles."""
    lines = []
    section = report.get("adapter") or {}
    if section.get("skipped"):
        lines.append(f"adapter GGUF: not written ({section['skipped']})")
    elif section:
        for kind, b in section["bases"].items():
            m = b["llama_cpp"]
            status = "ok" if b["passed"] else "FAILED: " + "; ".join(b["failures"])
            lines.append(f"{section['file']} on {b['file']}: {status} (KL {m['kl_mean']:.2g}, top-1 "
                         f"{m['top1_agreement']:.3f} against the HF adapter)")
    mf = report.get("modelfiles") or {}
    if mf:
        lines.append(f"Ollama Modelfiles: {', '.join(mf['files'].values())}"
                     + ("" if mf.get("template") else f" (no TEMPLATE: {mf.get('template_note')})"))
    return lines
