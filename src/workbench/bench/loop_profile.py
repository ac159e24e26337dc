"""Where a TRL training step's time goes: a few steady steps of a train run under torch.profiler,
each phase of the Trainer's loop in a named range (``bench train --profile``).

The phases are the Trainer's own calls, wrapped on the trainer instance (and its model) of
this process only: fetching the batch, the training step (forward, loss, backward; and in it
the Trainer's ``model.train()``, which walks every module), clipping and the gradient norm,
the optimizer, ``model.zero_grad()`` (every parameter), the LR schedule, the callbacks' step
hooks (the product's adapter snapshot among them) and the per-step log. Per phase, per step:
the host's time inside it and the GPU time of the kernels it launched. The GPU's busy time is
the union of its kernels' intervals, so the idle share says how long the GPU waited for the
host; the host time outside every phase is the loop's own bookkeeping.

Runs in the train child (``workbench.bench.train_child --profile-loop``) through the recipe's
stack seam (``Stack.trainer_made``), never in the product.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

#: The Trainer's calls timed as phases: (phase, attribute path on the trainer). A name this
#: transformers lacks is left out (the phases recorded say which ran).
PHASES = (
    ("fetch batch", "get_batch_samples"),
    ("forward + backward", "training_step"),
    ("in it: model.train() (every module)", "model.train"),
    ("clip gradients", "_clip_grad_norm"),
    ("gradient norm", "_get_grad_norm"),
    ("optimizer step", "optimizer.step"),
    ("model.zero_grad() (every parameter)", "model.zero_grad"),
    ("LR schedule", "lr_scheduler.step"),
    ("callbacks: step begin", "callback_handler.on_step_begin"),
    ("callbacks: step end", "callback_handler.on_step_end"),
    ("log (reads loss, grad norm)", "_maybe_log_save_evaluate"),
    ("FLOPs and token counts", "floating_point_ops"),
    ("FLOPs and token counts", "_track_num_input_tokens"),
)
#: The number of optimizer steps profiled.
STEPS = 3
RANGE_PREFIX = "trl loop: "


def _wrap(owner, attr: str, phase: str) -> bool:
    fn = getattr(owner, attr, None)
    if fn is None or getattr(fn, "_phase", None):
        return False
    from torch.profiler import record_function

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        with record_function(RANGE_PREFIX + phase):
            return fn(*args, **kwargs)

    timed._phase = phase
    setattr(owner, attr, timed)
    return True


def instrument(trainer, dest: Path, after_step: int, steps: int = STEPS) -> list[str]:
    """Wraps the phases that exist now on ``trainer`` (the optimizer and schedule, made when
    training starts, are wrapped then) and profiles the ``steps`` optimizer steps after
    ``after_step``: from one batch fetch to another, so each phase runs once a step. Writes
    ``<dest>.json`` (:func:`summarize`) and the Chrome trace. Returns the paths wrapped."""
    window = _Window(dest, after_step, steps)
    done = []
    for phase, path in PHASES:
        *parents, attr = path.split(".")
        owner = trainer
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is not None and _wrap(owner, attr, phase):
            done.append(path)
    fetch = getattr(trainer, "get_batch_samples", None)
    if fetch is not None:
        @functools.wraps(fetch)
        def fetch_in_window(*args, **kwargs):
            window.at(trainer.state.global_step)  # outside every phase's range
            return fetch(*args, **kwargs)

        trainer.get_batch_samples = fetch_in_window
    trainer.add_callback(window.callback())
    return done


class _Window:
    """The profiler over a window of optimizer steps."""

    def __init__(self, dest: Path, after_step: int, steps: int):
        self.dest, self.after, self.steps = dest, after_step, steps
        self.prof = self.t0 = None

    def at(self, global_step: int) -> None:
        if self.prof is None and global_step == self.after:
            self._start()
        elif self.prof is not None and global_step == self.after + self.steps:
            self._stop(self.steps)

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
        self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else []))
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def _stop(self, steps: int) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - self.t0) * 1e6
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        if steps > 0:
            write(prof, self.dest, steps, wall_us, self.cuda)

    def callback(self):
        from transformers import TrainerCallback

        window = self

        class LoopWindow(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
                for obj, phase in ((optimizer, "optimizer step"), (lr_scheduler, "LR schedule")):
                    if obj is not None:
                        _wrap(obj, "step", phase)

            def on_train_end(self, args, state, control, **kwargs):
                if window.prof is not None:  # training ended inside the window: the whole steps in it
                    window._stop(state.global_step - window.after)

        return LoopWindow()


def summarize(prof, steps: int, wall_us: float, cuda: bool) -> dict:
    """Per phase its host and GPU milliseconds per step; the step's wall and GPU-busy time."""
    from torch.autograd import DeviceType

    from workbench.bench.step import union_length

    phases: dict[str, dict] = {}
    spans = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith(RANGE_PREFIX):
            row = phases.setdefault(e.name[len(RANGE_PREFIX):], {"host_us": 0.0, "gpu_us": 0.0, "calls": 0})
            row["host_us"] += e.time_range.elapsed_us()
            row["gpu_us"] += e.device_time_total if cuda else 0.0
            row["calls"] += 1
    # Phases nest (training_step holds no other phase, but a callback could call one): a phase
    # inside another counts in both; the host time outside every phase counts each moment once.
    outer = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type != DeviceType.CUDA and e.name.startswith(RANGE_PREFIX)]
    in_phases = union_length(outer)
    busy = union_length(spans)
    rows = [{"phase": name, "host_ms_per_step": v["host_us"] / steps / 1e3,
             "gpu_ms_per_step": v["gpu_us"] / steps / 1e3 if cuda else None, "calls_per_step": v["calls"] / steps}
            for name, v in phases.items()]
    rows.sort(key=lambda r: -r["host_ms_per_step"])
    return {"steps": steps, "wall_ms_per_step": wall_us / steps / 1e3,
            "outside_phases_ms_per_step": max(0.0, wall_us - in_phases) / steps / 1e3,
            "gpu_busy_ms_per_step": busy / steps / 1e3 if cuda else None,
            "gpu_idle_share": max(0.0, 1.0 - busy / wall_us) if cuda and wall_us else None,
            "phases": rows}


def write(prof, dest: Path, steps: int, wall_us: float, cuda: bool) -> dict:
    """:func:`summarize` as ``<dest>.json``, with the trace beside it (bench.step.write_trace)."""
    from workbench import atomic
    from workbench.bench.step import write_trace

    summary = {**summarize(prof, steps, wall_us, cuda), "trace": write_trace(prof, dest).name}
    atomic.write_text(dest.parent / f"{dest.name}.json", json.dumps(summary, indent=1))
    return summary


def profiled(stack, dest: Path, after_step: int, steps: int = STEPS):
    """``stack`` (a training-recipe strategy, workbench.models.Stack) with the trainer the
    recipe makes profiled as :func:`instrument` says."""
    made = stack.trainer_made

    def trainer_made(trainer) -> None:
        made(trainer)
        instrument(trainer, dest, after_step, steps)

    stack.trainer_made = trainer_made
    return stack
