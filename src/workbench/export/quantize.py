"""q8_0 / q4_k_m GGUFs through llama.cpp's own quantizer, as llama-cpp-python ships it.

No binary is downloaded and no llama.cpp code lives here: ``llama_model_quantize``
from the libllama that llama-cpp-python loads does the work, with its default
parameters. It also decides the per-tensor types: q4_k_m mixes Q4_K and Q6_K, and
a tensor whose rows k-quants cannot take (row length not a multiple of 256) falls
back to another type chosen by llama.cpp. We do not predict those choices; we read
the written file back with gguf-py's GGUFReader and report every tensor's type,
naming the ones outside the quant's nominal types.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from workbench.errors import UserError

#: quant name -> (llama_cpp ftype constant, the types a tensor nominally gets)
QUANTS = {
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", {"Q8_0"}),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", {"Q4_K", "Q6_K"}),
}


def quantize(src: str | Path, dst: str | Path, quant: str) -> None:
    """Quantize the GGUF ``src`` to ``dst`` (written under a temp name, then renamed).
    ``src`` is never modified."""
    import ctypes

    import llama_cpp

    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    # llama.cpp logs every tensor at INFO through llama-cpp-python's logger; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant][0])
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise UserError(f"llama.cpp could not quantize {src.name} to {quant} (return code {code}; its log is "
                            f"above); {src.name} is intact — fix the cause or drop {quant} from --quant.")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def tensor_types(path: str | Path) -> dict[str, dict]:
    """{tensor name: {"type": GGML type name, "row_length": ne0, "shape": [...]}} read
    back from a GGUF (shapes in ggml order: the row length first)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: {"type": t.tensor_type.name, "row_length": int(t.shape[0]), "shape": [int(d) for d in t.shape]}
            for t in reader.tensors}


def fallbacks(types: dict[str, dict], quant: str) -> dict[str, dict]:
    """Matrices that did not get one of ``quant``'s nominal types, with the type
    llama.cpp chose and their row length (1-D tensors stay F32 by design)."""
    nominal = QUANTS[quant][1]
    return {name: {"type": t["type"], "row_length": t["row_length"]}
            for name, t in types.items() if len(t["shape"]) > 1 and t["type"] not in nominal}
