"""The ``rope_kv_write`` pass: each RoPE form x cache layout is rewritten exactly once per
layer, with outputs and caches equal to the unfused graph; look-alikes are left alone and
reported as near misses; Inductor re-inplaces the op onto the cache buffers."""

from __future__ import annotations

import re

import pytest
import torch

from attnfuse.passes.testing import graph_diff

FUSION = ["rope_kv_write"]
B, S, HQ, HKV, D = 2, 3, 4, 2, 16
SLOTS, PAGE = 24, 4


# ------------------------------------------------------------------ RoPE spellings
def rope_neox_cat(x, cos, sin):
    """HF ``rotate_half``: ``x * cos + cat(-x2, x1) * sin`` with full-width cos/sin."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_neox_chunk(x, cos, sin):
    """vLLM/SGLang native: chunk, ``x1 c - x2 s`` / ``x2 c + x1 s``, half-width cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_gptj_stack(x, cos, sin):
    """Interleaved pairs through strided slices and ``stack``/``flatten``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rope_gptj_hf(x, cos, sin):
    """HF GPT-J ``rotate_every_two`` with ``repeat_interleave``-d cos/sin (half given)."""
    cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rot * sin


def partial(rope, rotary_dim):
    def f(x, cos, sin):
        return torch.cat((rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    return f


def upcast(rope):
    def f(x, cos, sin):
        return rope(x.float(), cos.float(), sin.float()).to(x.dtype)
    return f


FORMS = {
    # name: (rope fn, cos/sin width given the rotary dim, rotary dim, style)
    "neox_cat": (rope_neox_cat, "full", D, "neox"),
    "neox_chunk": (rope_neox_chunk, "half", D, "neox"),
    "gptj_stack": (rope_gptj_stack, "half", D, "interleaved"),
    "gptj_hf_partial": (partial(rope_gptj_hf, 8), "half", 8, "interleaved"),
    "neox_partial": (partial(rope_neox_cat, 10), "full", 10, "neox"),
    "neox_fp32_upcast": (upcast(rope_neox_cat), "full", D, "neox"),
}


def angles(positions, rotary_dim, width, style, dtype):
    inv = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    ang = positions.float()[..., None] * inv
    if width == "full":
        ang = torch.cat((ang, ang), -1) if style == "neox" else ang.repeat_interleave(2, -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


# ------------------------------------------------------------------ models
class Layer(torch.nn.Module):
    """q/k/v projections, a RoPE form, a cache write in one layout, attention over it."""

    def __init__(self, rope, layout, dtype, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.rope, self.layout = rope, layout
        hidden = HQ * D
        self.wq = torch.nn.Parameter((torch.randn(hidden, HQ * D, generator=g) * 0.1).to(dtype))
        self.wk = torch.nn.Parameter((torch.randn(hidden, HKV * D, generator=g) * 0.1).to(dtype))
        self.wv = torch.nn.Parameter((torch.randn(hidden, HKV * D, generator=g) * 0.1).to(dtype))

    def forward(self, h, cos, sin, index, k_cache, v_cache):
        if self.layout == "static":  # HF: (B, H, S, D), cos (1, S, W) shared by heads
            q = (h @ self.wq).view(B, S, HQ, D).transpose(1, 2)
            k = (h @ self.wk).view(B, S, HKV, D).transpose(1, 2)
            v = (h @ self.wv).view(B, S, HKV, D).transpose(1, 2)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = self.rope(q, c, s), self.rope(k, c, s)
            k_cache.index_copy_(2, index, k)
            v_cache.index_copy_(2, index, v)
            keys, values = k_cache, v_cache
        else:  # serving: tokens (T, H, D), cos (T, 1, W)
            q = (h @ self.wq).view(-1, HQ, D)
            k = (h @ self.wk).view(-1, HKV, D)
            v = (h @ self.wv).view(-1, HKV, D)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = self.rope(q, c, s), self.rope(k, c, s)
            kf = k_cache if self.layout == "flat" else k_cache.view(-1, HKV, D)
            vf = v_cache if self.layout == "flat" else v_cache.view(-1, HKV, D)
            kf[index] = k
            vf[index] = v
            keys = kf[:8].unsqueeze(0).transpose(1, 2)
            values = vf[:8].unsqueeze(0).transpose(1, 2)
            q = q.unsqueeze(0).transpose(1, 2)
        rep = HQ // HKV
        keys = keys.repeat_interleave(rep, dim=1)
        values = values.repeat_interleave(rep, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype))


class Model(torch.nn.Module):
    def __init__(self, form, layout, dtype=torch.float32, layers=2):
        super().__init__()
        rope = FORMS[form][0]
        self.layers = torch.nn.ModuleList(Layer(rope, layout, dtype, i) for i in range(layers))

    def forward(self, h, cos, sin, index, caches):
        out = 0
        for layer, (kc, vc) in zip(self.layers, caches):
            out = out + layer(h, cos, sin, index, kc, vc).float().sum(1)
        return out


def make_inputs(form, layout, dtype=torch.float32, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, width, rd, style = FORMS[form]
    hidden = HQ * D
    if layout == "static":
        h = torch.randn(B, S, hidden, generator=g).to(dtype)
        positions = torch.arange(S) + 5
        cos, sin = angles(positions[None], rd, width, style, dtype)  # (1, S, W)
        index = positions  # cache positions: the HF write index
        shape = (B, HKV, 16, D)
    else:
        T = B * S
        h = torch.randn(T, hidden, generator=g).to(dtype)
        positions = torch.randint(0, 40, (T,), generator=g)
        cos, sin = angles(positions, rd, width, style, dtype)  # (T, W)
        index = torch.randperm(SLOTS, generator=g)[:T]
        shape = (SLOTS, HKV, D) if layout == "flat" else (SLOTS // PAGE, PAGE, HKV, D)
    caches = [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
              for _ in range(layers)]
    return h, cos, sin, index, caches


def _clone(args):
    h, cos, sin, index, caches = args
    return h, cos, sin, index, [(k.clone(), v.clone()) for k, v in caches]


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def run_and_compare(model, args, *, fired, dtype=torch.float32, backend="eager"):
    """Compile with the fusion; compare outputs and every cache with the eager run."""
    eager_args, compiled_args = _clone(args), _clone(args)
    with torch.no_grad():
        expected = model(*eager_args)
        d = graph_diff(model, *compiled_args, fusions=FUSION, backend=backend)
    d.assert_fired(rope_kv_write=fired)
    torch.testing.assert_close(d.outputs, expected, **TOL[dtype])
    for (k1, v1), (k2, v2) in zip(compiled_args[4], eager_args[4]):
        torch.testing.assert_close(k1, k2, **TOL[dtype])
        torch.testing.assert_close(v1, v2, **TOL[dtype])
    return d


# ------------------------------------------------------------------ positive cases
@pytest.mark.parametrize("layout", ["static", "flat", "paged_nhd"])
@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_and_layout_fused_once_per_layer(form, layout):
    dtype = torch.bfloat16 if form == "neox_fp32_upcast" else torch.float32
    model = Model(form, layout, dtype)
    d = run_and_compare(model, make_inputs(form, layout, dtype), fired=2, dtype=dtype)
    _, _, rd, style = FORMS[form]
    assert all(f"{style}, rotary_dim={rd}" in s.detail for s in d.report.sites), d.report.table()
    after = d.after
    assert after.count("auto_functionalized(attnfuse.rope_write_kv") == 2
    assert "aten.index_put" not in after  # both writes of both layers became the op


def test_bf16_static_cache():
    model = Model("neox_cat", "static", torch.bfloat16, layers=1)
    run_and_compare(model, make_inputs("neox_cat", "static", torch.bfloat16, layers=1), fired=1,
                    dtype=torch.bfloat16)


def test_prefill_reading_rotated_k_directly_returns_k():
    """Attention that reads the rotated k itself (prefill) gets the op's k output."""

    class Prefill(torch.nn.Module):
        def forward(self, q, k, v, cos, sin, slots, k_cache, v_cache):
            q, k = rope_neox_chunk(q, cos, sin), rope_neox_chunk(k, cos, sin)
            k_cache[slots] = k
            v_cache[slots] = v
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0),
                v.transpose(0, 1).repeat_interleave(2, 0), is_causal=True)

    g = torch.Generator().manual_seed(1)
    T = 5
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = angles(torch.arange(T), D, "half", "neox", torch.float32)
    cos, sin = cos[:, None], sin[:, None]
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, HKV, D, generator=g) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    expected = Prefill()(q, k, v, cos, sin, slots, *expected_caches)
    d = graph_diff(Prefill(), q, k, v, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_fired(rope_kv_write=1)
    assert "return_k=True" in d.after
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches, expected_caches, atol=1e-5, rtol=1e-5)


def test_negative_slots_keep_index_put_semantics():
    """index_put wraps a negative slot (Python indexing); the rewrite must do the same."""
    model = Model("neox_chunk", "flat", layers=1)
    h, cos, sin, index, caches = make_inputs("neox_chunk", "flat", layers=1)
    index[0] = -1
    run_and_compare(model, (h, cos, sin, index, caches), fired=1)


# ------------------------------------------------------------------ negative cases
def _near_misses(d):
    return [m.reason for m in d.report.near_misses if m.fusion == "rope_kv_write"]


def test_k_and_v_indexed_differently_is_a_near_miss():
    def f(q, k, v, cos, sin, slots_k, slots_v, k_cache, v_cache):
        q, k = rope_neox_chunk(q, cos, sin), rope_neox_chunk(k, cos, sin)
        k_cache[slots_k] = k
        v_cache[slots_v] = v
        return q

    g = torch.Generator().manual_seed(2)
    T = 4
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = (t[:, None] for t in angles(torch.arange(T), D, "half", "neox", torch.float32))
    sk, sv = torch.randperm(SLOTS, generator=g)[:T], torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, HKV, D, generator=g) for _ in range(2)]
    d = graph_diff(f, q, k, v, cos, sin, sk, sv, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert "aten.index_put" in d.after
    assert any("different indices" in r for r in _near_misses(d)), _near_misses(d)


def test_intermediate_of_k_rotation_used_elsewhere_is_a_near_miss():
    def f(q, k, v, cos, sin, slots, k_cache, v_cache):
        q = rope_neox_chunk(q, cos, sin)
        k1, k2 = k.chunk(2, dim=-1)
        first = k1 * cos - k2 * sin
        k = torch.cat((first, k2 * cos + k1 * sin), dim=-1)
        k_cache[slots] = k
        v_cache[slots] = v
        return q, first * 2  # a half-rotated k the op does not return

    g = torch.Generator().manual_seed(3)
    T = 4
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = (t[:, None] for t in angles(torch.arange(T), D, "half", "neox", torch.float32))
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, HKV, D, generator=g) for _ in range(2)]
    d = graph_diff(f, q, k, v, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert any("intermediate of the k rotation" in r for r in _near_misses(d)), _near_misses(d)


def test_mixed_dtypes_are_a_near_miss():
    """q rotated in bf16 but k upcast and written to an fp32 cache: one op cannot do both."""

    def f(q, k, v, cos, sin, slots, k_cache, v_cache):
        q = rope_neox_chunk(q, cos, sin)
        k = rope_neox_chunk(k.float(), cos.float(), sin.float())
        k_cache[slots] = k
        v_cache[slots] = v.float()
        return q

    g = torch.Generator().manual_seed(4)
    T = 4
    q, k, v = (torch.randn(T, h, D, generator=g).bfloat16() for h in (HQ, HKV, HKV))
    cos, sin = (t[:, None] for t in angles(torch.arange(T), D, "half", "neox", torch.bfloat16))
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, HKV, D, generator=g) for _ in range(2)]
    d = graph_diff(f, q, k, v, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert any("mixed dtypes" in r or "no q rotated" in r for r in _near_misses(d)), _near_misses(d)


def test_write_without_rope_is_left_alone():
    """A cache write of a k that is scaled, not rotated: same shape, not a RoPE."""

    def f(k, v, cos, sin, slots, k_cache, v_cache):
        k1, k2 = k.chunk(2, dim=-1)
        k = torch.cat((k1 * cos + k2 * sin, k2 * cos + k1 * sin), dim=-1)  # sign is wrong
        k_cache[slots] = k
        v_cache[slots] = v
        return k.sum()

    g = torch.Generator().manual_seed(5)
    T = 4
    k, v = (torch.randn(T, HKV, D, generator=g) for _ in range(2))
    cos, sin = (t[:, None] for t in angles(torch.arange(T), D, "half", "neox", torch.float32))
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, HKV, D, generator=g) for _ in range(2)]
    d = graph_diff(f, k, v, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert d.before == d.after
    assert any("not a RoPE" in r for r in _near_misses(d)), _near_misses(d)


def test_cos_varying_per_head_is_a_near_miss():
    def f(q, k, v, cos, sin, slots, k_cache, v_cache):
        q, k = rope_neox_chunk(q, cos, sin), rope_neox_chunk(k, cos[:, :HKV], sin[:, :HKV])
        k_cache[slots] = k
        v_cache[slots] = v
        return q

    g = torch.Generator().manual_seed(6)
    T = 4
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = torch.randn(T, HQ, D // 2, generator=g), torch.randn(T, HQ, D // 2, generator=g)
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, HKV, D, generator=g) for _ in range(2)]
    d = graph_diff(f, q, k, v, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert _near_misses(d), d.report.table()


# ------------------------------------------------------------------ Inductor
def test_inductor_reinplaces_the_op_on_the_cache_buffers():
    from attnfuse.examples.serving_gqa import ServingGQAConfig, ServingGQAModel, example_inputs

    model = ServingGQAModel(ServingGQAConfig(num_layers=1))
    _, decode = example_inputs(model)
    model.reset_cache()
    with torch.no_grad():
        expected = model(*decode)
    expected_k = model.layers[0].self_attn.k_cache.clone()
    model.reset_cache()
    with torch.no_grad():
        d = graph_diff(model, *decode, fusions=FUSION, backend="inductor")
    d.assert_fired(rope_kv_write=1)
    calls = [l for l in d.code.splitlines() if "torch.ops.attnfuse.rope_write_kv.default(" in l]
    assert len(calls) == 1, d.code
    # the op is handed the cache inputs themselves; nothing copies or clones them back
    found = re.search(r"None, (\w+), (\w+), \w+, 'paged_nhd'", calls[0])
    assert found, calls[0]
    k_arg, v_arg = found.groups()
    assert k_arg.startswith("arg") and v_arg.startswith("arg"), calls[0]
    assert f"copy_({k_arg}" not in d.code and f"copy_({v_arg}" not in d.code
    assert "index_put" not in d.code
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.layers[0].self_attn.k_cache, expected_k, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ opaque RoPE ops
@torch.library.custom_op("attnfuse_test::rope_with_cache", mutates_args=())
def _opaque_rope(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A serving engine's own RoPE op (the pass cannot look inside it)."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    rope = rope_neox_chunk if is_neox else rope_gptj_stack
    c, s = cos[:, None].to(query.dtype), sin[:, None].to(query.dtype)
    return rope(query, c, s), rope(key, c, s)


@_opaque_rope.register_fake
def _(query, key, positions, cos_sin_cache, is_neox):
    return torch.empty_like(query), torch.empty_like(key)


@pytest.mark.parametrize("neox", [True, False])
def test_registered_opaque_rope_op_is_fused(neox):
    from attnfuse.fusions.rope_kv_write import RopeOpSpec, register_rope_op

    register_rope_op(torch.ops.attnfuse_test.rope_with_cache.default,
                     RopeOpSpec(query="query", key="key", positions="positions",
                                cos_sin_cache="cos_sin_cache", is_neox="is_neox"))

    def f(q, k, v, positions, cos_sin_cache, slots, k_cache, v_cache):
        q, k = torch.ops.attnfuse_test.rope_with_cache(q, k, positions, cos_sin_cache, neox)
        k_cache.view(-1, HKV, D)[slots] = k
        v_cache.view(-1, HKV, D)[slots] = v
        return q * 2

    g = torch.Generator().manual_seed(7)
    T = 5
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = angles(torch.arange(40), D, "half", "neox", torch.float32)
    table = torch.cat((cos, sin), -1)
    positions = torch.randint(0, 40, (T,), generator=g)
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS // PAGE, PAGE, HKV, D, generator=g) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    expected = f(q, k, v, positions, table, slots, *expected_caches)
    d = graph_diff(f, q, k, v, positions, table, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_fired(rope_kv_write=1)
    assert "attnfuse_test.rope_with_cache" not in d.after
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches, expected_caches, atol=1e-5, rtol=1e-5)


def test_register_rope_op_names_a_bad_argument():
    from attnfuse.fusions.rope_kv_write import RopeOpSpec, register_rope_op

    with pytest.raises(ValueError, match=r"^spec.query: expected an argument"):
        register_rope_op(torch.ops.attnfuse_test.rope_with_cache.default,
                         RopeOpSpec(query="q", key="key", positions="positions",
                                    cos_sin_cache="cos_sin_cache"))


@pytest.mark.parametrize("layout", ["paged_nhd", "paged_hnd"])
def test_paged_write_by_page_and_offset(layout):
    """``cache[pages, offsets] = k`` (NHD) and ``cache[pages, :, offsets] = k`` (HND),
    including a negative offset, which index_put counts from the end of the page."""

    def f(q, k, v, cos, sin, pages, offsets, k_cache, v_cache):
        q, k = rope_neox_cat(q, cos, sin), rope_neox_cat(k, cos, sin)
        if layout == "paged_nhd":
            k_cache[pages, offsets] = k
            v_cache[pages, offsets] = v
        else:
            k_cache[pages, :, offsets] = k
            v_cache[pages, :, offsets] = v
        return q

    g = torch.Generator().manual_seed(8)
    T = 4
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = (t[:, None] for t in angles(torch.arange(T) + 3, D, "full", "neox", torch.float32))
    slots = torch.randperm(SLOTS, generator=g)[:T]
    pages, offsets = slots // PAGE, slots % PAGE
    offsets[0] = -1
    shape = (SLOTS // PAGE, PAGE, HKV, D) if layout == "paged_nhd" else (SLOTS // PAGE, HKV, PAGE, D)
    caches = [torch.randn(shape, generator=g) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    expected = f(q, k, v, cos, sin, pages, offsets, *expected_caches)
    d = graph_diff(f, q, k, v, cos, sin, pages, offsets, *caches, fusions=FUSION, backend="eager")
    d.assert_fired(rope_kv_write=1)
    assert f"cache_layout='{layout}'" in d.after
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches, expected_caches, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["flat", "paged_nhd"])
def test_single_token_decode(layout):
    """One token: the decomposition writes ``reshape(k, (H, D))`` (index_put broadcasts)."""

    def f(q, k, v, cos, sin, slots, k_cache, v_cache):
        q, k = rope_neox_chunk(q, cos, sin), rope_neox_chunk(k, cos, sin)
        kf = k_cache if layout == "flat" else k_cache.view(-1, HKV, D)
        vf = v_cache if layout == "flat" else v_cache.view(-1, HKV, D)
        kf[slots] = k
        vf[slots] = v
        return q

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = (t[:, None] for t in angles(torch.tensor([11]), D, "half", "neox", torch.float32))
    slots = torch.tensor([7])
    shape = (SLOTS, HKV, D) if layout == "flat" else (SLOTS // PAGE, PAGE, HKV, D)
    caches = [torch.randn(shape, generator=g) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    expected = f(q, k, v, cos, sin, slots, *expected_caches)
    d = graph_diff(f, q, k, v, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_fired(rope_kv_write=1)
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches, expected_caches, atol=1e-5, rtol=1e-5)


def _shared_kv_model(read_between: bool):
    def f(q, k, v, cos, sin, slots, kv):
        q, k = rope_neox_chunk(q, cos, sin), rope_neox_chunk(k, cos, sin)
        kv[0].view(-1, HKV, D)[slots] = k
        between = kv[0].sum() if read_between else 0
        kv[1].view(-1, HKV, D)[slots] = v
        keys = kv[0].view(-1, HKV, D)[:8].transpose(0, 1).repeat_interleave(2, 0)
        values = kv[1].view(-1, HKV, D)[:8].transpose(0, 1).repeat_interleave(2, 0)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), keys, values)
        return out + between

    g = torch.Generator().manual_seed(10)
    T = 4
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = (t[:, None] for t in angles(torch.arange(T) + 2, D, "half", "neox", torch.float32))
    slots = torch.randperm(SLOTS, generator=g)[:T]
    kv = torch.randn(2, SLOTS // PAGE, PAGE, HKV, D, generator=g)  # K and V in one buffer
    return f, (q, k, v, cos, sin, slots, kv)


def test_k_and_v_views_of_one_buffer():
    """``kv[0]``/``kv[1]`` writes: select/reshape/index_put/select_scatter chains."""
    f, args = _shared_kv_model(read_between=False)
    expected_kv = args[-1].clone()
    expected = f(*args[:-1], expected_kv)
    d = graph_diff(f, *args, fusions=FUSION, backend="eager")
    d.assert_fired(rope_kv_write=1)
    assert "auto_functionalized_v2(attnfuse.rope_write_kv" in d.after
    assert "select_scatter" not in d.after
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args[-1], expected_kv, atol=1e-5, rtol=1e-5)


def test_shared_buffer_read_between_writes_is_a_near_miss():
    f, args = _shared_kv_model(read_between=True)
    d = graph_diff(f, *args, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert any("read between the k and v writes" in r for r in _near_misses(d)), _near_misses(d)


def test_inductor_reinplaces_views_of_a_shared_buffer():
    f, args = _shared_kv_model(read_between=False)
    expected_kv = args[-1].clone()
    expected = f(*args[:-1], expected_kv)
    d = graph_diff(f, *args, fusions=FUSION, backend="inductor")
    d.assert_fired(rope_kv_write=1)
    calls = [l for l in d.code.splitlines() if "torch.ops.attnfuse.rope_write_kv.default(" in l]
    assert len(calls) == 1, d.code
    # both caches are views of the buffer input itself: written in place, never copied
    views = re.findall(r"reinterpret_tensor\((arg\d+_1), \(6, 4, 2, 16\)", calls[0])
    assert len(views) == 2 and views[0] == views[1], calls[0]
    assert f"copy_({views[0]}" not in d.code
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args[-1], expected_kv, atol=1e-5, rtol=1e-5)


def test_dynamic_token_count_fuses_without_specializing():
    """vLLM-style compiles keep the token count symbolic: one graph serves every size."""
    from attnfuse.examples.serving_gqa import (
        ServingGQAConfig,
        ServingGQAModel,
        allocate_block_tables,
        step_inputs,
    )
    from attnfuse.passes.backend import AttnfuseBackend

    model = ServingGQAModel(ServingGQAConfig(num_layers=1))
    tables = allocate_block_tables(model.config, 2)
    backend = AttnfuseBackend({"fusions": FUSION}, inductor=False)
    torch._dynamo.reset()
    try:
        fast = torch.compile(model, backend=backend, dynamic=True)
        g = torch.Generator().manual_seed(11)
        for seq in (6, 4, 3):
            args = step_inputs(model.config, torch.randint(0, 512, (2, seq), generator=g), 0, tables)
            model.reset_cache()
            with torch.no_grad():
                expected = model(*args, True)
            expected_k = model.layers[0].self_attn.k_cache.clone()
            model.reset_cache()
            with torch.no_grad():
                got = fast(*args, True)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.layers[0].self_attn.k_cache, expected_k)
    finally:
        torch._dynamo.reset()
    assert backend.report.counts == {"rope_kv_write": 1}  # one graph, fused once
