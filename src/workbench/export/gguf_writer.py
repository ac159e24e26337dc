"""Write a merged HF checkpoint (safetensors) as a 16-bit GGUF with gguf-py's GGUFWriter.

Tensor names come from gguf-py's ``TensorNameMap`` for the arch; the per-arch
transforms (rope row order, Gemma's ``1 + w`` norms, tied embeddings) are the ones
``archs`` describes. 1-D tensors (norms, biases) stay fp32 as llama.cpp expects; every
matrix is stored in the requested 16-bit type. The file is written under a temp
name in the same folder and renamed only when complete, so a killed or failed
write (e.g. a full disk) never leaves a finished-looking GGUF.
"""
from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path

import numpy as np
import torch

from workbench import atomic, export
from workbench.errors import UserError

from . import archs, vocab

#: GGUF output types this writer produces directly (the quantized ones come from llama.cpp).
FLOAT_TYPES = export.FLOAT_TYPES


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's halves layout (x0..x{d/2-1}, y0..y{d/2-1})
    to llama.cpp's adjacent pairs (x0, y0, x1, y1, ...). Works for weights and biases."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _to_numpy(t: torch.Tensor, out_type: str):
    """(array, raw GGML type or None) for one tensor."""
    import gguf

    if t.ndim == 1:
        return t.to(torch.float32).numpy(), None
    if out_type == "f16":
        half = t.to(torch.float16)
        if not torch.isfinite(half).all():
            raise UserError("a weight does not fit in float16 (it overflows to inf); export bf16 instead "
                            "(--quant bf16,...), which keeps fp32's range.")
        return half.numpy(), None
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def name_map(config: dict):
    """gguf-py's HF -> GGUF tensor-name map for this checkpoint (shared with the LoRA adapter writer)."""
    import gguf

    _, arch = archs.arch_for(config)
    return gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, arch.gguf_arch), config["num_hidden_layers"])


def _tensors(merged: Path, config: dict):
    """(gguf name, tensor) pairs in file order, transformed for llama.cpp."""
    from safetensors import safe_open

    family, arch = archs.arch_for(config)
    names = name_map(config)
    files = sorted(merged.glob("*.safetensors"))
    if not files:
        raise UserError(f"{merged} has no .safetensors weights; rerun `workbench merge`.")
    tied = config.get("tie_word_embeddings", family in ("gemma", "gemma2"))
    n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    offset = archs.norm_offset(family)
    seen_output = False
    for path in files:
        with safe_open(path, framework="pt") as fh:
            for hf_name in fh.keys():
                if tied and hf_name == "lm_head.weight":
                    continue   # llama.cpp reuses token_embd when output.weight is absent
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue   # a buffer some older checkpoints saved; llama.cpp computes rope itself
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"tensor {hf_name!r} has no GGUF name for the {family} architecture; "
                                    "this checkpoint has parts the exporter does not know.")
                t = fh.get_tensor(hf_name).to(torch.float32)
                if arch.permute_qk and ".self_attn.q_proj." in hf_name:
                    t = permute_rope_rows(t, config["num_attention_heads"])
                elif arch.permute_qk and ".self_attn.k_proj." in hf_name:
                    t = permute_rope_rows(t, n_kv)
                if offset and hf_name.endswith("norm.weight"):
                    t = t + offset
                seen_output |= name == "output.weight"
                yield name, t
    if not tied and not seen_output:
        raise UserError(f"{merged} has no lm_head.weight although config.json says the embeddings are not tied.")


def no_space(err: OSError) -> bool:
    """A full disk, also where numpy's short write ("N requested and M written") carries no errno."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or (
        err.errno is None and "requested and" in str(err) and "written" in str(err))


def write_error(err: OSError, path: Path, command: str) -> UserError:
    """One sentence for an OSError while writing ``path`` (the temp file is already gone)."""
    if no_space(err):
        return UserError(f"no space left on the device while writing {path.name}; free space on {path.parent} and "
                         f"rerun `{command}` (no partial file was kept).")
    return UserError(f"could not write {path.name} ({err.strerror or err}); check {path.parent} (permissions, free "
                     f"space) and rerun `{command}` (no partial file was kept).")


@contextlib.contextmanager
def gguf_file(out_path: Path, arch, command: str):
    """A GGUFWriter for ``out_path`` (``arch``: an archs entry): the block adds metadata and
    tensors; on leaving it the file is written through :func:`workbench.atomic.file`, so a
    failure (a full disk included) leaves no partial file under the final name."""
    import gguf

    try:
        with atomic.file(out_path) as tmp:
            writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
            try:
                yield writer
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file(progress=False)
                writer.close()
            except BaseException:
                with contextlib.suppress(OSError):   # closing flushes, and a full disk refuses that too
                    writer.close()
                raise
    except OSError as err:
        raise write_error(err, out_path, command) from None


def write(merged: str | Path, out_path: str | Path, out_type: str, tokenizer_dir: str | Path | None = None) -> dict:
    """Write ``merged`` (a HF checkpoint folder) as a GGUF of ``out_type`` (f16/bf16)
    at ``out_path``. Returns facts for the report: arch, pre-tokenizer, tensor count, notes."""
    import gguf

    if out_type not in FLOAT_TYPES:
        raise ValueError(f"out_type must be one of {FLOAT_TYPES}")
    merged, out_path = Path(merged), Path(out_path)
    config_path = merged / "config.json"
    if not config_path.is_file():
        raise UserError(f"{merged} has no config.json; rerun `workbench merge`.")
    config = json.loads(config_path.read_text())
    family, arch = archs.arch_for(config)
    notes = archs.check_exportable(config)
    meta = vocab.load(tokenizer_dir or merged, config["vocab_size"])
    ftype = gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.MOSTLY_BF16

    with gguf_file(out_path, arch, "workbench export") as writer:
        writer.add_name(merged.name)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(config["vocab_size"])
        archs.add_hparams(writer, config)
        meta.add_to(writer)
        count = 0
        for name, t in _tensors(merged, config):
            array, raw_type = _to_numpy(t, out_type)
            writer.add_tensor(name, array, raw_dtype=raw_type)
            count += 1
    return {"arch": family, "gguf_arch": writer.arch, "pre_tokenizer": meta.pre, "tensors": count,
            "vocab_padded": meta.padded, "add_bos": meta.add_bos, "special_ids": meta.special_ids,
            "notes": notes + meta.notes}
