"""Every entry point that touches transformers, datasets or the hub runs offline.

Without these variables the hub client and `datasets` try the network (seen on
the CPU machines with transformers 5.23 / datasets 5.2); with them there were
zero network attempts. Call :func:`enforce_offline` before importing either.
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE_VARS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def enforce_offline() -> None:
    """Set the offline switches (a user's explicit setting wins) and keep the HF
    cache inside the project's own cache folder unless HF_HOME is already set."""
    for key, value in OFFLINE_VARS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("HF_HOME", str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parity-workbench" / "hf"))
    _hide_repo_kernels_folder()


def _hide_repo_kernels_folder() -> None:
    """With the repo root on sys.path (``python -m`` from the root, pytest collecting
    parity/), transformers' probe for the hub ``kernels`` distribution imports our
    ``kernels/`` folder, whose guard raises ImportError and breaks ``import
    transformers``. When that distribution is not installed, mark the name as absent
    (``find_spec`` then returns None) so the probe answers "not available"."""
    import importlib.metadata
    import logging
    import sys

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        sys.modules.setdefault("kernels", None)
        # bitsandbytes' CPU backend then says, at every 4-bit load, that it could not
        # fetch an optional GEMM from the hub (which offline it must not): not news.
        bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        if _quiet_hub_kernel_notice not in bnb_log.filters:
            bnb_log.addFilter(_quiet_hub_kernel_notice)


def _quiet_hub_kernel_notice(record) -> bool:
    return "from kernels-community" not in record.getMessage()
