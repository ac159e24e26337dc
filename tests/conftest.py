import os

import torch

# Kernel code launched from tests/ runs on the CPU interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
