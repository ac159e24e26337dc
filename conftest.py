"""Session-wide test set-up, loaded before tests/ and parity/ conftests.

* ``python -m pytest`` puts the repository root on sys.path, so transformers' probe
  for the hub ``kernels`` distribution would import our ``kernels/`` folder (which
  refuses to be imported under that name) and ``import transformers`` would fail.
  :func:`enforce_offline` marks the name absent and keeps every hub call off.
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
