"""What every ``attnfuse::`` op shares: accepted dtypes and the CPU-kernel switch.

On CUDA the ops run their Triton kernels; on CPU they run their plain-torch references,
unless a caller (the kernel tests) asks for the kernels through ``kernel_on_cpu()``, which
then run under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)

_KERNEL_ON_CPU = contextvars.ContextVar("attnfuse_kernel_on_cpu", default=False)


@contextlib.contextmanager
def kernel_on_cpu() -> Iterator[None]:
    """Run the ops' Triton kernels (interpreted) for CPU tensors inside this block."""
    token = _KERNEL_ON_CPU.set(True)
    try:
        yield
    finally:
        _KERNEL_ON_CPU.reset(token)


def use_kernel(device: torch.device) -> bool:
    """Whether a call on ``device`` runs the Triton kernel (else the reference)."""
    return device.type == "cuda" or (device.type == "cpu" and _KERNEL_ON_CPU.get())
