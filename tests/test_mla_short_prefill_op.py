"""attnfuse::mla_prefill on CPU: both forms against the float32 definition and each other."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.custom_ops import mla_prefill as mp

H, D_NOPE, D_ROPE, D_V, R = 4, 32, 16, 32, 64
#: per dtype: (atol, rtol) of an output against the float32 reference
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def make(lens, dtype=torch.float32, topk=None, seed=0, covering=True):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    w = rnd(H, D_NOPE + D_V, R, s=1 / math.sqrt(R))
    inp = dict(
        q_nope=rnd(T, H, D_NOPE), q_pe=rnd(T, H, D_ROPE), ckv=rnd(T, R), k_pe=rnd(T, D_ROPE),
        w_uk=w[:, :D_NOPE].contiguous(), w_uv=w[:, D_NOPE:].contiguous().transpose(1, 2),
        cu_seqlens=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32),
        max_seqlen=max(lens), scale=1 / math.sqrt(D_NOPE + D_ROPE))
    inp["topk_indices"] = None if topk is None else top_k(lens, topk, g, covering)
    return inp


def top_k(lens, k, g, covering):
    """Distinct visible rows per query: all of them when at most k (if ``covering``)."""
    rows, start = [], 0
    for L in lens:
        for p in range(L):
            visible = torch.arange(start, start + p + 1)
            n = min(k, p + 1) if covering else min(k, max(1, (p + 1) // 2))
            pick = visible[torch.randperm(p + 1, generator=g)[:n]]
            rows.append(torch.cat([pick, torch.full((k - n,), -1)]))
        start += L
    return torch.stack(rows).to(torch.int32)


def call(inp, path="auto", covers=None, causal=True):
    covers = inp["topk_indices"] is not None if covers is None else covers
    return torch.ops.attnfuse.mla_prefill(
        inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uk"], inp["w_uv"],
        inp["cu_seqlens"], inp["max_seqlen"], inp["scale"], causal, inp["topk_indices"], covers, path)


def reference(inp, causal=True):
    return mp.mla_prefill_reference(inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uk"],
                                    inp["w_uv"], inp["cu_seqlens"], inp["max_seqlen"], inp["scale"],
                                    causal, inp["topk_indices"]).float()


RAGGED = [
    [7],              # one sequence
    [5, 1, 9, 3],     # ragged, with a length-1 sequence
    [1, 1, 1],        # all length 1
    [4, 4, 4],        # uniform
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens", RAGGED)
@pytest.mark.parametrize("causal", [True, False])
def test_dense_forms_match_reference_and_each_other(lens, dtype, causal):
    inp = make(lens, dtype)
    ref = reference(inp, causal)
    atol, rtol = TOLERANCES[dtype]
    outs = {p: call(inp, p, causal=causal).float() for p in ("mha", "absorbed", "auto")}
    for path, out in outs.items():
        assert out.shape == (sum(lens), H, D_V) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{path}: {m}")
    torch.testing.assert_close(outs["mha"], outs["absorbed"], atol=2 * atol, rtol=2 * rtol)


def test_causal_mask_is_applied():
    inp = make([6])
    assert not torch.allclose(call(inp, "mha", causal=True), call(inp, "mha", causal=False))
    # the first query sees only itself: its output is its own value
    v0 = torch.einsum("r,hrv->hv", inp["ckv"][0], inp["w_uv"])
    torch.testing.assert_close(call(inp, "absorbed")[0], v0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[5, 1, 9, 3], [8]])
def test_sparse_covering_both_forms(lens, dtype):
    # every sequence no longer than k and the indexer lists every visible row: the dense
    # MHA form is the same attention as the sparse absorbed form
    inp = make(lens, dtype, topk=12)
    ref = reference(inp)
    atol, rtol = TOLERANCES[dtype]
    for path in ("mha", "absorbed", "auto"):
        torch.testing.assert_close(call(inp, path).float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(ref, reference(make(lens, dtype)), atol=1e-5, rtol=1e-5)


def test_sparse_subset_takes_absorbed_form():
    inp = make([9, 1, 6], topk=4, covering=False)
    ref = reference(inp)
    assert not torch.allclose(ref, reference(make([9, 1, 6])), atol=1e-3)  # really sparse
    torch.testing.assert_close(call(inp, "absorbed"), ref, atol=2e-5, rtol=2e-5)
    assert mp.mla_prefill_path(inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uv"],
                               inp["cu_seqlens"], inp["max_seqlen"], inp["topk_indices"], False) == "absorbed"
    torch.testing.assert_close(call(inp, "auto", covers=False), ref, atol=2e-5, rtol=2e-5)


def test_sparse_empty_row_gives_zeros():
    inp = make([3], topk=2)
    inp["topk_indices"][1] = -1
    out = call(inp, "absorbed", covers=False)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, reference(inp).to(out.dtype), atol=2e-5, rtol=2e-5)


def test_rule():
    rule = mp.RULES["sm90"]
    base = dict(qk_nope_dim=128, rope_dim=64, v_head_dim=128, element_size=2, rule=rule)
    # dense on H100: the MHA form wherever its decompressed K/V fit (its host work is no
    # larger than the absorbed form's and its kernels are faster), wherever the offsets are
    for heads, lens in (([16, [128]]), ([16, [2048]]), ([16, [256] * 8]), ([16, [512] * 8]),
                        ([16, [2048, 682, 1, 1024]]), ([16, [4096]]), ([128, [128]]),
                        ([128, [512]]), ([128, [96] * 5]), ([16, [16384]]), ([128, [16384]])):
        args = dict(num_tokens=sum(lens), num_heads=heads, num_seqs=len(lens), max_seqlen=max(lens),
                    topk=None, topk_covers_visible=False, **base)
        for on_host in (False, True):
            assert mp.choose_path(offsets_on_host=on_host, **args) == "mha", (heads, lens, on_host)
    # a rule may give calls with host offsets (which never wait for the GPU) rows of their own
    split = mp.PrefillRule("test", short_absorbed=((16, 8, 2048),),
                           short_absorbed_host_offsets=((16, 8, 4096, 2048),))
    args = dict(num_tokens=3755, num_heads=16, num_seqs=4, max_seqlen=2048, topk=None,
                topk_covers_visible=False, **{**base, "rule": split})
    assert mp.choose_path(offsets_on_host=True, **args) == "absorbed"
    assert mp.choose_path(offsets_on_host=False, **args) == "mha"
    # the memory budget: a batch is decompressed in groups, one 32k-token sequence at
    # 128 heads does not fit
    assert mp.choose_path(num_tokens=30038, num_heads=128, num_seqs=4, max_seqlen=16384, topk=None,
                          topk_covers_visible=False, **base) == "mha"
    assert mp.choose_path(num_tokens=32768, num_heads=128, num_seqs=1, max_seqlen=32768, topk=None,
                          topk_covers_visible=False, **base) == "absorbed"
    assert mp.decompressed_kv_bytes(32768, 128, 192, 128, 2) > mp.DECOMPRESSED_KV_BUDGET_BYTES
    # a rule may send short launch-bound calls to the absorbed form
    short = mp.PrefillRule("test", short_absorbed=((16, 1, 512),))
    assert mp.choose_path(num_tokens=513, num_heads=16, num_seqs=1, max_seqlen=513, topk=None,
                          topk_covers_visible=False, **{**base, "rule": short}) == "mha"
    assert mp.choose_path(num_tokens=256, num_heads=16, num_seqs=1, max_seqlen=256, topk=None,
                          topk_covers_visible=False, **{**base, "rule": short}) == "absorbed"
    # sparse: MHA only up to k, and only with the indexer's promise
    sparse = dict(num_tokens=4096, num_heads=128, num_seqs=2, topk=2048, **base)
    assert mp.choose_path(max_seqlen=2048, topk_covers_visible=True, **sparse) == "mha"
    assert mp.choose_path(max_seqlen=2049, topk_covers_visible=True, **sparse) == "absorbed"
    assert mp.choose_path(max_seqlen=2048, topk_covers_visible=False, **sparse) == "absorbed"


def test_mha_form_in_budget_groups(monkeypatch):
    inp = make([5, 1, 9, 3, 2])
    ref = reference(inp)
    per_token = mp.decompressed_kv_bytes(1, H, D_NOPE + D_ROPE, D_V, 4)
    monkeypatch.setattr(mp, "DECOMPRESSED_KV_BUDGET_BYTES", 6 * per_token)
    assert mp.mha_groups(inp["cu_seqlens"].tolist(), 6) == [(0, 6), (6, 15), (15, 20)]
    torch.testing.assert_close(call(inp, "mha"), ref, atol=2e-5, rtol=2e-5)


def test_mla_plan_groups_cover_every_query_once():
    cu = [0, 5, 6, 20]
    groups = mp.mla_plan_groups(cu, 4)
    rows = [r for g in groups for a, b, _, _ in g for r in range(a, b)]
    assert rows == list(range(20))
    assert all(sum(b - a for a, b, _, _ in g) <= 4 for g in groups)
    for g in groups:
        for a, b, s, e in g:
            assert e == b and s in cu and s <= a  # keys: the sequence's prefix up to the chunk end


def test_opcheck():
    for inp in (make([5, 1, 3]), make([4, 2], topk=3)):
        args = (inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uk"], inp["w_uv"],
                inp["cu_seqlens"], inp["max_seqlen"], inp["scale"], True, inp["topk_indices"], False, "auto")
        torch.library.opcheck(torch.ops.attnfuse.mla_prefill.default, args)


def _bad(**changes):
    inp = make([3, 2])
    inp.update(changes)
    return inp


@pytest.mark.parametrize("changes, match", [
    (dict(q_nope=torch.randn(5, H)), "q_nope: expected a 3-D"),
    (dict(q_pe=torch.randn(5, H + 1, D_ROPE)), "q_pe: expected shape"),
    (dict(ckv=torch.randn(4, R)), "ckv: expected 5 rows"),
    (dict(k_pe=torch.randn(5, D_ROPE + 2)), "k_pe: expected shape"),
    (dict(w_uk=torch.randn(H, D_NOPE, R + 1)), "w_uk: expected shape"),
    (dict(w_uv=torch.randn(H + 1, R, D_V)), "w_uv: expected shape"),
    (dict(ckv=torch.randn(5, R, dtype=torch.float64)), "ckv: expected float16/bfloat16/float32"),
    (dict(k_pe=torch.randn(5, D_ROPE, dtype=torch.float16)), "k_pe: expected dtype torch.float32"),
    (dict(cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.float32)), "cu_seqlens: expected a 1-D int"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), "cu_seqlens: expected to start at 0 and end at 5"),
    (dict(max_seqlen=2), "max_seqlen: expected >= the longest sequence 3"),
    (dict(max_seqlen=0), "max_seqlen: expected a positive int"),
    (dict(scale=float("nan")), "scale: expected a finite positive"),
    (dict(topk_indices=torch.zeros(4, 2, dtype=torch.int32)), "topk_indices: expected a \\(5, K >= 1\\)"),
    (dict(topk_indices=torch.zeros(5, 2)), "topk_indices: expected a \\(5, K >= 1\\) int32/int64"),
])
def test_bad_input_raises_value_error(changes, match):
    with pytest.raises(ValueError, match=match):
        call(_bad(**changes), covers=False)


@pytest.mark.parametrize("path", ["auto", "mha", "absorbed"])
def test_equal_length_batch_needs_no_offsets_tensor(path):
    """cu_seqlens=None (what mla_short_prefill emits): T / max_seqlen sequences of
    max_seqlen tokens, the same attention as the explicit offsets."""
    inp = make([4, 4, 4], seed=3)
    with_offsets = call(inp, path)
    inp["cu_seqlens"] = None
    torch.testing.assert_close(call(inp, path), with_offsets, atol=0, rtol=0)
    torch.testing.assert_close(reference(inp), reference({**inp, "cu_seqlens": make([4, 4, 4])["cu_seqlens"]}))
    assert mp.mla_prefill_path(inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uv"], None,
                               4, None, False) in ("mha", "absorbed")


def test_offsets_validation_without_offsets_tensor():
    inp = make([4, 4, 4])
    inp["cu_seqlens"] = None
    inp["max_seqlen"] = 5
    with pytest.raises(ValueError, match="12 tokens are not a multiple of it"):
        call(inp)
    # offsets on another device than q's and not on the CPU (a call with a meta tensor
    # would dispatch to the fake kernel, so the check is called directly)
    inp = make([3, 2])
    inp["cu_seqlens"] = inp["cu_seqlens"].to("meta")
    with pytest.raises(ValueError, match="cu_seqlens: expected device cpu or the CPU, got meta"):
        mp.validate(*(inp[k] for k in ("q_nope", "q_pe", "ckv", "k_pe", "w_uk", "w_uv", "cu_seqlens",
                                       "max_seqlen", "scale")), True, None, False, "auto")


def test_host_offsets_known_without_a_device_read():
    assert mp.host_offsets(None, 12, 4) == [0, 4, 8, 12]
    assert mp.host_offsets(None, 0, 4) == [0, 0]
    assert mp.host_offsets(torch.tensor([0, 2, 7]), 7, 5) == [0, 2, 7]
    assert mp.host_offsets(torch.tensor([0, 2, 7], device="meta"), 7, 5) is None


def test_bad_path_raises_value_error():
    with pytest.raises(ValueError, match="path: expected one of"):
        call(make([3]), "fastest")
    sparse = make([3], topk=2, covering=False)
    with pytest.raises(ValueError, match="needs topk_covers_visible=True"):
        call(sparse, "mha", covers=False)
    with pytest.raises(ValueError, match="needs max_seqlen <= K = 2"):
        call(sparse, "mha", covers=True)


def test_op_is_kept_out_of_cuda_graphs():
    """The op reads cu_seqlens on the host: Inductor must see it as CUDA-graph unsafe
    (reduce-overhead then runs it outside the graph), and a call during a capture says why
    it cannot run instead of failing inside CUDA."""
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    from attnfuse.custom_ops import grouped_decode, rope_write_kv  # noqa: F401  (registers them)

    op = torch.ops.attnfuse.mla_prefill.default
    assert torch.Tag.cudagraph_unsafe in op.tags
    graph = torch.fx.Graph()
    node = graph.call_function(op, tuple(graph.placeholder(f"a{i}") for i in range(9)))
    assert is_cudagraph_unsafe_fx_node(node)
    # the other ops are capturable and must stay that way
    for other in (torch.ops.attnfuse.grouped_decode.default, torch.ops.attnfuse.rope_write_kv.default):
        assert torch.Tag.cudagraph_unsafe not in other.tags


def test_call_during_a_capture_raises(monkeypatch):
    monkeypatch.setattr(mp, "_stream_capturing", lambda t: True)
    with pytest.raises(RuntimeError, match="cannot run inside a CUDA-graph capture"):
        call(make([3, 2]))


def test_flashinfer_wrappers_plan_once_per_layout():
    """Consecutive calls with the same plan arguments (the layers of one prefill) plan once;
    another layout, another slot or a plan that raised plans again."""
    wrappers = mp.FlashinferWrappers()
    built, planned = [], []

    def build():
        built.append(object())
        return built[-1]

    def plan(key):
        def run(wrapper):
            if key == "bad":
                raise RuntimeError("plan failed")
            planned.append((wrapper, key))
        return run

    cpu = torch.device("cpu")
    w = [wrappers.planned("ragged", cpu, 0, build, (k,), plan(k)) for k in ("a", "a", "a")]
    assert w[0] is w[1] is w[2] and len(built) == 1 and planned == [(w[0], "a")]
    wrappers.planned("ragged", cpu, 0, build, ("b",), plan("b"))
    wrappers.planned("ragged", cpu, 0, build, ("a",), plan("a"))  # b came between: plan again
    assert [k for _, k in planned] == ["a", "b", "a"]
    other = wrappers.planned("ragged", cpu, 1, build, ("a",), plan("a"))  # its own slot
    assert other is not w[0] and [k for _, k in planned] == ["a", "b", "a", "a"]
    with pytest.raises(RuntimeError, match="plan failed"):
        wrappers.planned("ragged", cpu, 0, build, ("bad",), plan("bad"))
    wrappers.planned("ragged", cpu, 0, build, ("a",), plan("a"))
    assert [k for _, k in planned][-1] == "a" and len(planned) == 5


class _FakeRaggedWrapper:
    """Stands in for flashinfer's ragged prefill wrapper on CPU: ``run`` attends with the
    layout of the last ``plan`` (so a kept plan of another layout gives wrong results)."""

    plans: list = []

    def __init__(self, workspace, layout, backend="auto"):
        self.indptr = None

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, *, head_dim_vo,
             causal, sm_scale, q_data_type, kv_data_type):
        assert torch.equal(qo_indptr, kv_indptr)
        self.indptr, self.causal, self.scale = qo_indptr.tolist(), causal, sm_scale
        _FakeRaggedWrapper.plans.append(tuple(self.indptr))

    def run(self, q, k, v):
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        for a, b in zip(self.indptr[:-1], self.indptr[1:]):
            s = torch.einsum("qhd,khd->hqk", q[a:b].float(), k[a:b].float()) * self.scale
            if self.causal:
                s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
            out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b].float()).to(q.dtype)
        return out


def test_mha_path_plans_once_for_the_layers_of_a_prefill(monkeypatch):
    """The MHA form's flashinfer plan is made by the first call of a layout and kept for
    the next calls with that layout (each with its own data); a new layout plans again."""
    import types

    fake = types.SimpleNamespace(BatchPrefillWithRaggedKVCacheWrapper=_FakeRaggedWrapper)
    monkeypatch.setattr(mp, "_flashinfer", lambda: fake)
    monkeypatch.setattr(mp, "WRAPPERS", mp.FlashinferWrappers())
    monkeypatch.setattr(mp, "_workspace", lambda dev, zeroed=False: torch.empty(0))
    monkeypatch.setattr(mp, "cuda_major", lambda dev: 9)
    monkeypatch.setattr(_FakeRaggedWrapper, "plans", [])

    def mha(inp):
        cu = inp["cu_seqlens"].tolist()
        args = (inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uk"], inp["w_uv"])
        run = mp.prepare_mha_gpu(*args, cu, inp["max_seqlen"], inp["scale"], True)
        # the op's own order: decompression launched first, then the plan and the attention
        early = mp.prepare_mha_gpu(*args, cu, inp["max_seqlen"], inp["scale"], True,
                                   inputs=mp.mha_inputs(*args))
        torch.testing.assert_close(early(), run())
        return run().float()

    for seed, lens in ((1, [5, 1, 9]), (2, [5, 1, 9]), (3, [5, 1, 9]), (4, [7, 8])):
        inp = make(lens, seed=seed)
        torch.testing.assert_close(mha(inp), reference(inp), atol=2e-5, rtol=2e-5)
    assert _FakeRaggedWrapper.plans == [(0, 5, 6, 15), (0, 7, 15)]


class _FakeMLAWrapper:
    """Stands in for flashinfer's MLA wrapper on CPU: attends with the last plan's CSR
    metadata (query offsets, the latent rows each request reads), causal as flashinfer
    aligns it (the last query of a request sees every key of it)."""

    plans: list = []

    def __init__(self, workspace):
        self.meta = None

    def plan(self, *, metadata, num_heads, head_dim_ckv, head_dim_kpe, page_size, causal, sm_scale,
             q_data_type, kv_data_type, query_layout, kv_cache_layout):
        self.meta, self.causal, self.scale = metadata, causal, sm_scale
        _FakeMLAWrapper.plans.append(tuple(metadata[0].tolist()))

    def run(self, *, query, kv_cache, out=None):
        q_indptr, kv_indptr, kv_indices, _ = self.meta
        q = torch.cat(query, dim=-1).float()
        kv = torch.cat([kv_cache[0][:, 0], kv_cache[1][:, 0]], dim=-1).float()
        given, out = out, q.new_zeros(q.shape[0], q.shape[1], kv_cache[0].shape[-1])
        for i in range(len(q_indptr) - 1):
            qa, qb = int(q_indptr[i]), int(q_indptr[i + 1])
            rows = kv_indices[int(kv_indptr[i]):int(kv_indptr[i + 1])]
            s = torch.einsum("qhd,kd->hqk", q[qa:qb], kv[rows]) * self.scale
            if self.causal:
                offset = len(rows) - (qb - qa)
                visible = torch.arange(len(rows))[None] <= (torch.arange(qb - qa)[:, None] + offset)
                s = s.masked_fill(~visible, float("-inf"))
            out[qa:qb] = torch.einsum("hqk,kr->qhr", s.softmax(-1), kv[rows, :kv_cache[0].shape[-1]])
        if given is not None:  # a caller-owned buffer is filled and returned, as flashinfer does
            return given.copy_(out)
        return out.to(query[0].dtype)


def test_absorbed_path_plans_once_for_the_layers_of_a_prefill(monkeypatch):
    import flashinfer.mla

    monkeypatch.setattr(flashinfer.mla, "BatchMLAPagedAttentionWrapper", _FakeMLAWrapper)
    monkeypatch.setattr(flashinfer.mla.MLAPlanMetadata, "csr", staticmethod(lambda *t: t), raising=False)
    monkeypatch.setattr(mp, "WRAPPERS", mp.FlashinferWrappers())
    monkeypatch.setattr(mp, "_workspace", lambda dev, zeroed=False: torch.empty(0))
    monkeypatch.setattr(_FakeMLAWrapper, "plans", [])

    def absorbed(inp):
        args = (inp["q_nope"], inp["q_pe"], inp["ckv"], inp["k_pe"], inp["w_uk"], inp["w_uv"])
        cu = inp["cu_seqlens"].tolist()
        run = mp.prepare_absorbed_dense_gpu(*args, cu, inp["scale"], True)
        early = mp.prepare_absorbed_dense_gpu(*args, cu, inp["scale"], True,
                                              q_lat=mp.absorbed_query(inp["q_nope"], inp["w_uk"]))
        torch.testing.assert_close(early(), run())
        return run().float()

    for seed, lens in ((1, [5, 1, 9]), (2, [5, 1, 9]), (3, [7, 8])):
        inp = make(lens, seed=seed)
        torch.testing.assert_close(absorbed(inp), reference(inp), atol=2e-5, rtol=2e-5)
    assert _FakeMLAWrapper.plans == [(0, 5, 6, 15), (0, 7, 15)]

    # plans of at most 4 query rows (flashinfer's work-item capacity, made small): the long
    # sequence is cut into query chunks, each plan writes its rows of one output buffer
    monkeypatch.setattr(mp, "MLA_PLAN_MAX_TOKEN_HEADS", 4 * make([1])["q_nope"].shape[1])
    _FakeMLAWrapper.plans.clear()
    inp = make([5, 1, 9], seed=4)
    torch.testing.assert_close(absorbed(inp), reference(inp), atol=2e-5, rtol=2e-5)
    assert _FakeMLAWrapper.plans == [(0, 4), (0, 1, 2, 4), (0, 4), (0, 3)]


@pytest.mark.parametrize("layout", ["contiguous", "kv_b_proj view"])
def test_decompress_kv_writes_k_and_v_in_place_for_any_weight_strides(layout):
    """K and V from the batched GEMMs written in place equal the float64 definition, for
    contiguous weights and for the strided views of one kv_b_proj weight (SGLang, HF)."""
    g = torch.Generator().manual_seed(7)
    T = 11
    ckv, k_pe = torch.randn(T, R, generator=g), torch.randn(T, D_ROPE, generator=g)
    w = torch.randn(H, D_NOPE + D_V, R, generator=g) / math.sqrt(R)
    w_uk, w_uv = w[:, :D_NOPE], w[:, D_NOPE:].transpose(1, 2)
    if layout == "contiguous":
        w_uk, w_uv = w_uk.contiguous(), w_uv.transpose(1, 2).contiguous().transpose(1, 2)
    k, v = mp.decompress_kv(ckv, k_pe, w_uk, w_uv)
    assert k.is_contiguous() and v.is_contiguous()
    f = torch.float64
    want_k = torch.cat([torch.einsum("tr,hdr->thd", ckv.to(f), w_uk.to(f)),
                        k_pe.to(f)[:, None, :].expand(T, H, D_ROPE)], dim=-1)
    torch.testing.assert_close(k.to(f), want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.to(f), torch.einsum("tr,hrv->thv", ckv.to(f), w_uv.to(f)),
                               atol=1e-5, rtol=1e-5)
