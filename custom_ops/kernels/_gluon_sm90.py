"""What the SM90 Gluon stage-1 kernels (``mla_decode_sm90.py``, ``gqa_decode_sm90.py``)
share: the Gluon imports, the split bounds, the online softmax step, the epilogue that
writes a split, and the alignment check of their 16-byte copies.

Both kernels write exactly what the Triton stage 1 of ``grouped_decode.py`` writes, so
the Triton stage 2 merges their splits: the split bounds are ``_split_bounds``'s rounded
to the kernel's ``BLOCK_N``, an empty split writes ``(0, -inf)``, a sequence of length 0
gives output 0 and LSE -inf.
"""

from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; its Hopper module with wgmma and cp.async
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    gluon = gl = async_copy = fence_async_shared = warpgroup_mma = warpgroup_mma_wait = None
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "LN2", "LOG2E", "aligned", "async_copy", "fence_async_shared",
           "finish_split", "gl", "gluon", "softmax_step", "split_range", "warpgroup_mma",
           "warpgroup_mma_wait"]


def aligned(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """16-byte copies need 16-byte aligned rows: the kernels are compiled for strides
    divisible by 16 elements (Triton's integer specialization) and a 16-byte aligned start
    (allocations are; a view's offset must keep it)."""
    return ((t.storage_offset() * t.element_size()) % 16 == 0
            and all(s % 16 == 0 for s in strides))


if HAVE_GLUON:
    LOG2E = gl.constexpr(1.4426950408889634)
    LN2 = gl.constexpr(0.6931471805599453)

    @gluon.jit
    def split_range(SeqLens, b, split, max_positions, NUM_SPLITS: gl.constexpr,
                    BLOCK_N: gl.constexpr, HAS_SEQLENS: gl.constexpr):
        """``(lo, hi, num_tiles)`` of this split of sequence ``b``: ``_split_bounds`` of
        ``grouped_decode.py`` with the split length rounded up to ``BLOCK_N``."""
        if HAS_SEQLENS:
            kv_end = gl.load(SeqLens + b).to(gl.int32)
        else:
            kv_end = max_positions
        span = gl.maximum(kv_end, 0)
        per_split = (span + NUM_SPLITS - 1) // NUM_SPLITS
        per_split = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo = split * per_split
        hi = gl.minimum(lo + per_split, kv_end)
        num_tiles = gl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N
        return lo, hi, num_tiles

    @gluon.jit
    def softmax_step(qk, m_i, l_i, col_ok, qk_scale):
        """One tile of the online softmax in base 2: scores ``qk`` (rows x keys) scaled by
        ``qk_scale`` (``sm_scale * log2(e)``), keys where ``col_ok`` is false masked out.
        Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalized probabilities, the
        factor that rescales the running output, the running maxima and denominators. A
        row with no key so far keeps maximum -inf and gives ``p = alpha = 0``, never NaN."""
        qk = qk * qk_scale
        qk = gl.where(col_ok[None, :], qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(qk - m_safe[:, None])
        alpha = gl.exp2(m_i - m_safe)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def finish_split(acc, m_i, l_i, head0, n_heads, b, split,
                     Out, Lse, PartialOut, PartialLse,
                     stride_ob, stride_oh, stride_lb, stride_lh,
                     stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
                     BLOCK_H: gl.constexpr, HEAD_D: gl.constexpr, NUM_SPLITS: gl.constexpr,
                     o_layout: gl.constexpr, s_layout: gl.constexpr,
                     WRITE_LSE: gl.constexpr = True):
        """Write one split of heads ``head0 + [0, n_heads)``: the output normalized by the
        denominators ``l_i`` (0 where a row saw no key) and the natural-log LSE from the
        base-2 running maxima ``m_i`` (-inf where no key), into ``Out``/``Lse`` with one
        split, else into the fp32 partials of split ``split`` for stage 2.
        ``acc`` has ``o_layout`` (``BLOCK_H x HEAD_D``); ``m_i``, ``l_i`` its rows of
        ``s_layout``. A program whose partitions write column ranges of a row passes
        ``Out``/``PartialOut`` advanced to its first column, and ``WRITE_LSE=False`` in all
        partitions but one."""
        has_mass = l_i > 0.0
        inv = gl.where(has_mass, 1.0 / gl.where(has_mass, l_i, 1.0), 0.0)
        out = acc * gl.convert_layout(inv, gl.SliceLayout(1, o_layout))[:, None]
        lse = gl.where(has_mass, (m_i + gl.log2(gl.where(has_mass, l_i, 1.0))) * LN2,
                       float("-inf"))
        hg_o = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        hg_l = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
        heads_o = head0 + hg_o
        heads_l = head0 + hg_l
        ok_o = (hg_o < n_heads)[:, None] & (offs_d < HEAD_D)[None, :]
        ok_l = hg_l < n_heads
        if NUM_SPLITS == 1:
            o_ptrs = (Out + b.to(gl.int64) * stride_ob + heads_o[:, None] * stride_oh
                      + offs_d[None, :])
            gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok_o)
            if WRITE_LSE:
                gl.store(Lse + b.to(gl.int64) * stride_lb + heads_l * stride_lh, lse, mask=ok_l)
        else:
            p_ptrs = (PartialOut + b.to(gl.int64) * stride_pb + heads_o[:, None] * stride_ph
                      + split * stride_ps + offs_d[None, :])
            gl.store(p_ptrs, out, mask=ok_o)
            if WRITE_LSE:
                gl.store(PartialLse + b.to(gl.int64) * stride_plb + heads_l * stride_plh
                         + split, lse, mask=ok_l)
