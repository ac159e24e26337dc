"""Session-wide test set-up, loaded before the tests/ and parity/ conftests.

* Tests never reach the hub: :func:`enforce_offline` sets the offline switches before
  anything imports transformers or datasets.
* Under pytest-xdist each worker gets one torch thread: CI has 2 cores and 2
  workers, and oversubscribed intra-op threads make the CPU tests several times
  slower.
"""
import os

from workbench.offline import enforce_offline

enforce_offline()

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
