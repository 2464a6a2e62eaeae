"""What every ``attnfuse::`` op shares: accepted dtypes and the CPU-kernel switch.

On CUDA the ops run their Triton kernels; on CPU they run their plain-torch references,
unless a caller (the kernel tests) asks for the kernels through ``kernel_on_cpu()``, which
then run under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
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


# ------------------------------------------------------------------ direct dispatch
# A ``torch.library.custom_op`` call on a plain tensor passes three Python kernels: the
# generic autograd kernel, the generic ADInplaceOrView kernel of a mutating op (it
# rebuilds the schema's argument list on every call) and the generic backend wrapper
# (it checks that outputs do not alias inputs). On the 2-core CI machine that is about
# 64 us per call of a 15-argument op with an empty body, against 7-8 us through the
# kernels registered here (torch 2.13); on the hosts of the GPU machines measured it was
# more than the kernel itself runs at 8k tokens (benchmarks/results/bench_rope_kv.md).
# The kernels registered here cut an ordinary call to one Python kernel.
_AFTER_AD_INPLACE_OR_VIEW = torch._C._after_ADInplaceOrView_keyset
#: device types given direct kernels, with the backend dispatch key each one reaches
DIRECT_BACKENDS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}
_libraries: list[torch.library.Library] = []  # registrations live as long as the process


def direct_dispatch_enabled() -> bool:
    """``ATTNFUSE_DIRECT_DISPATCH=0`` keeps torch's generic kernels (read at import)."""
    import os

    return os.environ.get("ATTNFUSE_DIRECT_DISPATCH", "1") != "0"


def register_direct_kernels(op: torch._library.custom_ops.CustomOpDef, impl,
                            mutated: tuple[str, ...] = ()) -> bool:
    """Give ``op`` direct CPU/CUDA kernels that call ``impl`` (its Python body).

    * Backend keys (``CPU``, ``CUDA``): ``impl`` itself, in place of custom_op's generic
      wrapper (the whole path for inference tensors under ``torch.inference_mode``).
    * Autograd keys (``AutogradCPU``, ``AutogradCUDA``): when no input needs a gradient
      and the next kernel after autograd would be the plain backend one (no fake,
      functional or other Python tensor, no mode), bump the version counters of the
      ``mutated`` arguments (what ADInplaceOrView does for a mutating op) and call
      ``impl``. Any other call goes to custom_op's own autograd kernel, so gradients,
      tracing and functionalization behave exactly as without this.
    * ADInplaceOrView (``mutated`` given): bump the version counters and call ``impl``
      when the backend kernel is next (under ``torch.inference_mode`` ordinary tensors
      still pass this key), else redispatch.

    Returns False (nothing registered) where torch lacks what this relies on or
    ``ATTNFUSE_DIRECT_DISPATCH=0``.
    """
    try:
        from torch._library.autograd import make_autograd_impl

        opoverload = op._opoverload
        generic = make_autograd_impl(opoverload, op)
    except (ImportError, AttributeError, TypeError):
        return False
    if not direct_dispatch_enabled():
        return False
    names = [a.name for a in opoverload._schema.arguments]
    positions = tuple(names.index(n) for n in mutated)
    any_requires_grad = torch._C._any_requires_grad
    is_grad_enabled = torch.is_grad_enabled
    increment_version = torch.autograd.graph.increment_version
    namespace, name = opoverload._schema.name.split("::")
    backends = tuple(DIRECT_BACKENDS.values())
    lib = torch.library.Library(namespace, "FRAGMENT")

    def make_autograd_kernel(backend):
        def kernel(keyset, *args, **kwargs):
            if ((keyset & _AFTER_AD_INPLACE_OR_VIEW).highestPriorityTypeId() != backend
                    or (is_grad_enabled() and any_requires_grad(*args, *kwargs.values()))):
                return generic(keyset, *args, **kwargs)
            if positions:
                increment_version([args[i] for i in positions])
            return impl(*args, **kwargs)
        return kernel

    for backend in DIRECT_BACKENDS.values():
        lib.impl(name, impl, backend.name)
        lib.impl(name, make_autograd_kernel(backend), f"Autograd{backend.name}", with_keyset=True)
    if positions:
        def ad_inplace_or_view(keyset, *args, **kwargs):
            increment_version([args[i] for i in positions])
            rest = keyset & _AFTER_AD_INPLACE_OR_VIEW
            if rest.highestPriorityTypeId() in backends:
                return impl(*args, **kwargs)  # what the backend kernel would run
            return opoverload.redispatch(rest, *args, **kwargs)

        _override(lib, f"{namespace}/{name}/ADInplaceOrView", name, ad_inplace_or_view)
    _libraries.append(lib)
    return True


def _override(lib: torch.library.Library, record: str, name: str, kernel) -> bool:
    """Register ``kernel`` for ADInplaceOrView over custom_op's generic one.

    That kernel still runs under ``torch.inference_mode`` for ordinary (non-inference)
    tensors, which keep their version counters there. Torch >= 2.13 takes the override
    through ``allow_override``; older torch refuses a second Python kernel for a key it
    has recorded although the dispatcher itself accepts it, so the record is dropped
    first. False (generic kernel kept) if torch refuses anyway.
    """
    import inspect

    if "allow_override" in inspect.signature(lib.impl).parameters:
        lib.impl(name, kernel, "ADInplaceOrView", with_keyset=True, allow_override=True)
        return True
    recorded = getattr(torch.library, "_impls", None)
    if not isinstance(recorded, set):
        return False
    recorded.discard(record)
    try:
        lib.impl(name, kernel, "ADInplaceOrView", with_keyset=True)
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    # torch.cuda.get_device_capability reads the device properties on every call
    return torch.cuda.get_device_capability(index)


def cuda_major(device: torch.device) -> int:
    """Compute capability major of a CUDA device (cached: ops ask on every call)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0]
