"""``attnfuse::fill_fork`` / ``attnfuse::fill_join``: a buffer fill on a side stream.

A workspace fill (``workspace.zero_()``, ``torch.zeros(...)``) that model code issues
right before an attention kernel runs serially behind independent work (cache gather,
projections). These two ops move it onto the device's side stream:

``fill_fork(buf, value, num_programs, start, numel) -> token``
    Fills ``buf.view(-1)[start : start + numel]`` (``numel = -1``: to the end) with
    ``value`` on the side stream and returns a token (an empty tensor on ``buf``'s
    device). The caller's *current* stream is read at call time (never cached), an event
    is recorded on it and the side stream waits for that event before filling, so the
    fill starts only after every earlier use of ``buf`` on the caller's stream: the fill
    can neither overwrite a buffer that an earlier kernel still reads nor race the kernel
    that used it before. The fill is the bounded-grid Triton kernel of
    ``custom_ops.kernels.fill`` on ``num_programs`` programs (``0``: full grid).
``fill_join(buf, token) -> ()``
    Makes the caller's current stream wait for the fill started by the matching
    ``fill_fork``. Call it before the first consumer of ``buf``. Under CUDA-graph
    capture it is what joins the side stream back into the capture, so it must run
    before the capture ends (``torch.cuda.graph`` raises "unjoined" otherwise).

On CPU (and any device without streams) ``fill_fork`` is a plain fill and ``fill_join``
does nothing.

How the pair stays ordered in a graph
-------------------------------------
Both ops declare ``buf`` mutated (``Tensor(a!)``). The fork's mutation orders it after
every earlier reader and writer of ``buf``; the join's declared mutation orders every
later reader of ``buf`` (the consumer) after the join, in FX and in Inductor's scheduler
(a reader of a mutated buffer depends on the mutating node). The token carries a data
dependency from fork to join. Mutable ops are never dead-code eliminated (and both are
registered with ``torch.fx.node.has_side_effect`` as well, since the join's output is
never used).

Lifetime
--------
The fork keeps a reference to ``buf`` in a per-device table of pending fills until the
join, so a buffer allocated inside a graph cannot be freed and reused while the side
stream still writes it; after the join the consumer's stream is ordered after the fill,
so the caching allocator's stream-ordered reuse is safe.

Parameters
----------
buf : Tensor, any dtype, mutated
    The buffer to fill. The Triton path needs it contiguous; other layouts fill with
    ``Tensor.fill_`` on the side stream (still forked and joined).
value : float
    The fill value, cast to ``buf``'s dtype (integers are exact up to 2**53).
num_programs : int
    Programs of the fill kernel (``0``: full grid). A bounded grid leaves the other SMs
    to the compute it overlaps with; see ``fusions.workspace_overlap`` for how it is chosen.
start, numel : int
    The filled element range of ``buf.view(-1)``; ``numel = -1`` fills to the end.

Example
-------
>>> token = torch.ops.attnfuse.fill_fork(workspace, 0.0, 48, 0, -1)
>>> kv = torch.mm(kv_c, w_kv_b)          # overlaps with the fill
>>> torch.ops.attnfuse.fill_join(workspace, token)
>>> out = attention(q, kv, workspace)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.fx

__all__ = ["fill_fork", "fill_join", "pending_fills", "side_stream"]


# ------------------------------------------------------------------ validation
def _fail(arg: str, value: object, expected: str) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {value}")


def validate_fork(buf: torch.Tensor, value: float, num_programs: int, start: int, numel: int) -> None:
    """Raise ``ValueError`` naming the first bad argument of ``fill_fork``."""
    if not isinstance(buf, torch.Tensor):
        _fail("buf", type(buf).__name__, "a tensor")
    if not isinstance(num_programs, int) or num_programs < 0:
        _fail("num_programs", num_programs, "an int >= 0 (0 = full grid)")
    total = buf.numel()
    if not isinstance(start, int) or start < 0 or start > total:
        _fail("start", start, f"an int in [0, {total}] (buf has {total} elements)")
    if not isinstance(numel, int) or numel < -1 or (numel >= 0 and start + numel > total):
        _fail("numel", numel, f"-1 or an int with start + numel <= {total}")
    if (start != 0 or numel not in (-1, total)) and not buf.is_contiguous():
        _fail("buf", f"strides {tuple(buf.stride())}", "a contiguous tensor when a sub-range is filled")
    try:
        torch.tensor([value], dtype=torch.float64).to(buf.dtype)
    except (RuntimeError, TypeError):
        _fail("value", value, f"a value representable in {buf.dtype}")


def _range(buf: torch.Tensor, start: int, numel: int) -> tuple[int, int]:
    return start, (buf.numel() - start if numel < 0 else numel)


# ------------------------------------------------------------------ stream state
@dataclass
class _PendingFill:
    done: torch.cuda.Event
    #: held so that a buffer allocated inside a graph outlives the side-stream write
    buf: torch.Tensor


class _DeviceState:
    """The side stream of one device and the fills started on it but not yet joined."""

    def __init__(self, device: torch.device) -> None:
        # One side stream per device: fills are short and ordered among themselves;
        # the stream object is cached, the caller's stream never is.
        self.stream = torch.cuda.Stream(device=device)
        self.pending: dict[int, _PendingFill] = {}


_STATE_LOCK = threading.Lock()
_STATES: dict[int, _DeviceState] = {}


def _state(device: torch.device) -> _DeviceState:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STATE_LOCK:
        state = _STATES.get(index)
        if state is None:
            state = _STATES[index] = _DeviceState(torch.device("cuda", index))
        return state


def side_stream(device: torch.device | str | int) -> torch.cuda.Stream:
    """The side stream ``fill_fork`` uses on ``device``."""
    return _state(torch.device(device) if not isinstance(device, torch.device) else device).stream


def pending_fills(device: torch.device | str | int) -> int:
    """Number of fills forked on ``device`` and not yet joined (0 after a well-formed graph)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return len(_state(device).pending)


def _pending_key(buf: torch.Tensor) -> int:
    return buf.data_ptr()


def _fill_here(buf: torch.Tensor, value: float, num_programs: int, start: int, numel: int) -> None:
    """The fill itself, on the current stream."""
    start, count = _range(buf, start, numel)
    if buf.is_cuda and buf.is_contiguous():
        from .kernels.fill import launch_fill

        launch_fill(buf, value, num_programs, start, count)
    elif start == 0 and count == buf.numel():
        buf.fill_(value)
    else:
        buf.view(-1)[start:start + count].fill_(value)


def _join_cuda(state: _DeviceState, key: int, caller: torch.cuda.Stream) -> None:
    pending = state.pending.pop(key, None)
    if pending is not None:
        caller.wait_event(pending.done)


# ------------------------------------------------------------------ the ops
@torch.library.custom_op("attnfuse::fill_fork", mutates_args=("buf",))
def fill_fork(buf: torch.Tensor, value: float, num_programs: int = 0, start: int = 0,
              numel: int = -1) -> torch.Tensor:
    validate_fork(buf, value, num_programs, start, numel)
    if not buf.is_cuda:
        _fill_here(buf, value, num_programs, start, numel)
        return buf.new_empty(0)
    state = _state(buf.device)
    caller = torch.cuda.current_stream(buf.device)  # at call time: capture streams differ
    key = _pending_key(buf)
    # A second fork of the same buffer before its join: the new fill must follow the old
    # one and anything queued after it, so join the old one first.
    _join_cuda(state, key, caller)
    ready = torch.cuda.Event()
    ready.record(caller)
    state.stream.wait_event(ready)
    with torch.cuda.stream(state.stream):
        _fill_here(buf, value, num_programs, start, numel)
        done = torch.cuda.Event()
        done.record(state.stream)
    state.pending[key] = _PendingFill(done=done, buf=buf)
    return buf.new_empty(0)


@fill_fork.register_fake
def _fill_fork_fake(buf, value, num_programs=0, start=0, numel=-1):
    torch._check(num_programs >= 0, lambda: f"num_programs: expected >= 0, got {num_programs}")
    torch._check(start >= 0, lambda: f"start: expected >= 0, got {start}")
    torch._check(numel >= -1, lambda: f"numel: expected -1 or >= 0, got {numel}")
    return buf.new_empty(0)


@torch.library.custom_op("attnfuse::fill_join", mutates_args=("buf",))
def fill_join(buf: torch.Tensor, token: torch.Tensor) -> None:
    # ``buf`` is declared mutated without being written: the declaration is what orders
    # every later reader of ``buf`` after the join.
    if token.device != buf.device:
        _fail("token", f"a tensor on {token.device}", f"a token from fill_fork on buf's device {buf.device}")
    if buf.is_cuda:
        _join_cuda(_state(buf.device), _pending_key(buf), torch.cuda.current_stream(buf.device))


@fill_join.register_fake
def _fill_join_fake(buf, token):
    torch._check(token.device == buf.device, lambda: f"token: expected device {buf.device}, got {token.device}")
    return None


for _op in (torch.ops.attnfuse.fill_fork.default, torch.ops.attnfuse.fill_join.default):
    torch.fx.node.has_side_effect(_op)
