"""A device scalar the host will read later, copied to it without a wait.

On CUDA the copy goes into pinned host memory asynchronously, queued where it is made, with an
event after it: reading the value later waits for the GPU to reach that copy, not for whatever
was issued since (a backward, the rest of a forward). The patched fused loss counts its target
rows this way before the backbone runs (workbench.patch), and the training guard tests each
loss this way before its backward (workbench.trainer).
"""
from __future__ import annotations

import torch


class HostCopy:
    """``value()``: the Python number of the 0-d tensor ``t``, a fresh result nothing writes
    afterwards. Off CUDA the tensor is kept and read then (no read where it is made). During
    CUDA-graph capture nothing is copied (a read would synchronize, which capture forbids) and
    ``value()`` is None."""

    def __init__(self, t: torch.Tensor):
        self._done = None
        self._value = None
        if t.device.type != "cuda":
            self._tensor = t
        elif torch.cuda.is_current_stream_capturing():
            self._tensor = None
        else:
            self._tensor = torch.empty((), dtype=t.dtype, pin_memory=True)
            self._tensor.copy_(t, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(t.device))  # the copy's stream, not the current device's

    def value(self):
        if self._tensor is not None:
            if self._done is not None:
                self._done.synchronize()
                self._done = None
            self._value, self._tensor = self._tensor.item(), None
        return self._value
