"""Suite-wide setup.

Triton decides at ``@triton.jit`` decoration time whether a kernel is interpreted, so the
interpreter flag must be set before any kernel module is imported. This machine class
(CI included) has no GPU: kernels only run through the interpreter here.
"""

import os

# Decided before ``import torch``: torch 2.13 imports triton.language itself (torch._native
# registers Triton kernels), which freezes the standard library (tl.zeros, tl.cdiv, ...)
# in compiled mode, and interpreted kernels then fail calling it. No NVIDIA device node
# means no GPU.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402,F401
