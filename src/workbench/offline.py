"""Every entry point that touches transformers, datasets or the hub runs offline.

Without these variables the hub client and `datasets` try the network (seen on
the CPU machines with transformers 5.23 / datasets 5.2); with them there were
zero network attempts. Call :func:`enforce_offline` before importing either.
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE_VARS = {
    # transformers >= 5.25 with the `kernels` package fetches layer code from the Hub and
    # swaps it into every model it loads (and again at each model.train()). Downloaded code
    # never runs here, and it would replace our own kernels' forwards.
    "USE_HUB_KERNELS": "0",
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
    _quiet_hub_kernel_notice_once()


#: bitsandbytes' CPU backend asks the hub's `kernels` package for an optional GEMM at
#: import. Offline that fetch must fail, and both libraries say so on every import ("Failed
#: to load CPU gemm_4bit_forward ... pip install kernels", "Skipping publisher trust
#: check"): expected here, not a failure, so it is filtered out of the user's screen.
_HUB_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def _quiet_hub_kernel_notice_once() -> None:
    import logging

    for name in _HUB_KERNEL_LOGGERS:
        log = logging.getLogger(name)
        if _quiet_hub_kernel_notice not in log.filters:
            log.addFilter(_quiet_hub_kernel_notice)


def _quiet_hub_kernel_notice(record) -> bool:
    message = record.getMessage()
    return "kernels-community" not in message
