"""Tiny run directories for the merge/export tests, following the run-dir contract.

``build_run`` writes what the train stage leaves behind (RUN/base, RUN/adapter with a
non-zero LoRA B, RUN/tokenizer, a "train" manifest record); ``build_merged_run``
writes what the merge stage leaves behind (RUN/merge/merged + a "merge" record)
without running it, for the export tests that do not need a real merge.

Weights use initializer_range 0.1 (not transformers' 0.02): with 0.02 the logits
span ~0.6 and attention is nearly uniform, so a wrong rope layout moves logits by
only ~0.007 and would pass any sane threshold; with 0.1 they span ~3.6 and the same
mistake gives KL ~0.1 against ~5e-7 for a correct f16 export (measured on
verify.heldout_windows; 0.13 on the former plain-text windows). Larger
ranges make the random network chaotic (q4_k_m KL ~0.1 at 0.2). Norm weights are
jittered so that Gemma's ``1 + w`` convention is exercised too.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.offline import enforce_offline

enforce_offline()

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokenizer():
    from workbench.tokenizer import default_tokenizer

    return default_tokenizer()


def tiny_config(family: str, vocab_size: int, **overrides):
    """workbench.families' tiny config with this module's initializer range."""
    from workbench.families import tiny_config as family_tiny_config

    return family_tiny_config(family, vocab_size, **{"initializer_range": 0.1, **overrides})


def tiny_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _record(run: Path, name: str, record: dict) -> None:
    from workbench import manifest

    manifest.record_stage(run, name, record)


def build_run(root: Path, family: str = "qwen2", *, qlora: bool = False, dtype: torch.dtype = torch.float32,
              seed: int = 0, **config_overrides) -> Path:
    """RUN as the train stage leaves it: base (safetensors), adapter, tokenizer, train record."""
    from peft import LoraConfig, get_peft_model

    from workbench import manifest

    run = Path(root)
    tok = tokenizer()
    model = tiny_model(tiny_config(family, config_overrides.pop("vocab_size", len(tok)), **config_overrides), seed)
    model.to(dtype).save_pretrained(run / "base")
    tok.save_pretrained(run / "tokenizer")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    peft_model = get_peft_model(model.float(), lora)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:   # PEFT initialises B to zero: the adapter would be a no-op
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(run / "adapter")
    adapter_config = run / "adapter" / "adapter_config.json"
    cfg = json.loads(adapter_config.read_text())
    cfg["base_model_name_or_path"] = str((run / "base").resolve())
    adapter_config.write_text(json.dumps(cfg, indent=2))
    quant = {"type": "nf4", "double_quant": True, "compute_dtype": "float32"} if qlora else None
    _record(run, "train", {
        "base_model": str((run / "base").resolve()), "quantization": quant, "family": family,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS, "use_rslora": False},
        "dataset": {"name": "test fixture"},
        "outputs": manifest.outputs_record(run, [run / "adapter", run / "tokenizer"]),
    })
    return run


def build_merged_run(root: Path, family: str = "qwen2", *, tok=None, seed: int = 0, **config_overrides) -> Path:
    """RUN as the merge stage leaves it (a plain tiny model stands in for the merge)."""
    from workbench import manifest

    run = Path(root)
    tok = tok or tokenizer()
    merged = run / "merge" / "merged"
    tiny_model(tiny_config(family, config_overrides.pop("vocab_size", len(tok)), **config_overrides), seed).save_pretrained(merged)
    tok.save_pretrained(merged)
    _record(run, "merge", {"merged_dir": "merge/merged", "outputs": manifest.outputs_record(run, [merged])})
    return run


def heldout() -> str:
    from workbench.synthetic import heldout_text

    return heldout_text()
