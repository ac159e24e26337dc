"""The environment every report carries: device, versions, date, host."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import platform
import re


def version(dist: str) -> str | None:
    """The installed version of the distribution ``dist``, or None."""
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def versions(*dists: str) -> dict:
    """{distribution: its installed version or None} for each of ``dists``."""
    return {d: version(d) for d in dists}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    """A short file-name-safe device id: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    name = device_name()
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment() -> dict:
    import torch

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(),
        "device_slug": device_slug(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "numpy": version("numpy"),
        "hypothesis": version("hypothesis"),
        "workbench": version("parity-workbench"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
    return env
