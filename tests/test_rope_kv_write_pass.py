"""The ``rope_kv_write`` pass: each RoPE form x cache layout is rewritten exactly once per
layer, with outputs and caches equal to the unfused graph; look-alikes are left alone and
reported as near misses; Inductor re-inplaces the op onto the cache buffers."""

from __future__ import annotations

import re

import pytest
import torch

from attnfuse.examples.serving_gqa import step_inputs
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
def _flat_tokens(g, T):
    """q, k, v ``(T, heads, D)`` and neox half-width cos/sin at positions ``0..T-1``."""
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cos, sin = (t[:, None] for t in angles(torch.arange(T), D, "half", "neox", torch.float32))
    return q, k, v, cos, sin


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
    q, k, v, cos, sin = _flat_tokens(g, T)
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
    q, k, v, cos, sin = _flat_tokens(g, T)
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


def _one_layer_serving_gqa():
    """A one-layer serving GQA model, block tables for 2 sequences, and a backend running
    this fusion without code generation."""
    from attnfuse.examples.serving_gqa import ServingGQAConfig, ServingGQAModel, allocate_block_tables
    from attnfuse.passes.backend import AttnfuseBackend

    model = ServingGQAModel(ServingGQAConfig(num_layers=1))
    tables = allocate_block_tables(model.config, 2)
    return model, tables, AttnfuseBackend({"fusions": FUSION}, inductor=False)


def test_dynamic_token_count_fuses_without_specializing():
    """vLLM-style compiles keep the token count symbolic: one graph serves every size."""
    model, tables, backend = _one_layer_serving_gqa()
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


# ------------------------------------------------------------------ MLA latent caches
R, RD, NOPE = 32, 16, 16  # kv_lora_rank, rope dim, nope dim of the MLA tests
MLA_FORMS = ["neox_chunk", "neox_cat", "gptj_stack", "neox_fp32_upcast"]


class MLALayer(torch.nn.Module):
    """Serving-style MLA: tokens ``(T, hidden)``; RoPE on ``q_pe (T, H, RD)`` and on the
    single shared ``k_pe (T, RD)``; ``ckv (T, R)`` and ``k_pe`` written by slot into
    ``(slots, R)`` and ``(slots, RD)`` caches; absorbed attention over the caches (or, in
    prefill, over the new ``k_pe`` itself)."""

    def __init__(self, rope, dtype, seed, prefill=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        hidden = HQ * D
        self.rope, self.prefill = rope, prefill
        self.wq = torch.nn.Parameter((torch.randn(hidden, HQ * (NOPE + RD), generator=g) * 0.1).to(dtype))
        self.wkv = torch.nn.Parameter((torch.randn(hidden, R + RD, generator=g) * 0.1).to(dtype))
        self.w_uk = torch.nn.Parameter((torch.randn(HQ, NOPE, R, generator=g) * 0.1).to(dtype))

    def forward(self, h, cos, sin, slots, ckv_cache, kpe_cache):
        T = h.shape[0]
        q_nope, q_pe = (h @ self.wq).view(T, HQ, -1).split([NOPE, RD], dim=-1)
        ckv, k_pe = (h @ self.wkv).split([R, RD], dim=-1)
        q_pe = self.rope(q_pe, cos[:, None], sin[:, None])
        k_pe = self.rope(k_pe, cos, sin)
        ckv_cache[slots] = ckv
        kpe_cache[slots] = k_pe
        q_lat = torch.einsum("thn,hnr->thr", q_nope, self.w_uk)
        if self.prefill:  # attends to the new tokens: reads the rotated k_pe directly
            lat, pe = ckv, k_pe
        else:
            lat, pe = ckv_cache[:SLOTS // 2], kpe_cache[:SLOTS // 2]
        scores = torch.einsum("thr,lr->htl", q_lat, lat) + torch.einsum("thd,ld->htl", q_pe, pe)
        probs = torch.softmax(scores.float() * 0.2, dim=-1).to(lat.dtype)
        return torch.einsum("htl,lr->thr", probs, lat)


class MLAModel(torch.nn.Module):
    def __init__(self, form, dtype=torch.float32, layers=2, prefill=False):
        super().__init__()
        self.layers = torch.nn.ModuleList(MLALayer(FORMS[form][0], dtype, i, prefill)
                                          for i in range(layers))

    def forward(self, h, cos, sin, slots, caches):
        out = 0
        for layer, (ckv, kpe) in zip(self.layers, caches):
            out = out + layer(h, cos, sin, slots, ckv, kpe).float()
        return out


def mla_inputs(form, dtype=torch.float32, layers=2, seed=0, tokens=B * S):
    g = torch.Generator().manual_seed(seed)
    _, width, _, style = FORMS[form]
    h = torch.randn(tokens, HQ * D, generator=g).to(dtype)
    positions = torch.randint(0, 40, (tokens,), generator=g)
    cos, sin = angles(positions, RD, width, style, dtype)  # (T, W)
    slots = torch.randperm(SLOTS, generator=g)[:tokens]
    caches = [(torch.randn(SLOTS, R, generator=g).to(dtype), torch.randn(SLOTS, RD, generator=g).to(dtype))
              for _ in range(layers)]
    return h, cos, sin, slots, caches


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("form", MLA_FORMS)
def test_mla_latent_caches_fused_once_per_layer(form, prefill):
    """k_pe rotated and written to the (slots, rope_dim) cache, ckv to (slots, kv_lora_rank):
    the op's one-head flat layout, q_pe with its heads; prefill also gets the rotated k_pe."""
    dtype = torch.bfloat16 if form == "neox_fp32_upcast" else torch.float32
    model = MLAModel(form, dtype, prefill=prefill)
    d = run_and_compare(model, mla_inputs(form, dtype), fired=2, dtype=dtype)
    style = FORMS[form][3]
    assert all(f"flat, {style}, rotary_dim={RD}, one-head latent caches" in s.detail
               for s in d.report.sites), d.report.table()
    assert d.after.count("auto_functionalized(attnfuse.rope_write_kv") == 2
    assert "aten.index_put" not in d.after
    assert ("return_k=True" in d.after) == prefill


def test_mla_single_token_decode():
    model = MLAModel("neox_chunk", layers=1)
    run_and_compare(model, mla_inputs("neox_chunk", layers=1, tokens=1), fired=1)


def test_mla_negative_slot_keeps_index_put_semantics():
    model = MLAModel("neox_chunk", layers=1)
    h, cos, sin, slots, caches = mla_inputs("neox_chunk", layers=1, seed=3)
    slots[1] = -2
    run_and_compare(model, (h, cos, sin, slots, caches), fired=1)


def test_mla_q_reading_cos_on_another_axis_is_a_near_miss():
    """q_pe takes cos rows along its head axis (T == H): not the angles k_pe gets."""

    def f(q_pe, k_pe, ckv, cos, sin, slots, ckv_cache, kpe_cache):
        q_pe = rope_neox_chunk(q_pe, cos[None], sin[None])  # (1, T, W): rows on the heads
        k_pe = rope_neox_chunk(k_pe, cos, sin)
        ckv_cache[slots] = ckv
        kpe_cache[slots] = k_pe
        return q_pe

    g = torch.Generator().manual_seed(12)
    T = HQ
    q_pe, k_pe, ckv = torch.randn(T, HQ, RD, generator=g), torch.randn(T, RD, generator=g), torch.randn(T, R, generator=g)
    cos, sin = angles(torch.arange(T) + 1, RD, "half", "neox", torch.float32)
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, R, generator=g), torch.randn(SLOTS, RD, generator=g)]
    d = graph_diff(f, q_pe, k_pe, ckv, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert any("vary per head" in r or "different token axes" in r for r in _near_misses(d)), \
        _near_misses(d)


def test_mla_cache_written_through_a_paged_view_is_a_near_miss():
    """A (blocks, page, rope_dim) cache written as (slots, rope_dim): said so, not fused."""

    def f(q_pe, k_pe, ckv, cos, sin, slots, ckv_cache, kpe_cache):
        q_pe = rope_neox_chunk(q_pe, cos[:, None], sin[:, None])
        k_pe = rope_neox_chunk(k_pe, cos, sin)
        ckv_cache.view(-1, R)[slots] = ckv
        kpe_cache.view(-1, RD)[slots] = k_pe
        return q_pe

    g = torch.Generator().manual_seed(13)
    T = 4
    q_pe, k_pe, ckv = torch.randn(T, HQ, RD, generator=g), torch.randn(T, RD, generator=g), torch.randn(T, R, generator=g)
    cos, sin = angles(torch.arange(T), RD, "half", "neox", torch.float32)
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS // PAGE, PAGE, R, generator=g), torch.randn(SLOTS // PAGE, PAGE, RD, generator=g)]
    d = graph_diff(f, q_pe, k_pe, ckv, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert any("(slots, features) view" in r for r in _near_misses(d)), _near_misses(d)


# ------------------------------------------------------------------ permuted input features
def rope_deinterleaved(x, cos, sin):
    """HF DeepSeek-V3 ``apply_rotary_pos_emb_interleave``: interleaved pairs rotated and
    written out de-interleaved (a neox rotation of ``cat(x[0::2], x[1::2])``)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


PERMUTED_FORMS = {
    "deinterleaved": (rope_deinterleaved, "half", D, "neox"),
    "deinterleaved_partial": (partial(rope_deinterleaved, 8), "half", 8, "neox"),
}


@pytest.mark.parametrize("layout", ["static", "flat"])
@pytest.mark.parametrize("form", list(PERMUTED_FORMS))
def test_rope_of_permuted_features_gets_the_permuted_input(form, layout, monkeypatch):
    """y = rope(x[..., perm]): the op is given x[..., perm] and writes y's layout exactly."""
    monkeypatch.setitem(FORMS, form, PERMUTED_FORMS[form])
    model = Model(form, layout)
    d = run_and_compare(model, make_inputs(form, layout), fired=2)
    _, _, rd, _ = PERMUTED_FORMS[form]
    assert all(f"neox, rotary_dim={rd}, input features permuted" in s.detail
               for s in d.report.sites), d.report.table()


def test_irregular_feature_permutation_is_a_near_miss():
    """Pairs (2j, 2j+1) rotated and written out in a scrambled pair order: a RoPE of x's
    features in an order that takes many slices to gather; refused, and said why."""
    pairs = [3, 0, 6, 1, 7, 4, 2, 5]

    def gathered_rope(x, cos, sin):
        x1 = torch.cat([x[..., 2 * j: 2 * j + 1] for j in pairs], dim=-1)
        x2 = torch.cat([x[..., 2 * j + 1: 2 * j + 2] for j in pairs], dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def f(q, k, v, cos, sin, slots, k_cache, v_cache):
        q, k = gathered_rope(q, cos, sin), gathered_rope(k, cos, sin)
        k_cache[slots] = k
        v_cache[slots] = v
        return q

    g = torch.Generator().manual_seed(14)
    T = 4
    q, k, v, cos, sin = _flat_tokens(g, T)
    slots = torch.randperm(SLOTS, generator=g)[:T]
    caches = [torch.randn(SLOTS, HKV, D, generator=g) for _ in range(2)]
    d = graph_diff(f, q, k, v, cos, sin, slots, *caches, fusions=FUSION, backend="eager")
    d.assert_not_fired("rope_kv_write")
    assert any("strided slices (at most" in r for r in _near_misses(d)), _near_misses(d)


# ------------------------------------------------------------------ in-place opaque RoPE ops
@torch.library.custom_op("attnfuse_test::rope_inplace", mutates_args=("query", "key"))
def _rope_inplace(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                  cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """A CPU stand-in with FlashInfer's ``apply_rope_with_cos_sin_cache_inplace`` signature
    and meaning: query/key ``(T, H * head_size)`` rotated in place on the first
    ``cos_sin_cache.shape[1]`` features of each head, ``[cos | sin]`` rows by position."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    rd = cos_sin_cache.shape[1]
    rope = rope_neox_chunk if is_neox else rope_gptj_stack
    for x in (query, key):
        heads = x.view(x.shape[0], -1, head_size)
        heads[..., :rd] = rope(heads[..., :rd], cos[:, None].to(x.dtype), sin[:, None].to(x.dtype))


@_rope_inplace.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox):
    return None


@torch.library.custom_op("attnfuse_test::rope_flat", mutates_args=())
def _rope_flat(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
               cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The functional counterpart (FlashInfer's ``apply_rope_with_cos_sin_cache``)."""
    q, k = query.clone(), key.clone()
    _rope_inplace(positions, q, k, head_size, cos_sin_cache, is_neox)
    return q, k


@_rope_flat.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox):
    return torch.empty_like(query), torch.empty_like(key)


@pytest.fixture
def flashinfer_like_ops():
    from attnfuse.fusions.rope_kv_write import FLASHINFER_ROPE_SPEC, register_rope_op

    register_rope_op(torch.ops.attnfuse_test.rope_inplace.default, FLASHINFER_ROPE_SPEC)
    register_rope_op(torch.ops.attnfuse_test.rope_flat.default, FLASHINFER_ROPE_SPEC)


def _inplace_model(kind, *, neox=True, read_k=False, read_across=False, v_from_k=False):
    """vLLM-style attention around an in-place RoPE: q/k/v split from one qkv projection
    (``kind="split"``: the op rotates views of that buffer) or projected separately
    (``"separate"``), or the functional op on flat q/k (``"functional"``)."""

    def f(h, w, positions, cos_sin_cache, slots, k_cache, v_cache):
        qkv = h @ w
        if kind == "split":
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
        else:
            q = qkv[:, : HQ * D].contiguous()
            k = qkv[:, HQ * D: (HQ + HKV) * D].contiguous()
            v = qkv[:, (HQ + HKV) * D:]
        if kind == "functional":
            q, k = torch.ops.attnfuse_test.rope_flat(positions, q, k, D, cos_sin_cache, neox)
        else:
            torch.ops.attnfuse_test.rope_inplace(positions, q, k, D, cos_sin_cache, neox)
        if v_from_k:
            v = k * 2
        k_cache.view(-1, HKV, D)[slots] = k.view(-1, HKV, D)
        v_cache.view(-1, HKV, D)[slots] = v.reshape(-1, HKV, D)
        keys = k_cache.view(-1, HKV, D)[:8].transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        values = v_cache.view(-1, HKV, D)[:8].transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(-1, HQ, D).transpose(0, 1), keys, values)
        extra = k.sum(-1) if read_k else 0
        if read_across:
            extra = extra + qkv[:, HQ * D - 4: HQ * D + 4].sum(-1)
        return out, extra

    return f


def _inplace_inputs(tokens=5, rotary_dim=D, seed=15):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, 32, generator=g)
    w = torch.randn(32, (HQ + 2 * HKV) * D, generator=g) * 0.2
    cos, sin = angles(torch.arange(40), rotary_dim, "half", "neox", torch.float32)
    positions = torch.randint(0, 40, (tokens,), generator=g)
    slots = torch.randperm(SLOTS, generator=g)[:tokens]
    caches = [torch.randn(SLOTS // PAGE, PAGE, HKV, D, generator=g) for _ in range(2)]
    return h, w, positions, torch.cat((cos, sin), -1), slots, *caches


def _compare_inplace(f, args, fired, v2=True):
    expected_caches = [c.clone() for c in args[-2:]]
    expected = f(*args[:-2], *expected_caches)
    with torch._inductor.config.patch(enable_auto_functionalized_v2=v2):
        d = graph_diff(f, *args, fusions=FUSION, backend="eager")
    d.assert_fired(rope_kv_write=fired)
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(list(args[-2:]), expected_caches, atol=1e-5, rtol=1e-5)
    return d


@pytest.mark.usefixtures("flashinfer_like_ops")
@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized"])
@pytest.mark.parametrize("kind", ["split", "separate"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_inplace_rope_op_is_fused(kind, neox, v2):
    """The in-place call and both cache writes become one op; q, k and v keep their
    values, whether q/k are views of the qkv buffer (v read from its untouched part) or
    tensors of their own, and whichever auto_functionalized form functionalization used."""
    d = _compare_inplace(_inplace_model(kind, neox=neox), _inplace_inputs(), fired=1, v2=v2)
    assert "attnfuse_test.rope_inplace" not in d.after
    assert "slice_scatter" not in d.after
    style = "neox" if neox else "interleaved"
    assert all(f"paged_nhd, {style}, rotary_dim={D}, in-place attnfuse_test.rope_inplace" in s.detail
               for s in d.report.sites), d.report.table()


@pytest.mark.usefixtures("flashinfer_like_ops")
def test_inplace_rope_partial_rotary_prefill_reads_k():
    """A cos/sin cache narrower than the head: partial rotary; k read besides the write."""
    f = _inplace_model("split", read_k=True)
    d = _compare_inplace(f, _inplace_inputs(rotary_dim=8), fired=1)
    assert "rotary_dim=8" in d.after and "return_k=True" in d.after


@pytest.mark.usefixtures("flashinfer_like_ops")
def test_inplace_rope_single_token():
    _compare_inplace(_inplace_model("split"), _inplace_inputs(tokens=1), fired=1)


@pytest.mark.usefixtures("flashinfer_like_ops")
def test_functional_rope_op_on_flat_query_and_key():
    """``(T, H * head_size)`` in and out: reshaped to heads for the op and back."""
    d = _compare_inplace(_inplace_model("functional", read_k=True), _inplace_inputs(), fired=1)
    assert "attnfuse_test.rope_flat" not in d.after


@pytest.mark.usefixtures("flashinfer_like_ops")
def test_inplace_rope_buffer_read_across_query_and_key_is_a_near_miss():
    f = _inplace_model("split", read_across=True)
    d = _compare_inplace(f, _inplace_inputs(), fired=0)
    assert "attnfuse_test.rope_inplace" in d.after
    assert any("reads across the query/key it rotates" in r for r in _near_misses(d)), _near_misses(d)


@pytest.mark.usefixtures("flashinfer_like_ops")
def test_inplace_rope_v_computed_from_rotated_k_is_a_near_miss():
    f = _inplace_model("split", v_from_k=True)
    d = _compare_inplace(f, _inplace_inputs(), fired=0)
    assert any("v is computed from the buffer" in r for r in _near_misses(d)), _near_misses(d)


@pytest.mark.usefixtures("flashinfer_like_ops")
def test_inductor_reinplaces_the_fused_inplace_rope():
    f = _inplace_model("split")
    args = _inplace_inputs()
    expected_caches = [c.clone() for c in args[-2:]]
    expected = f(*args[:-2], *expected_caches)
    d = graph_diff(f, *args, fusions=FUSION, backend="inductor")
    d.assert_fired(rope_kv_write=1)
    assert "rope_inplace" not in d.code
    calls = [l for l in d.code.splitlines() if "torch.ops.attnfuse.rope_write_kv.default(" in l]
    assert len(calls) == 1, d.code
    torch.testing.assert_close(d.outputs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(list(args[-2:]), expected_caches, atol=1e-5, rtol=1e-5)


def test_known_rope_ops_are_declared_when_they_exist():
    from attnfuse.fusions.rope_kv_write import (
        FLASHINFER_ROPE_SPEC,
        KNOWN_ROPE_OPS,
        register_known_rope_ops,
    )

    assert set(KNOWN_ROPE_OPS) == {"vllm::flashinfer_rotary_embedding", "_C::rotary_embedding"}
    table = {"attnfuse_test::rope_inplace": FLASHINFER_ROPE_SPEC,
             "attnfuse_test::no_such_rope": FLASHINFER_ROPE_SPEC}
    assert register_known_rope_ops(table) == [torch.ops.attnfuse_test.rope_inplace.default]


def test_register_rope_op_refuses_half_in_place_ops():
    from attnfuse.fusions.rope_kv_write import RopeOpSpec, register_rope_op

    @torch.library.custom_op("attnfuse_test::rope_half_inplace", mutates_args=("query",))
    def half(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
             cos_sin_cache: torch.Tensor) -> None:
        pass

    with pytest.raises(ValueError, match=r"^spec: expected .* both in place or both functionally"):
        register_rope_op(torch.ops.attnfuse_test.rope_half_inplace.default,
                         RopeOpSpec(query="query", key="key", positions="positions",
                                    cos_sin_cache="cos_sin_cache"))


@pytest.mark.usefixtures("flashinfer_like_ops")
@pytest.mark.parametrize("case", ["mla", "inplace"])
def test_dynamic_token_count_mla_and_inplace(case):
    """A symbolic token count (caches, weights and the cos/sin cache static, as serving
    engines hold them): one graph, fused once per layer, right for every size."""
    from attnfuse.passes.backend import AttnfuseBackend

    backend = AttnfuseBackend({"fusions": FUSION}, inductor=False)
    if case == "mla":
        fn = MLAModel("neox_chunk", layers=1)

        def inputs(n):
            h, cos, sin, slots, caches = mla_inputs("neox_chunk", layers=1, tokens=n, seed=n)
            return (h, cos, sin, slots), [t for c in caches for t in c], caches
    else:
        fn = _inplace_model("split")

        def inputs(n):
            args = _inplace_inputs(tokens=n, seed=n)
            return args[:-2], [args[1], args[3], *args[-2:]], list(args[-2:])

    torch._dynamo.reset()
    try:
        fast = torch.compile(fn, backend=backend, dynamic=True)
        for n in (6, 4, 3):
            args, static, caches = inputs(n)
            for t in static:
                torch._dynamo.mark_static(t)
            copies = [tuple(t.clone() for t in c) if isinstance(c, tuple) else c.clone() for c in caches]
            with torch.no_grad():
                expected = fn(*args, copies) if case == "mla" else fn(*args, *copies)
                got = fast(*args, caches) if case == "mla" else fast(*args, *caches)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(caches, copies, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
    assert len(backend.report.graphs) == 1, backend.report.table()
    assert backend.report.counts == {"rope_kv_write": 1}, backend.report.table()


def test_symbolic_slot_count_with_static_tokens_fuses():
    """Automatic dynamic shapes can mark only the slot mapping: the value's static token
    count then fixes the number of rows index_put writes."""
    model, tables, backend = _one_layer_serving_gqa()
    g = torch.Generator().manual_seed(5)
    args = step_inputs(model.config, torch.randint(0, 512, (2, 3), generator=g), 0, tables)
    torch._dynamo.reset()
    try:
        model.reset_cache()
        with torch.no_grad():
            expected = model(*args, True)
        expected_k = model.layers[0].self_attn.k_cache.clone()
        model.reset_cache()
        slots = args[2].clone()
        torch._dynamo.mark_dynamic(slots, 0)
        with torch.no_grad():
            got = torch.compile(model, backend=backend)(args[0], args[1], slots, *args[3:], True)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.layers[0].self_attn.k_cache, expected_k)
    assert backend.report.counts == {"rope_kv_write": 1}, backend.report.table()
