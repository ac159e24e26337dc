"""workbench.export: merge, GGUF writing, llama.cpp quantization and verification (see the module docstrings)."""
from __future__ import annotations

if __name__ != "workbench.export":  # pragma: no cover - guard against a second module object
    raise ImportError(
        f"this package must be imported as 'workbench.export', not {__name__!r}; install the project "
        "(pip install -e .) and import it from the workbench namespace."
    )

#: The GGUF types the export stage writes: the 16-bit ones by our writer, the quantized ones by
#: llama.cpp's quantizer. The one list every stage, command and report takes them from.
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")
#: The ones our writer makes (export/gguf_writer.py); the rest are llama.cpp's (export/quantize.py).
FLOAT_TYPES = GGUF_TYPES[:2]
#: What `workbench run` exports by default: f16 (the lossless reference the eval comparison
#: and the report measure the others against) and the two quantized types.
DEFAULT_TYPES = tuple(t for t in GGUF_TYPES if t != "bf16")
