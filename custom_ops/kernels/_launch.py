"""Cheap repeated launches of a Triton kernel (host time per decode step).

``kernel[grid](*args, **constexprs)`` re-derives Triton's specialization of every argument
on each call (divisibility of ints and pointers, int widths), builds a cache key and looks
up the compiled kernel. For a 45-argument kernel that costs more host time than the
kernel runs at decode (``benchmarks/results/host_overhead.md``). A ``Launcher`` keeps the
compiled kernel Triton returned for a call under a key that is *finer* than Triton's own
specialization, and launches it directly the next time the key repeats:

* a tensor contributes its dtype and whether its address is 16-byte aligned;
* an int contributes its value (strides and sizes repeat exactly from step to step);
* a float contributes only its type (Triton never specializes on float values);
* constexprs, ``num_warps``, ``num_stages`` and the device contribute their values.

Two calls with the same key therefore get the same specialization from Triton, hence the
same compiled kernel, so launching that kernel directly is what ``kernel[grid]`` would
have done. A miss (first call, or a new key) goes through ``kernel[grid]`` unchanged,
which compiles if needed and returns the kernel that is then remembered.

The direct path is taken only where it is known to be equivalent: a CUDA device, a
Triton whose ``JITFunction.run`` returns the compiled kernel and launches it through
``CompiledKernel.run``, and no launch hooks installed (profilers such as proton add them;
then every call takes the ordinary path). With no hook the direct path passes no launch
metadata, which Triton itself would build and hand to empty hooks on every call. ``ATTNFUSE_FAST_LAUNCH=0`` turns the direct
path off (benchmarks compare both).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

try:  # the direct path needs Triton's runtime knobs (Triton >= 3.4)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: ordinary launches only
    _knobs = None

#: entries a PlanCache keeps before it is cleared
MAX_ENTRIES = 1024


class PlanCache(dict):
    """Key -> remembered launch, cleared when it reaches ``MAX_ENTRIES`` (keys hold ints
    such as token counts: a long-running prefill sweep must not grow it without bound)."""

    def remember(self, key: tuple, plan: Any) -> None:
        if len(self) >= MAX_ENTRIES:
            self.clear()
        self[key] = plan


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` is a constexpr function with per-call
    overhead in recent Triton; launch planning runs on every call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (0 for ``n <= 0``), as ``triton.next_power_of_2``."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def fast_launch_enabled() -> bool:
    return os.environ.get("ATTNFUSE_FAST_LAUNCH", "1") != "0"


def _no_hook(hook: Any) -> bool:
    """No launch hook installed: ``None`` (older Triton) or an empty ``HookChain``."""
    return hook is None or getattr(hook, "calls", None) == []


def _arg_key(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (a.dtype, (a.data_ptr() & 15) == 0)
    if isinstance(a, float):
        return float
    return a  # int, bool, None


class Launcher:
    """``Launcher(jit_fn, **options)(grid, args, constexprs, num_warps=..., num_stages=...)``.

    ``args`` are the runtime arguments in signature order; ``constexprs`` the keyword
    constexprs, which must be the kernel's trailing parameters (checked once). ``options``
    are further compile options of every launch (``maxnreg``).
    """

    def __init__(self, fn: Any, **options: Any) -> None:
        self.fn = fn
        self.options = options
        self._cache = PlanCache()  # key -> (compiled kernel, trailing constexpr values)
        self._names: list[str] | None = list(getattr(fn, "arg_names", None) or []) or None

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: dict[str, Any], *,
                 num_warps: int, num_stages: int = 3) -> None:
        device = args[0].device if isinstance(args[0], torch.Tensor) else None
        direct = (device is not None and device.type == "cuda" and self._names is not None
                  and _knobs is not None and fast_launch_enabled()
                  and _no_hook(_knobs.runtime.launch_enter_hook)
                  and _no_hook(_knobs.runtime.launch_exit_hook))
        if direct:
            key = (device.index, num_warps, num_stages, *map(_arg_key, args),
                   *constexprs.values())
            hit = self._cache.get(key)
            if hit is not None:
                kernel, tail = hit
                g0 = grid[0]
                g1 = grid[1] if len(grid) > 1 else 1
                g2 = grid[2] if len(grid) > 2 else 1
                stream = torch._C._cuda_getCurrentRawStream(device.index)
                kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata,
                           None, None, None, *args, *tail)
                return
        kernel = self.fn[grid](*args, **constexprs, num_warps=num_warps,
                               num_stages=num_stages, **self.options)
        if direct and kernel is not None and hasattr(kernel, "packed_metadata"):
            tail_names = self._names[len(args):]
            if sorted(tail_names) != sorted(constexprs):
                return  # not trailing constexprs: keep the ordinary path for this kernel
            self._cache.remember(key, (kernel, tuple(constexprs[n] for n in tail_names)))


@dataclass(frozen=True)
class KernelLaunch:
    """One planned launch: ``launcher``'s kernel on ``grid`` with ``args`` (runtime
    arguments in signature order) and ``constexprs``. ``writes`` are the positions in
    ``args`` of the tensors the kernel stores to; every other tensor is only read.
    Calling it launches; ``attnfuse.passes.inline_kernels`` instead puts it into a
    compiled graph, where Inductor launches it."""

    launcher: Launcher
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    writes: tuple[int, ...] = ()

    def __call__(self) -> None:
        self.launcher(self.grid, self.args, self.constexprs, num_warps=self.num_warps,
                      num_stages=self.num_stages)


# ------------------------------------------------------------------ planned calls
def tensor_signature(t: torch.Tensor | None) -> tuple | None:
    """What an op's validation and launch planning read of a tensor: shape, strides,
    dtype and device index (``None`` for an absent optional tensor)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.get_device())


def _index_of(tensors: tuple, t: torch.Tensor) -> int | None:
    """Position of ``t`` itself (not an equal tensor) in ``tensors``; None if absent."""
    return next((i for i, x in enumerate(tensors) if x is t), None)


@dataclass(frozen=True)
class LaunchPlan:
    """A ``KernelLaunch`` with its tensors replaced by slots, to be filled from the tensors
    of a later call with the same signature.

    ``rebind`` pairs each tensor position in ``template`` with the index of the call
    tensor that goes there (``tensors`` given to ``of``/``launch``, in the caller's
    order; outputs allocated per call included).
    """

    launcher: Launcher
    grid: tuple[int, ...]
    template: tuple
    rebind: tuple[tuple[int, int], ...]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    @staticmethod
    def of(launch: KernelLaunch, tensors: tuple) -> LaunchPlan | None:
        """The plan of ``launch``, or None when one of its tensors is not in ``tensors``
        (a temporary made for this call: such calls are planned every time)."""
        rebind = []
        for pos, arg in enumerate(launch.args):
            if isinstance(arg, torch.Tensor):
                idx = _index_of(tensors, arg)
                if idx is None:
                    return None
                rebind.append((pos, idx))
        template = tuple(None if isinstance(a, torch.Tensor) else a for a in launch.args)
        return LaunchPlan(launch.launcher, launch.grid, template, tuple(rebind),
                          launch.constexprs, launch.num_warps, launch.num_stages)

    def launch(self, tensors: tuple) -> None:
        args = list(self.template)
        for pos, idx in self.rebind:
            args[pos] = tensors[idx]
        self.launcher(self.grid, tuple(args), self.constexprs, num_warps=self.num_warps,
                      num_stages=self.num_stages)


class Allocations:
    """The ``empty(shape, dtype)`` a planning function allocates its buffers through,
    recording each allocation so that ``CallPlan`` can repeat them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.specs: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.tensors: list[torch.Tensor] = []

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.specs.append((tuple(shape), dtype))
        self.tensors.append(t)
        return t


@dataclass(frozen=True)
class CallPlan:
    """Every launch of one op call, its buffers and its results, to be repeated for a later
    call with the same signature: ``run(inputs)`` allocates the buffers (in the order the
    first call did), launches each ``LaunchPlan`` over ``(*inputs, *buffers)`` and returns
    the tensors at ``results`` (``None`` where the first call returned ``None``)."""

    launches: tuple[LaunchPlan, ...]
    allocations: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    results: tuple[int, ...]

    @staticmethod
    def of(launches: Sequence[KernelLaunch], inputs: tuple, buffers: Allocations,
           results: tuple) -> CallPlan | None:
        """The plan of a call that launched ``launches`` over ``inputs`` and the tensors
        ``buffers`` allocated; None when a launch or a result uses any other tensor."""
        tensors = (*inputs, *buffers.tensors)
        plans = [LaunchPlan.of(launch, tensors) for launch in launches]
        found = [-1 if r is None else _index_of(tensors, r) for r in results]
        if any(p is None for p in plans) or None in found:
            return None
        return CallPlan(tuple(plans), tuple(buffers.specs), tuple(found))

    def run(self, inputs: tuple, device: torch.device) -> tuple:
        tensors = (*inputs, *(torch.empty(s, dtype=d, device=device) for s, d in self.allocations))
        for plan in self.launches:
            plan.launch(tensors)
        return tuple(None if i < 0 else tensors[i] for i in self.results)
