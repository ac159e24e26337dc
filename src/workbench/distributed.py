"""Distributed launches (``accelerate launch``, ``torchrun``): which process is the main one.

The Trainer trains with DDP/FSDP as accelerate sets it up; we only keep the run directory
single-writer and the screen single-voiced: the main process prints training progress and
writes the run, the others wait for it where they need what it wrote.
"""
from __future__ import annotations

import os

from workbench import console

_main = True


def setup():
    """accelerate's PartialState under a distributed launch (WORLD_SIZE > 1), else None;
    remembers whether this process is the main one."""
    global _main
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        # cpu=True as TrainingArguments(use_cpu=True) asks (gloo); without it accelerate
        # sees no distributed setup on a machine without CUDA.
        state = PartialState(cpu=not torch.cuda.is_available())
    _main = state is None or state.is_main_process
    return state


def is_main() -> bool:
    """True unless this is a non-main process of a distributed launch."""
    return _main


def wait_for_everyone(state) -> None:
    if state is not None:
        state.wait_for_everyone()


def log(message: str, detail: bool = False) -> None:
    """A training progress line, from the main process only. ``detail``: an inner step that
    `workbench run` keeps in its log (console.progress)."""
    if _main:
        console.progress(f"train: {message}", detail=detail)
