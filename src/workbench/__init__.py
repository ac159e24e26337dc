"""Parity Workbench: verified Triton kernels and a fine-tune → export → qualify harness.

The namespace's parts live in the repository's top-level folders
(``workbench.kernels`` is ``kernels/``, and so on); see pyproject.toml.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import workbench` stays light: `workbench.patch(model)` is the
    # (callable) module workbench/patch.py, `workbench.unpatch(model)` its undo.
    if name in ("patch", "unpatch"):
        import importlib

        module = importlib.import_module("workbench.patch")
        return module if name == "patch" else module.unpatch_model
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
