"""workbench.host_copy.HostCopy: a device scalar read later, once (the CPU path here; on CUDA
the same reads go through pinned memory and an event, exercised by the fused loss's counted rows
and the training guard on the GPU)."""
import torch

from workbench.host_copy import HostCopy


def test_host_copy_reads_the_value_later_and_once(monkeypatch):
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
    count = HostCopy(torch.tensor([1, 0, 1, 1]).sum())
    flag = HostCopy(torch.isfinite(torch.tensor([1.0, float("nan")])).all())
    assert reads == []  # nothing is read where the copies are made
    assert count.value() == 3 and count.value() == 3 and flag.value() is False
    assert len(reads) == 2
