"""Offloaded gradient checkpointing: the checkpointed layers' inputs wait in host memory.

With gradient checkpointing, what a decoder layer keeps for the backward is its input
(the hidden states, tokens x hidden in the compute dtype: 1 GiB per layer for an 8B
model at 131072 tokens); the rest is recomputed. ``training.gradient_checkpointing:
offload`` moves those inputs to pinned host memory as the forward saves them and back as
the backward needs them, so the GPU holds one layer's activations at a time, not every
layer's input.

It is built on what torch and transformers already have, not a checkpoint of our own:
transformers' reentrant checkpointing (``torch.utils.checkpoint`` with
``use_reentrant=True``) saves each layer's tensor inputs through autograd's
``save_for_backward``, and :class:`ActivationOffload` is a pair of saved-tensor hooks
(``torch.autograd.graph.saved_tensors_hooks``) active around each checkpointed call
only. So nothing else is moved: not the embedding, the final norm or the loss, and not
the recompute in the backward, which runs outside the hooks. (Non-reentrant
checkpointing keeps its inputs in a closure, where no hook sees them; hence reentrant.)

On CUDA the copy to the host runs on a side stream, overlapping the next layer's
forward; the caching allocator is told (``record_stream``) that the GPU tensor is in use
there until it is copied. The copy back is issued on the compute stream after waiting
for the side stream, just before the layer's recompute reads it. On the CPU the "host
copy" is a plain copy: nothing is saved, but the path is the same, which is how the
tests check it there.
"""
from __future__ import annotations

import contextlib


class ActivationOffload:
    """Saved-tensor hooks that keep the (strided) tensors saved under them in host memory,
    counting what they moved (``tensors``, ``bytes``) and brought back (``restored``).
    Under reentrant checkpointing those are the layers' tensor inputs, nothing small."""

    def __init__(self):
        self.modules = 0
        self.first_step = None
        self.tensors = self.bytes = self.restored = 0
        self._streams: dict = {}

    def _side_stream(self, device):
        import torch

        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, tensor):
        import torch

        if tensor.layout != torch.strided:
            return tensor
        size = tensor.numel() * tensor.element_size()
        if tensor.is_cuda:
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the values are written
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # not reused before the copy has read it
        else:
            host = torch.empty_like(tensor, device="cpu")
            host.copy_(tensor)
        self.tensors += 1
        self.bytes += size
        return (tensor.device, host)

    def unpack(self, packed):
        import torch

        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        self.restored += 1
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(self._side_stream(device))  # the host copy is complete
            return host.to(device, non_blocking=True)
        return host

    @contextlib.contextmanager
    def hooks(self):
        import torch

        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield

    def wrap(self, checkpoint_func):
        """``checkpoint_func`` (a layer's ``_gradient_checkpointing_func``) run inside the hooks."""
        def offloaded_checkpoint(function, *args, **kwargs):
            with self.hooks():
                return checkpoint_func(function, *args, **kwargs)

        offloaded_checkpoint.workbench_offload = self
        offloaded_checkpoint.wrapped = checkpoint_func
        return offloaded_checkpoint


def _reentrant(func) -> bool:
    keywords = getattr(func, "keywords", None) or {}  # transformers sets a functools.partial of checkpoint
    return keywords.get("use_reentrant") is True


def install(model, offload: ActivationOffload) -> int:
    """Wrap the checkpointing function of every module of ``model`` that checkpoints
    (transformers' ``gradient_checkpointing`` flag and ``_gradient_checkpointing_func``)
    in ``offload``'s hooks; returns how many modules were wrapped. Call it after
    checkpointing is enabled (the Trainer enables it when training starts). Raises
    ValueError when a module checkpoints without reentrancy, where the hooks would move
    nothing."""
    wrapped = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or not getattr(module, "gradient_checkpointing", False):
            continue
        if getattr(func, "workbench_offload", None) is offload:
            wrapped += 1
            continue
        func = getattr(func, "wrapped", func) if hasattr(func, "workbench_offload") else func  # another's hooks
        if not _reentrant(func):
            raise ValueError(f"{type(module).__name__} checkpoints with {func!r}, not reentrant checkpointing "
                             "(use_reentrant=True), whose saved inputs offloading moves.")
        module._gradient_checkpointing_func = offload.wrap(func)
        wrapped += 1
    return wrapped


def trainer_callback(offload: ActivationOffload):
    """A TrainerCallback that installs ``offload`` when training begins (after the Trainer
    has enabled checkpointing) and, after the first optimizer step, checks that it moved
    something and records what one step moved (``offload.first_step``)."""
    from transformers import TrainerCallback

    from workbench.errors import UserError

    class OffloadCheckpoints(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            try:
                layers = install(model, offload)
            except ValueError as err:
                raise UserError(f"training.gradient_checkpointing: offload cannot work here: {err} Use true "
                                "(checkpointing without offloading).") from None
            if not layers:
                raise UserError("training.gradient_checkpointing: offload found no checkpointing layer in this "
                                "model; use true (checkpointing without offloading).")
            offload.modules = layers

        def on_step_end(self, args, state, control, **kwargs):
            if offload.first_step is not None:
                return
            if not offload.tensors:
                raise UserError("training.gradient_checkpointing: offload moved nothing to host memory in the first "
                                f"step (its {offload.modules} checkpointing modules saved no input through autograd); "
                                "use true (checkpointing without offloading).")
            offload.first_step = {"tensors": offload.tensors, "gib": round(offload.bytes / 2**30, 4)}

    return OffloadCheckpoints()


def record(offload: ActivationOffload | None) -> dict | None:
    """The train record's ``offload`` entry."""
    if offload is None:
        return None
    return {"modules": offload.modules, "first_step": offload.first_step,
            "total": {"tensors": offload.tensors, "gib": round(offload.bytes / 2**30, 4),
                      "restored": offload.restored}}
