"""workbench.export: merge, GGUF writing, llama.cpp quantization and verification (see the module docstrings)."""
from __future__ import annotations

if __name__ != "workbench.export":  # pragma: no cover - guard against a second module object
    raise ImportError(
        f"this package must be imported as 'workbench.export', not {__name__!r}; install the project "
        "(pip install -e .) and import it from the workbench namespace."
    )
