"""workbench.eval: lm-eval tasks, the GGUF model class and the eval stage (see the module docstrings)."""
from __future__ import annotations

if __name__ != "workbench.eval":  # pragma: no cover - guard against a second module object
    raise ImportError(
        f"this package must be imported as 'workbench.eval', not {__name__!r}; install the project "
        "(pip install -e .) and import it from the workbench namespace."
    )
