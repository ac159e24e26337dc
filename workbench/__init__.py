"""Parity Workbench: verified Triton kernels and a fine-tune → export → qualify harness.

The namespace's parts live in the repository's top-level folders
(``workbench.kernels`` is ``kernels/``, and so on); see pyproject.toml.
"""
__version__ = "0.1.0"
