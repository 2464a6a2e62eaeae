"""``attnfuse::rope_write_kv``: RoPE on q and k plus the KV-cache write of k and v, one op.

Serving code rotates q and k, then writes k and v into the cache in a separate step
(SGLang ``set_kv_buffer``, vLLM ``reshape_and_cache``, HF ``StaticCache.update``). This
op does both in one pass over k; on CUDA it is one Triton launch
(``custom_ops.kernels.rope_write_kv``).

Parameters
----------
q : ``(T, Hq, D)`` or ``(B, S, Hq, D)``
    Queries; any strides. The leading dims are the *token dims*, shared by every
    per-token argument.
k : ``(*tok, Hkv, D)``
    Keys, rotated and written to ``k_cache``.
v : ``(*tok, Hkv, Dv)``
    Values, written to ``v_cache`` unchanged (MLA: the latent ``ckv``, ``Hkv`` = 1).
cos, sin : floating
    Without ``positions``: per-token rows broadcastable to ``(*tok, W)`` (HF computes
    them once per forward and shares them across layers). With ``positions``: tables
    ``(max_pos, W)`` indexed by it (the cos/sin-cache form). ``W`` is ``rotary_dim``
    (full width, one angle per feature: HF's ``cat((freqs, freqs))``) or
    ``rotary_dim // 2`` (one angle per rotated pair).
positions : int, broadcastable to ``tok``, optional
    Positions to gather cos/sin rows from; ``None`` when they are already gathered.
k_cache, v_cache : mutated
    The caches, in the layout ``cache_layout`` names (``N`` = pages or slots):

    - ``"static"``: HF ``(B, Hkv, S_max, D)``; ``cache_index`` holds cache positions
      (token ``(b, s)`` goes to ``[b, :, cache_index[b, s]]``, or ``cache_index[s]`` when
      the batch shares positions; negative counts from the end, as Python indexing does).
    - ``"flat"``: ``(slots, Hkv, D)`` or ``(slots, D)`` (one head: MLA's ``ckv``/``kpe``).
    - ``"paged_nhd"``: ``(N, page, Hkv, D)``; ``"paged_hnd"``: ``(N, Hkv, page, D)``.

    For ``flat`` and ``paged_*`` the index is a slot mapping (slot = block * page +
    offset) and a negative slot is padding: nothing is written (vLLM's convention).
cache_index : int, broadcastable to ``tok``
    Where each token's k and v go (see ``k_cache``).
cache_layout : str
    ``"static"``, ``"flat"``, ``"paged_nhd"`` or ``"paged_hnd"``.
rotary_dim : int
    Leading features of each head that are rotated (even, ``<= D``); the rest pass
    through (partial rotary).
style : str
    ``"neox"`` (rotate-half: pairs ``(j, j + rotary_dim/2)``) or ``"interleaved"``
    (GPT-J: pairs ``(2j, 2j + 1)``).
k_scale, v_scale : fp32 scalar tensors, optional
    Required when the matching cache is fp8 (``float8_e4m3fn`` or ``float8_e5m2``), and
    only then. Convention: ``cache = saturate(x / scale)``, so ``cache * scale``
    recovers ``x``; values beyond the format's largest finite value are clamped to it.
return_k : bool
    Whether to also return the rotated k (prefill attention that reads k directly).

Returns
-------
``(q_rot, k_rot)``: rotated q, shaped like ``q``, and rotated k shaped like ``k`` when
``return_k`` (an empty tensor otherwise). Both are in their input's dtype. The rotation
runs in fp32 and rounds once; a non-fp8 cache receives k rounded to k's dtype, exactly
what writing the rotated k would store.

Example
-------
>>> q_rot, _ = torch.ops.attnfuse.rope_write_kv(q, k, v, cos, sin, None, k_cache, v_cache,
...     slots, "paged_nhd", 128, "neox", None, None, False)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._dispatch import (  # noqa: F401
    FLOAT_DTYPES,
    INDEX_DTYPES,
    kernel_on_cpu,
    register_direct_kernels,
    use_kernel,
)
from .kernels._launch import Allocations, CallPlan, PlanCache, tensor_signature

CACHE_LAYOUTS = ("static", "flat", "paged_nhd", "paged_hnd")
ROPE_STYLES = ("neox", "interleaved")
#: largest finite value of each fp8 cache format (the saturating cast clamps to it)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
CACHE_DTYPES = FLOAT_DTYPES + tuple(FP8_MAX)

# ------------------------------------------------------------------ validation
def _fail(arg: str, value: object, expected: str) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {value}")


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}"


def _broadcastable(shape: Sequence[int], target: Sequence[int]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def validate(q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout,
             rotary_dim, style, k_scale, v_scale) -> None:
    """Raise ``ValueError`` naming the first bad argument."""
    if style not in ROPE_STYLES:
        _fail("style", repr(style), f"one of {ROPE_STYLES}")
    if cache_layout not in CACHE_LAYOUTS:
        _fail("cache_layout", repr(cache_layout), f"one of {CACHE_LAYOUTS}")
    if q.dim() not in (3, 4):
        _fail("q", _describe(q), "rank 3 (T, Hq, D) or 4 (B, S, Hq, D)")
    tok = tuple(q.shape[:-2])
    head_dim = q.shape[-1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in FLOAT_DTYPES:
            _fail(name, _describe(t), f"a dtype in {FLOAT_DTYPES}")
        if t.dim() != q.dim() or tuple(t.shape[:-2]) != tok:
            _fail(name, _describe(t), f"token dims {tok} followed by (heads, head_dim)")
    if k.shape[-1] != head_dim:
        _fail("k", _describe(k), f"head_dim {head_dim} (q's)")
    if k.dtype != q.dtype:
        _fail("k", _describe(k), f"q's dtype {q.dtype}")
    hkv = k.shape[-2]
    if v.shape[-2] != hkv:
        _fail("v", _describe(v), f"{hkv} heads (k's)")
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        _fail("rotary_dim", rotary_dim, f"an even int in [2, head_dim={head_dim}]")
    widths = (rotary_dim, rotary_dim // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.is_floating_point() or t.dtype not in FLOAT_DTYPES:
            _fail(name, _describe(t), f"a dtype in {FLOAT_DTYPES}")
        if t.shape[-1:] != cos.shape[-1:] or t.shape[-1] not in widths:
            _fail(name, _describe(t), f"last dim rotary_dim={rotary_dim} or rotary_dim/2 "
                  f"(the same for cos and sin)")
        if positions is None:
            if not _broadcastable(t.shape[:-1], tok):
                _fail(name, _describe(t), f"rows broadcastable to token dims {tok}")
        elif t.dim() != 2:
            _fail(name, _describe(t), "a (max_positions, width) table when positions is given")
    if positions is not None:
        if positions.dtype not in INDEX_DTYPES or not _broadcastable(positions.shape, tok):
            _fail("positions", _describe(positions), f"int32/int64 broadcastable to {tok}")
    if cache_index.dtype not in INDEX_DTYPES or not _broadcastable(cache_index.shape, tok):
        _fail("cache_index", _describe(cache_index), f"int32/int64 broadcastable to {tok}")
    for name, cache, feat, scale_name, scale in (
        ("k_cache", k_cache, head_dim, "k_scale", k_scale),
        ("v_cache", v_cache, v.shape[-1], "v_scale", v_scale),
    ):
        if cache.dtype not in CACHE_DTYPES:
            _fail(name, _describe(cache), f"a dtype in {CACHE_DTYPES}")
        if cache.device != q.device:
            _fail(name, f"device {cache.device}", f"q's device {q.device}")
        expected = _expected_cache_shape(cache_layout, cache, hkv, feat, tok)
        if expected is not None:
            _fail(name, _describe(cache), expected)
        src = k if name == "k_cache" else v
        if cache.dtype in FP8_MAX:
            if scale is None:
                _fail(scale_name, None, f"a float32 scalar tensor because {name} is {cache.dtype}")
        elif cache.dtype != src.dtype:
            _fail(name, _describe(cache), f"{src.dtype} (the dtype written into it) or fp8")
        if scale is not None:
            if cache.dtype not in FP8_MAX:
                _fail(scale_name, _describe(scale), f"None because {name} is not fp8")
            if scale.dtype != torch.float32 or scale.numel() != 1:
                _fail(scale_name, _describe(scale), "a float32 tensor with one element")
    if cache_layout == "static" and k_cache.shape[0] != (tok[0] if len(tok) == 2 else 1):
        _fail("k_cache", _describe(k_cache), f"batch {tok[0] if len(tok) == 2 else 1} (q's)")


def _expected_cache_shape(layout, cache, heads, feat, tok) -> str | None:
    """None when ``cache`` fits ``layout``, else what was expected."""
    if layout == "flat":
        if cache.dim() == 2 and heads == 1 and cache.shape[1] == feat:
            return None
        if cache.dim() == 3 and tuple(cache.shape[1:]) == (heads, feat):
            return None
        return f"(slots, {heads}, {feat}) or, with one head, (slots, {feat}) for layout 'flat'"
    if cache.dim() != 4:
        return f"rank 4 for layout {layout!r}"
    head_axis = {"static": 1, "paged_nhd": 2, "paged_hnd": 1}[layout]
    if cache.shape[head_axis] != heads or cache.shape[3] != feat:
        return f"{heads} heads at dim {head_axis} and head_dim {feat} for layout {layout!r}"
    return None


# ------------------------------------------------------------------ normalization
def _as_tokens(t: torch.Tensor) -> torch.Tensor:
    """``(T, H, D)`` -> ``(1, T, H, D)``; ``(B, S, H, D)`` unchanged (views only)."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def _cache_blocks(cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, int]:
    """A ``(blocks, page, heads, feat)`` view of ``cache`` and its page size."""
    if layout == "static":
        return cache.permute(0, 2, 1, 3), cache.shape[2]
    if layout == "flat":
        view = cache.unsqueeze(1) if cache.dim() == 3 else cache[:, None, None, :]
        return view, 1
    if layout == "paged_nhd":
        return cache, cache.shape[1]
    return cache.permute(0, 2, 1, 3), cache.shape[2]


# ------------------------------------------------------------------ reference
def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      rotary_dim: int, style: str) -> torch.Tensor:
    """RoPE in fp32 on ``x (..., H, D)`` with full-width ``cos``/``sin (..., rotary_dim)``."""
    x = x.float()
    rot, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)
    if style == "neox":
        x1, x2 = rot.chunk(2, dim=-1)
        partner = torch.cat((-x2, x1), dim=-1)
    else:
        pairs = rot.unflatten(-1, (-1, 2))
        partner = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat((rot * c + partner * s, tail), dim=-1)


def _full_width(t: torch.Tensor, rotary_dim: int, style: str) -> torch.Tensor:
    """Half-width angles (one per pair) expanded to one per feature."""
    if t.shape[-1] == rotary_dim:
        return t
    if style == "neox":
        return torch.cat((t, t), dim=-1)
    return t.repeat_interleave(2, dim=-1)


def _quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if dtype in FP8_MAX:
        fmax = FP8_MAX[dtype]
        return (x.float() / scale.float().reshape(())).clamp(-fmax, fmax).to(dtype)
    return x.to(dtype)


def _reference(q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout,
               rotary_dim, style, k_scale, v_scale, return_k):
    q4, k4, v4 = _as_tokens(q), _as_tokens(k), _as_tokens(v)
    tok4 = tuple(q4.shape[:2])
    if positions is not None:
        pos = positions.expand(*tok4).long()
        cos_t, sin_t = cos[pos], sin[pos]
    else:
        cos_t = cos.expand(*tok4, cos.shape[-1])
        sin_t = sin.expand(*tok4, sin.shape[-1])
    cos_t = _full_width(cos_t, rotary_dim, style)
    sin_t = _full_width(sin_t, rotary_dim, style)
    q_rot = _rotate_reference(q4, cos_t, sin_t, rotary_dim, style).to(q.dtype)
    k_rot32 = _rotate_reference(k4, cos_t, sin_t, rotary_dim, style)
    k_rot = k_rot32.to(k.dtype)
    k_src = k_rot32 if k_cache.dtype in FP8_MAX else k_rot

    index = cache_index.expand(*tok4).long()
    kc4, page = _cache_blocks(k_cache, cache_layout)
    vc4, _ = _cache_blocks(v_cache, cache_layout)
    if cache_layout == "static":
        batch = torch.arange(tok4[0], device=q.device)[:, None].expand(*tok4)
        offset = torch.where(index < 0, index + page, index)
        block, valid = batch, torch.ones_like(index, dtype=torch.bool)
    else:
        valid = index >= 0
        block, offset = index.clamp(min=0) // page, index.clamp(min=0) % page
    block, offset = block[valid], offset[valid]
    kc4[block, offset] = _quantize(k_src[valid], k_cache.dtype, k_scale)
    vc4[block, offset] = _quantize(v4[valid], v_cache.dtype, v_scale)

    q_out = q_rot.reshape(q.shape).contiguous()
    k_out = k_rot.reshape(k.shape).contiguous() if return_k else k.new_empty(0)
    return q_out, k_out


# ------------------------------------------------------------------ kernel path
# Strides are computed arithmetically (no views): on the decode path the host-side cost
# of this op is what a CUDA-graph-less step pays per layer.
def _token_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``(b, s, head, feature)`` strides of a ``(T, H, D)`` or ``(B, S, H, D)`` tensor."""
    st = t.stride()
    return (0, *st) if t.dim() == 3 else st


def _broadcast_strides(t: torch.Tensor, tok: tuple[int, ...], trailing: int) -> tuple[int, ...]:
    """Strides of ``t`` broadcast to ``tok + (trailing dims)``, as ``(b, s, *trailing)``."""
    rank = len(tok) + trailing
    shape = (1,) * (rank - t.dim()) + tuple(t.shape)
    stride = (0,) * (rank - t.dim()) + tuple(t.stride())
    out = [0 if n == 1 else s_ for n, s_ in zip(shape, stride)]
    lead = out[: len(tok)]
    if trailing:
        out_trailing = [stride[-i] for i in range(trailing, 0, -1)]
    else:
        out_trailing = []
    return ((0, *lead) if len(tok) == 1 else tuple(lead)) + tuple(out_trailing)


def _cache_strides(cache: torch.Tensor, layout: str) -> tuple[tuple[int, ...], int]:
    """``(block, offset, head, feature)`` strides of ``cache`` and its page size."""
    st = cache.stride()
    if layout == "static" or layout == "paged_hnd":
        return (st[0], st[2], st[1], st[3]), cache.shape[2]
    if layout == "paged_nhd":
        return st, cache.shape[1]
    if cache.dim() == 3:
        return (st[0], 0, st[1], st[2]), 1
    return (st[0], 0, 0, st[1]), 1


def _kernel(q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout,
            rotary_dim, style, k_scale, v_scale, return_k, num_warps=None, remember=None):
    """The Triton path; with ``remember`` (a call signature, ``_signature``) the launch
    is also kept in ``_PLANS`` under it for later calls of that signature."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        # the kernel assumes contiguous features; such caches are rare: stay correct
        return _reference(q, k, v, cos, sin, positions, k_cache, v_cache, cache_index,
                          cache_layout, rotary_dim, style, k_scale, v_scale, return_k)
    given = (q, k, v, cos, sin)
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in given)

    buffers = Allocations(q.device)
    q_out, k_out, launch = plan_kernel(
        q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout, rotary_dim,
        style, k_scale, v_scale, return_k, empty=buffers, num_warps=num_warps)
    launches = [] if launch is None else [launch]  # no tokens: nothing to launch
    for one in launches:
        one()
    if remember is not None and all(a is b for a, b in zip(given, (q, k, v, cos, sin))):
        inputs = (q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, k_scale, v_scale)
        plan = CallPlan.of(launches, inputs, buffers, (q_out, k_out))
        if plan is not None:
            _PLANS.remember(remember, plan)
    return q_out, (k_out if k_out is not None else k.new_empty(0))


# ------------------------------------------------------------------ planned calls
# Decode and eager prefill call the op with the same shapes, strides and dtypes step
# after step. The first call of each such signature is validated and planned; its launch
# is remembered (CallPlan: the kernel arguments with the tensors left as slots, and the
# outputs to allocate) and later calls only allocate the outputs and launch. Validation
# and planning read nothing but the signature and the non-tensor arguments, all of which
# are in the key, so a remembered call would have passed validation and planned the same
# launch.
_PLANS = PlanCache()


def _signature(q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout,
               rotary_dim, style, k_scale, v_scale, return_k) -> tuple:
    return (cache_layout, rotary_dim, style, return_k,
            *map(tensor_signature, (q, k, v, cos, sin, positions, k_cache, v_cache, cache_index,
                                    k_scale, v_scale)))


def plan_kernel(q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout,
                rotary_dim, style, k_scale, v_scale, return_k, *, empty, num_warps=None):
    """``(q_out, k_out or None, launch or None)`` of one call, without launching.

    Every feature (last) dim must have stride 1. ``q_out``/``k_out`` come from
    ``empty(shape, dtype)``: real tensors for a call, fake ones when the launch is put
    into a compiled graph (``attnfuse.passes.inline_kernels``).
    """
    from .kernels.rope_write_kv import plan_rope_write_kv_launch

    tok = tuple(q.shape[:-2])
    batch, seq_len = (1, tok[0]) if len(tok) == 1 else tok
    q_out = empty(tuple(q.shape), q.dtype)
    k_out = empty(tuple(k.shape), k.dtype) if return_k else None
    strides = {"q": _token_strides(q), "k": _token_strides(k), "v": _token_strides(v),
               "index": _broadcast_strides(cache_index, tok, 0)}
    if positions is not None:
        strides["positions"] = _broadcast_strides(positions, tok, 0)
        strides["cos"] = (0, *cos.stride())
        strides["sin"] = (0, *sin.stride())
    else:
        strides["cos"] = _broadcast_strides(cos, tok, 1)
        strides["sin"] = _broadcast_strides(sin, tok, 1)
    strides["k_cache"], page = _cache_strides(k_cache, cache_layout)
    strides["v_cache"], _ = _cache_strides(v_cache, cache_layout)
    launch = plan_rope_write_kv_launch(
        q, k, v, q_out, k_out, cos, sin, positions, cache_index, k_cache, v_cache,
        batch=batch, seq_len=seq_len, num_q_heads=q.shape[-2], num_kv_heads=k.shape[-2],
        head_dim=q.shape[-1], head_dim_v=v.shape[-1], rotary_dim=rotary_dim,
        interleaved=style == "interleaved", cos_width=cos.shape[-1], strides=strides,
        page_size=page, index_is_position=cache_layout == "static",
        k_scale=k_scale, v_scale=v_scale, num_warps=num_warps,
    )
    return q_out, k_out, launch


# ------------------------------------------------------------------ the op
def _rope_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
    k_cache: torch.Tensor, v_cache: torch.Tensor, cache_index: torch.Tensor,
    cache_layout: str, rotary_dim: int, style: str,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, return_k: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout,
            rotary_dim, style, k_scale, v_scale, return_k)
    if not use_kernel(q.device):
        validate(*args[:-1])
        return _reference(*args)
    key = _signature(*args)
    plan = _PLANS.get(key)
    if plan is not None:
        q_out, k_out = plan.run((q, k, v, cos, sin, positions, k_cache, v_cache, cache_index,
                                 k_scale, v_scale), q.device)
        return q_out, (k_out if k_out is not None else k.new_empty(0))
    validate(*args[:-1])  # raises for bad input; only calls that pass are remembered
    return _kernel(*args, remember=key)


rope_write_kv = torch.library.custom_op(
    "attnfuse::rope_write_kv", _rope_write_kv, mutates_args=("k_cache", "v_cache"))


@rope_write_kv.register_fake
def _(q, k, v, cos, sin, positions, k_cache, v_cache, cache_index, cache_layout,
      rotary_dim, style, k_scale, v_scale, return_k):
    torch._check(q.dim() in (3, 4), lambda: f"q: expected rank 3 or 4, got {q.dim()}")
    torch._check(k.shape[:-2] == q.shape[:-2] and v.shape[:-2] == q.shape[:-2],
                 lambda: "k, v: expected the token dims of q")
    torch._check(k.shape[-1] == q.shape[-1], lambda: "k: expected q's head_dim")
    torch._check(2 <= rotary_dim <= q.shape[-1] and rotary_dim % 2 == 0,
                 lambda: f"rotary_dim: expected an even int <= head_dim, got {rotary_dim}")
    torch._check(cache_layout in CACHE_LAYOUTS, lambda: f"cache_layout: got {cache_layout!r}")
    torch._check(style in ROPE_STYLES, lambda: f"style: got {style!r}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if return_k else k.new_empty(0)
    return q_out, k_out


#: whether calls reach ``_rope_write_kv`` through one Python kernel (``_dispatch``)
DIRECT_DISPATCH = register_direct_kernels(rope_write_kv, _rope_write_kv,
                                          mutated=("k_cache", "v_cache"))


def reference(*args, **kwargs):
    """The plain-torch reference (for tests and benchmarks): same arguments as the op."""
    return _reference(*args, **kwargs)


def kernel(*args, num_warps: int | None = None):
    """The Triton path without the dispatcher and validation (benchmarks: warp sweeps)."""
    return _kernel(*args, num_warps=num_warps)
