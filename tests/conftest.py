"""Suite-wide setup.

Triton decides at ``@triton.jit`` decoration time whether a kernel is interpreted, so the
interpreter flag must be set before any kernel module is imported. This machine class
(CI included) has no GPU: kernels only run through the interpreter here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
