"""Write a PEFT LoRA adapter as a GGUF LoRA adapter, the file llama.cpp (``--lora``,
llama-cpp-python's ``lora_path``) and Ollama (``ADAPTER``) apply to a base GGUF at load time.

What the file holds (llama.cpp's conventions, as its ``convert_lora_to_gguf.py``
writes them and ``llama_adapter_lora_init`` checks them):

* metadata: ``general.architecture`` = the base GGUF's arch (llama.cpp refuses an
  adapter of another arch), ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha`` (float32), ``general.file_type``, ``general.name``; no
  hyperparameters or vocabulary (those are the base GGUF's);
* for every adapted linear layer, two tensors named after the base GGUF's tensor,
  ``blk.0.attn_q.weight.lora_a`` and ``blk.0.attn_q.weight.lora_b``. The names come
  from the same gguf-py ``TensorNameMap`` as our merged-model writer
  (:func:`workbench.export.gguf_writer.name_map`), so adapter and base agree by
  construction;
* layout: PEFT's matrices as they are, A ``[r, in]`` and B ``[out, r]`` (numpy order;
  in GGML's ``ne`` order A is ``[in, r]`` and B ``[r, out]``), which is what llama.cpp
  checks (``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]``, ``a.ne[1] == b.ne[0]``);
* the LoRA scaling is **not** folded in: llama.cpp multiplies ``B (A x)`` by
  ``alpha / r`` with r read from each tensor pair, which is PEFT's ``lora_alpha / r``
  when the stored alpha is PEFT's ``lora_alpha``. rsLoRA (PEFT: ``alpha / sqrt(r)``)
  stores ``alpha * sqrt(r)``, which needs a single rank;
* the same transforms as the base weights: for the ``llama`` GGUF arch the q/k rows
  are reordered for llama.cpp's rope (``permute_rope_rows``). That reorders the rows
  of ``B A``, i.e. the rows of B; A (the input side) is unchanged;
* f16 (default) or f32 tensors; a value that overflows f16 is refused.

Refused with one sentence (never exported wrong): DoRA, trained biases
(``bias != "none"``), per-module alphas (``alpha_pattern``; the file has one alpha),
rsLoRA with per-module ranks, LoRA on the embeddings (llama.cpp stores those
transposed) or on a tied lm_head (the base GGUF has no output tensor), full
``modules_to_save`` weights, and any adapter tensor that is not a lora_A/lora_B pair
of a base weight of the right shape.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from workbench.errors import UserError

from . import archs, gguf_writer

TYPES = ("f16", "f32")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


def read_config(adapter: Path) -> dict:
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{adapter / 'adapter_config.json'} is not readable JSON ({err}); re-save the adapter.") \
            from None
    if not isinstance(cfg, dict):
        raise UserError(f"{adapter / 'adapter_config.json'} is not a JSON object; re-save the adapter.")
    return cfg


def _refuse(what: str) -> UserError:
    return UserError(f"this adapter cannot be written as a GGUF LoRA adapter: {what}; ship the merged GGUFs "
                     "instead (workbench export without --adapter-gguf).")


def check_config(cfg: dict) -> None:
    """Refuse what llama.cpp's LoRA format cannot carry."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _refuse(f"it is a {cfg.get('peft_type')} adapter, not LoRA")
    if cfg.get("use_dora"):
        raise _refuse("it is DoRA (use_dora), whose magnitude vectors llama.cpp does not apply")
    if cfg.get("bias", "none") != "none":
        raise _refuse(f"it trains biases (bias={cfg.get('bias')!r}), which the format has no place for")
    if cfg.get("alpha_pattern"):
        raise _refuse("it has per-module alphas (alpha_pattern); the format stores one alpha")
    if cfg.get("use_rslora") and cfg.get("rank_pattern"):
        raise _refuse("it is rsLoRA with per-module ranks (rank_pattern); one stored alpha cannot give "
                      "alpha/sqrt(r) for several r")
    if cfg.get("fan_in_fan_out"):
        raise _refuse("its layers store transposed weights (fan_in_fan_out)")
    if cfg.get("modules_to_save"):
        raise _refuse(f"it carries full weights of {', '.join(cfg['modules_to_save'])} (modules_to_save)")


def _pairs(adapter: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{HF weight name (e.g. model.layers.0.self_attn.q_proj.weight): {"A": tensor, "B": tensor}}."""
    from safetensors import safe_open

    from workbench.checks import check_safetensors

    path = adapter / "adapter_model.safetensors"
    check_safetensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():
            m = _KEY.match(key)
            if m is None:
                what = "LoRA on the embeddings" if "lora_embedding" in key else f"the tensor {key!r}, not a " \
                    "lora_A/lora_B weight"
                raise _refuse(f"it holds {what}")
            pairs.setdefault(m["module"] + ".weight", {})[m["which"]] = fh.get_tensor(key).to(torch.float32)
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise _refuse(f"{name} has lora_{'B' if 'A' in pair else 'A'} missing")
    if not pairs:
        raise _refuse("it holds no LoRA tensors")
    return pairs


def base_shapes(base: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                shapes[key] = list(fh.get_slice(key).get_shape())
    return shapes


def tensors(adapter: Path, config: dict, shapes: dict[str, list[int]]):
    """(gguf name, A, B, hf name) per adapted layer, transformed for llama.cpp."""
    family, arch = archs.arch_for(config)
    names = gguf_writer.name_map(config)
    tied = config.get("tie_word_embeddings", family in ("gemma", "gemma2"))
    n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    out = []
    for hf_name, pair in sorted(_pairs(adapter).items(), key=lambda kv: _layer_order(kv[0])):
        a, b = pair["A"], pair["B"]
        if hf_name == "lm_head.weight" and tied:
            raise _refuse("it adapts lm_head, which this base ties to the embeddings (its GGUF has no output "
                          "tensor to apply it to)")
        if "embed_tokens" in hf_name:
            raise _refuse("it holds LoRA on the embeddings")
        if hf_name not in shapes:
            raise _refuse(f"it adapts {hf_name}, which the base model does not have (another base?)")
        out_dim, in_dim = shapes[hf_name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
            raise _refuse(f"{hf_name} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not fit the base "
                          f"weight [{out_dim}, {in_dim}] (another base?)")
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise _refuse(f"{hf_name} has no GGUF name for the {family} architecture")
        if arch.permute_qk and ".self_attn.q_proj." in hf_name:
            b = gguf_writer.permute_rope_rows(b, config["num_attention_heads"])
        elif arch.permute_qk and ".self_attn.k_proj." in hf_name:
            b = gguf_writer.permute_rope_rows(b, n_kv)
        out.append((name, a, b, hf_name))
    return out


def _layer_order(name: str):
    m = re.search(r"\.layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def stored_alpha(cfg: dict, ranks: set[int]) -> float:
    """adapter.lora.alpha such that llama.cpp's alpha / r equals PEFT's scaling."""
    alpha = float(cfg.get("lora_alpha") or cfg.get("r") or 8)
    if cfg.get("use_rslora"):
        if len(ranks) != 1:
            raise _refuse("it is rsLoRA with several ranks")
        alpha *= math.sqrt(next(iter(ranks)))
    return alpha


def _array(t: torch.Tensor, out_type: str, name: str) -> np.ndarray:
    if out_type == "f32":
        return t.to(torch.float32).contiguous().numpy()
    half = t.to(torch.float16)
    if not torch.isfinite(half).all():
        raise UserError(f"{name} does not fit in float16 (it overflows to inf); write the adapter in f32 instead.")
    return half.contiguous().numpy()


def write(adapter: str | Path, base: str | Path, out_path: str | Path, out_type: str = "f16") -> dict:
    """Write ``adapter`` (a PEFT folder) as a GGUF LoRA adapter for ``base`` (the HF
    checkpoint it was trained on) at ``out_path``. Returns facts for the report."""
    import gguf

    if out_type not in TYPES:
        raise ValueError(f"out_type must be one of {TYPES}")
    adapter, base, out_path = Path(adapter), Path(base), Path(out_path)
    cfg = read_config(adapter)
    check_config(cfg)
    config = json.loads((base / "config.json").read_text())
    archs.check_exportable(config)
    _, arch = archs.arch_for(config)
    rows = tensors(adapter, config, base_shapes(base))
    ranks = {int(a.shape[0]) for _, a, _, _ in rows}
    alpha = stored_alpha(cfg, ranks)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.ALL_F32

    with gguf_writer.gguf_file(out_path, arch, "workbench export --adapter-gguf") as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(f"{adapter.name} (LoRA adapter of {base.name})")
        writer.add_file_type(ftype)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, a, b, _ in rows:
            writer.add_tensor(f"{name}.lora_a", _array(a, out_type, f"{name}.lora_a"))
            writer.add_tensor(f"{name}.lora_b", _array(b, out_type, f"{name}.lora_b"))
    return {"gguf_arch": writer.arch, "type": out_type, "alpha": alpha, "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora")), "ranks": sorted(ranks), "layers": len(rows),
            "tensors": 2 * len(rows), "targets": sorted({h.split(".")[-2] for _, _, _, h in rows})}
