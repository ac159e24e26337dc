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
import shutil
from pathlib import Path

from workbench import atomic
from workbench.export import FLOAT_TYPES, GGUF_TYPES
from workbench.errors import UserError, reason

#: llama.cpp's k-quant block (QK_K): a Q4_K/Q6_K row's length must be a multiple of it.
QK_K = 256

#: quant name -> (llama_cpp ftype constant, the types a tensor nominally gets)
QUANTS = {
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", {"Q8_0"}),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", {"Q4_K", "Q6_K"}),
}
assert tuple(QUANTS) == tuple(t for t in GGUF_TYPES if t not in FLOAT_TYPES), "export.GGUF_TYPES lists the types"


def quantize(src: str | Path, dst: str | Path, quant: str) -> None:
    """Quantize the GGUF ``src`` to ``dst`` (written under a temp name, then renamed).
    ``src`` is never modified."""
    import ctypes

    import llama_cpp

    src, dst = Path(src), Path(dst)
    # llama.cpp logs every tensor at INFO through llama-cpp-python's logger; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    # While quantizing, its log goes to us instead: out of the terminal, but its last lines
    # name a failure's cause.
    lines = _Tail()
    callback = llama_cpp.llama_log_callback(lines.feed)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant][0])
    try:
        with atomic.file(dst) as tmp:
            code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if code != 0:
                raise UserError(_failure(src, dst, quant, code, lines.cause()))
    except OSError as err:
        from .gguf_writer import write_error

        raise write_error(err, dst, "workbench export") from None
    finally:
        _restore_log(llama_cpp)


def _restore_log(llama_cpp) -> None:
    """Give llama.cpp's log back to llama-cpp-python's own callback."""
    import ctypes

    try:
        from llama_cpp import _logger
    except ImportError:
        return
    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class _Tail:
    """The last lines llama.cpp logged."""

    def __init__(self, keep: int = 50):
        self.lines: list[str] = []
        self.keep = keep
        self._open = ""

    def feed(self, level, text, user_data) -> None:
        self._open += text.decode("utf-8", errors="replace")
        *done, self._open = self._open.split("\n")
        self.lines = (self.lines + [d.strip() for d in done if d.strip()])[-self.keep:]

    def cause(self) -> str | None:
        """The last line that says what went wrong, else the last line."""
        lines = self.lines + ([self._open.strip()] if self._open.strip() else [])
        for text in reversed(lines):
            if any(w in text.lower() for w in ("error", "failed", "exception", "cannot", "unable")):
                return text
        return lines[-1] if lines else None


def _failure(src: Path, dst: Path, quant: str, code: int, cause: str | None) -> str:
    needed = src.stat().st_size // 2 if src.exists() else 0
    if shutil.disk_usage(dst.parent).free < needed or "no space left" in (cause or "").lower():
        return (f"no space left on the device while quantizing {src.name} to {quant} in {dst.parent}; free space "
                f"there and rerun `workbench export` ({src.name} is intact, no partial file was kept).")
    said = f"llama.cpp said: {reason(cause)}" if cause else "llama.cpp logged no reason"
    return (f"llama.cpp could not quantize {src.name} to {quant} (return code {code}; {said}); {src.name} is intact, "
            f"so fix the cause or drop {quant} from --quant.")


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


def fallback_note(quant: str, entry: dict) -> str | None:
    """How much of a ``quant`` GGUF is not of its nominal types, in words (None: all of it is):
    e.g. "q4_k_m holds no Q4_K/Q6_K matrix: 30 of 30 fell back to 25 Q5_0, 5 Q8_0 (row lengths
    128, 384; k-quants need multiples of 256)". ``entry``: the export report's entry of the file."""
    from collections import Counter

    fb = entry.get("fallbacks") or {}
    if not fb:
        return None
    nominal = "/".join(sorted(QUANTS[quant][1]))
    total = entry.get("matrices")
    counts = ", ".join(f"{n} {t}" for t, n in Counter(v["type"] for v in fb.values()).most_common())
    rows = ", ".join(str(r) for r in sorted({v["row_length"] for v in fb.values()}))
    head = f"holds no {nominal} matrix" if total == len(fb) else f"is only partly {nominal}"
    need = f"; k-quants need multiples of {QK_K}" if quant.startswith("q4_k") else ""
    return (f"{quant} {head}: {len(fb)}{f' of {total}' if total else ''} matrices fell back to {counts} "
            f"(row lengths {rows}{need})")
