"""Stage 1 of grouped (GQA / MQA) decode on Hopper (SM90), written in Gluon: the query
heads of one KV head on warpgroup MMA, K and V tiles streamed through a deep ``cp.async``
ring, and the page ids through a ring of their own, copied with the tiles before theirs.

Why a second GQA stage-1 kernel
-------------------------------
At a batch that already gives about one (sequence, KV head) program per SM (GQA 32/8
heads at B=16: 128 programs), the fastest schedule is one split per program streaming its
whole sequence, without a merge. The Triton stage 1 cannot stream that fast from a paged
cache: its software pipeliner sees the K/V loads as indirect (their page ids are loaded
in the same loop step) and keeps a single K/V buffer, waiting for it at the top of every
step (``benchmarks/results/bench_decode_sweep_v10.md``: B=16 ctx 1k, 1 split, 43 us).
Here the ring is explicit:

* ``NUM_STAGES`` stages of one K tile and one V tile (``BLOCK_N x HEAD_D`` each) in shared
  memory, filled by masked ``cp.async`` copies (a masked copy writes zeros, so page tails
  are never read) ``NUM_STAGES - 1`` tiles ahead of use. Each thread copies 16 bytes per
  row, so one copy instruction of a warp covers whole rows (wider copies per thread, with
  fewer row offsets to compute, were slower: ``bench_decode_sweep_v14.md``);
* on a paged cache the page ids of tile ``t + NUM_STAGES - 1`` are copied into a
  ``NUM_STAGES``-slot shared-memory ring in the same copy group as tile ``t``, and read
  from there when tile ``t + NUM_STAGES - 1``'s copies start. Loaded into registers
  instead, even a step ahead, each page-table miss was paid in full: the loop's fences
  (needed before wgmma reads shared memory) sit between the load and its use and wait
  for it (page 16, B=16 ctx 8k: 202 us with register loads, 181 us with the ring;
  ``bench_decode_sweep_v14.md``);
* the query tile (``BLOCK_H = 64`` rows, the group's heads, padded with zero rows) is in
  shared memory; ``S = Q K^T`` and ``O += P V`` run on one warpgroup's wgmma. With a
  group of 4 heads 15/16 of the MMA rows are padding, which costs about 500 tensor-core
  cycles per 64-key tile against about 2,600 cycles of memory time per tile at one
  program per SM: the kernel stays memory-bound.

It writes exactly what the Triton stage 1 writes (normalized partial output and natural
log-sum-exp per split, or the final output with one split), with the same split bounds
(``_split_bounds`` rounded to ``BLOCK_N``), so the Triton stage 2 merges its splits. An
empty split writes ``(0, -inf)``; a sequence of length 0 gives output 0 and LSE -inf.

Scope (``supports``): bf16 or fp16 query and caches, separate K and V caches with equal
head dims of 64, 128 or 256, groups of up to ``BLOCK_H`` heads, paged (any page size) or
static cache, optional per-sequence lengths; no mask, softcap, window or fp8 scales.
Gluon kernels do not run under the Triton interpreter: on CPU the Triton kernel is what
is tested; this one is checked against the float32 reference on the GPU
(``benchmarks/bench_decode.py --check``, ``tests/test_grouped_decode_sm90_gqa.py``).
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
    softmax_step,
    split_range,
    warpgroup_mma,
    warpgroup_mma_wait,
)

#: query heads per program: one wgmma M tile (smaller groups are padded)
BLOCK_H = 64
HEAD_DIMS = (64, 128, 256)
#: keys per tile at most: wgmma's largest N
MAX_BLOCK_N = 256
NUM_WARPS = 4
#: the batch is the grid's second dimension, which CUDA caps
MAX_BATCH = 65535

if HAVE_GLUON:

    @gluon.jit
    def _tile_pages(BlockTable, b, stride_btb, start, hi, BLOCK_N: gl.constexpr,
                    PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, layout: gl.constexpr):
        """The page id of each position ``start + [0, BLOCK_N)`` (0 past ``hi``; unused
        for a static cache), loaded into registers: for the prologue's tiles only."""
        pos = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        if PAGED:
            page = gl.load(BlockTable + b.to(gl.int64) * stride_btb + pos // PAGE_SIZE,
                           mask=pos < hi, other=0)
        else:
            page = pos * 0
        return page

    @gluon.jit
    def _copy_pages(BlockTable, b, stride_btb, start, hi, ids_smem, BLOCK_N: gl.constexpr,
                    PAGE_SIZE: gl.constexpr):
        """Start copying the page id of each position ``start + [0, BLOCK_N)`` into shared
        memory (0 past ``hi``). An async copy, not a load into registers: the loop's
        fences wait for a register load, so page-table misses stalled every step (page
        16, B=16, 8k: 210 us loaded, 187 us with the ids computed instead)."""
        id_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        pos = start + gl.arange(0, BLOCK_N, layout=id_layout)
        async_copy.async_copy_global_to_shared(
            ids_smem, BlockTable + b.to(gl.int64) * stride_btb + pos // PAGE_SIZE,
            mask=pos < hi)

    @gluon.jit
    def _issue_tile(Kh, Vh, page, b, start, hi, k_smem, v_smem,
                    stride_k0, stride_k1, stride_v0, stride_v1,
                    HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                    PAGED: gl.constexpr, SAME_KV_ROWS: gl.constexpr, layout: gl.constexpr):
        """Start the copies of one K and one V tile (rows past ``hi`` written as zeros).
        ``Kh``/``Vh`` point at the program's KV head; with ``SAME_KV_ROWS`` (equal K and V
        row strides) the row offsets are computed once for both."""
        pos = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        ok = pos < hi
        if PAGED:
            # the position within a page times its stride stays far below 2**31
            k_rows = page.to(gl.int64) * stride_k0 + (pos % PAGE_SIZE) * stride_k1
        else:
            k_rows = b.to(gl.int64) * stride_k0 + pos.to(gl.int64) * stride_k1
        if SAME_KV_ROWS:
            v_rows = k_rows
        elif PAGED:
            v_rows = page.to(gl.int64) * stride_v0 + (pos % PAGE_SIZE) * stride_v1
        else:
            v_rows = b.to(gl.int64) * stride_v0 + pos.to(gl.int64) * stride_v1
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, layout))
        async_copy.async_copy_global_to_shared(
            k_smem, Kh + k_rows[:, None] + offs_d[None, :], mask=ok[:, None])
        async_copy.async_copy_global_to_shared(
            v_smem, Vh + v_rows[:, None] + offs_d[None, :], mask=ok[:, None])

    @gluon.jit
    def gqa_decode_sm90_stage1(
        Q, K, V, BlockTable, SeqLens, PartialOut, PartialLse, Out, Lse,
        sm_scale, max_positions, group_size,
        stride_qb, stride_qh, stride_k0, stride_k1, stride_kh, stride_v0, stride_v1,
        stride_vh, stride_btb,
        stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
        stride_ob, stride_oh, stride_lb, stride_lh,
        HEAD_D: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr, NUM_SPLITS: gl.constexpr,
        PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, HAS_SEQLENS: gl.constexpr,
        SAME_KV_ROWS: gl.constexpr,
    ):
        gl.static_assert(BLOCK_H == 64)
        gl.static_assert(NUM_STAGES >= 2)
        kvh = gl.program_id(0)  # KV heads vary fastest: a sequence's heads run side by side
        b = gl.program_id(1)
        split = gl.program_id(2)
        dtype: gl.constexpr = Q.dtype.element_ty
        Kh = K + kvh.to(gl.int64) * stride_kh
        Vh = V + kvh.to(gl.int64) * stride_vh

        # ---- layouts: one warpgroup, rows = heads
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16])
        # copies: 16 bytes per thread, a warp's copy instruction on whole rows (wider
        # copies per thread leave every instruction's rows half-covered: slower)
        COL_THREADS: gl.constexpr = HEAD_D // 8 if HEAD_D // 8 < 32 else 32
        ld_layout: gl.constexpr = gl.BlockedLayout(
            size_per_thread=[1, 8], threads_per_warp=[32 // COL_THREADS, COL_THREADS],
            warps_per_cta=[4, 1], order=[1, 0])
        kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, HEAD_D], dtype)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dtype)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, HEAD_D], q_sl)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_D], kv_sl)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_D], kv_sl)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N], p_sl)
        # page ids of the tiles NUM_STAGES - 1 ahead of the next copies (paged caches)
        ids_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        ids_bufs = gl.allocate_shared_memory(gl.int32, [NUM_STAGES, BLOCK_N], ids_sl)

        lo, hi, num_tiles = split_range(SeqLens, b, split, max_positions, NUM_SPLITS, BLOCK_N,
                                        HAS_SEQLENS)

        # ---- the query heads of the KV head (rows past them are zeros), once
        offs_h = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_layout))
        head_ok = offs_h < group_size
        q_rows = (Q + b.to(gl.int64) * stride_qb
                  + (kvh * group_size + offs_h)[:, None] * stride_qh)
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, ld_layout))
        async_copy.async_copy_global_to_shared(q_smem, q_rows + offs_d[None, :],
                                               mask=head_ok[:, None])
        async_copy.commit_group()

        # ---- prologue: the first NUM_STAGES - 1 tiles in flight. The copy group of tile
        # t also carries the page ids of tile t + NUM_STAGES - 1, whose copies start at
        # step t, right after that group is waited for.
        for s in gl.static_range(NUM_STAGES - 1):
            start = lo + s * BLOCK_N
            page = _tile_pages(BlockTable, b, stride_btb, start, hi, BLOCK_N, PAGE_SIZE,
                               PAGED, ld_layout)
            _issue_tile(Kh, Vh, page, b, start, hi, k_bufs.index(s), v_bufs.index(s),
                        stride_k0, stride_k1, stride_v0, stride_v1,
                        HEAD_D, BLOCK_N, PAGE_SIZE, PAGED, SAME_KV_ROWS, ld_layout)
            if PAGED:
                _copy_pages(BlockTable, b, stride_btb, start + (NUM_STAGES - 1) * BLOCK_N, hi,
                            ids_bufs.index((s + NUM_STAGES - 1) % NUM_STAGES), BLOCK_N,
                            PAGE_SIZE)
            async_copy.commit_group()

        qk_scale = sm_scale * LOG2E  # logits in base 2
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_H, HEAD_D], gl.float32, layout=o_layout)
        offs_ns = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

        for j in range(num_tiles):
            # tile j has landed (this thread's copies; the barrier makes it everyone's and
            # also means every warp finished iteration j - 1, whose stage is reused below)
            async_copy.wait_group(NUM_STAGES - 2)
            fence_async_shared()
            gl.thread_barrier()
            nxt = j + NUM_STAGES - 1
            if PAGED:  # copied with tile j's group (the slot is rewritten at step j + 1)
                page = ids_bufs.index(nxt % NUM_STAGES).load(gl.SliceLayout(1, ld_layout))
            else:
                page = _tile_pages(BlockTable, b, stride_btb, lo + nxt * BLOCK_N, hi,
                                   BLOCK_N, PAGE_SIZE, PAGED, ld_layout)
            _issue_tile(Kh, Vh, page, b, lo + nxt * BLOCK_N, hi,
                        k_bufs.index(nxt % NUM_STAGES), v_bufs.index(nxt % NUM_STAGES),
                        stride_k0, stride_k1, stride_v0, stride_v1,
                        HEAD_D, BLOCK_N, PAGE_SIZE, PAGED, SAME_KV_ROWS, ld_layout)
            if PAGED:  # into the slot read at step j - 1
                _copy_pages(BlockTable, b, stride_btb, lo + (nxt + NUM_STAGES - 1) * BLOCK_N,
                            hi, ids_bufs.index((nxt + NUM_STAGES - 1) % NUM_STAGES),
                            BLOCK_N, PAGE_SIZE)
            async_copy.commit_group()

            k_smem = k_bufs.index(j % NUM_STAGES)
            v_smem = v_bufs.index(j % NUM_STAGES)
            qk = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=s_layout)
            qk = warpgroup_mma(q_smem, k_smem.permute((1, 0)), qk, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))

            p, alpha, m_i, l_i = softmax_step(qk, m_i, l_i, lo + j * BLOCK_N + offs_ns < hi,
                                              qk_scale)

            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            acc = warpgroup_mma(p_smem, v_smem, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        async_copy.wait_group(0)

        finish_split(acc, m_i, l_i, kvh * group_size, group_size, b, split,
                     Out, Lse, PartialOut, PartialLse, stride_ob, stride_oh, stride_lb,
                     stride_lh, stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
                     BLOCK_H, HEAD_D, NUM_SPLITS, o_layout, s_layout)


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache, block_table, mask,
             softcap: float, window: int | None, k_scale, v_scale) -> bool:
    """Whether a validated call can run this kernel (see the module docstring)."""
    if not (HAVE_GLUON and q.is_cuda and v_cache is not None and mask is None and not softcap
            and (window is None or window < 0) and k_scale is None and v_scale is None):
        return False
    # paged (blocks, page, Hkv, D) or static (B, Hkv, S, D): three row strides either way
    k_rows, v_rows = k_cache.stride()[:3], v_cache.stride()[:3]
    num_kv_heads = k_cache.shape[2] if block_table is not None else k_cache.shape[1]
    head_dim = q.shape[-1]
    return (q.dtype in (torch.bfloat16, torch.float16)
            and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and head_dim in HEAD_DIMS and k_cache.shape[-1] == head_dim
            and v_cache.shape[-1] == head_dim
            and q.shape[1] // num_kv_heads <= BLOCK_H and q.shape[0] <= MAX_BATCH
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and aligned(q, (q.stride(0), q.stride(1))) and aligned(k_cache, k_rows)
            and aligned(v_cache, v_rows)
            and cuda_major(q.device) == 9)
