"""Triton kernel: rotate q and k (RoPE) and write k and v into a KV cache, in one launch.

Algorithm
---------
RoPE pairs the first ``rotary_dim`` features of each head: pair ``j`` is ``(j, j + rd/2)``
in the neox (rotate-half) style and ``(2j, 2j + 1)`` in the GPT-J (interleaved) style.
For a pair ``(a, b)`` with angles read from the per-token cos/sin rows::

    out[a] = x[a] * cos[a] - x[b] * sin[a]
    out[b] = x[b] * cos[b] + x[a] * sin[b]

Features from ``rotary_dim`` on pass through. cos/sin rows are either full width
(``rotary_dim`` entries, HF's ``cat((freqs, freqs))`` form, read per feature) or half
width (``rotary_dim / 2`` entries, one angle per pair: the cos/sin-cache form of
vLLM/FlashInfer). The arithmetic runs in fp32 and rounds once at the store.

Every token's k (rotated) and v go to the cache row its index names. The cache is
addressed as ``(block, offset, head, feature)`` with explicit strides, which covers
every layout: HF static ``(B, H, S, D)`` (block = batch row, offset = cache position),
flat ``(slots, H, D)`` (page size 1), paged NHD and HND (block = slot // page,
offset = slot % page). A negative slot is padding and writes nothing; a negative static
cache position counts from the end, as Python indexing (and ``index_put``) does. fp8
caches store ``saturate(x / scale)``.

Grid
----
``(num_tokens, num_head_tiles)``. Program ``(t, i)`` reads token ``t``'s cos/sin once and
handles q heads ``[i*BLOCK_HQ, (i+1)*BLOCK_HQ)`` and kv heads
``[i*BLOCK_HKV, (i+1)*BLOCK_HKV)``. Large token counts use one tile (one program per
token); small ones split the heads so that the launch still fills the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import KernelLaunch, Launcher, cdiv, next_pow2

#: programs a launch should reach before head tiles stop being split: two waves on a
#: 132-SM H100, enough to hide the memory latency of the short per-program work
TARGET_PROGRAMS = 264
#: register budget of one program, in elements of a head tile (q heads x head_dim):
#: beyond it a tile spills, so more programs with fewer heads are used instead
MAX_TILE_ELEMENTS = 4096
#: elements of a head tile per warp. Measured on H100 (bench_rope_kv's num_warps sweep):
#: for a whole Llama-3-8B token (32 x 128) 4 warps are fastest or within 2% from 1k to
#: 32k tokens (8 warps: up to 13% slower, 1 warp: 5-13% slower); one-head tiles (T <= 16
#: decode) want one warp; 8-head tiles (T = 128) 4 warps (3.0-3.1 us against 3.2-3.4 us
#: with one, bf16 and fp8 caches, under CUDA graphs)
ELEMENTS_PER_WARP = 256
MAX_WARPS = 4

#: largest finite values of the fp8 formats: the saturating cast clamps to them
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
FP8_DTYPES = tuple(FP8_MAX)


@dataclass(frozen=True)
class LaunchSettings:
    num_head_tiles: int
    block_hq: int
    block_hkv: int
    num_warps: int


@functools.lru_cache(maxsize=1024)
def launch_settings(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                    num_warps: int | None = None) -> LaunchSettings:
    """Head tiling and warp count for one launch (the only place they are chosen)."""
    num_tiles = 1
    # split heads while the grid is small, or while one tile would not fit in registers
    while num_tiles < num_q_heads and (
        num_tokens * num_tiles < TARGET_PROGRAMS
        or cdiv(num_q_heads, num_tiles) * head_dim > MAX_TILE_ELEMENTS
    ):
        num_tiles *= 2
    num_tiles = min(num_tiles, num_q_heads)
    block_hq = next_pow2(cdiv(num_q_heads, num_tiles))
    num_tiles = cdiv(num_q_heads, block_hq)
    block_hkv = next_pow2(max(1, cdiv(num_kv_heads, num_tiles)))
    num_tiles = max(num_tiles, cdiv(num_kv_heads, block_hkv))
    if num_warps is None:
        tile_elements = block_hq * next_pow2(head_dim)
        num_warps = max(1, min(MAX_WARPS, tile_elements // ELEMENTS_PER_WARP))
    return LaunchSettings(num_tiles, block_hq, block_hkv, num_warps)


@triton.jit
def _load_rows(ptr, row, heads, head_mask, feat, feat_mask, s_h, s_d):
    offs = row + heads[:, None].to(tl.int64) * s_h + feat[None, :] * s_d
    return tl.load(ptr + offs, mask=head_mask[:, None] & feat_mask[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, row, heads, mask2d, feat, s_h, s_d, val):
    offs = row + heads[:, None].to(tl.int64) * s_h + feat[None, :] * s_d
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask2d)


@triton.jit
def _store_cache(ptr, row, heads, mask2d, feat, s_h, s_d, val, scale,
                 QUANTIZE: tl.constexpr, QMAX: tl.constexpr):
    if QUANTIZE:
        val = tl.minimum(tl.maximum(val / scale, -QMAX), QMAX)
    _store_rows(ptr, row, heads, mask2d, feat, s_h, s_d, val)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, index_ptr,
    q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    seq_len, num_q_heads, num_kv_heads, page_size,
    # Shapes and strides. Token t is (b, s) = (t // seq_len, t % seq_len).
    # Every feature dim is contiguous (the launcher guarantees it), so only the other
    # strides are passed: each argument costs host time at every launch.
    #   q     (B, S, Hq, D)   q_sb, q_ss, q_sh      (q_out, k_out: contiguous, same shapes)
    #   k     (B, S, Hkv, D)  k_sb, k_ss, k_sh
    #   v     (B, S, Hkv, Dv) v_sb, v_ss, v_sh
    #   cos/sin rows: per token (b, s) strides cs_b, cs_s, or per position (pos * cs_s)
    #   pos   (B, S) int      p_sb, p_ss (only with HAS_POSITIONS)
    #   index (B, S) int      i_sb, i_ss
    #   caches (block, offset, head): kc_*, vc_*
    q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh,
    cs_b, cs_s, sn_b, sn_s,
    p_sb, p_ss, i_sb, i_ss,
    kc_sblk, kc_soff, kc_sh, vc_sblk, vc_soff, vc_sh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, ROTARY_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_DV: tl.constexpr,
    INTERLEAVED: tl.constexpr, COS_FULL_WIDTH: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    INDEX_IS_POSITION: tl.constexpr, RETURN_K: tl.constexpr,
    QUANTIZE_K: tl.constexpr, QUANTIZE_V: tl.constexpr, K_QMAX: tl.constexpr,
    V_QMAX: tl.constexpr,
):
    tl.static_assert(ROTARY_DIM % 2 == 0)
    HALF: tl.constexpr = ROTARY_DIM // 2
    TAIL: tl.constexpr = HEAD_DIM - ROTARY_DIM
    q_sd: tl.constexpr = 1
    k_sd: tl.constexpr = 1
    v_sd: tl.constexpr = 1
    cs_d: tl.constexpr = 1
    sn_d: tl.constexpr = 1
    kc_sd: tl.constexpr = 1
    vc_sd: tl.constexpr = 1
    qo_sd: tl.constexpr = 1
    ko_sd: tl.constexpr = 1
    qo_sh: tl.constexpr = HEAD_DIM
    ko_sh: tl.constexpr = HEAD_DIM
    qo_ss = num_q_heads * HEAD_DIM
    qo_sb = seq_len * qo_ss
    ko_ss = num_kv_heads * HEAD_DIM
    ko_sb = seq_len * ko_ss

    t = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    b = t // seq_len
    s = t % seq_len

    # ---- cos/sin for this token: read once, shared by every head of the tile
    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    if INTERLEAVED:
        feat_a = 2 * j
        feat_b = 2 * j + 1
    else:
        feat_a = j
        feat_b = j + HALF
    if HAS_POSITIONS:
        pos = tl.load(pos_ptr + b * p_sb + s * p_ss).to(tl.int64)
        cos_row = cos_ptr + pos * cs_s
        sin_row = sin_ptr + pos * sn_s
    else:
        cos_row = cos_ptr + b * cs_b + s * cs_s
        sin_row = sin_ptr + b * sn_b + s * sn_s
    if COS_FULL_WIDTH:
        cos_a = tl.load(cos_row + feat_a * cs_d, mask=j_mask, other=0.0).to(tl.float32)
        cos_b = tl.load(cos_row + feat_b * cs_d, mask=j_mask, other=0.0).to(tl.float32)
        sin_a = tl.load(sin_row + feat_a * sn_d, mask=j_mask, other=0.0).to(tl.float32)
        sin_b = tl.load(sin_row + feat_b * sn_d, mask=j_mask, other=0.0).to(tl.float32)
    else:
        cos_a = tl.load(cos_row + j * cs_d, mask=j_mask, other=0.0).to(tl.float32)
        sin_a = tl.load(sin_row + j * sn_d, mask=j_mask, other=0.0).to(tl.float32)
        cos_b = cos_a
        sin_b = sin_a
    cos_a = cos_a[None, :]
    cos_b = cos_b[None, :]
    sin_a = sin_a[None, :]
    sin_b = sin_b[None, :]
    tail = ROTARY_DIM + tl.arange(0, BLOCK_TAIL)
    tail_mask = tail < HEAD_DIM

    # ---- q: rotate into q_out
    hq = tile * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
    hq_mask = hq < num_q_heads
    if tile * BLOCK_HQ < num_q_heads:
        q_row = q_ptr + b * q_sb + s * q_ss
        qo_row = q_out_ptr + b * qo_sb + s * qo_ss
        xa = _load_rows(q_row, 0, hq, hq_mask, feat_a, j_mask, q_sh, q_sd).to(tl.float32)
        xb = _load_rows(q_row, 0, hq, hq_mask, feat_b, j_mask, q_sh, q_sd).to(tl.float32)
        m2 = hq_mask[:, None] & j_mask[None, :]
        _store_rows(qo_row, 0, hq, m2, feat_a, qo_sh, qo_sd, xa * cos_a - xb * sin_a)
        _store_rows(qo_row, 0, hq, m2, feat_b, qo_sh, qo_sd, xb * cos_b + xa * sin_b)
        if TAIL > 0:
            xt = _load_rows(q_row, 0, hq, hq_mask, tail, tail_mask, q_sh, q_sd)
            _store_rows(qo_row, 0, hq, hq_mask[:, None] & tail_mask[None, :], tail,
                        qo_sh, qo_sd, xt)

    # ---- k and v: rotate k, write both into the cache row the index names
    hk = tile * BLOCK_HKV + tl.arange(0, BLOCK_HKV)
    hk_mask = hk < num_kv_heads
    if tile * BLOCK_HKV < num_kv_heads:
        idx = tl.load(index_ptr + b * i_sb + s * i_ss).to(tl.int64)
        if INDEX_IS_POSITION:
            # static cache: block = batch row, offset = cache position (Python indexing)
            offset = tl.where(idx < 0, idx + page_size, idx)
            block = b
            hk_write = hk_mask
        else:
            # negative slot: padding, nothing written (a per-head vector, not a scalar
            # and-ed into the masks, which the interpreter rejects)
            hk_write = hk_mask & ((hk * 0 + idx) >= 0)
            safe = tl.maximum(idx, 0)
            block = safe // page_size
            offset = safe % page_size
        kc_row = k_cache_ptr + block * kc_sblk + offset * kc_soff
        vc_row = v_cache_ptr + block * vc_sblk + offset * vc_soff
        k_scale = 1.0
        v_scale = 1.0
        if QUANTIZE_K:
            k_scale = tl.load(k_scale_ptr).to(tl.float32)
        if QUANTIZE_V:
            v_scale = tl.load(v_scale_ptr).to(tl.float32)

        k_row = k_ptr + b * k_sb + s * k_ss
        xa = _load_rows(k_row, 0, hk, hk_mask, feat_a, j_mask, k_sh, k_sd).to(tl.float32)
        xb = _load_rows(k_row, 0, hk, hk_mask, feat_b, j_mask, k_sh, k_sd).to(tl.float32)
        ra = xa * cos_a - xb * sin_a
        rb = xb * cos_b + xa * sin_b
        m2 = hk_mask[:, None] & j_mask[None, :]
        if RETURN_K:
            ko_row = k_out_ptr + b * ko_sb + s * ko_ss
            _store_rows(ko_row, 0, hk, m2, feat_a, ko_sh, ko_sd, ra)
            _store_rows(ko_row, 0, hk, m2, feat_b, ko_sh, ko_sd, rb)
        wm = hk_write[:, None] & j_mask[None, :]
        if not QUANTIZE_K:
            # round to k's dtype first, as the unfused graph (rotate, then write) does
            ra = ra.to(k_ptr.dtype.element_ty)
            rb = rb.to(k_ptr.dtype.element_ty)
        _store_cache(kc_row, 0, hk, wm, feat_a, kc_sh, kc_sd, ra, k_scale, QUANTIZE_K, K_QMAX)
        _store_cache(kc_row, 0, hk, wm, feat_b, kc_sh, kc_sd, rb, k_scale, QUANTIZE_K, K_QMAX)
        if TAIL > 0:
            xt = _load_rows(k_row, 0, hk, hk_mask, tail, tail_mask, k_sh, k_sd)
            tm = hk_mask[:, None] & tail_mask[None, :]
            if RETURN_K:
                _store_rows(ko_row, 0, hk, tm, tail, ko_sh, ko_sd, xt)
            _store_cache(kc_row, 0, hk, hk_write[:, None] & tail_mask[None, :], tail, kc_sh, kc_sd, xt.to(tl.float32),
                         k_scale, QUANTIZE_K, K_QMAX)

        dv = tl.arange(0, BLOCK_DV)
        dv_mask = dv < HEAD_DIM_V
        v_row = v_ptr + b * v_sb + s * v_ss
        xv = _load_rows(v_row, 0, hk, hk_mask, dv, dv_mask, v_sh, v_sd)
        vm = hk_write[:, None] & dv_mask[None, :]
        _store_cache(vc_row, 0, hk, vm, dv, vc_sh, vc_sd, xv.to(tl.float32), v_scale,
                     QUANTIZE_V, V_QMAX)


_ROPE_WRITE_KV = Launcher(_rope_write_kv_kernel)


def plan_rope_write_kv_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_out: torch.Tensor, k_out: torch.Tensor | None,
    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None, index: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    *,
    batch: int, seq_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
    head_dim_v: int, rotary_dim: int, interleaved: bool, cos_width: int,
    strides: dict[str, tuple[int, ...]], page_size: int, index_is_position: bool,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    num_warps: int | None = None,
) -> KernelLaunch | None:
    """The kernel launch for validated arguments (``None``: no tokens, nothing to do);
    no tensor is created or viewed here. Calling the result launches it.

    Every feature (last) dim must have stride 1, and ``q_out``/``k_out`` must be
    contiguous; the op's wrapper ensures both.

    Tokens are ``(batch, seq_len)``. ``strides`` holds, for each name, the strides the
    kernel walks: ``q``, ``q_out``, ``k``, ``k_out``, ``v``: ``(b, s, head, feature)``;
    ``cos``, ``sin``: ``(b, s, feature)`` per token, or ``(0, row, feature)`` for tables
    read at ``positions``; ``positions``, ``index``: ``(b, s)``; ``k_cache``, ``v_cache``:
    ``(block, offset, head, feature)`` (``custom_ops.rope_write_kv`` derives them for each
    layout). Broadcast dims have stride 0.
    """
    num_tokens = batch * seq_len
    if num_tokens == 0:
        return None
    cfg = launch_settings(num_tokens, num_q_heads, num_kv_heads, head_dim, num_warps)
    st = strides
    ko = k_out if k_out is not None else q_out  # unused when RETURN_K is off
    half = rotary_dim // 2
    grid = (num_tokens, cfg.num_head_tiles)
    return KernelLaunch(
        _ROPE_WRITE_KV,
        grid,
        (q, k, v, cos, sin, positions if positions is not None else index, index,
         q_out, ko, k_cache, v_cache,
         k_scale if k_scale is not None else q_out, v_scale if v_scale is not None else q_out,
         seq_len, num_q_heads, num_kv_heads, page_size,
         *st["q"][:3], *st["k"][:3], *st["v"][:3],
         *st["cos"][:2], *st["sin"][:2], *st.get("positions", (0, 0)), *st["index"],
         *st["k_cache"][:3], *st["v_cache"][:3]),
        dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, ROTARY_DIM=rotary_dim,
             BLOCK_HQ=cfg.block_hq, BLOCK_HKV=cfg.block_hkv,
             BLOCK_HALF=next_pow2(max(half, 1)),
             BLOCK_TAIL=next_pow2(max(head_dim - rotary_dim, 1)),
             BLOCK_DV=next_pow2(head_dim_v),
             INTERLEAVED=interleaved, COS_FULL_WIDTH=cos_width == rotary_dim,
             HAS_POSITIONS=positions is not None, INDEX_IS_POSITION=index_is_position,
             RETURN_K=k_out is not None,
             QUANTIZE_K=k_cache.dtype in FP8_DTYPES, QUANTIZE_V=v_cache.dtype in FP8_DTYPES,
             K_QMAX=FP8_MAX.get(k_cache.dtype, 0.0), V_QMAX=FP8_MAX.get(v_cache.dtype, 0.0)),
        num_warps=cfg.num_warps, num_stages=3,
        # q_out, k_out (when returned), k_cache, v_cache
        writes=(7, 8, 9, 10) if k_out is not None else (7, 9, 10),
    )
