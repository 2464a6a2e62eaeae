"""Stage 1 of MLA decode on Hopper (SM90), written in Gluon: 64 query heads per program
on warpgroup MMA, one warpgroup computing the scores while the other streams the latent
tiles (warp-specialized).

Why a second stage-1 kernel
---------------------------
In shared-latent (MLA) mode one program multiplies a tile of query heads with a
``BLOCK_N x 576`` latent tile twice: ``S = Q K^T`` over all 576 features and ``O += P V``
over the first 512 (V is K's first 512 features). The output accumulator alone is
``64 x 512`` fp32 (half the register file of 8 warps). The Triton kernel
(``grouped_decode.py``) leaves the query tile's placement to the compiler, which keeps it
in registers next to the accumulator: 255 registers per thread and about a third of
FlashInfer's speed at 128 heads (``benchmarks/results/bench_decode_sweep_v6.md``).
Here every operand's place is explicit: the query tile (72 KB) and two latent stages
(144 KB) in shared memory, S and half of O in each warpgroup's registers.

The roles (``gl.warp_specialize``, two partitions of 4 warps)
-------------------------------------------------------------
* the **scorer** (default partition) computes a tile's scores alone, ``S = Q K^T`` at
  ``N = 64`` keys (2 KB + 2 KB of shared memory per 64 K MAC: what shared memory
  delivers at the tensor-core rate), the online softmax with all of a row in one warp
  (no exchange between warpgroups), then adds ``P V`` for output columns ``[256, 512)``
  with P straight from its registers (the score accumulator's layout is the product's
  A-operand layout), and while that product runs, writes P over the tile's RoPE columns
  (dead once S is computed: no extra shared memory) and the rescale factors for the
  streamer;
* the **streamer** (worker partition) issues every ``cp.async`` of the latent tiles,
  their page-table loads included, so that no copy is on the scorer's path, and adds
  ``P V`` for output columns ``[0, 256)``.

An earlier version kept both warpgroups in step (each computed half of a tile's scores
at ``N = 32``, the row maxima were exchanged through shared memory, and both issued the
next tile's copies before the score product): it took 1.02-1.31x the time of this
kernel's first version at the 24 MLA points of ``benchmarks/bench_decode.py`` on an H100
(``benchmarks/results/bench_decode_sweep_v15.md``). A variant with two scoring
warpgroups on alternate tiles is kept as an experiment in
``benchmarks/mla_seesaw_kernel.py``. Taking the scorer's P from registers instead of
shared memory (its ``P V`` issued before P is stored, the rescale factors converted in
registers) made the kernel 1.01-1.12x faster at 128 heads and batch >= 16, 1.00-1.02x
elsewhere (``bench_decode_sweep_v16.md``). Slower there, not taken: the streamer's half
of ``P V`` trailing into the next tile's softmax (0.76-0.85x in full, 0.87-0.99x for a
quarter of the columns: the stage it holds is refilled too late) and the next tile's
score product queued behind the scorer's ``P V`` (0.80-0.99x).
Merging the splits inside this kernel instead of in stage 2 was also built and lost
(``bench_decode_sweep_v17.md``). In one version, the last split to finish merged the
others' partials alone: at ctx 4k, its better form took 1.7-31 us longer than
stage 2. In the other, a cooperative launch with a grid-wide barrier spread the merge
over all programs: 1.8 us slower at MLA-128 B=16 ctx 4k. The partials in bf16 saved
nothing there either. A third version, in which only the splits of one (sequence, head
tile) wait for each other, was 0.9-1.8 us slower at 128 heads
(``bench_decode_sweep_v19.md``). 32-key tiles in 4 stages (three tiles' copies in
flight instead of one) were slower everywhere, 0.78-0.82x at the compute-bound points
(same file).
Copying the latent tiles by TMA instead of ``cp.async`` (one page-table entry per tile,
9 bulk copies) gave the same times within noise (``bench_decode_sweep_v18.md``).

Per 64-key tile ``j`` (stage ``s = j % 2``, ``NUM_STAGES = 2`` tiles in flight):

=============  ===================================  ==================================
barrier        arrived by                           waited by
=============  ===================================  ==================================
full[s]        each streamer thread, when its       the scorer, before the score
               copies of tile ``j`` land            product
ready[s]       the scorer: P (over the RoPE         the streamer, before its ``P V``
               columns) and the rescale factors
empty[s]       the scorer, after its ``P V``        the streamer, before refilling
                                                    stage ``s`` with tile ``j + 2``
l_ready        the scorer: the final maxima and     the streamer, for its epilogue
               denominators
=============  ===================================  ==================================

It writes exactly what the Triton stage 1 writes (normalized partial output and natural
log-sum-exp per split, or the final output with one split), with the same split bounds
(``_split_bounds`` rounded to ``BLOCK_N``), so the Triton stage 2 merges its splits. The
invariants of ``grouped_decode.py`` hold: every copy is masked (a masked ``cp.async``
writes zeros, so page tails are never read), an empty split writes ``(0, -inf)``, a
sequence of length 0 gives output 0 and LSE -inf.

Scope: bf16 or fp16 query and cache, one latent head (``Hkv = 1``), 512 + 64 features,
paged (any page size) or static cache, optional per-sequence lengths, batch up to
``MAX_BATCH``; no mask, softcap, window or fp8 scales (``supports`` says which calls
qualify). Gluon kernels do not run under the Triton interpreter: on CPU the Triton
kernel is what is tested; this one is checked against the float64 reference on the GPU
(``tests/test_grouped_decode_sm90.py``, ``benchmarks/bench_decode.py --check``).
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

if HAVE_GLUON:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

#: query heads per program: one wgmma M tile (fewer heads are padded)
BLOCK_H = 64
#: latent features multiplied with V (the rest is the RoPE part)
LATENT_DIM = 512
ROPE_DIM = 64
#: the batch is the grid's second dimension (head tiles vary fastest), which CUDA caps
MAX_BATCH = 65535
#: keys per tile and tiles in flight (two 72 KB stages next to the 72 KB query tile)
BLOCK_N = 64
NUM_STAGES = 2
#: warps of the default partition (the scorer); the streamer adds 4
NUM_WARPS = 4
#: registers per thread of both partitions (256 threads x 240 fit the 64K register file)
MAX_REGS = 240
HALF = LATENT_DIM // 2

# mbarrier indices
_FULL = 0  # + stage
_READY = 2  # + stage
_EMPTY = 4  # + stage
_L_READY = 6
_NUM_BARS = 7


if HAVE_GLUON:
    _BH = gl.constexpr(BLOCK_H)
    _BN = gl.constexpr(BLOCK_N)
    _DL = gl.constexpr(LATENT_DIM)
    _DR = gl.constexpr(ROPE_DIM)
    _HALF = gl.constexpr(HALF)
    _FULL = gl.constexpr(_FULL)
    _READY = gl.constexpr(_READY)
    _EMPTY = gl.constexpr(_EMPTY)
    _L_READY = gl.constexpr(_L_READY)
    _NUM_BARS = gl.constexpr(_NUM_BARS)
    _MAX_REGS = gl.constexpr(MAX_REGS)

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
    def _issue(KV, rows, ok, kl_smem, kr_smem, kt_smem, full_bar, layout: gl.constexpr):
        """Start the copies of one latent tile (masked rows become zeros); each thread
        arrives on ``full_bar`` once its own copies land."""
        offs_h = gl.arange(0, _HALF, layout=gl.SliceLayout(0, layout))
        offs_t = gl.arange(0, _DR, layout=gl.SliceLayout(0, layout))
        base = KV + rows[:, None]
        async_copy.async_copy_global_to_shared(kt_smem, base + _DL + offs_t[None, :],
                                               mask=ok[:, None])
        async_copy.async_copy_global_to_shared(kl_smem, base + offs_h[None, :], mask=ok[:, None])
        async_copy.async_copy_global_to_shared(kr_smem, base + _HALF + offs_h[None, :],
                                               mask=ok[:, None])
        async_copy.mbarrier_arrive(full_bar, increment_count=False)

    @gluon.jit
    def _streamer(args, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
                  NUM_SPLITS: gl.constexpr):
        (KV, BlockTable, b, tile, split, lo, hi, num_tiles, group_size, stride_btb,
         stride_k0, stride_k1, Out, PartialOut, stride_ob, stride_oh, stride_pb, stride_ph,
         stride_ps, kl_bufs, kr_bufs, kt_bufs, a_bufs, l_buf, bars) = args
        ld: gl.constexpr = gl.BlockedLayout(
            size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _HALF, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        for t in gl.static_range(2):
            if t < num_tiles:
                rows, ok = _tile_rows(BlockTable, b, stride_btb, stride_k0, stride_k1,
                                      lo + t * _BN, hi, _BN, PAGE_SIZE, PAGED, ld)
                _issue(KV, rows, ok, kl_bufs.index(t), kr_bufs.index(t), kt_bufs.index(t),
                       bars.index(_FULL + t), ld)

        acc = gl.zeros([_BH, _HALF], gl.float32, layout=o_layout)
        for j in range(num_tiles):
            s = j % 2
            ph = (j // 2) & 1
            # the page ids of tile j + 2 now: their latency passes under the waits below
            rows, ok = _tile_rows(BlockTable, b, stride_btb, stride_k0, stride_k1,
                                  lo + (j + 2) * _BN, hi, _BN, PAGE_SIZE, PAGED, ld)
            mbarrier.wait(bars.index(_READY + s), ph)
            alpha = a_bufs.index(s).load(row_o)
            acc = acc * alpha[:, None]
            # P was written over the tile's RoPE columns
            acc = warpgroup_mma(kt_bufs.index(s), kl_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            if j + 2 < num_tiles:
                mbarrier.wait(bars.index(_EMPTY + s), ph)  # the scorer's P V is done too
                _issue(KV, rows, ok, kl_bufs.index(s), kr_bufs.index(s), kt_bufs.index(s),
                       bars.index(_FULL + s), ld)

        mbarrier.wait(bars.index(_L_READY), 0)
        l_i = l_buf.load(row_o)
        finish_split(acc, l_i, l_i, tile * _BH, group_size - tile * _BH, b, split, Out, Out,
                     PartialOut, PartialOut, stride_ob, stride_oh, 0, 0, stride_pb, stride_ph,
                     stride_ps, 0, 0, _BH, _HALF, NUM_SPLITS, o_layout, o_layout,
                     WRITE_LSE=False)

    @gluon.jit
    def _scorer(args, NUM_SPLITS: gl.constexpr):
        (Q, Out, Lse, PartialOut, PartialLse, b, tile, split, lo, hi, num_tiles, qk_scale,
         group_size, stride_qb, stride_qh, stride_ob, stride_oh, stride_lb, stride_lh,
         stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
         ql_smem, qr_smem, qt_smem, kl_bufs, kr_bufs, kt_bufs, a_bufs, l_buf, bars) = args
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _HALF, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        ld: gl.constexpr = gl.BlockedLayout(
            size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])

        # ---- the query tile, once, into shared memory
        offs_h = gl.arange(0, _BH, layout=gl.SliceLayout(1, ld))
        head_ok = (tile * _BH + offs_h < group_size)[:, None]
        q_rows = (Q + b.to(gl.int64) * stride_qb
                  + (tile * _BH + offs_h).to(gl.int64)[:, None] * stride_qh)
        offs_a = gl.arange(0, _HALF, layout=gl.SliceLayout(0, ld))
        offs_t = gl.arange(0, _DR, layout=gl.SliceLayout(0, ld))
        async_copy.async_copy_global_to_shared(ql_smem, q_rows + offs_a[None, :], mask=head_ok)
        async_copy.async_copy_global_to_shared(qr_smem, q_rows + _HALF + offs_a[None, :],
                                               mask=head_ok)
        async_copy.async_copy_global_to_shared(qt_smem, q_rows + _DL + offs_t[None, :],
                                               mask=head_ok)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()

        m_i = gl.full([_BH], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([_BH], gl.float32, layout=row_s)
        acc = gl.zeros([_BH, _HALF], gl.float32, layout=o_layout)
        offs_ns = gl.arange(0, _BN, layout=gl.SliceLayout(0, s_layout))
        for j in range(num_tiles):
            s = j % 2
            ph = (j // 2) & 1
            kl = kl_bufs.index(s)
            kr = kr_bufs.index(s)
            kt = kt_bufs.index(s)
            mbarrier.wait(bars.index(_FULL + s), ph)
            fence_async_shared()
            qk = gl.zeros([_BH, _BN], gl.float32, layout=s_layout)
            qk = warpgroup_mma(qt_smem, kt.permute((1, 0)), qk, use_acc=False, is_async=True)
            qk = warpgroup_mma(ql_smem, kl.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma(qr_smem, kr.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))

            p, alpha, m_i, l_i = softmax_step(qk, m_i, l_i, lo + j * _BN + offs_ns < hi,
                                              qk_scale)

            # this half of P V takes P from registers; the streamer's half reads it where
            # the tile's RoPE columns were (dead once S is done), with the rescale factors
            pb = p.to(kt.dtype)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(pb, p_op), kr, acc, is_async=True)
            kt.store(pb)
            a_bufs.index(s).store(alpha)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(bars.index(_READY + s))
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            gl.thread_barrier()
            mbarrier.arrive(bars.index(_EMPTY + s))

        l_buf.store(l_i)
        gl.thread_barrier()
        mbarrier.arrive(bars.index(_L_READY))
        finish_split(acc, gl.convert_layout(m_i, row_o), gl.convert_layout(l_i, row_o),
                     tile * _BH, group_size - tile * _BH, b, split, Out + _HALF, Lse,
                     PartialOut + _HALF, PartialLse, stride_ob, stride_oh, stride_lb,
                     stride_lh, stride_pb, stride_ph, stride_ps, stride_plb, stride_plh, _BH,
                     _HALF, NUM_SPLITS, o_layout, o_layout)

    # constexprs travel as arguments of their own (inside a tuple they would become
    # run-time values); both partitions take the same arguments
    @gluon.jit
    def _scorer_part(sargs, targs, NUM_SPLITS: gl.constexpr, PAGE_SIZE: gl.constexpr,
                     PAGED: gl.constexpr):
        _scorer(sargs, NUM_SPLITS)

    @gluon.jit
    def _streamer_part(sargs, targs, NUM_SPLITS: gl.constexpr, PAGE_SIZE: gl.constexpr,
                       PAGED: gl.constexpr):
        _streamer(targs, PAGE_SIZE, PAGED, NUM_SPLITS)

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
        gl.static_assert(HEAD_DA == _DL)
        gl.static_assert(HEAD_DT == _DR)
        gl.static_assert(BLOCK_H == _BH)
        gl.static_assert(BLOCK_N == _BN)
        gl.static_assert(NUM_STAGES == 2)
        # head tiles vary fastest: the tiles of one sequence split run side by side and
        # share their latent reads through L2 even when the grid takes several waves
        tile = gl.program_id(0)
        b = gl.program_id(1)
        split = gl.program_id(2)
        dtype: gl.constexpr = Q.dtype.element_ty

        wide_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128,
                                                     element_bitwidth=16, rank=2)
        vec_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                       order=[0])
        ql_smem = gl.allocate_shared_memory(dtype, [_BH, _HALF], wide_sl)
        qr_smem = gl.allocate_shared_memory(dtype, [_BH, _HALF], wide_sl)
        qt_smem = gl.allocate_shared_memory(dtype, [_BH, _DR], wide_sl)
        kl_bufs = gl.allocate_shared_memory(dtype, [2, _BN, _HALF], wide_sl)
        kr_bufs = gl.allocate_shared_memory(dtype, [2, _BN, _HALF], wide_sl)
        kt_bufs = gl.allocate_shared_memory(dtype, [2, _BN, _DR], wide_sl)
        a_bufs = gl.allocate_shared_memory(gl.float32, [2, _BH], vec_sl)
        l_buf = gl.allocate_shared_memory(gl.float32, [_BH], vec_sl)
        bars = gl.allocate_shared_memory(gl.int64, [_NUM_BARS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            # every streamer thread arrives once its own copies of a tile land
            mbarrier.init(bars.index(_FULL + i), count=4 * 32)
            mbarrier.init(bars.index(_READY + i), count=1)
            mbarrier.init(bars.index(_EMPTY + i), count=1)
        mbarrier.init(bars.index(_L_READY), count=1)

        lo, hi, num_tiles = split_range(SeqLens, b, split, max_positions, NUM_SPLITS, _BN,
                                        HAS_SEQLENS)
        qk_scale = sm_scale * LOG2E  # logits in base 2

        sargs = (Q, Out, Lse, PartialOut, PartialLse, b, tile, split, lo, hi, num_tiles,
                 qk_scale, group_size, stride_qb, stride_qh, stride_ob, stride_oh, stride_lb,
                 stride_lh, stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
                 ql_smem, qr_smem, qt_smem, kl_bufs, kr_bufs, kt_bufs, a_bufs, l_buf, bars)
        targs = (KV, BlockTable, b, tile, split, lo, hi, num_tiles, group_size, stride_btb,
                 stride_k0, stride_k1, Out, PartialOut, stride_ob, stride_oh, stride_pb,
                 stride_ph, stride_ps, kl_bufs, kr_bufs, kt_bufs, a_bufs, l_buf, bars)
        # (the argument tuples are written here, not assigned to a name first: a tuple
        # held in a variable turns its constexprs into run-time values in Triton 3.6)
        gl.warp_specialize([
            (_scorer_part, (sargs, targs, NUM_SPLITS, PAGE_SIZE, PAGED)),
            (_streamer_part, (sargs, targs, NUM_SPLITS, PAGE_SIZE, PAGED)),
        ], [4], [_MAX_REGS])


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

