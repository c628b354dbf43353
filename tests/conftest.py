import os

import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. It must be set before
# triton.jit wraps the kernels, i.e. before mptkern.ops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
