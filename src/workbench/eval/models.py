"""The models a run can be evaluated as, where each one's artifacts are, and how
each becomes an lm-eval LM.

    base      the base checkpoint the adapter was trained on (train record's base_model)
    adapter   the LoRA adapter on that base, as trained: on the NF4-quantized base for QLoRA
    merged    RUN/merge/merged (the merge stage)
    f16, bf16, q8_0, q4_k_m   RUN/export/model-<type>.gguf (the export stage), in llama.cpp

HF models run through lm-eval's HFLM, handed the already-loaded model (the base
is loaded once and then wrapped with the adapter); GGUFs run through
:class:`workbench.eval.gguf_lm.GGUFLM`. Every backend gets the same
``max_length`` (the merged, else the base, config's max_position_embeddings,
capped at ``MAX_LENGTH``) so that long inputs are cut into the same windows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workbench import manifest
from workbench.errors import UserError
from workbench.export import GGUF_TYPES

HF_KINDS = ("base", "adapter", "merged")
GGUF_KINDS = GGUF_TYPES
KINDS = HF_KINDS + GGUF_KINDS

#: Longest window evaluated: a long-context model's full context (e.g. 128k)
#: would need a KV cache far beyond what scoring short task documents requires.
MAX_LENGTH = 2048

#: HF batch size on the CPU and the GPU: the shipped tasks' documents are tens of tokens.
HF_BATCH_SIZE = 16


@dataclass
class Artifact:
    """Where one model kind lives in the run (``path``: a folder or a .gguf file)."""

    kind: str
    path: Path | None
    missing: str | None = None     # why it is unavailable, with the command that makes it
    note: str | None = None

    def hash(self) -> str:
        return manifest.hash_tree(self.path)


def parse_models(text: str | None) -> list[str] | None:
    """``--models`` as a list in pipeline order (None: every available model)."""
    if text is None:
        return None
    wanted = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in KINDS]
    if unknown or not wanted:
        raise UserError(f"unknown --models value(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(KINDS)}.")
    return [k for k in KINDS if k in wanted]


def locate(run: Path) -> dict[str, Artifact]:
    """Every model kind's artifact in ``run``, or why it is missing."""
    from workbench.export.merge import base_model_path

    found: dict[str, Artifact] = {}
    train = manifest.stage(run, "train")
    if not train or train.get("status") != "complete":
        why = "the run has no completed train stage (run `workbench train --run DIR`)"
        found.update({k: Artifact(k, None, why) for k in ("base", "adapter")})
    else:
        try:
            base = base_model_path(run, train)
            found["base"] = Artifact("base", base)
        except UserError as err:
            found["base"] = Artifact("base", None, str(err).rstrip("."))
        adapter = run / "adapter"
        if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
            found["adapter"] = Artifact("adapter", None, f"{adapter} has no adapter_config.json + "
                                        "adapter_model.safetensors (rerun `workbench train --run DIR`)")
        elif found["base"].path is None:
            found["adapter"] = Artifact("adapter", None, f"its base is unavailable: {found['base'].missing}")
        else:
            quant = train.get("quantization")
            note = "on the NF4 base (QLoRA, as trained)" if quant else None
            found["adapter"] = Artifact("adapter", adapter, note=note)

    merge = manifest.stage(run, "merge")
    merged = run / (merge or {}).get("merged_dir", "merge/merged")
    if not merge or merge.get("status") != "complete" or not (merged / "config.json").is_file():
        found["merged"] = Artifact("merged", None, "no merged model yet (run `workbench merge --run DIR`)")
    else:
        found["merged"] = Artifact("merged", merged)

    export = manifest.stage(run, "export") or {}
    files = export.get("files", {})
    for kind in GGUF_KINDS:
        entry = files.get(kind)
        path = run / entry["path"] if entry else None
        if path is None or not path.is_file():
            found[kind] = Artifact(kind, None, f"no {kind} GGUF yet (run `workbench export --run DIR --quant {kind}`)")
        else:
            note = None if entry.get("passed", True) else "failed the export stage's verification"
            found[kind] = Artifact(kind, path, note=note)
    return found


def max_length(artifacts: dict[str, Artifact]) -> int | None:
    """The shared window length: the merged (else base) config's
    max_position_embeddings, capped at MAX_LENGTH; None when neither folder is
    there (each GGUF then uses its own trained context)."""
    for kind in ("merged", "base"):
        a = artifacts.get(kind)
        if a and a.path is not None and (a.path / "config.json").is_file():
            config = json.loads((a.path / "config.json").read_text())
            limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
                "max_position_embeddings")
            if limit:
                return min(int(limit), MAX_LENGTH)
    return None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype():
    """fp32 on the CPU (exact reference numbers); bf16 on a GPU that has it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(run: Path):
    from transformers import AutoTokenizer

    folder = run / "tokenizer"
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"{folder} has no tokenizer; the train stage writes it - rerun `workbench train --run DIR`.")
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(), use_safetensors=True,
                                                trust_remote_code=False).to(_device()).eval()


def adapter_model(run: Path, base_path: Path, train: dict, base_model=None):
    """The run's adapter on its base as trained: on ``base_model`` (loaded from
    ``base_path`` if not given; modified in place), or, for a QLoRA run, on the
    base quantized to NF4 the way the train record says."""
    from workbench.models import load_nf4_base, with_adapter

    quant = train.get("quantization")
    if quant:
        base_model = load_nf4_base(base_path, quant, _device())
    elif base_model is None:
        base_model = load_hf(base_path)
    return with_adapter(base_model, run / "adapter")


def hflm(model, tokenizer, length: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, device=_device(), batch_size=HF_BATCH_SIZE, max_length=length)


def gguflm(path: Path, length: int | None):
    from .gguf_lm import GGUFLM

    return GGUFLM(str(path), max_length=length)
