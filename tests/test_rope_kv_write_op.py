"""``attnfuse::rope_write_kv``: schema and fake impl (opcheck), the reference against a
float64 computation written out by hand, and the ValueErrors for bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.custom_ops import rope_write_kv as rwk

OP = torch.ops.attnfuse.rope_write_kv.default


def _angles(positions: torch.Tensor, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    return positions.double()[..., None] * inv  # (..., rotary_dim / 2)


def _rope64(x: torch.Tensor, ang: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    """RoPE written pair by pair, in float64: the definition, not an implementation."""
    x = x.double().clone()
    out = x.clone()
    half = rotary_dim // 2
    c, s = ang.cos()[..., None, :], ang.sin()[..., None, :]  # broadcast over heads
    for j in range(half):
        a, b = (j, j + half) if style == "neox" else (2 * j, 2 * j + 1)
        out[..., a] = x[..., a] * c[..., j] - x[..., b] * s[..., j]
        out[..., b] = x[..., b] * c[..., j] + x[..., a] * s[..., j]
    return out


def _case(layout: str, *, tokens=5, hq=4, hkv=2, d=16, dv=16, rotary_dim=16, style="neox",
          dtype=torch.float32, cache_dtype=None, width="full", positions_table=False, seed=0):
    """Random arguments for the op (per-token or table cos/sin) and the float64 truth."""
    g = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    batch = 2 if layout == "static" else 1
    tok = (batch, tokens) if layout == "static" else (tokens,)
    q = torch.randn(*tok, hq, d, generator=g).to(dtype)
    k = torch.randn(*tok, hkv, d, generator=g).to(dtype)
    v = torch.randn(*tok, hkv, dv, generator=g).to(dtype)
    pos = torch.randint(0, 64, tok, generator=g)
    ang = _angles(pos, rotary_dim)
    if layout == "static":
        max_len = tokens + 3
        index = torch.randperm(max_len, generator=g)[:tokens]
        shape_k, shape_v = (batch, hkv, max_len, d), (batch, hkv, max_len, dv)
    else:
        slots = 24
        index = torch.randperm(slots, generator=g)[:tokens]
        index[1] = -1  # padding: written nowhere
        page = 4
        shape_k, shape_v = {
            "flat": ((slots, hkv, d), (slots, hkv, dv)),
            "paged_nhd": ((slots // page, page, hkv, d), (slots // page, page, hkv, dv)),
            "paged_hnd": ((slots // page, hkv, page, d), (slots // page, hkv, page, dv)),
        }[layout]
    k_cache = torch.randn(shape_k, generator=g).to(cache_dtype)
    v_cache = torch.randn(shape_v, generator=g).to(cache_dtype)
    half_ang = ang if width == "half" else (
        torch.cat((ang, ang), -1) if style == "neox" else ang.repeat_interleave(2, -1))
    if positions_table:
        table = _angles(torch.arange(64), rotary_dim)
        table = table if width == "half" else (
            torch.cat((table, table), -1) if style == "neox" else table.repeat_interleave(2, -1))
        cos, sin, positions = table.cos().float(), table.sin().float(), pos
    else:
        cos, sin, positions = half_ang.cos().to(dtype), half_ang.sin().to(dtype), None
    scale = None
    if cache_dtype in rwk.FP8_MAX:
        scale = torch.tensor(0.25)
    args = [q, k, v, cos, sin, positions, k_cache, v_cache, index, layout, rotary_dim, style,
            scale, scale, True]
    truth_q = _rope64(q, ang, rotary_dim, style)
    truth_k = _rope64(k, ang, rotary_dim, style)
    return args, truth_q, truth_k


def _rows(cache: torch.Tensor, layout: str, index: torch.Tensor, batch: int) -> torch.Tensor:
    """The cache rows ``index`` names, as ``(tokens..., H, D)`` (valid tokens only)."""
    if layout == "static":
        return cache.permute(0, 2, 1, 3)[:, index]
    valid = index[index >= 0]
    if layout == "flat":
        return cache[valid]
    if layout == "paged_nhd":
        page = cache.shape[1]
        return cache[valid // page, valid % page]
    page = cache.shape[2]
    return cache.permute(0, 2, 1, 3)[valid // page, valid % page]


def _slot_major(cache: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "flat":
        return cache
    if layout == "paged_nhd":
        return cache.flatten(0, 1)
    return cache.permute(0, 2, 1, 3).flatten(0, 1)


LAYOUTS = ["static", "flat", "paged_nhd", "paged_hnd"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("width", ["full", "half"])
def test_reference_matches_float64(layout, style, width):
    args, tq, tk = _case(layout, style=style, width=width, rotary_dim=12)
    before_k = args[6].clone()
    q_rot, k_rot = OP(*args)
    torch.testing.assert_close(q_rot.double(), tq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot.double(), tk, atol=1e-5, rtol=1e-5)
    index = args[8]
    tok_valid = slice(None) if layout == "static" else (index >= 0)
    written_k = _rows(args[6], layout, index, 2)
    written_v = _rows(args[7], layout, index, 2)
    truth_k = tk if layout == "static" else tk[tok_valid]
    truth_v = args[2] if layout == "static" else args[2][tok_valid]
    torch.testing.assert_close(written_k.double(), truth_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(written_v, truth_v)
    if layout != "static":  # rows no token names are untouched (padding wrote nothing)
        named = set(index[index >= 0].tolist())
        after, before = _slot_major(args[6], layout), _slot_major(before_k, layout)
        for slot in range(after.shape[0]):
            assert torch.equal(after[slot], before[slot]) != (slot in named), slot


def test_positions_table_form():
    args, tq, tk = _case("paged_nhd", positions_table=True, width="half", rotary_dim=16)
    q_rot, k_rot = OP(*args)
    torch.testing.assert_close(q_rot.double(), tq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot.double(), tk, atol=1e-5, rtol=1e-5)


def test_fp8_scale_convention():
    args, _, tk = _case("flat", cache_dtype=torch.float8_e4m3fn)
    args[1] = args[1] * 200  # some values beyond 448 * scale: the cast saturates
    tk = tk * 200
    OP(*args)
    index = args[8]
    rows = _rows(args[6], "flat", index, 1).double() * 0.25
    expect = (tk[index >= 0] / 0.25).clamp(-448, 448) * 0.25
    # e4m3 keeps 3 mantissa bits: a relative step of 2^-3 at most
    torch.testing.assert_close(rows, expect, atol=1e-3, rtol=2**-3)
    assert rows.abs().max().item() == 448 * 0.25


def test_padding_slot_writes_nothing():
    args, _, _ = _case("flat")
    args[8] = torch.full_like(args[8], -1)
    before = args[6].clone(), args[7].clone()
    OP(*args)
    assert torch.equal(args[6], before[0]) and torch.equal(args[7], before[1])


def test_static_negative_position_counts_from_end():
    args, _, tk = _case("static", tokens=1)
    args[8] = torch.tensor([-1])
    OP(*args)
    torch.testing.assert_close(args[6][:, :, -1].double(), tk[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    args, _, _ = _case(layout, rotary_dim=8)
    torch.library.opcheck(OP, args)


def test_opcheck_fp8_without_k_return():
    args, _, _ = _case("paged_nhd", cache_dtype=torch.float8_e5m2)
    args[-1] = False
    # opcheck's schema and AOT checks compare mutated tensors with arithmetic that fp8
    # has no CPU kernel for; the fake-tensor check is the one fp8 changes
    torch.library.opcheck(OP, args, test_utils=("test_faketensor",))
    q_rot, k_rot = OP(*args)
    assert k_rot.numel() == 0


BAD = [
    ("style", lambda a: a.__setitem__(11, "gptj"), "style"),
    ("layout", lambda a: a.__setitem__(9, "nhd"), "cache_layout"),
    ("rotary too big", lambda a: a.__setitem__(10, 18), "rotary_dim"),
    ("rotary odd", lambda a: a.__setitem__(10, 7), "rotary_dim"),
    ("q rank", lambda a: a.__setitem__(0, a[0][0]), "q"),
    ("k head dim", lambda a: a.__setitem__(1, a[1][..., :8]), "k"),
    ("v heads", lambda a: a.__setitem__(2, a[2][:, :1]), "v"),
    ("cos width", lambda a: a.__setitem__(3, a[3][..., :5]), "cos"),
    ("index dtype", lambda a: a.__setitem__(8, a[8].float()), "cache_index"),
    ("index length", lambda a: a.__setitem__(8, a[8][:2]), "cache_index"),
    ("cache heads", lambda a: a.__setitem__(6, a[6][:, :1]), "k_cache"),
    ("cache dtype", lambda a: a.__setitem__(7, a[7].half()), "v_cache"),
    ("scale on bf16", lambda a: a.__setitem__(12, torch.tensor(1.0)), "k_scale"),
]


@pytest.mark.parametrize("name,mutate,arg", BAD, ids=[b[0] for b in BAD])
def test_value_errors_name_the_argument(name, mutate, arg):
    args, _, _ = _case("flat")
    args[-1] = True
    mutate(args)
    with pytest.raises(ValueError, match=rf"^{arg}: expected"):
        OP(*args)


def test_fp8_cache_requires_scale():
    args, _, _ = _case("flat", cache_dtype=torch.float8_e4m3fn)
    args[12] = None
    with pytest.raises(ValueError, match=r"^k_scale: expected"):
        OP(*args)


def test_rotation_is_norm_preserving_on_each_pair():
    # a property independent of the formula's spelling: RoPE rotates each pair
    args, _, _ = _case("flat", rotary_dim=16, d=16)
    q_rot, _ = OP(*args)
    q = args[0]
    pairs_in = q.double().unflatten(-1, (2, 8)).pow(2).sum(-2)
    pairs_out = q_rot.double().unflatten(-1, (2, 8)).pow(2).sum(-2)
    torch.testing.assert_close(pairs_out, pairs_in, atol=1e-4, rtol=1e-4)
    assert math.isfinite(pairs_out.sum().item())
