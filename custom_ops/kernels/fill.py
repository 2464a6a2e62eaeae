"""Triton kernel: fill a contiguous range of a buffer with one value, on a bounded grid.

Algorithm
---------
The buffer is reinterpreted as signed integers of its element size (``int8`` ..
``int64``) and every element of ``[start, start + numel)`` receives the bit pattern of
the fill value in the buffer's dtype (computed on the host). Filling bit patterns makes
the kernel exact for every dtype (floats, ints, bool) and lets one kernel serve all of
them.

Grid
----
``(num_programs,)``, chosen by the caller. Each program walks the range in
``BLOCK``-element tiles with a grid stride of ``num_programs * BLOCK``, so any grid size
covers the whole range. A *bounded* grid is the point of this kernel: a native fill
launches one block per tile and owns the block dispatcher and the memory bus until it
finishes, so it cannot overlap with compute on another stream (measured on H100). A fill
on a few dozen programs leaves the other SMs to the compute it runs beside, at a lower
bandwidth of its own. ``num_programs = 0`` means the full grid (one program per tile,
up to ``MAX_FULL_GRID_PROGRAMS``): the fastest fill when it runs alone.

Shapes and strides
------------------
::

    out   : (N,) contiguous, integer view of the buffer (element size 1, 2, 4 or 8 bytes)
    start : first element to fill
    numel : number of elements to fill
    pattern : int, the fill value's bit pattern as a signed integer of the element size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import cdiv

#: bytes each program stores per loop iteration: 16 KiB keeps 8 warps issuing 64-byte
#: stores per thread, enough in-flight stores to approach one SM's store bandwidth
BLOCK_BYTES = 16384
#: warps per program; more warps per SM is what raises a bounded grid's bandwidth
NUM_WARPS = 8
#: cap of the full grid: 8 waves of 132 SMs is past the point where more blocks help, and
#: keeps the launch inside the 32-bit grid limit for any buffer
MAX_FULL_GRID_PROGRAMS = 8 * 132
#: integer dtype that reinterprets a buffer of each element size
INT_VIEW_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def fill_kernel(out_ptr, pattern, start, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    values = tl.full([BLOCK], pattern, dtype=out_ptr.dtype.element_ty)
    base = out_ptr + start
    for tile_start in range(pid * BLOCK, numel, num_programs * BLOCK):
        idx = tile_start + offs
        tl.store(base + idx, values, mask=idx < numel)


@dataclass(frozen=True)
class FillSettings:
    block: int
    num_programs: int
    num_warps: int


def fill_settings(element_size: int, numel: int, num_programs: int) -> FillSettings:
    """Tile size and grid for a fill of ``numel`` elements of ``element_size`` bytes."""
    if element_size not in INT_VIEW_DTYPES:
        raise ValueError(f"element_size: expected one of {sorted(INT_VIEW_DTYPES)}, got {element_size}")
    if num_programs < 0:
        raise ValueError(f"num_programs: expected >= 0 (0 = full grid), got {num_programs}")
    block = BLOCK_BYTES // element_size
    tiles = max(1, cdiv(numel, block))
    if num_programs == 0:
        num_programs = min(tiles, MAX_FULL_GRID_PROGRAMS)
    # more programs than tiles would only launch idle programs
    return FillSettings(block=block, num_programs=min(num_programs, tiles), num_warps=NUM_WARPS)


def fill_pattern(value: float, dtype: torch.dtype) -> int:
    """``value`` cast to ``dtype``, as the signed integer with the same bits."""
    element = torch.tensor([value], dtype=torch.float64).to(dtype)
    return int(element.view(INT_VIEW_DTYPES[element.element_size()]).item())


def launch_fill(buf: torch.Tensor, value: float, num_programs: int, start: int = 0,
                numel: int | None = None) -> None:
    """Fill ``buf.view(-1)[start : start + numel]`` with ``value`` on the current stream.

    ``buf`` must be contiguous; ``num_programs = 0`` is the full grid.
    """
    if not buf.is_contiguous():
        raise ValueError(f"buf: expected a contiguous tensor, got strides {tuple(buf.stride())}")
    total = buf.numel()
    numel = total - start if numel is None else numel
    if start < 0 or numel < 0 or start + numel > total:
        raise ValueError(f"start, numel: expected a range inside [0, {total}), got ({start}, {numel})")
    if numel == 0:
        return
    settings = fill_settings(buf.element_size(), numel, num_programs)
    flat = buf.view(-1).view(INT_VIEW_DTYPES[buf.element_size()])
    fill_kernel[(settings.num_programs,)](
        flat, fill_pattern(value, buf.dtype), start, numel,
        BLOCK=settings.block, num_warps=settings.num_warps,
    )
