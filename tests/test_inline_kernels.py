"""``passes.inline_kernels``: op calls become the kernel launches they make.

Graphs are traced on CPU with fake tensors, inlined with CPU allowed, then run eagerly:
the ``triton_kernel_wrapper_functional`` nodes launch the kernels under Triton's
interpreter, and results (caches included) must equal the op's plain-torch reference on
fresh random data. Under Inductor the step inlines only CUDA calls; that path runs in
``tests/test_launch_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional
from torch.fx.experimental.proxy_tensor import make_fx

import attnfuse
from attnfuse.custom_ops import grouped_decode as gd
from attnfuse.custom_ops import rope_write_kv as rwk
from attnfuse.custom_ops._dispatch import kernel_on_cpu
from attnfuse.passes.inline_kernels import inline_kernels

from test_rope_kv_write_op import _case

GD = torch.ops.attnfuse.grouped_decode.default
RW = torch.ops.attnfuse.rope_write_kv.default
TOL = dict(atol=2e-5, rtol=2e-5)


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _inline(fn, *args) -> torch.fx.GraphModule:
    gm = make_fx(fn, tracing_mode="fake")(*args)
    counts = inline_kernels(gm.graph, devices=("cuda", "cpu"))
    assert counts == {"inlined": 1}, counts
    gm.graph.lint()
    gm.recompile()
    return gm


def _decode_case(kind: str, g: torch.Generator):
    b, hq, d = 2, 8, 32
    if kind == "static_bool_mask":
        hkv, s = 2, 300
        q = torch.randn(b, hq, d, generator=g)
        k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
        mask = torch.rand(b, s, generator=g) > 0.2
        return (q, k, v, None, None, mask, 0.3, 0.0, -1, None, None, -1)
    if kind == "paged_seq_lens":
        hkv, page, blocks = 4, 16, 24
        q = torch.randn(b, hq, d, generator=g)
        k = torch.randn(blocks, page, hkv, d, generator=g)
        v = torch.randn(blocks, page, hkv, 16, generator=g)
        table = torch.randperm(blocks, generator=g)[:20].reshape(b, 10).int()
        lens = torch.tensor([150, 1], dtype=torch.int32)
        return (q, k, v, table, lens, None, 0.25, 0.0, -1, None, None, -1)
    # MLA: one shared latent row per position, V its leading 24 features, one split
    q = torch.randn(b, hq, 40, generator=g)
    kv = torch.randn(b, 1, 48, 40, generator=g)
    return (q, kv, None, None, None, None, 0.2, 0.0, -1, None, None, 24)


@pytest.mark.parametrize("kind", ["static_bool_mask", "paged_seq_lens", "mla_shared_latent"])
def test_inlined_grouped_decode_matches_reference(kind):
    args = _decode_case(kind, torch.Generator().manual_seed(0))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def fn(*ts):
        full = list(args)
        for i, t in zip(slots, ts):
            full[i] = t
        out, lse = GD(*full)
        return out * 2, lse

    gm = _inline(fn, *tensors)
    targets = _targets(gm)
    assert GD not in targets
    assert targets.count(triton_kernel_wrapper_functional) in (1, 2)
    with kernel_on_cpu():
        out, lse = gm(*tensors)
    want_out, want_lse = gd.reference(*args)
    torch.testing.assert_close(out, 2 * want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


def _functional_rope(args):
    """``rope_write_kv`` as the rope_kv_write pass emits it: ``auto_functionalized``,
    returning ``(q_out, k_out, new k_cache, new v_cache)``."""
    tensor_slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    names = [a.name for a in RW._schema.arguments]

    def fn(*ts):
        full = list(args)
        for i, t in zip(tensor_slots, ts):
            full[i] = t
        return tuple(auto_functionalized(RW, **dict(zip(names, full))))

    return fn, [args[i] for i in tensor_slots]


@pytest.mark.parametrize("layout", ["static", "paged_nhd"])
@pytest.mark.parametrize("return_k", [True, False])
def test_inlined_rope_write_kv_writes_caches_like_the_reference(layout, return_k):
    args, _, _ = _case(layout, positions_table=layout == "paged_nhd")
    args[-1] = return_k
    fn, tensors = _functional_rope(args)
    gm = _inline(fn, *tensors)
    assert auto_functionalized not in _targets(gm)
    assert triton_kernel_wrapper_functional in _targets(gm)
    ours = [t.clone() for t in tensors]
    with kernel_on_cpu():
        q_out, k_out, k_cache, v_cache = gm(*ours)
    want = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    want_q, want_k = rwk.reference(*want)
    torch.testing.assert_close(q_out, want_q, **TOL)
    if return_k:
        torch.testing.assert_close(k_out, want_k, **TOL)
    torch.testing.assert_close(k_cache, want[6], **TOL)
    torch.testing.assert_close(v_cache, want[7], **TOL)


def test_symbolic_shapes_keep_the_op_call():
    args = _decode_case("static_bool_mask", torch.Generator().manual_seed(1))
    q, k, v, mask = args[0], args[1], args[2], args[5]
    gm = make_fx(lambda q, k, v, m: GD(q, k, v, None, None, m, 0.3, 0.0, -1, None, None, -1)[0],
                 tracing_mode="symbolic")(q, k, v, mask)
    assert inline_kernels(gm.graph, devices=("cuda", "cpu")) == {"symbolic shape or stride": 1}
    assert GD in _targets(gm)


def test_strided_feature_dim_keeps_the_op_call():
    """The op would copy a q whose last dim is strided first: not the same launch."""
    args = _decode_case("static_bool_mask", torch.Generator().manual_seed(3))
    q_wide = torch.randn(2, 8, 64)
    gm = make_fx(lambda q, k, v, m: GD(q[..., ::2], k, v, None, None, m, 0.3, 0.0, -1, None, None, -1)[0],
                 tracing_mode="fake")(q_wide, args[1], args[2], args[5])
    counts = inline_kernels(gm.graph, devices=("cuda", "cpu"))
    assert counts == {"an input with a strided last dim (the op copies it)": 1}, counts
    assert GD in _targets(gm)


def test_result_used_whole_keeps_the_op_call():
    """A user that takes the (out, lse) tuple itself has nothing to be pointed at."""
    args = _decode_case("static_bool_mask", torch.Generator().manual_seed(4))
    gm = make_fx(lambda q, k, v, m: GD(q, k, v, None, None, m, 0.3, 0.0, -1, None, None, -1)[0],
                 tracing_mode="fake")(args[0], args[1], args[2], args[5])
    call = next(n for n in gm.graph.nodes if n.target is GD)
    with gm.graph.inserting_after(call):
        whole = gm.graph.call_function(tuple, (call,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], whole) if isinstance(out.args[0], tuple) else (out.args[0], whole),)
    counts = inline_kernels(gm.graph, devices=("cuda", "cpu"))
    assert counts == {"a result used other than by indexing": 1}, counts
    assert GD in _targets(gm)


def test_inductor_on_cpu_reports_calls_it_kept():
    """Inductor launches user kernels on CUDA only: CPU calls stay op calls, and say why."""
    args = _decode_case("static_bool_mask", torch.Generator().manual_seed(2))

    def fn(q, k, v, m):
        return GD(q, k, v, None, None, m, 0.3, 0.0, -1, None, None, -1)[0] + 1

    backend = attnfuse.AttnfuseBackend()
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit runs no pass
        out = torch.compile(fn, backend=backend)(args[0], args[1], args[2], args[5])
    torch.testing.assert_close(out, gd.reference(*args)[0] + 1, **TOL)
    inlined = [g.inlined for g in backend.report.graphs if not g.from_cache]
    assert inlined and all(i == {"not on CUDA": 1} for i in inlined), inlined


def test_inline_option_is_checked():
    with pytest.raises(ValueError, match="inline_kernels"):
        attnfuse.AttnfuseBackend({"inline_kernels": "yes"})


def test_ttir_memo_reuses_the_front_end_only_for_the_same_key(monkeypatch):
    """Inductor's write analysis generates TTIR per launch node; ours is made once per
    (kernel, dtypes, ints, constexprs) and other kernels are never touched."""
    import torch._higher_order_ops.triton_kernel_wrap as tkw

    from attnfuse.passes import inline_kernels as ik

    calls = []

    def fake_generate_ttir(kernel, kwargs, tma):
        calls.append(kernel)
        return object(), list(kwargs)

    monkeypatch.setattr(tkw, "generate_ttir", fake_generate_ttir)
    monkeypatch.setattr(ik, "_TTIR", {})
    ik._install_ttir_memo()
    ours = ik._wrapped(gd_kernel_fn(), 4, 3)
    other = object()
    t16 = torch.empty(2, dtype=torch.float16)
    first = tkw.generate_ttir(ours, {"Q": t16, "n": 8, "BLOCK": 16}, {})
    assert tkw.generate_ttir(ours, {"Q": torch.empty(5, dtype=torch.float16), "n": 8, "BLOCK": 16}, {}) is first
    assert tkw.generate_ttir(ours, {"Q": t16, "n": 9, "BLOCK": 16}, {}) is not first
    assert tkw.generate_ttir(ours, {"Q": t16.float(), "n": 8, "BLOCK": 16}, {}) is not first
    tkw.generate_ttir(other, {"Q": t16}, {})
    tkw.generate_ttir(other, {"Q": t16}, {})
    assert calls == [ours, ours, ours, other, other]


@pytest.mark.parametrize("name", ["identify_accessed_tensors", "identify_mutated_tensors"])
def test_access_analysis_memo_runs_once_per_key_and_hands_out_copies(monkeypatch, name):
    """Inductor's read/write analysis of a user kernel (either torch's name for it) runs
    once per (kernel, dtypes, ints, constexprs) for ours; each caller gets its own copy."""
    import torch._higher_order_ops.triton_kernel_wrap as tkw

    from attnfuse.passes import inline_kernels as ik

    calls = []

    def fake_analysis(kernel, kwargs, tma):
        calls.append(kernel)
        return {"writes": ["Out"], "n": kwargs.get("n")}

    monkeypatch.setattr(tkw, name, fake_analysis, raising=False)
    monkeypatch.setattr(ik, "_ACCESSES", {})
    ik._install_ttir_memo()
    ours = ik._wrapped(gd_kernel_fn(), 4, 3)
    t16 = torch.empty(2, dtype=torch.float16)
    first = getattr(tkw, name)(ours, {"Q": t16, "n": 8}, {})
    again = getattr(tkw, name)(ours, {"Q": torch.empty(3, dtype=torch.float16), "n": 8}, {})
    assert first == again == {"writes": ["Out"], "n": 8} and first is not again
    # Inductor's lowering analyses the autotuner's JIT function: the same entry
    assert getattr(tkw, name)(gd_kernel_fn(), {"Q": t16, "n": 8}, {}) == first
    assert getattr(tkw, name)(ours, {"Q": t16, "n": 9}, {})["n"] == 9
    other = object()
    getattr(tkw, name)(other, {"Q": t16}, {})
    getattr(tkw, name)(other, {"Q": t16}, {})
    assert calls == [ours, ours, other, other]
    monkeypatch.setenv("ATTNFUSE_TTIR_MEMO", "0")
    getattr(tkw, name)(ours, {"Q": t16, "n": 8}, {})
    assert calls[-1] is ours and len(calls) == 5


def gd_kernel_fn():
    from attnfuse.custom_ops.kernels.grouped_decode import _STAGE2

    return _STAGE2.fn


def test_early_compile_reads_the_call_as_literals():
    from attnfuse.passes.inline_kernels import early_compile_call

    source = "import triton\n@triton.jit\ndef k_0(x):\n    s = 'a\\\\n'\n"
    code = "async_compile.triton('k_0', " + repr(source) + ", device_str='cuda')\n"
    assert early_compile_call(code) == ("k_0", source, "cuda")
    triple = "async_compile.triton('k_1', '''\nimport triton\ndef k_1():\n    pass\n''')"
    assert early_compile_call(triple) == ("k_1", "\nimport triton\ndef k_1():\n    pass\n", "cuda")
    # anything else is left alone, and nothing is ever executed
    assert early_compile_call("async_compile.triton('k', __import__('os').getcwd())") is None
    assert early_compile_call("other.triton('k', 'src')") is None
    assert early_compile_call("async_compile.triton('k', 'src', device_str='cuda', x=1)") is None
    assert early_compile_call("not python (") is None


def _reinplaced_launches(gm: torch.fx.GraphModule) -> None:
    """What Inductor's reinplacing does to launches whose written tensors nothing else
    reads afterwards: users of a written value read the tensor itself, nothing is cloned."""
    for node in gm.graph.find_nodes(op="call_function", target=triton_kernel_wrapper_functional):
        for user in list(node.users):
            user.replace_all_uses_with(node.kwargs["kwargs"][user.args[1]])
            gm.graph.erase_node(user)
        node.kwargs = {**node.kwargs, "tensors_to_clone": []}


@pytest.mark.parametrize("kind", ["paged_seq_lens", "rope_paged"])
def test_direct_decomposition_equals_inductors(kind, monkeypatch):
    """Our reinplaced launches become the mutation nodes Inductor's traced decomposition
    makes (same targets, arguments and metadata), and the graph computes the same."""
    import copy

    import torch._inductor.fx_passes.post_grad as post_grad
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation

    from attnfuse.passes.inline_kernels import decompose_our_launches

    if kind == "rope_paged":
        args, _, _ = _case("paged_nhd", positions_table=True)
        fn, tensors = _functional_rope(args)
    else:
        args = _decode_case(kind, torch.Generator().manual_seed(5))
        slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def fn(*ts):
            full = list(args)
            for i, t in zip(slots, ts):
                full[i] = t
            return GD(*full)

        tensors = [args[i] for i in slots]
    gm = _inline(fn, *tensors)
    _reinplaced_launches(gm)
    theirs = copy.deepcopy(gm)
    n_launches = len(gm.graph.find_nodes(op="call_function", target=triton_kernel_wrapper_functional))
    assert n_launches >= 1
    monkeypatch.setenv("ATTNFUSE_DIRECT_DECOMPOSE", "0")  # the original pass only
    post_grad.decompose_triton_kernel_wrapper_functional(theirs.graph)
    assert decompose_our_launches(gm.graph) == n_launches
    gm.graph.lint()

    def described(g):
        out = []
        for n in g.nodes:
            if n.target is triton_kernel_wrapper_mutation:
                kw = {k: (v.name if isinstance(v, torch.fx.Node) else v) for k, v in n.kwargs["kwargs"].items()}
                vals = n.meta["eager_input_vals"][1]
                out.append((n.kwargs["kernel_idx"], n.kwargs["constant_args_idx"], n.kwargs["grid"], kw,
                            sorted(n.meta["val"]), sorted(vals["kwargs"]), vals["grid"], vals["kernel_idx"]))
            elif n.op == "call_function":
                out.append(n.target)
        return out

    assert described(gm.graph) == described(theirs.graph)
    assert triton_kernel_wrapper_functional not in _targets(gm)
    gm.recompile()
    theirs.recompile()
    ours_in, theirs_in = [t.clone() for t in tensors], [t.clone() for t in tensors]
    with kernel_on_cpu():
        got, want = gm(*ours_in), theirs(*theirs_in)
    for a, b in zip(list(got) + ours_in, list(want) + theirs_in):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_direct_decomposition_leaves_launches_with_clones_to_inductor():
    from attnfuse.passes.inline_kernels import decompose_our_launches

    args = _decode_case("paged_seq_lens", torch.Generator().manual_seed(6))
    gm = _inline(lambda q, k, v, t, s: GD(q, k, v, t, s, None, 0.25, 0.0, -1, None, None, -1),
                 *[args[i] for i in (0, 1, 2, 3, 4)])
    # not reinplaced: every launch still clones what it writes, and has users
    assert decompose_our_launches(gm.graph) == 0
    assert triton_kernel_wrapper_functional in _targets(gm)


def test_a_call_whose_inlining_raises_keeps_its_op_call(monkeypatch):
    """Not strict: the nodes made for the failing call are erased and the call stays; the
    graph still computes the op's result. Strict: the error propagates."""
    from attnfuse.passes import inline_kernels as ik

    args = _decode_case("paged_seq_lens", torch.Generator().manual_seed(7))
    tensors = [args[i] for i in (0, 1, 2, 3, 4)]

    def fn(q, k, v, t, s):
        return GD(q, k, v, t, s, None, 0.25, 0.0, -1, None, None, -1)

    real = ik._Emitter.launch
    launched = []

    def launch_then_fail(self, launch):
        real(self, launch)
        launched.append(launch)
        if len(launched) == 2:  # after both launches of the split call are in the graph
            raise RuntimeError("planted")

    monkeypatch.setattr(ik._Emitter, "launch", launch_then_fail)
    gm = make_fx(fn, tracing_mode="fake")(*tensors)
    before = [n.target for n in gm.graph.nodes]
    assert ik.inline_kernels(gm.graph, devices=("cuda", "cpu"), strict=False) == {"raised RuntimeError": 1}
    gm.graph.lint()
    assert [n.target for n in gm.graph.nodes] == before
    gm.recompile()
    torch.testing.assert_close(gm(*tensors)[0], gd.reference(*args)[0], **TOL)
    launched.clear()
    with pytest.raises(RuntimeError, match="planted"):
        ik.inline_kernels(gm.graph, devices=("cuda", "cpu"))
