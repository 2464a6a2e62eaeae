"""``workspace_overlap`` on CPU: the fill ops and kernel, where the pass puts fork and
join, what blocks a move, dead-fill and registry-driven removal, the cost model.

On CPU the fork/join ops are plain fills, so these tests check the graph rewrite and
that numerics are unchanged; the stream behaviour is tested on the GPU
(``test_workspace_overlap_gpu.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck

from attnfuse.custom_ops.kernels.fill import MAX_FULL_GRID_PROGRAMS, fill_settings, launch_fill
from attnfuse.custom_ops.workspace_fill import fill_fork, fill_join  # noqa: F401  (registers ops)
from attnfuse.fusions.workspace_overlap import (
    OverlapSettings,
    WindowCost,
    WorkspaceConsumerRegistry,
    WorkspaceOverlapFusion,
    plan_overlap,
    register_workspace_consumer,
    unregister_workspace_consumer,
)
from attnfuse.passes.testing import graph_diff

FORK = "attnfuse.fill_fork"
JOIN = "attnfuse.fill_join"
#: elements of the test workspaces: 64 KiB of fp32, above TEST_MIN_FILL_BYTES
WORKSPACE_NUMEL = 16384
#: settings that make overlap pay at CPU test sizes: a slow fill (64 KiB at 0.5 GB/s is
#: 131 us) beside matmuls counted at the 10 us kernel floor each
TEST_SETTINGS = {
    "overlap_on_cpu": True,
    "fill_bandwidth_gbps": 0.5,
    "program_bandwidth_gbps": 0.25,
    "bounded_fill_bandwidth_gbps": 0.5,
    "side_stream_fill_slowdown": 1.0,
    "kernel_floor_us": 10.0,
    "min_fill_bytes": 1024,
}
OPTIONS = {"workspace_overlap": TEST_SETTINGS}


# ------------------------------------------------------------------ consumer ops
@torch.library.custom_op("attnfuse_ws_test::reads_workspace", mutates_args=())
def reads_workspace(q: torch.Tensor, workspace: torch.Tensor) -> torch.Tensor:
    """A consumer that reads every element of its workspace (needs the fill)."""
    return q * workspace[: q.shape[-1]] + workspace.sum() + 1.0


@reads_workspace.register_fake
def _(q, workspace):
    return torch.empty_like(q)


@torch.library.custom_op("attnfuse_ws_test::scratch_attention", mutates_args=("workspace",))
def scratch_attention(q: torch.Tensor, workspace: torch.Tensor) -> torch.Tensor:
    """A consumer that uses its workspace as scratch: writes it before reading it."""
    n = q.numel()
    workspace.view(-1)[:n].copy_(q.reshape(-1) * 2)
    return workspace.view(-1)[:n].reshape(q.shape) + q


@scratch_attention.register_fake
def _(q, workspace):
    return torch.empty_like(q)


@torch.library.custom_op("attnfuse_ws_test::semaphore_kernel", mutates_args=("workspace",))
def semaphore_kernel(q: torch.Tensor, workspace: torch.Tensor) -> torch.Tensor:
    """Reads counters in the first 1 KiB of its workspace (must be zero), the rest is scratch."""
    counters_sum = workspace.view(-1)[:256].sum()
    workspace.view(-1)[256:512].copy_(q.reshape(-1)[:256])
    return q + counters_sum


@semaphore_kernel.register_fake
def _(q, workspace):
    return torch.empty_like(q)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def registered():
    """Register the test consumers and forget them afterwards."""
    register_workspace_consumer(scratch_attention, "workspace", needs_zeros=False)
    register_workspace_consumer("attnfuse_ws_test::semaphore_kernel", "workspace", needs_zeros=True,
                                region=(0, 1024))
    yield
    unregister_workspace_consumer(torch.ops.attnfuse_ws_test.scratch_attention)
    unregister_workspace_consumer("attnfuse_ws_test::semaphore_kernel")


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


class Recorder:
    """A SiteRecorder for applying the fusion to hand-made graphs."""

    def __init__(self):
        self.rewrites: list[tuple[str, str]] = []
        self.near_misses: list[tuple[str, str]] = []

    def rewritten(self, node, detail=""):
        self.rewrites.append((node.name, detail))

    def near_miss(self, node, reason):
        self.near_misses.append((node.name, reason))


def _ops_in_order(text: str) -> list[str]:
    """Op names of a normalized graph text, in order."""
    ops = []
    for line in text.splitlines():
        if " = " in line:
            ops.append(line.split(" = ", 1)[1].split("(", 1)[0])
    return ops


# ================================================================== ops and kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("num_programs", [0, 1, 3])
def test_fill_kernel_interpreted(dtype, num_programs):
    numel, start, count, value = 5000, 17, 4321, 1.0
    buf = (torch.rand(numel) * 100 + 2).to(dtype)
    expected = buf.clone()
    expected[start:start + count] = value
    launch_fill(buf, value, num_programs, start, count)
    assert torch.equal(buf, expected)


def test_fill_kernel_grid_settings():
    settings = fill_settings(2, 1 << 26, 0)
    assert settings.num_programs == MAX_FULL_GRID_PROGRAMS  # full grid, capped
    assert fill_settings(2, 1 << 26, 48).num_programs == 48
    assert fill_settings(4, 10, 48).num_programs == 1  # never more programs than tiles
    with pytest.raises(ValueError, match="num_programs"):
        fill_settings(2, 100, -1)


@pytest.mark.parametrize("shape, args", [
    ((1000,), (0.0, 8, 0, -1)),
    ((40, 25), (3.5, 0, 100, 500)),
    ((16, 16), (0.0, 1, 0, -1)),
])
def test_ops_opcheck(shape, args):
    buf = _rand(*shape)
    torch.library.opcheck(torch.ops.attnfuse.fill_fork.default, (buf, *args))
    torch.library.opcheck(torch.ops.attnfuse.fill_join.default, (buf, buf.new_empty(0)))
    # and on a transposed (non-contiguous) buffer filled whole
    torch.library.opcheck(torch.ops.attnfuse.fill_fork.default, (_rand(8, 4).t(), 2.0, 4, 0, -1))


def test_ops_on_cpu_are_a_plain_fill():
    buf = _rand(100)
    before = buf.clone()
    token = torch.ops.attnfuse.fill_fork(buf, 0.0, 4, 10, 30)
    torch.ops.attnfuse.fill_join(buf, token)
    expected = before.clone()
    expected[10:40] = 0.0
    assert torch.equal(buf, expected)
    assert token.numel() == 0


@pytest.mark.parametrize("kwargs, arg", [
    (dict(num_programs=-1), "num_programs"),
    (dict(start=200), "start"),
    (dict(start=50, numel=60), "numel"),
])
def test_fork_rejects_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: expected"):
        torch.ops.attnfuse.fill_fork(_rand(100), 0.0, **kwargs)


def test_fork_and_join_survive_dead_code_elimination():
    def fn(buf):
        token = torch.ops.attnfuse.fill_fork(buf, 0.0, 8, 0, -1)
        torch.ops.attnfuse.fill_join(buf, token)
        return None

    gm = make_fx(fn)(_rand(64))
    gm.graph.eliminate_dead_code()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.attnfuse.fill_fork.default, torch.ops.attnfuse.fill_join.default]


# ================================================================== moving the fill
def _mla_like(x, w1, w2, q):
    """A workspace zero-filled in front of a projection chain its consumer depends on."""
    workspace = torch.zeros(WORKSPACE_NUMEL, device=x.device)
    kv = (x @ w1) @ w2
    return torch.ops.attnfuse_ws_test.reads_workspace(kv + q, workspace)


def test_fill_moves_before_window_and_joins_before_consumer():
    args = [_rand(16, 16) for _ in range(4)]
    d = graph_diff(_mla_like, *args, fusions=["workspace_overlap"], backend="eager", options=OPTIONS)
    d.assert_fired(workspace_overlap=1)
    ops = _ops_in_order(d.after)
    assert "aten.full" not in ops
    # fork before both matmuls of the window, join right before the consumer
    assert ops.index(FORK) < ops.index("aten.mm")
    assert ops[ops.index("attnfuse_ws_test.reads_workspace") - 1] == JOIN
    assert ops.index(JOIN) > max(i for i, o in enumerate(ops) if o == "aten.mm")
    torch.testing.assert_close(d.outputs, _mla_like(*args), rtol=1e-6, atol=1e-5)


def test_fork_goes_at_latest_point_that_hides_the_fill():
    # a fast fill (2 GB/s: 33 us) hides behind the last matmul alone (10 us floor is not
    # enough, but one matmul counted at 40 us is), so the fork lands after the first one
    settings = dict(TEST_SETTINGS, fill_bandwidth_gbps=2.0, program_bandwidth_gbps=1.0,
                    bounded_fill_bandwidth_gbps=2.0, kernel_floor_us=40.0)
    args = [_rand(16, 16) for _ in range(4)]
    d = graph_diff(_mla_like, *args, fusions=["workspace_overlap"], backend="eager",
                   options={"workspace_overlap": settings})
    d.assert_fired(workspace_overlap=1)
    ops = _ops_in_order(d.after)
    mms = [i for i, o in enumerate(ops) if o == "aten.mm"]
    assert mms[0] < ops.index(FORK) < mms[1] < ops.index(JOIN)
    torch.testing.assert_close(d.outputs, _mla_like(*args), rtol=1e-6, atol=1e-5)


def test_inductor_keeps_fork_window_join_order():
    args = [_rand(32, 32) for _ in range(4)]
    d = graph_diff(_mla_like, *args, fusions=["workspace_overlap"], backend="inductor", options=OPTIONS)
    d.assert_fired(workspace_overlap=1)
    FileCheck().check("attnfuse.fill_fork").check("extern_kernels.mm").check("extern_kernels.addmm") \
        .check("attnfuse.fill_join").check("attnfuse_ws_test.reads_workspace").run(d.code)
    torch.testing.assert_close(d.outputs, _mla_like(*args), rtol=1e-6, atol=1e-5)


class _PersistentWorkspace(torch.nn.Module):
    """A module that zeroes its persistent workspace buffer every call (``ws.zero_()``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("workspace", torch.randn(WORKSPACE_NUMEL))

    def forward(self, x, w, q):
        self.workspace.zero_()
        kv = (x @ w) @ w
        return torch.ops.attnfuse_ws_test.reads_workspace(kv + q, self.workspace)


def test_persistent_workspace_zero_is_overlapped_and_written_back():
    args = [_rand(16, 16) for _ in range(3)]
    model, ref = _PersistentWorkspace(), _PersistentWorkspace()
    ref.workspace.copy_(model.workspace)
    d = graph_diff(model, *args, fusions=["workspace_overlap"], backend="eager", options=OPTIONS)
    d.assert_fired(workspace_overlap=1)
    torch.testing.assert_close(d.outputs, ref(*args), rtol=1e-6, atol=1e-5)
    assert torch.equal(model.workspace, torch.zeros(WORKSPACE_NUMEL))


# ------------------------------------------------------------------ in-place graphs
def _inplace_graph(fn, *args) -> fx.GraphModule:
    """A non-functional ATen graph (``zero_`` stays in place), as engines see after reinplacing."""
    return make_fx(fn)(*args)


def _reader_first(ws, x, w, q):
    s = ws.sum()  # the last earlier reader of the workspace
    kv = (x @ w) @ w
    ws.zero_()
    return torch.ops.attnfuse_ws_test.reads_workspace(kv + q, ws) + s


def _reader_between(ws, x, w, q):
    kv = x @ w
    s = ws.sum()  # a reader between the first matmul and the fill: the fill cannot move above it
    kv = kv @ w
    ws.zero_()
    return torch.ops.attnfuse_ws_test.reads_workspace(kv + q, ws) + s


def _apply(gm: fx.GraphModule, settings=None) -> Recorder:
    rec = Recorder()
    WorkspaceOverlapFusion(settings if settings is not None else TEST_SETTINGS).apply(gm.graph, rec)
    gm.graph.lint()
    gm.recompile()
    return rec


def _positions(gm: fx.GraphModule) -> dict[str, list[int]]:
    pos: dict[str, list[int]] = {}
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "call_function":
            pos.setdefault(str(n.target).split(".")[-2], []).append(i)
    return pos


@pytest.mark.parametrize("fn, fork_after_mms", [(_reader_first, 0), (_reader_between, 1)],
                         ids=["reader-first", "reader-between"])
def test_earlier_reader_bounds_the_move(fn, fork_after_mms):
    args = [_rand(WORKSPACE_NUMEL), _rand(16, 16), _rand(16, 16), _rand(16, 16)]
    gm = _inplace_graph(fn, *args)
    rec = _apply(gm)
    assert len(rec.rewrites) == 1, rec.near_misses
    pos = _positions(gm)
    assert "zero_" not in pos
    fork, join, mms, reader = pos["fill_fork"][0], pos["fill_join"][0], pos["mm"], pos["sum"][0]
    assert fork > reader  # after the last earlier reader of the buffer
    assert sum(m < fork for m in mms) == fork_after_mms  # ... and no further
    assert fork < mms[-1] < join < pos["reads_workspace"][0]
    ws = args[0].clone()
    out = gm(ws, *args[1:])
    ref_ws = args[0].clone()
    torch.testing.assert_close(out, fn(ref_ws, *args[1:]), rtol=1e-6, atol=1e-5)
    assert torch.equal(ws, ref_ws)


def test_reader_right_before_fill_leaves_it_serial():
    def fn(ws, x, w, q):
        kv = (x @ w) @ w
        s = ws.sum()  # no independent work left between this reader and the fill
        ws.zero_()
        return torch.ops.attnfuse_ws_test.reads_workspace(q, ws) + s + kv

    gm = _inplace_graph(fn, _rand(WORKSPACE_NUMEL), _rand(16, 16), _rand(16, 16), _rand(16, 16))
    rec = _apply(gm)
    assert rec.rewrites == []
    assert any("no independent work" in reason for _, reason in rec.near_misses)
    assert "zero_" in _positions(gm)


# ================================================================== removal
def test_fill_overwritten_by_covering_scatters_is_removed():
    def fn(x):
        buf = torch.zeros(64, 64)
        buf[:32] = x[:32]
        buf[32:] = x[32:] * 3
        return buf * 2

    x = _rand(64, 64)
    d = graph_diff(fn, x, fusions=["workspace_overlap"], backend="eager")
    d.assert_fired(workspace_overlap=1)
    assert "aten.full" not in d.after and FORK not in d.after
    assert "removed: every reader overwrites it" in d.report.sites[0].detail
    torch.testing.assert_close(d.outputs, fn(x))


def test_partially_overwritten_fill_is_kept():
    def fn(x):
        buf = torch.zeros(64, 64)
        buf[:32] = x[:32]
        buf[33:] = x[33:] * 3  # row 32 keeps its zeros
        return buf * 2

    x = _rand(64, 64)
    d = graph_diff(fn, x, fusions=["workspace_overlap"], backend="eager")
    d.assert_not_fired("workspace_overlap")
    assert "aten.full" in d.after
    torch.testing.assert_close(d.outputs, fn(x))


def test_inplace_fill_then_full_copy_is_removed():
    def fn(ws, x):
        ws.zero_()
        ws.copy_(x)
        return ws * 2

    args = (_rand(WORKSPACE_NUMEL), _rand(WORKSPACE_NUMEL))
    gm = _inplace_graph(fn, *args)
    rec = _apply(gm)
    assert len(rec.rewrites) == 1 and "every reader overwrites it" in rec.rewrites[0][1]
    assert "zero_" not in _positions(gm)
    torch.testing.assert_close(gm(args[0].clone(), args[1]), fn(args[0].clone(), args[1]))


def _scratch_model(x, w, q):
    workspace = torch.zeros(WORKSPACE_NUMEL, device=x.device)
    kv = (x @ w) @ w
    return torch.ops.attnfuse_ws_test.scratch_attention(kv + q, workspace)


def test_fill_feeding_only_scratch_consumers_is_removed(registered):
    args = [_rand(16, 16) for _ in range(3)]
    d = graph_diff(_scratch_model, *args, fusions=["workspace_overlap"], backend="eager", options=OPTIONS)
    d.assert_fired(workspace_overlap=1)
    assert "aten.full" not in d.after and FORK not in d.after and "aten.empty_strided" in d.after
    assert "need no zeros" in d.report.sites[0].detail
    torch.testing.assert_close(d.outputs, _scratch_model(*args), rtol=1e-6, atol=1e-5)


def test_unregistered_scratch_consumer_keeps_its_fill():
    args = [_rand(16, 16) for _ in range(3)]
    d = graph_diff(_scratch_model, *args, fusions=["workspace_overlap"], backend="eager", options=OPTIONS)
    d.assert_fired(workspace_overlap=1)
    assert FORK in d.after  # overlapped, not removed
    torch.testing.assert_close(d.outputs, _scratch_model(*args), rtol=1e-6, atol=1e-5)


def test_fill_narrowed_to_registered_region(registered):
    def fn(x, w, q):
        workspace = torch.zeros(WORKSPACE_NUMEL, device=x.device)
        kv = (x @ w) @ w
        return torch.ops.attnfuse_ws_test.semaphore_kernel(kv + q, workspace)

    args = [_rand(16, 16) for _ in range(3)]
    d = graph_diff(fn, *args, fusions=["workspace_overlap"], backend="eager",
                   options={"workspace_overlap": dict(TEST_SETTINGS, min_saving_us=0.0)})
    d.assert_fired(workspace_overlap=1)
    # 1 KiB of fp32: elements [0, 256)
    fork_line = next(line for line in d.after.splitlines() if FORK in line)
    assert fork_line.rstrip(")").endswith("0, 256")
    torch.testing.assert_close(d.outputs, fn(*args), rtol=1e-6, atol=1e-5)


def test_narrowed_fill_stays_serial_where_overlap_does_not_pay(registered):
    def fn(x, w, q):
        workspace = torch.zeros(WORKSPACE_NUMEL, device=x.device)
        kv = (x @ w) @ w
        return torch.ops.attnfuse_ws_test.semaphore_kernel(kv + q, workspace)

    args = [_rand(16, 16) for _ in range(3)]
    # default settings: no overlap on CPU, but the fill still shrinks to the 1 KiB region
    d = graph_diff(fn, *args, fusions=["workspace_overlap"], backend="eager",
                   options={"workspace_overlap": {"min_fill_bytes": 1024}})
    d.assert_fired(workspace_overlap=1)
    assert "narrowed from 65536 B to 1024 B, serial" in d.report.sites[0].detail
    ops = _ops_in_order(d.after)
    fork = ops.index(FORK)
    assert ops[fork + 1:fork + 3] == [JOIN, "auto_functionalized_v2"]  # the consumer, functionalized
    torch.testing.assert_close(d.outputs, fn(*args), rtol=1e-6, atol=1e-5)


def test_private_registry_through_options():
    registry = WorkspaceConsumerRegistry()
    registry.register(torch.ops.attnfuse_ws_test.scratch_attention, needs_zeros=False)
    args = [_rand(16, 16) for _ in range(3)]
    d = graph_diff(_scratch_model, *args, fusions=["workspace_overlap"], backend="eager",
                   options={"workspace_overlap": dict(TEST_SETTINGS, consumers=registry)})
    assert "need no zeros" in d.report.sites[0].detail


def test_registry_rejects_bad_declarations():
    registry = WorkspaceConsumerRegistry()
    with pytest.raises(ValueError, match="^op: expected"):
        registry.register("no_namespace", needs_zeros=True)
    with pytest.raises(ValueError, match="^region: expected"):
        registry.register("a::b", needs_zeros=True, region=(0, 0))
    with pytest.raises(ValueError, match="^region: a consumer with needs_zeros=False"):
        registry.register("a::b", needs_zeros=False, region=(0, 8))


# ================================================================== leaving fills alone
def test_cpu_fill_left_alone_by_default():
    args = [_rand(16, 16) for _ in range(4)]
    d = graph_diff(_mla_like, *args, fusions=["workspace_overlap"], backend="eager",
                   options={"workspace_overlap": {"min_fill_bytes": 1024}})
    d.assert_not_fired("workspace_overlap")
    assert any("no side stream" in m.reason for m in d.report.near_misses)


def test_overlap_that_does_not_pay_stays_serial():
    # default H100 settings: a 64 KiB fill takes the 2 us floor; fork and join cost as much
    args = [_rand(16, 16) for _ in range(4)]
    d = graph_diff(_mla_like, *args, fusions=["workspace_overlap"], backend="eager",
                   options={"workspace_overlap": {"min_fill_bytes": 1024, "overlap_on_cpu": True}})
    d.assert_not_fired("workspace_overlap")
    assert any("overlap does not pay" in m.reason for m in d.report.near_misses)
    assert "aten.full" in d.after


def test_small_and_unused_fills_are_not_candidates():
    def fn(x):
        return x + torch.full((4,), 2.0)  # a constant, not a workspace

    d = graph_diff(fn, _rand(4), fusions=["workspace_overlap"], backend="eager", options=OPTIONS)
    d.assert_not_fired("workspace_overlap")
    assert d.report.near_misses == []


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unknown option 'min_window'"):
        WorkspaceOverlapFusion({"min_window": 3})
    with pytest.raises(ValueError, match="min_programs, max_programs"):
        WorkspaceOverlapFusion({"max_programs": 200})


# ================================================================== cost model
MIB = 1024 * 1024


def test_cost_model_latency_bound_window_overlaps_on_bounded_grid():
    # without the measured side-stream slowdown: the model's bounded-grid arithmetic
    s = OverlapSettings(side_stream_fill_slowdown=1.0)
    # 128 MiB fill (42 us alone) beside a 30 us latency-bound window moving 20 MB
    plan = plan_overlap(128 * MIB, WindowCost(time_us=30.0, bytes=20 * 10**6), s)
    assert s.min_programs <= plan.num_programs <= s.max_programs
    assert plan.overlap_us < plan.serial_us - s.min_saving_us
    # the fill dominates: the grid is the smallest that reaches the bounded bandwidth
    bounded_us = 128 * MIB / (s.bounded_fill_bandwidth_gbps * 1e3)
    assert plan.overlap_us == pytest.approx(bounded_us + s.fork_join_us, rel=1e-3)
    assert plan.num_programs == -(-int(s.bounded_fill_bandwidth_gbps) // int(s.program_bandwidth_gbps))


@pytest.mark.parametrize("window_us", [12.2, 29.8, 100.3])
def test_default_model_leaves_whole_workspace_fills_serial(window_us):
    # the pass's own window estimates for MLA context chunks of 512, 2048 and 8192 tokens:
    # with the measured side-stream slowdown, overlapping a 128 MiB fill never pays
    # (bench_workspace_sweep.md: no forced overlap beat serial)
    s = OverlapSettings()
    plan = plan_overlap(128 * MIB, WindowCost(time_us=window_us, bytes=int(window_us * 2e6)), s)
    assert plan.saving_us < s.min_saving_us


def test_default_model_overlaps_a_small_fill_beside_long_compute():
    s = OverlapSettings()
    plan = plan_overlap(64 * MIB, WindowCost(time_us=200.0, bytes=50 * 10**6), s)
    assert plan.saving_us >= s.min_saving_us and plan.hides


def test_cost_model_memory_bound_window_does_not_pay():
    s = OverlapSettings()
    # a window that streams 400 MB (133 us at 3 TB/s): the fill would only share the bus
    plan = plan_overlap(128 * MIB, WindowCost(time_us=133.0, bytes=400 * 10**6), s)
    assert plan.saving_us < s.min_saving_us


def test_cost_model_long_compute_window_hides_a_small_grid():
    s = OverlapSettings(side_stream_fill_slowdown=1.0)
    plan = plan_overlap(128 * MIB, WindowCost(time_us=400.0, bytes=10**6), s)
    assert plan.hides and plan.num_programs < s.max_programs
