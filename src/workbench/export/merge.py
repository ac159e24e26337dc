"""`workbench merge`: fold the run's LoRA adapter into its base and measure what changed.

Output dtype: the merged model is saved in the base checkpoint's stored dtype (a
bf16 base gives a bf16 merge; the built-in tiny default, stored in fp32, stays
fp32). The merge itself is computed in fp32 (base loaded in fp32, W + s·B·A, one
rounding to the stored dtype at save), so a 16-bit merge carries exactly one
rounding of the merged weight and the fp32 default none at all; the export stage
then makes its own f16/bf16 GGUFs from it.

Reference: every merged model is compared with the model the adapter was trained
with — the unmerged adapter on the base — on the same held-out ids (logit
difference, KL, top-1, perplexity). For a QLoRA run that base is the NF4-quantized
one (bitsandbytes, the run's compute dtype), and two merges are written: into the
original 16-bit weights (``merge/merged``, what export uses) and into the
dequantized NF4 weights (``merge/merged_from_nf4``), with the perplexity of each.

Each folder is written under a temp name and renamed when complete; the report
and the manifest record come last, so a failed merge leaves earlier stages intact.
"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from workbench import atomic, console, manifest, stages
from workbench.envinfo import versions
from workbench.errors import UserError
from workbench.models import load_base, load_nf4_base, with_adapter

from .compare import hf_logits, logit_metrics

_STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def log(msg: str) -> None:
    console.progress(f"[merge] {msg}", detail=True)


def base_model_path(run: Path, train: dict) -> Path:
    """The base checkpoint folder: the train record's base_model (relative to the run
    when it lies inside it), else the adapter's base_model_name_or_path when it is a
    local folder."""
    candidates = [train.get("base_model")]
    adapter_config = run / "adapter" / "adapter_config.json"
    if adapter_config.is_file():
        candidates.append(json.loads(adapter_config.read_text()).get("base_model_name_or_path"))
    for c in candidates:
        if c and isinstance(c, str) and manifest.resolve(run, c).is_dir():
            base = manifest.resolve(run, c)
            if not any(base.glob("*.safetensors")):
                raise UserError(f"base model {base} has no .safetensors weights; only safetensors are loaded — "
                                "convert the checkpoint to safetensors first.")
            return base.resolve()
    raise UserError(f"the run's base model is not a local folder (tried {', '.join(repr(c) for c in candidates)}); "
                    "merge runs offline and needs the base checkpoint on disk — restore it at that path.")


def stored_dtype(base: Path) -> str:
    """The floating dtype the base checkpoint's weights are stored in."""
    from safetensors import safe_open

    for f in sorted(base.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                dtype = fh.get_slice(name).get_dtype()
                if dtype in _STORED_DTYPES:
                    return _STORED_DTYPES[dtype]
    raise UserError(f"base model {base} has no float32/bfloat16/float16 weights to merge into.")


def require_adapter(run: Path) -> Path:
    """RUN/adapter, when it holds a safetensors PEFT adapter."""
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter} has no adapter_config.json + adapter_model.safetensors; "
                        "rerun `workbench train --run DIR` (only safetensors adapters are loaded).")
    return adapter


#: How many keys a coverage refusal names.
_NAMED = 3


def check_adapter_covers(adapter: Path, base: Path) -> None:
    """Refuse (UserError) an adapter that does not fit ``base`` exactly, before anything is
    merged: every linear layer of the base that its target_modules name must have its
    lora_A/lora_B pair, every adapter tensor must belong to a layer of the base, and the
    shapes must fit the layer (A: r x in, B: out x r). PEFT only warns about missing
    keys and leaves its random initialisation in their place."""
    import re

    from safetensors import safe_open

    from workbench.checks import check_safetensors

    try:
        acfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{adapter / 'adapter_config.json'} is not valid JSON ({err}); fix or re-save the "
                        "adapter.") from None
    check_safetensors(adapter / "adapter_model.safetensors")
    base_shapes = {}
    for f in sorted(base.glob("*.safetensors")):
        check_safetensors(f)
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                base_shapes[key] = list(fh.get_slice(key).get_shape())
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as fh:
        adapter_shapes = {key: list(fh.get_slice(key).get_shape()) for key in fh.keys()}

    targets = acfg.get("target_modules") or []
    exclude = acfg.get("exclude_modules") or []
    layers = acfg.get("layers_to_transform")
    layers = {layers} if isinstance(layers, int) else set(layers or [])

    def targeted(module: str) -> bool:
        def named(spec) -> bool:
            if isinstance(spec, str):
                return re.fullmatch(spec, module) is not None or module == spec or module.endswith("." + spec)
            return any(module == t or module.endswith("." + t) for t in spec)
        if not named(targets) or (exclude and named(exclude)):
            return False
        if layers:
            found = re.search(r"\.(\d+)\.", module)
            return found is not None and int(found.group(1)) in layers
        return True

    prefix = "base_model.model."
    expected = {}
    for key, shape in base_shapes.items():
        if key.endswith(".weight") and len(shape) == 2 and targeted(key[:-len(".weight")]):
            module = key[:-len(".weight")]
            expected[f"{prefix}{module}.lora_A.weight"] = ("A", shape)
            expected[f"{prefix}{module}.lora_B.weight"] = ("B", shape)
    missing = sorted(k for k in expected if k not in adapter_shapes)
    unexpected, wrong = [], []
    for key, shape in sorted(adapter_shapes.items()):
        if key in expected:
            part, (out_features, in_features) = expected[key]
            if len(shape) != 2 or (part == "A" and shape[1] != in_features) or (part == "B" and shape[0] != out_features):
                wrong.append(f"{key} {shape} (the base's layer is {out_features} x {in_features})")
        elif not (key.startswith(prefix) and key[len(prefix):] in base_shapes):
            unexpected.append(key)   # (a modules_to_save tensor names a tensor of the base)

    def few(keys) -> str:
        return ", ".join(keys[:_NAMED]) + (f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else "")

    fix = "merge it into the base it was trained on (--base FOLDER)"
    if missing:
        raise UserError(f"the adapter in {adapter} does not cover the base {base}: {len(missing)} LoRA tensor(s) "
                        f"of layers its target_modules name are missing ({few(missing)}); {fix}.")
    if unexpected:
        raise UserError(f"the adapter in {adapter} does not fit the base {base}: {len(unexpected)} tensor(s) name "
                        f"no layer of the base ({few(unexpected)}); {fix}.")
    if wrong:
        raise UserError(f"the adapter in {adapter} does not fit the base {base}: {len(wrong)} tensor(s) have the "
                        f"wrong shape ({few(wrong)}); {fix}.")


def dequantized_weights(nf4_model) -> dict:
    """{module name: fp32 weight} for every bitsandbytes 4-bit linear layer, dequantized
    with bitsandbytes itself (the exact values the QLoRA forward pass multiplies by)."""
    import bitsandbytes as bnb

    return {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()
            for name, m in nf4_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def save_merged(model, dtype: str, tok_dir: Path, final: Path) -> None:
    """save_pretrained (safetensors, in ``dtype``) + the run's tokenizer, written atomically as
    ``final``; a full disk or a refused write is one sentence."""
    import torch

    try:
        with atomic.directory(final) as tmp:
            model.to(getattr(torch, dtype)).save_pretrained(str(tmp), safe_serialization=True)
            for f in tok_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device while writing {final}; free space on {final.parent} "
                            "and rerun `workbench merge` (the earlier stages are untouched).") from None
        raise UserError(f"could not write {final} ({err.strerror or err}); check {final.parent} (free space, "
                        "permissions) and rerun `workbench merge` (the earlier stages are untouched).") from None


def _evaluate_saved(folder: Path, ref, wins, device: str) -> dict:
    """Metrics of the model as saved on disk (not the in-memory object that was saved)."""
    return logit_metrics(ref, hf_logits(load_base(folder, device), wins), wins)


def run_merge(run: str | Path) -> dict:
    """The merge stage; returns the report. The merged model is compared with the adapter
    on the run's held-out rows as training renders them (verify.heldout_windows: the ids
    the export stage and the qualify gates compare on too)."""
    from workbench.offline import enforce_offline

    enforce_offline()
    run = manifest.require_run(run)
    with manifest.lock(run):
        return _run_merge(run)


def _run_merge(run: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    train = manifest.require_stage(run, "train", "run `workbench train --run DIR` first, or bring your own adapter "
                                   "with `workbench merge --run DIR --adapter FOLDER --base FOLDER`.")
    adapter = require_adapter(run)
    tok_dir = run / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{tok_dir} has no tokenizer.json; the train stage writes it — rerun `workbench train`.")
    base = base_model_path(run, train)
    check_adapter_covers(adapter, base)
    found = STAGE.inputs(run, stages.Settings())
    dtype = stored_dtype(base)
    quant = train.get("quantization")
    if quant and quant.get("type") != "nf4":
        raise UserError(f"train record quantization type {quant.get('type')!r} is not supported; merge knows nf4 only.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    from . import verify

    rows, source = verify.heldout_rows(run)
    wins, window = verify.heldout_windows(tokenizer, json.loads((base / "config.json").read_text())
                                          ["max_position_embeddings"], rows)
    out_dir = run / "merge"
    for stale in out_dir.glob(".*.partial"):   # left by a killed merge (we hold the run's lock)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)

    if quant:
        log(f"reference: adapter on the NF4 base {base} (bitsandbytes, compute {quant.get('compute_dtype')})")
        nf4 = load_nf4_base(base, quant, device)
        deq = dequantized_weights(nf4)   # before PEFT wraps the layers (and renames them)
        ref = hf_logits(with_adapter(nf4, adapter), wins)
        del nf4
        reference = f"adapter on the NF4-quantized base (bitsandbytes, compute dtype {quant.get('compute_dtype')})"
    else:
        log(f"reference: adapter on the base {base} (fp32)")
        reference = "adapter on the base, unmerged, in fp32"

    peft_model = with_adapter(load_base(base, device), adapter)
    if not quant:
        ref = hf_logits(peft_model, wins)
    save_merged(peft_model.merge_and_unload(), dtype, tok_dir, out_dir / "merged")
    del peft_model
    report = {"base_model": manifest.relative(run, base), "dtype": dtype, "quantization": quant, "reference": reference,
              "eval": {"tokens": sum(len(w) for w in wins), "window": window, "ids_sha256": verify.ids_sha256(wins),
                       "text": verify.heldout_label(tokenizer, source)}}
    report["merged"] = _evaluate_saved(out_dir / "merged", ref, wins, device)
    outputs = [out_dir / "merged"]

    if quant:
        log("merging into the dequantized NF4 weights")
        model = load_base(base, device)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in deq.items():
                modules[name].weight.copy_(weight.to(device))
        save_merged(with_adapter(model, adapter).merge_and_unload(), dtype, tok_dir, out_dir / "merged_from_nf4")
        del model
        report["merged_from_nf4"] = _evaluate_saved(out_dir / "merged_from_nf4", ref, wins, device)
        a, b = report["merged"]["ppl"], report["merged_from_nf4"]["ppl"]
        report["nf4_vs_16bit"] = {"ppl_merged_16bit": a, "ppl_merged_from_nf4": b,
                                  "ppl_reference": report["merged"]["ppl_ref"], "ppl_rel_diff": a / b - 1.0}
        outputs.append(out_dir / "merged_from_nf4")

    atomic.write_json(out_dir / "merge_report.json", report)
    outputs.append(out_dir / "merge_report.json")
    for key in ("merged", "merged_from_nf4"):
        if key in report:
            m = report[key]
            log(f"{key}: KL mean {m['kl_mean']:.3g}, top-1 {m['top1_agreement']:.4f}, "
                f"max |dlogit| {m['max_abs_logit_diff']:.3g}, ppl {m['ppl']:.4g} vs {m['ppl_ref']:.4g}")
    stages.record(run, STAGE, None, {
        "dtype": dtype, "quantization": quant, "merged_dir": "merge/merged",
        "metrics": {k: report[k] for k in ("merged", "merged_from_nf4", "nf4_vs_16bit") if k in report},
        "versions": versions("torch", "transformers", "peft", "safetensors", "bitsandbytes", "parity-workbench"),
    }, found=found, outputs=outputs)
    return report


class MergeStage(stages.Stage):
    """Reads the train stage's adapter and tokenizer and the base it trained on; writes merge/."""

    name = "merge"
    upstream = {"adapter": "train", "tokenizer": "train", "base_model": "train"}
    labels = {"base_model": "base model"}

    def inputs(self, run: Path, settings: stages.Settings) -> dict:
        try:
            base = base_model_path(run, manifest.stage(run, "train") or {})
        except (UserError, OSError, ValueError):   # ValueError: an adapter_config.json that is not JSON
            base = None
        return {"adapter": run / "adapter", "tokenizer": run / "tokenizer", "base_model": base}

    def outputs(self, run: Path, settings: stages.Settings) -> list[Path]:
        nf4 = (manifest.stage(run, "train") or {}).get("quantization")
        return [run / "merge" / p for p in ("merged", *(["merged_from_nf4"] if nf4 else []), "merge_report.json")]

    def run(self, run: Path, settings: stages.Settings) -> dict:
        return run_merge(run)

    def summary(self, run: Path, report: dict) -> str:
        m = report["merged"]
        return f"KL mean {m['kl_mean']:.3g}, top-1 {m['top1_agreement']:.4f} vs the unmerged adapter"


STAGE = MergeStage()
