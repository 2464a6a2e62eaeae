"""``workspace_overlap``: workspace fills moved off the critical path, or removed.

Attention kernels take workspace buffers that model code zero-fills right before the
call (``workspace.zero_()``, ``torch.zeros(...)`` for outputs), serialized behind
independent work (in DeepSeek's MLA prefill context loop: cache gather, ``kv_b_proj``,
concat). This fusion, for every constant fill of at least ``min_fill_bytes``:

1. **removes it** when it is provably dead: every reader of the filled value overwrites
   all of it first (a functional ``copy(fill, src)`` covering the buffer), or is a
   consumer registered as needing no zeros (``register_workspace_consumer``);
2. **narrows it** to the byte region its registered consumers need zeroed (a semaphore
   block in front of scratch space);
3. otherwise **overlaps it**: ``attnfuse::fill_fork`` starts the fill on the side stream
   at a point before independent work, ``attnfuse::fill_join`` waits for it right before
   the first consumer; the fill kernel's grid is sized by the cost model below, and the
   fill stays serial where overlap would not pay.

Forms matched (post-grad ATen, verified by tracing): functionalization turns
``torch.zeros``/``new_zeros``/``zeros_like``/``full``, and ``buf.zero_()`` /
``buf.fill_(v)`` on a buffer, into a fresh ``aten.full`` (plus a ``copy_`` epilogue when
the buffer is a graph input); ``full_like``, ``zeros``, ``new_full``, ``fill.Scalar`` and
``zero`` are accepted too. Graphs that still hold in-place ``fill_``/``zero_`` (an
engine's graph after reinplacing, or ``make_fx`` without functionalization) are handled
in place: the fork goes after the last earlier reader or writer of the buffer or any of
its views, the join before the first later one.

Ordering: both ops declare the buffer mutated and the join takes the fork's token, so no
reader of the buffer can be scheduled between them (see ``custom_ops.workspace_fill``).

Cost model (all thresholds are ``OverlapSettings`` fields, set through
``options={"workspace_overlap": {...}}``): the fill takes ``bytes / fill_bandwidth`` on
the full grid, and ``bytes / min(P * program_bandwidth, bounded_fill_bandwidth)`` on
``P`` programs, times ``side_stream_fill_slowdown`` when it runs beside the window
(measured). The window of independent work is the sum over its nodes of
``max(flops / compute, bytes / memory_bandwidth, kernel_floor)`` (matmuls, attention,
custom ops; nodes Inductor may fuse count their bytes only, views nothing). Beside a fill
on ``P`` programs the window slows to ``max(window * S / (S - P * share), (window_bytes +
fill_bytes) / memory_bandwidth)`` (``S`` SMs, ``share`` = ``program_sm_share``): it loses
the SM share the fill's programs hold and shares the memory bus. Overlap costs ``max(fill(P), window(P)) + fork_join_us`` against ``fill + window``
serially; the best ``P`` in ``[min_programs, max_programs]`` is taken when it saves at
least ``min_saving_us``. The fork goes at the latest point whose window already hides the
fill (the buffer lives no longer than needed), at the earliest legal point otherwise.
Hardware limits (H100, measured in ``benchmarks/bench_workspace.py``): a memory-bound
window cannot hide a fill (they share the bus), and a bounded-grid fill runs 1.7-2.8x
slower beside other kernels than alone, so a whole 128 MiB workspace fill is left serial
beside the latency-bound windows of the MLA context loop; the wins there are removal
(consumers that need no zeros) and narrowing (semaphore regions).

Origin: vLLM's "workspace fill on aux stream" (TRT-LLM ragged MLA prefill), with the
review's two races (the next fill overwriting a buffer the previous kernel still reads;
the first fill racing the buffer's earlier user) ruled out by the fork's event.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..custom_ops import workspace_fill as _workspace_fill  # noqa: F401  (registers the ops)
from .base import Fusion, SiteRecorder, fake_value, sdpa_ops

aten = torch.ops.aten

FILL_FORK = torch.ops.attnfuse.fill_fork.default
FILL_JOIN = torch.ops.attnfuse.fill_join.default


# ============================================================== consumer registry
@dataclass(frozen=True)
class WorkspaceNeed:
    """What a consumer op needs from the workspace argument ``arg``.

    ``needs_zeros``: whether it reads the fill's value at all (FlashInfer's FA2/FA3
    wrappers use the float workspace as split-k scratch: no; semaphore counters: yes).
    ``region``: ``(byte_offset, byte_length)`` that must hold the fill value; ``None``
    means the whole buffer.
    """

    arg: str
    needs_zeros: bool
    region: tuple[int, int] | None = None


#: FlashInfer's FA2/FA3 prefill/decode/MLA wrappers on SM90 (0.7): the float workspace is
#: split-k scratch, written before it is read; zeroing it is wasted work.
FLASHINFER_FA_SCRATCH = dict(needs_zeros=False)
#: TRT-LLM/XQA kernels keep completion-counter semaphores in the first 8 MiB of their
#: workspace: that block needs zeros before first use, the rest is scratch.
SEMAPHORE_REGION_BYTES = 8 * 1024 * 1024
TRTLLM_SEMAPHORES = dict(needs_zeros=True, region=(0, SEMAPHORE_REGION_BYTES))


def _op_key(op: Any) -> str:
    """``"namespace::name"`` of an op packet, overload or name string."""
    if isinstance(op, str):
        if "::" not in op:
            raise ValueError(f"op: expected 'namespace::name', got {op!r}")
        return op.split(".")[0]
    qualname = getattr(op, "_qualname", None)  # a torch.library.custom_op object
    if isinstance(qualname, str):
        return qualname
    schema = getattr(op, "_schema", None)  # an OpOverload
    if schema is not None and isinstance(getattr(schema, "name", None), str):
        return schema.name
    qualified = getattr(op, "_qualified_op_name", None)  # an OpOverloadPacket
    if isinstance(qualified, str):
        return qualified
    raise ValueError(f"op: expected a torch op (OpOverload or packet) or 'ns::name', got {op!r}")


class WorkspaceConsumerRegistry:
    """Which consumer ops need a filled workspace, and which region of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._needs: dict[str, WorkspaceNeed] = {}

    def register(self, op: Any, arg: str = "workspace", *, needs_zeros: bool,
                 region: tuple[int, int] | None = None) -> None:
        if not isinstance(arg, str) or not arg:
            raise ValueError(f"arg: expected the workspace argument's name, got {arg!r}")
        if region is not None:
            if (not isinstance(region, tuple) or len(region) != 2
                    or not all(isinstance(v, int) and v >= 0 for v in region) or region[1] == 0):
                raise ValueError(f"region: expected (byte_offset >= 0, byte_length > 0), got {region!r}")
            if not needs_zeros:
                raise ValueError(f"region: a consumer with needs_zeros=False needs no region, got {region!r}")
        with self._lock:
            self._needs[_op_key(op)] = WorkspaceNeed(arg, bool(needs_zeros), region)

    def unregister(self, op: Any) -> None:
        with self._lock:
            self._needs.pop(_op_key(op), None)

    def lookup(self, op: Any) -> WorkspaceNeed | None:
        try:
            key = _op_key(op)
        except ValueError:
            return None
        return self._needs.get(key)

    def snapshot(self) -> tuple[tuple[str, WorkspaceNeed], ...]:
        with self._lock:
            return tuple(sorted(self._needs.items()))


#: The process-wide registry the fusion consults unless given another in its options.
WORKSPACE_CONSUMERS = WorkspaceConsumerRegistry()


def register_workspace_consumer(op: Any, arg: str = "workspace", *, needs_zeros: bool,
                                region: tuple[int, int] | None = None) -> None:
    """Declare what ``op`` needs from its workspace argument ``arg``.

    ``op`` is a torch op (``torch.ops.ns.name`` or an overload) or ``"ns::name"``.
    ``needs_zeros=False``: the op never reads the fill's value (scratch space); a fill
    that feeds only such consumers is removed. ``needs_zeros=True, region=(offset,
    length)``: only those bytes must hold the fill value; the fill is narrowed to the
    union of its consumers' regions. Unregistered consumers are assumed to read every
    element. Example::

        register_workspace_consumer(torch.ops.mylib.mla_prefill, "float_workspace",
                                    **FLASHINFER_FA_SCRATCH)
        register_workspace_consumer("mylib::trtllm_decode", "workspace", **TRTLLM_SEMAPHORES)
    """
    WORKSPACE_CONSUMERS.register(op, arg, needs_zeros=needs_zeros, region=region)


def unregister_workspace_consumer(op: Any) -> None:
    """Forget ``op`` (it is treated as reading every element again)."""
    WORKSPACE_CONSUMERS.unregister(op)


# ============================================================== settings
@dataclass(frozen=True)
class OverlapSettings:
    """Thresholds of the cost model; defaults measured on H100 SXM (132 SMs)."""

    #: bandwidth of the native full-grid fill alone (measured: 128 MiB in 42 us, 394 MiB
    #: in 127 us; ``benchmarks/results/bench_workspace_fill.md``)
    fill_bandwidth_gbps: float = 3200.0
    #: bandwidth per program of the bounded-grid fill kernel: measured 61 GB/s up to 16
    #: programs, 52 GB/s at 33-49
    program_bandwidth_gbps: float = 52.0
    #: the most a bounded grid reaches: 49 and 66 programs both measured about 2.5 TB/s
    bounded_fill_bandwidth_gbps: float = 2500.0
    #: how much slower a bounded-grid fill runs on the side stream beside the window than
    #: alone: measured 1.7-2.8x on H100 in the MLA context loop (16-66 programs,
    #: ``benchmarks/results/bench_workspace_sweep.md``; the cause is not isolated). The
    #: worst case is used, so overlap is chosen only where it pays even then.
    side_stream_fill_slowdown: float = 2.8
    #: memory bandwidth the window's kernels share with the fill
    memory_bandwidth_gbps: float = 3000.0
    #: dense bf16 matmul/attention throughput the window's kernels reach
    compute_tflops: float = 600.0
    #: shortest time a launched kernel takes (launch latency and tail, under CUDA graphs)
    kernel_floor_us: float = 2.0
    #: SMs of the device
    num_sms: int = 132
    #: share of an SM one fill program takes from compute running beside it: a program
    #: holds 8 of the SM's 64 warp slots (``kernels.fill.NUM_WARPS``) and co-resides with
    #: the compute kernel's blocks
    program_sm_share: float = 0.125
    #: fewest fill programs tried: below this the fill takes longer than any window worth it
    min_programs: int = 8
    #: most fill programs: about half the SMs, beyond which a bounded fill starts to own
    #: the block dispatcher like a full-grid one (16-66 programs measured to overlap)
    max_programs: int = 66
    #: cost of the event record/wait pairs of one fork and join on the caller's stream
    fork_join_us: float = 2.0
    #: overlap must save at least this much, or the fill stays serial
    min_saving_us: float = 2.0
    #: fills smaller than this are not worth a fork and join (a 1 MiB fill takes less
    #: than the events around it); they are left alone without a near miss
    min_fill_bytes: int = 1024 * 1024
    #: also rewrite fills on CPU tensors (the ops are plain fills there): for tests
    overlap_on_cpu: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> OverlapSettings:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in options.items():
            if key == "consumers":
                continue
            if key not in fields:
                raise ValueError(f"workspace_overlap: unknown option {key!r}; expected one of {sorted(fields)}")
            kind = type(getattr(cls, key))
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: expected a bool, got {value!r}")
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key}: expected a number >= 0, got {value!r}")
            kwargs[key] = kind(value)
        settings = cls(**kwargs)
        if not 1 <= settings.min_programs <= settings.max_programs < settings.num_sms:
            raise ValueError(
                f"min_programs, max_programs: expected 1 <= min <= max < num_sms={settings.num_sms}, "
                f"got {settings.min_programs}, {settings.max_programs}")
        return settings


# ============================================================== cost model
@dataclass(frozen=True)
class WindowCost:
    """Estimated cost of a run of independent nodes."""

    time_us: float = 0.0
    bytes: int = 0

    def __add__(self, other: WindowCost) -> WindowCost:
        return WindowCost(self.time_us + other.time_us, self.bytes + other.bytes)


@dataclass(frozen=True)
class OverlapPlan:
    num_programs: int
    fill_us: float          # the bounded fill alone
    serial_us: float        # full-grid fill + window, one after the other
    overlap_us: float       # predicted with the fork and join
    hides: bool             # the fill ends within the (slowed) window

    @property
    def saving_us(self) -> float:
        return self.serial_us - self.overlap_us


def fill_time_us(fill_bytes: int, num_programs: int, s: OverlapSettings) -> float:
    """Predicted fill time on ``num_programs`` programs (0: full grid)."""
    bandwidth = s.fill_bandwidth_gbps
    if num_programs:
        bandwidth = min(s.bounded_fill_bandwidth_gbps, num_programs * s.program_bandwidth_gbps)
    return max(fill_bytes / (bandwidth * 1e3), s.kernel_floor_us)


def plan_overlap(fill_bytes: int, window: WindowCost, s: OverlapSettings) -> OverlapPlan:
    """The best bounded grid for a fill beside ``window`` (see the module docstring)."""
    serial = fill_time_us(fill_bytes, 0, s) + window.time_us
    shared_bus = (window.bytes + fill_bytes) / (s.memory_bandwidth_gbps * 1e3)
    best: OverlapPlan | None = None
    for programs in range(s.min_programs, s.max_programs + 1):
        fill = fill_time_us(fill_bytes, programs, s) * s.side_stream_fill_slowdown
        sms_left = s.num_sms - programs * s.program_sm_share
        slowed = max(window.time_us * s.num_sms / sms_left, shared_bus)
        total = max(fill, slowed) + s.fork_join_us
        if best is None or total < best.overlap_us - 1e-9:
            best = OverlapPlan(programs, fill, serial, total, fill <= slowed)
    assert best is not None
    return best


_VIEW_TARGETS = frozenset(
    getattr(aten, name).default
    for name in ("view", "reshape", "_unsafe_view", "permute", "expand", "squeeze", "unsqueeze",
                 "t", "transpose", "alias", "as_strided", "slice", "select", "unbind", "split",
                 "split_with_sizes", "chunk", "diagonal", "unfold", "view_as_real", "view_as_complex")
    if hasattr(getattr(aten, name, None), "default")
) | {aten.slice.Tensor, aten.select.int, aten.transpose.int, aten.squeeze.dim, aten.unsqueeze.default,
     aten.split.Tensor, aten.unbind.int, aten.view.dtype, aten.squeeze.dims, operator.getitem}

_MATMULS = {aten.mm.default: "mm", aten.addmm.default: "mm", aten.bmm.default: "bmm",
            aten.baddbmm.default: "bmm"}


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() if not _is_symbolic(value) else 0
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _is_symbolic(t: torch.Tensor) -> bool:
    return any(not isinstance(d, int) for d in t.shape)


def _matmul_flops(node: fx.Node) -> int:
    out = fake_value(node)
    a = fake_value(node.args[-2])
    if not isinstance(out, torch.Tensor) or not isinstance(a, torch.Tensor) or _is_symbolic(out) or _is_symbolic(a):
        return 0
    return 2 * out.numel() * int(a.shape[-1])


def _attention_flops(node: fx.Node) -> int:
    q, k, v = (fake_value(a) for a in node.args[:3])
    if not all(isinstance(t, torch.Tensor) and not _is_symbolic(t) for t in (q, k, v)):
        return 0
    batch_heads = q.numel() // (q.shape[-2] * q.shape[-1])
    return 2 * batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def node_cost(node: fx.Node, s: OverlapSettings) -> WindowCost:
    """Estimated time of one node on the caller's stream (module docstring)."""
    if node.op != "call_function" or node.target in _VIEW_TARGETS or node.target in (FILL_FORK, FILL_JOIN):
        return WindowCost()
    out_bytes = _tensor_bytes(fake_value(node))
    in_bytes = sum(_tensor_bytes(fake_value(a)) for a in node.all_input_nodes)
    moved = in_bytes + out_bytes
    memory_us = moved / (s.memory_bandwidth_gbps * 1e3)
    target = node.target
    flops = 0
    launches = True
    if target in _MATMULS:
        flops = _matmul_flops(node)
    elif target in sdpa_ops():
        flops = _attention_flops(node)
    elif isinstance(target, torch._ops.OpOverload) and target.namespace != "aten":
        pass  # custom op: an opaque kernel of at least its bytes
    elif isinstance(target, torch._ops.HigherOrderOperator):
        pass  # auto_functionalized custom op
    else:
        launches = False  # Inductor may fuse it into a neighbour: its bytes only
    compute_us = flops / (s.compute_tflops * 1e6)
    time = max(memory_us, compute_us)
    if launches:
        time = max(time, s.kernel_floor_us)
    return WindowCost(time, moved)


# ============================================================== fills
#: functional fills: target -> (index of the value argument or None for zero)
_FRESH_FILLS: dict[Any, int | None] = {
    aten.full.default: 1, aten.zeros.default: None, aten.full_like.default: 1,
    aten.zeros_like.default: None, aten.new_zeros.default: None, aten.new_full.default: 2,
    aten.fill.Scalar: 1, aten.zero.default: None,
}
_INPLACE_FILLS: dict[Any, int | None] = {aten.fill_.Scalar: 1, aten.zero_.default: None}


@dataclass
class _Fill:
    node: fx.Node
    value: float
    inplace: bool
    meta: torch.Tensor          # fake value of the filled buffer

    @property
    def nbytes(self) -> int:
        return self.meta.numel() * self.meta.element_size()


def _as_fill(node: fx.Node) -> _Fill | str | None:
    """The fill ``node`` performs, a reason it is not one we handle, or None."""
    if node.op != "call_function":
        return None
    table = _FRESH_FILLS if node.target in _FRESH_FILLS else _INPLACE_FILLS if node.target in _INPLACE_FILLS else None
    if table is None:
        return None
    index = table[node.target]
    value: Any = 0.0
    if index is not None:
        value = node.args[index] if len(node.args) > index else node.kwargs.get("fill_value", node.kwargs.get("value"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"fill value {value!r} is not a constant number"
    meta = fake_value(node)
    if not isinstance(meta, torch.Tensor):
        return "no tensor metadata on the fill"
    if _is_symbolic(meta):
        return f"symbolic shape {tuple(meta.shape)}"
    return _Fill(node, float(value), node.target in _INPLACE_FILLS, meta)


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _VIEW_TARGETS


def _alias_closure(root: fx.Node) -> list[fx.Node]:
    """``root`` and every view node reachable from it."""
    seen = [root]
    stack = [root]
    while stack:
        n = stack.pop()
        for u in n.users:
            if _is_view(u) and u.args and u.args[0] is n and u not in seen:
                seen.append(u)
                stack.append(u)
    return seen


def _view_root(node: fx.Node) -> fx.Node:
    while _is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


# ---------------------------------------------------------------- consumer reads
@dataclass
class _Read:
    """One non-view user of the filled buffer and what it needs of it."""

    node: fx.Node
    kind: str                         # "needs" | "scratch" | "overwrite"
    region: tuple[int, int] | None = None   # bytes, when kind == "needs" and known


def _consumer_arg_names(node: fx.Node, buffer: fx.Node) -> tuple[Any, list[str]]:
    """(op, argument names holding ``buffer``) for a custom-op call or its functional wrapper."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

    if node.target is auto_functionalized_v2 and node.args:
        bases = node.kwargs.get("_all_bases", [])
        names = []
        for key, val in node.kwargs.items():
            if key.startswith("_") and key.endswith("_base_index") and isinstance(val, int):
                if val < len(bases) and bases[val] is buffer:
                    arg = key[1:-len("_base_index")]
                    # a view of the base is described by _<arg>_size/_stride/_storage_offset
                    view = any(f"_{arg}_{k}" in node.kwargs for k in ("size", "stride", "storage_offset"))
                    names.append(arg if not view else f"{arg}[view]")
            elif val is buffer and not key.startswith("_"):
                names.append(key)
        return node.args[0], names
    if node.target is auto_functionalized and node.args:
        return node.args[0], [k for k, v in node.kwargs.items() if v is buffer]
    if isinstance(node.target, torch._ops.OpOverload):
        schema_args = node.target._schema.arguments
        names = [schema_args[i].name for i, a in enumerate(node.args) if a is buffer and i < len(schema_args)]
        names += [k for k, v in node.kwargs.items() if v is buffer]
        return node.target, names
    return None, []


def _classify(node: fx.Node, buffer: fx.Node, full_shape: tuple[int, ...],
              registry: WorkspaceConsumerRegistry) -> _Read:
    """What ``node`` (a user of ``buffer``) needs of the fill."""
    if node.op == "call_function" and node.target in (aten.copy.default, aten.copy_.default):
        if node.args[0] is buffer and node.args[1] is not buffer:
            src = fake_value(node.args[1])
            if isinstance(src, torch.Tensor) and _broadcasts_to(tuple(src.shape), full_shape):
                return _Read(node, "overwrite")
        return _Read(node, "needs")
    op, names = _consumer_arg_names(node, buffer)
    if op is None or not names:
        return _Read(node, "needs")
    need = registry.lookup(op)
    if need is None or any(n != need.arg for n in names):
        return _Read(node, "needs")
    if not need.needs_zeros:
        return _Read(node, "scratch")
    return _Read(node, "needs", need.region)


def _live_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` except views nobody uses (leftovers of functionalization)."""
    return [u for u in node.users if not (_is_view(u) and not u.users)]


def _scatters_cover(node: fx.Node, shape: tuple[int, ...]) -> bool:
    """Whether ``node`` feeds only a chain of ``slice_scatter`` writes along one dim that
    together overwrite every element before anything reads an intermediate value (the
    functional form of ``buf[:a] = x; buf[a:] = y``)."""
    current, dim, covered = node, None, []
    while True:
        users = _live_users(current)
        if len(users) != 1:
            return False
        user = users[0]
        if user.op != "call_function" or user.target is not aten.slice_scatter.default or user.args[0] is not current:
            return False
        args = list(user.args) + [None] * (6 - len(user.args))
        d = user.kwargs.get("dim", args[2] if args[2] is not None else 0)
        start = user.kwargs.get("start", args[3])
        end = user.kwargs.get("end", args[4])
        step = user.kwargs.get("step", args[5] if args[5] is not None else 1)
        if not isinstance(d, int) or step != 1:
            return False
        d %= len(shape)
        if dim is None:
            dim = d
        if d != dim:
            return False
        extent = shape[dim]
        start = 0 if start is None else start
        end = extent if end is None else end
        if not isinstance(start, int) or not isinstance(end, int):
            return False
        start = max(0, start + extent if start < 0 else start)
        end = min(extent, end + extent if end < 0 else end)
        covered.append((start, end))
        reach = 0
        for lo, hi in sorted(covered):
            if lo > reach:
                break
            reach = max(reach, hi)
        if reach >= extent:
            return True
        current = user


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


# ============================================================== the fusion
class WorkspaceOverlapFusion(Fusion):
    """Fills overlapped on a side stream, narrowed, or removed (module docstring)."""

    name = "workspace_overlap"
    origin = "vLLM 'workspace fill on aux stream' (TRT-LLM ragged MLA prefill)"
    source_modules = ("attnfuse.custom_ops.workspace_fill", "attnfuse.custom_ops.kernels.fill")

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.settings = OverlapSettings.from_options(self.options)
        registry = self.options.get("consumers", WORKSPACE_CONSUMERS)
        if not isinstance(registry, WorkspaceConsumerRegistry):
            raise ValueError(f"consumers: expected a WorkspaceConsumerRegistry, got {registry!r}")
        self.registry = registry

    def cache_key(self) -> str:
        # the registry changes what is emitted, so it is part of the key
        opts = {k: v for k, v in self.options.items() if k != "consumers"}
        return repr((sorted(opts.items()), self.registry.snapshot()))

    # ------------------------------------------------------------------ driver
    def apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
        fills: list[_Fill] = []
        for node in graph.nodes:
            found = _as_fill(node)
            if isinstance(found, _Fill):
                fills.append(found)
            elif isinstance(found, str):
                sites.near_miss(node, found)
        for fill in fills:
            if fill.node.graph is graph:  # still present
                self._rewrite(graph, fill, sites)

    def _rewrite(self, graph: fx.Graph, fill: _Fill, sites: SiteRecorder) -> None:
        order = {n: i for i, n in enumerate(graph.nodes)}
        node = fill.node
        if fill.inplace:
            buffer = node.args[0]
            if not isinstance(buffer, fx.Node):
                sites.near_miss(node, "in-place fill of a non-node")
                return
            aliases = _alias_closure(_view_root(buffer)) + [a for a in _alias_closure(node) if a is not node]
            # views created after the fill from its result alias the buffer too
            accesses = sorted({u for a in aliases + [node] for u in a.users if not _is_view(u)} - {node},
                              key=order.__getitem__)
            later = [u for u in accesses if order[u] > order[node]]
            earlier = [u for u in accesses if order[u] < order[node]]
            readers = [self._classify_inplace(u, aliases + [node], fill) for u in later]
        else:
            readers = self._fresh_readers(node, fill)
            if readers is None:
                sites.near_miss(node, "the filled buffer reaches a consumer through a view or an "
                                      "unsupported argument; left alone")
                return
            later = sorted({r.node for r in readers}, key=order.__getitem__)
            earlier = []
        small = fill.nbytes < self.settings.min_fill_bytes

        # 1. dead: nobody reads the filled value
        if later and all(r.kind in ("overwrite", "scratch") for r in readers):
            why = "every reader overwrites it" if all(r.kind == "overwrite" for r in readers) else \
                "its consumers need no zeros (registry)"
            sites.rewritten(node, f"fill of {fill.nbytes} B removed: {why}")
            if fill.inplace:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            else:
                self._replace_with_empty(graph, node, fill)
            return
        if small:
            return
        if not later:
            sites.near_miss(node, "no reader after the fill")
            return
        # 2. narrow to the registered regions
        start, numel = self._fill_range(readers, fill)
        fill_bytes = (fill.meta.numel() if numel < 0 else numel) * fill.meta.element_size()
        narrowed = numel >= 0
        consumer = later[0]

        # 3. where the fork may go and how much work it overlaps
        device = fill.meta.device
        refusal = None
        plan: OverlapPlan | None = None
        fork_before: fx.Node | None = None
        if device.type != "cuda" and not (device.type == "cpu" and self.settings.overlap_on_cpu):
            refusal = f"fill on {device}: no side stream to overlap on"
        else:
            plan, fork_before, window = self._place_fork(graph, fill, earlier, consumer, order, fill_bytes)
            if plan is None:
                refusal = ("no independent work between the earliest legal fork point and "
                           f"the first reader ({consumer.name})")
            elif plan.saving_us < self.settings.min_saving_us:
                refusal = (f"overlap does not pay: fill {fill_bytes} B beside a window of "
                           f"{window.time_us:.1f} us saves {plan.saving_us:.1f} us "
                           f"< min_saving_us={self.settings.min_saving_us}")
        if refusal is not None:
            if not narrowed:
                sites.near_miss(node, refusal)
                return
            # still worth narrowing: a serial fill of the region, right before the reader
            plan, fork_before = None, consumer

        # 4. rewrite: [empty] + fork before the window, join before the first reader
        assert fork_before is not None
        with graph.inserting_before(fork_before):
            target = node.args[0] if fill.inplace else self._empty_like_meta(graph, fill)
            programs = plan.num_programs if plan is not None else 0  # serial: full grid
            token = graph.call_function(FILL_FORK, (target, fill.value, programs, start, numel))
            token.meta["val"] = fill.meta.new_empty(0)
        with graph.inserting_before(consumer):
            join = graph.call_function(FILL_JOIN, (target, token))
            join.meta["val"] = None
        for n in (target, token, join):
            n.meta.setdefault("stack_trace", node.meta.get("stack_trace"))
        node.replace_all_uses_with(target)
        graph.erase_node(node)
        what = f"fill narrowed from {fill.nbytes} B to {fill_bytes} B" if narrowed else f"fill of {fill_bytes} B"
        if plan is None:
            detail = f"{what}, serial before {consumer.name} ({refusal})"
        else:
            detail = (f"{what} forked before {fork_before.name} on {plan.num_programs} programs, "
                      f"joined before {consumer.name}: predicted {plan.overlap_us:.1f} us vs "
                      f"{plan.serial_us:.1f} us serial")
        sites.rewritten(token, detail)

    def _place_fork(self, graph: fx.Graph, fill: _Fill, earlier: list[fx.Node], consumer: fx.Node,
                    order: dict[fx.Node, int], fill_bytes: int
                    ) -> tuple[OverlapPlan | None, fx.Node | None, WindowCost]:
        """The plan and the node to fork before: the latest point whose window hides the
        fill and pays, else the earliest legal point (after the last earlier access)."""
        node = fill.node
        if fill.inplace:
            floor = max(order[n] for n in [node.args[0]] + earlier)
        else:
            floor = self._leading_block_end(graph)
        candidates = [n for n in graph.nodes if floor < order[n] < order[consumer] and n is not node]
        window = WindowCost()
        fork_before: fx.Node | None = None
        plan: OverlapPlan | None = None
        for n in reversed(candidates):
            cost = node_cost(n, self.settings)
            if cost.time_us == 0.0:
                continue
            window = window + cost
            fork_before = n
            plan = plan_overlap(fill_bytes, window, self.settings)
            if plan.hides and plan.saving_us >= self.settings.min_saving_us:
                break
        return plan, fork_before, window

    # ------------------------------------------------------------------ helpers
    def _fresh_readers(self, node: fx.Node, fill: _Fill) -> list[_Read] | None:
        users = _live_users(node)
        if len(users) == 1 and _scatters_cover(node, tuple(fill.meta.shape)):
            return [_Read(users[0], "overwrite")]
        readers = []
        for user in users:
            if _is_view(user):
                # a view passes the buffer on; whoever reads the view reads the fill
                readers.append(_Read(user, "needs"))
                continue
            readers.append(_classify(user, node, tuple(fill.meta.shape), self.registry))
        return readers

    def _classify_inplace(self, user: fx.Node, aliases: list[fx.Node], fill: _Fill) -> _Read:
        buffer = fill.node.args[0]
        for alias in (buffer, fill.node):
            if alias in user.all_input_nodes:
                return _classify(user, alias, tuple(fill.meta.shape), self.registry)
        return _Read(user, "needs")  # through a view: conservatively a full read

    def _fill_range(self, readers: list[_Read], fill: _Fill) -> tuple[int, int]:
        """Element range to fill: the union of the registered regions, else everything."""
        needs = [r for r in readers if r.kind == "needs"]
        total = fill.meta.numel()
        if not needs or any(r.region is None for r in needs) or not fill.meta.is_contiguous():
            return 0, -1
        size = fill.meta.element_size()
        lo = min(r.region[0] for r in needs) // size
        hi = max(r.region[0] + r.region[1] for r in needs)
        hi = min(total, -(-hi // size))
        if lo == 0 and hi == total:
            return 0, -1
        return lo, hi - lo

    @staticmethod
    def _leading_block_end(graph: fx.Graph) -> int:
        """Position of the last placeholder/get_attr of the leading block (-1 if none):
        a fresh buffer of static shape depends on nothing after it."""
        end = -1
        for i, n in enumerate(graph.nodes):
            if n.op not in ("placeholder", "get_attr"):
                break
            end = i
        return end

    @staticmethod
    def _empty_like_meta(graph: fx.Graph, fill: _Fill) -> fx.Node:
        meta = fill.meta
        empty = graph.call_function(
            aten.empty_strided.default, (list(meta.shape), list(meta.stride())),
            {"dtype": meta.dtype, "layout": torch.strided, "device": meta.device, "pin_memory": False})
        empty.meta["val"] = meta
        return empty

    def _replace_with_empty(self, graph: fx.Graph, node: fx.Node, fill: _Fill) -> None:
        with graph.inserting_before(node):
            empty = self._empty_like_meta(graph, fill)
        node.replace_all_uses_with(empty)
        graph.erase_node(node)


__all__ = [
    "FLASHINFER_FA_SCRATCH",
    "TRTLLM_SEMAPHORES",
    "OverlapPlan",
    "OverlapSettings",
    "WORKSPACE_CONSUMERS",
    "WindowCost",
    "WorkspaceConsumerRegistry",
    "WorkspaceNeed",
    "WorkspaceOverlapFusion",
    "node_cost",
    "plan_overlap",
    "register_workspace_consumer",
    "unregister_workspace_consumer",
]
