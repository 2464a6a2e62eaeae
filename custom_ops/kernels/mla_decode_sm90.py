"""Stage 1 of MLA decode on Hopper (SM90), written in Gluon: 64 query heads per program
on warpgroup MMA, the latent tile staged once in shared memory for both products.

Why a second stage-1 kernel
---------------------------
In shared-latent (MLA) mode one program multiplies a tile of query heads with a
``BLOCK_N x 576`` latent tile twice: ``S = Q K^T`` over all 576 features and ``O += P V``
over the first 512 (V is K's first 512 features). The output accumulator alone is
``64 x 512`` fp32 (half the register file of 8 warps). The Triton kernel
(``grouped_decode.py``) leaves the query tile's placement to the compiler, which keeps it
in registers next to the accumulator: 255 registers per thread and about a third of
FlashInfer's speed at 128 heads (``benchmarks/results/bench_decode_sweep_v6.md``).
Here every operand's place is explicit:

* shared memory: the query tile (``64 x 576``, 72 KB), ``NUM_STAGES`` latent tiles
  (``BLOCK_N x 576`` each) filled by ``cp.async`` ahead of use, and P (``64 x BLOCK_N``);
* registers: S (``64 x BLOCK_N`` fp32), the softmax denominators per key column (same
  shape, summed over columns once at the end) and O (``64 x 512`` fp32). 8 warps form two
  warpgroups; both MMA layouts put warpgroup ``w`` on columns ``[w N/2, (w+1) N/2)``,
  so each warpgroup computes half of S's key columns and half of O's 512 features: no
  product is computed twice.

Per KV tile: wait for its copy, start the copy of tile ``j + NUM_STAGES - 1`` into the
stage consumed one iteration ago, ``S = Q K^T`` (two wgmma: 512 + 64 features), the
online softmax (row maxima across both warpgroups), P to shared memory, ``O = alpha O +
P V`` (wgmma, B = the same latent tile without its last 64 features).

It writes exactly what the Triton stage 1 writes (normalized partial output and natural
log-sum-exp per split, or the final output with one split), with the same split bounds
(``_split_bounds`` rounded to ``BLOCK_N``), so the Triton stage 2 merges its splits. The
invariants of ``grouped_decode.py`` hold: every copy is masked (a masked ``cp.async``
writes zeros, so page tails are never read), an empty split writes ``(0, -inf)``, a
sequence of length 0 gives output 0 and LSE -inf.

A variant with the two warpgroups on different key tiles (warp-specialized, a loader
partition, mbarriers) is kept as an experiment in ``benchmarks/mla_seesaw_kernel.py``:
correct, and 1.07-1.24x slower at 128 heads (``benchmarks/results/bench_decode_sweep_v12.md``).

Scope: bf16 or fp16 query and cache, one latent head (``Hkv = 1``), 512 + 64 features,
paged (any page size) or static cache, optional per-sequence lengths, batch up to
``MAX_BATCH``; no mask, softcap, window or fp8 scales (``supports`` says which calls
qualify). Gluon kernels do not run under the Triton interpreter: on CPU the Triton
kernel is what is tested; this one is checked against the float32 reference on the GPU
(``benchmarks/bench_decode.py --check``, ``tests/test_grouped_decode_sm90.py``).
"""

from __future__ import annotations

import torch

from .._dispatch import cuda_major
from ._gluon_sm90 import (
    HAVE_GLUON,
    LOG2E,
    aligned,
    async_copy,
    fence_async_shared,
    finish_split,
    gl,
    gluon,
    split_range,
    warpgroup_mma,
    warpgroup_mma_wait,
)

#: query heads per program: one wgmma M tile per warpgroup pair (fewer heads are padded)
BLOCK_H = 64
#: latent features multiplied with V (the rest is the RoPE part)
LATENT_DIM = 512
ROPE_DIM = 64
NUM_WARPS = 8
#: the batch is the grid's second dimension (head tiles vary fastest), which CUDA caps
MAX_BATCH = 65535


if HAVE_GLUON:

    @gluon.jit
    def _tile_rows(BlockTable, b, stride_btb, stride_k0, stride_k1, start, hi,
                   BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
                   layout: gl.constexpr):
        """Element offsets of the latent rows of positions ``start + [0, BLOCK_N)`` and
        which of them are < ``hi`` (rows of ``layout``'s slice along dim 1)."""
        pos = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        ok = pos < hi
        if PAGED:
            page = gl.load(BlockTable + b.to(gl.int64) * stride_btb + pos // PAGE_SIZE,
                           mask=ok, other=0).to(gl.int64)
            rows = page * stride_k0 + (pos % PAGE_SIZE).to(gl.int64) * stride_k1
        else:
            rows = b.to(gl.int64) * stride_k0 + pos.to(gl.int64) * stride_k1
        return rows, ok

    @gluon.jit
    def _issue_tile(KV, rows, ok, k_smem, kt_smem,
                    HEAD_DA: gl.constexpr, HEAD_DT: gl.constexpr, layout: gl.constexpr):
        """Start the copies of one latent tile (masked rows are written as zeros)."""
        offs_a = gl.arange(0, HEAD_DA, layout=gl.SliceLayout(0, layout))
        offs_t = gl.arange(0, HEAD_DT, layout=gl.SliceLayout(0, layout))
        async_copy.async_copy_global_to_shared(
            k_smem, KV + rows[:, None] + offs_a[None, :], mask=ok[:, None])
        async_copy.async_copy_global_to_shared(
            kt_smem, KV + rows[:, None] + HEAD_DA + offs_t[None, :], mask=ok[:, None])

    @gluon.jit
    def mla_decode_sm90_stage1(
        Q, KV, BlockTable, SeqLens, PartialOut, PartialLse, Out, Lse,
        sm_scale, max_positions, group_size,
        stride_qb, stride_qh, stride_k0, stride_k1, stride_btb,
        stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
        stride_ob, stride_oh, stride_lb, stride_lh,
        HEAD_DA: gl.constexpr, HEAD_DT: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_SPLITS: gl.constexpr,
        PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, HAS_SEQLENS: gl.constexpr,
    ):
        gl.static_assert(BLOCK_H == 64)
        gl.static_assert(NUM_STAGES >= 2)
        # head tiles vary fastest: the tiles of one sequence split run side by side and
        # share their latent reads through L2 even when the grid takes several waves
        tile = gl.program_id(0)
        b = gl.program_id(1)
        split = gl.program_id(2)
        dtype: gl.constexpr = Q.dtype.element_ty

        # ---- layouts: two warpgroups side by side along N in both products
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, HEAD_DA // 2, 16])
        ld_layout: gl.constexpr = gl.BlockedLayout(
            size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[8, 1], order=[1, 0])
        wide_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                     rank=2)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dtype)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, HEAD_DA], wide_sl)
        qt_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, HEAD_DT], wide_sl)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DA], wide_sl)
        kt_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DT], wide_sl)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N], p_sl)

        lo, hi, num_tiles = split_range(SeqLens, b, split, max_positions, NUM_SPLITS, BLOCK_N,
                                        HAS_SEQLENS)

        # ---- the query tile, once, into shared memory
        offs_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_layout))
        head_ok = tile * BLOCK_H + offs_h < group_size
        q_rows = Q + b.to(gl.int64) * stride_qb + (tile * BLOCK_H + offs_h)[:, None] * stride_qh
        offs_a = gl.arange(0, HEAD_DA, layout=gl.SliceLayout(0, ld_layout))
        offs_t = gl.arange(0, HEAD_DT, layout=gl.SliceLayout(0, ld_layout))
        async_copy.async_copy_global_to_shared(q_smem, q_rows + offs_a[None, :],
                                               mask=head_ok[:, None])
        async_copy.async_copy_global_to_shared(qt_smem, q_rows + HEAD_DA + offs_t[None, :],
                                               mask=head_ok[:, None])
        async_copy.commit_group()

        # ---- prologue: the first NUM_STAGES - 1 tiles in flight
        for s in gl.static_range(NUM_STAGES - 1):
            rows, ok = _tile_rows(BlockTable, b, stride_btb, stride_k0, stride_k1,
                                  lo + s * BLOCK_N, hi, BLOCK_N, PAGE_SIZE, PAGED, ld_layout)
            _issue_tile(KV, rows, ok, k_bufs.index(s), kt_bufs.index(s), HEAD_DA, HEAD_DT,
                        ld_layout)
            async_copy.commit_group()

        qk_scale = sm_scale * LOG2E  # logits in base 2
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        # the softmax denominators stay per (row, key column) until the end: one reduction
        # across the warpgroups per tile (the maxima) instead of two (H100 A/B, 8 points:
        # 0-4% faster at 128 heads, equal at 16; 217 instead of 246 registers)
        l2d = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
        acc = gl.zeros([BLOCK_H, HEAD_DA], gl.float32, layout=o_layout)
        offs_ns = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

        for j in range(num_tiles):
            # tile j has landed (this thread's copies; the barrier makes it everyone's and
            # also means every warp finished iteration j - 1, whose stage is reused below)
            async_copy.wait_group(NUM_STAGES - 2)
            fence_async_shared()
            gl.thread_barrier()
            nxt = j + NUM_STAGES - 1
            rows, ok = _tile_rows(BlockTable, b, stride_btb, stride_k0, stride_k1,
                                  lo + nxt * BLOCK_N, hi, BLOCK_N, PAGE_SIZE, PAGED, ld_layout)
            _issue_tile(KV, rows, ok, k_bufs.index(nxt % NUM_STAGES),
                        kt_bufs.index(nxt % NUM_STAGES), HEAD_DA, HEAD_DT, ld_layout)
            async_copy.commit_group()

            k_smem = k_bufs.index(j % NUM_STAGES)
            kt_smem = kt_bufs.index(j % NUM_STAGES)
            qk = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
            qk = warpgroup_mma(q_smem, k_smem.permute((1, 0)), qk, use_acc=False, is_async=True)
            qk = warpgroup_mma(qt_smem, kt_smem.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))

            qk = qk * qk_scale
            col_ok = lo + j * BLOCK_N + offs_ns < hi
            qk = gl.where(col_ok[None, :], qk, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(qk, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(qk - m_safe[:, None])
            alpha = gl.exp2(m_i - m_safe)
            l2d = l2d * alpha[:, None] + p
            m_i = m_new

            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            acc = warpgroup_mma(p_smem, k_smem, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        async_copy.wait_group(0)

        l_i = gl.sum(l2d, 1)
        finish_split(acc, m_i, l_i, tile * BLOCK_H, group_size - tile * BLOCK_H, b, split,
                     Out, Lse, PartialOut, PartialLse, stride_ob, stride_oh, stride_lb,
                     stride_lh, stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
                     BLOCK_H, HEAD_DA, NUM_SPLITS, o_layout, s_layout)


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache, block_table, mask,
             softcap: float, window: int | None, k_scale, v_scale,
             v_head_dim: int | None) -> bool:
    """Whether a validated call can run this kernel (see the module docstring)."""
    if not (HAVE_GLUON and q.is_cuda and v_cache is None and mask is None and not softcap
            and (window is None or window < 0) and k_scale is None and v_scale is None):
        return False
    paged = block_table is not None
    num_kv_heads = k_cache.shape[2] if paged else k_cache.shape[1]
    row_strides = ((k_cache.stride(0), k_cache.stride(1)) if paged
                   else (k_cache.stride(0), k_cache.stride(2)))
    return (q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype
            and q.shape[-1] == LATENT_DIM + ROPE_DIM and v_head_dim == LATENT_DIM
            and num_kv_heads == 1 and q.shape[0] <= MAX_BATCH
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1
            and aligned(q, (q.stride(0), q.stride(1))) and aligned(k_cache, row_strides)
            and cuda_major(q.device) == 9)

