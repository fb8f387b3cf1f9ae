import os

import torch

# Triton reads this when a kernel module is imported: without a GPU, run the kernels through its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
