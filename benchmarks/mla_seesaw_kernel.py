"""An experiment, not used by the op: stage 1 of MLA decode on Hopper (SM90) with the two
warpgroups out of phase (a "seesaw" schedule) and a loader partition, written in Gluon.
``bench_decode_seesaw.py`` checks and times it; the findings are in
``results/bench_decode_sweep_v12.md`` (it is correct, and 4-30% slower than the op's
SM90 kernel of the time on an H100).

Why try it
----------
The op's SM90 kernel at the time (``mla_decode_sm90.py`` has since been replaced by a
warp-specialized one: one scoring warpgroup and a streaming one, sweep v15) kept both
warpgroups in step: each computed half of every key tile's scores (``N = 32`` per
warpgroup), they exchanged the row maxima, then each multiplied P with half of V. Two
things capped it at about 415 TFLOP/s with 128 heads: the score product at ``N = 32``
read the 72 KB query tile from shared memory once per 32 keys per warpgroup
(shared-memory bound), and the tensor cores idled during every softmax.

Note (sweep v15): the worker partitions get their constexprs from a tuple held in a
variable (``wargs``), which Triton 3.6 turns into run-time values: warpgroup 1 and the
loader are compiled with both paged and static paths and run-time ``NOLOAD``, ``TRACE``
and ``STAGGER`` tests (a ``TRACE=False`` build holds 12 branches on partition arguments
and 9 ``%clock64`` reads). The timings of sweeps v12 and v14 include that cost.

Here the two warpgroups work on different key tiles of a pair ``(A, B)``:

* warpgroup 0 computes ``S_A = Q K_A^T`` (all 64 keys, ``N = 64``), warpgroup 1
  ``S_B``; Q is read once per 64 keys per warpgroup;
* warpgroup 0 owns output columns ``[0, 256)``, warpgroup 1 ``[256, 512)``; each adds
  both tiles' ``P V`` products for its columns;
* the softmax runs in sequence over the pair: warpgroup 0 publishes ``m_A`` (row maxima
  after A) and ``P_A``, warpgroup 1 continues from ``m_A`` and publishes ``m_B`` and
  ``P_B``. While one warpgroup runs its softmax the other runs a product.

A loader partition (4 warps, few registers) fills the two tile stages with ``cp.async``
and signals per column group (RoPE features, V's left half, V's right half) on
mbarriers. A group is refilled as soon as its last reader is done: the RoPE group after
the owner's score product, the left half after warpgroup 0's ``P V``, the right half
after warpgroup 1's. The next tile's score product waits for its groups in that order.

Per pair, with ``ph = pair & 1``, the waits are:

=============  ==========================  =======================================
barrier        arrived by                  waited by
=============  ==========================  =======================================
full[s][g]     loader, when its copies of  the owner of stage s (score product) and
               group g of stage s land     (groups L, R) the warpgroup using V there
empty[s][g]    the last reader of group g  the loader before refilling it
pa_ready       warpgroup 0: P_A, m_A       warpgroup 1
pb_ready       warpgroup 1: P_B, m_B       warpgroup 0
pa_free        warpgroup 1 after P_A V_R   warpgroup 0 before overwriting P_A, m_A
pb_free        warpgroup 0 after P_B V_L   warpgroup 1 before overwriting P_B, m_B
=============  ==========================  =======================================

Shared memory: Q without its RoPE part (64 KB; the RoPE part sits in registers as the
wgmma A operand), two stages of ``64 x 576`` (144 KB), two P tiles (16 KB): 224 KB.

It writes what the other stage-1 kernels write (normalized partial output and natural
log-sum-exp per split, or the final output with one split), with the same split bounds,
so the Triton stage 2 merges its splits. Masked copies write zeros (page tails are never
read), an empty split writes ``(0, -inf)``, an odd tile count pairs the last tile with
an all-masked one.

Scope: as ``mla_decode_sm90.supports``; Gluon kernels do not run under the Triton
interpreter, so this one is checked against the float32 reference on the GPU.

Three switches (constexprs): ``NOLOAD`` masks every KV copy after the first 128
positions (zero-filled tiles: the schedule's compute and synchronization alone);
``TRACE`` stores ``%clock64`` at 18 points of pairs 8-23 of program (0, 0, 0) into
``Dbg`` (``TRACE_SLOTS`` int64 per pair).
``STAGGER`` makes warpgroup 1 start its score product only once warpgroup 0's is done
(an mbarrier), so that the two never share the tensor cores: slower still
(``results/bench_decode_sweep_v14.md``).
"""

from __future__ import annotations

from attnfuse.custom_ops.kernels.mla_decode_sm90 import BLOCK_H, HAVE_GLUON, LATENT_DIM, ROPE_DIM

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

BLOCK_N = 64
#: warps of the default partition (warpgroup 0); warpgroup 1 and the loader add 4 each
NUM_WARPS = 4
#: registers per thread: the loader's, and the kernel's average over its 12 warps
#: (``maxnreg``; 168 x 384 threads fit the 64K register file). The warpgroups get the rest.
LOADER_REGS = 56
MAX_REGS = 168
CONSUMER_REGS = (3 * MAX_REGS - LOADER_REGS) // 2
HALF = LATENT_DIM // 2

# mbarrier indices in the ``xbars`` array
_PA_READY = 0
_PB_READY = 1
_PA_FREE = 2
_PB_FREE = 3
_Q_READY = 4
_L0_READY = 5
_L1_READY = 6
#: warpgroup 0's score product is done (``STAGGER``: warpgroup 1 starts its own then)
_SA_DONE = 7
_NUM_XBARS = 8
#: int64 slots per traced pair (``TRACE``): 0-5 warpgroup 0, 6-11 warpgroup 1, 12-17 loader
TRACE_SLOTS = 24
#: traced pairs: 8 .. 8 + TRACE_PAIRS - 1 (past the pipeline's start)
TRACE_PAIRS = 16


if HAVE_GLUON:
    from attnfuse.custom_ops.kernels._gluon_sm90 import LN2 as _LN2
    from attnfuse.custom_ops.kernels._gluon_sm90 import LOG2E as _LOG2E
    from attnfuse.custom_ops.kernels._gluon_sm90 import split_range

    # module constants as compile-time values inside the kernels
    _BH = gl.constexpr(BLOCK_H)
    _BN = gl.constexpr(BLOCK_N)
    _DL = gl.constexpr(LATENT_DIM)
    _DR = gl.constexpr(ROPE_DIM)
    _HALF = gl.constexpr(HALF)
    _PA_READY = gl.constexpr(_PA_READY)
    _PB_READY = gl.constexpr(_PB_READY)
    _PA_FREE = gl.constexpr(_PA_FREE)
    _PB_FREE = gl.constexpr(_PB_FREE)
    _Q_READY = gl.constexpr(_Q_READY)
    _L0_READY = gl.constexpr(_L0_READY)
    _L1_READY = gl.constexpr(_L1_READY)
    _SA_DONE = gl.constexpr(_SA_DONE)
    _NUM_XBARS = gl.constexpr(_NUM_XBARS)
    _CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)
    _LOADER_REGS = gl.constexpr(LOADER_REGS)
    _TRACE_SLOTS = gl.constexpr(TRACE_SLOTS)
    _TRACE_PAIRS = gl.constexpr(TRACE_PAIRS)

    @gluon.jit
    def _rec(Dbg, rec, i, slot, TRACE: gl.constexpr):
        """Store this SM's cycle counter for pair ``i`` (``TRACE`` builds only)."""
        if TRACE:
            if rec & (i >= 8) & (i < 8 + _TRACE_PAIRS):
                t = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [],
                                              dtype=gl.int64, is_pure=False, pack=1)
                gl.store(Dbg + (i - 8) * _TRACE_SLOTS + slot, t)

    @gluon.jit
    def _loader(args, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, NOLOAD: gl.constexpr,
                TRACE: gl.constexpr):
        (KV, BlockTable, b, stride_btb, stride_k0, stride_k1, lo, hi, num_pairs,
         kl_bufs, kr_bufs, kt_bufs, full_bars, empty_bars, Dbg, rec) = args
        layout: gl.constexpr = gl.BlockedLayout(
            size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])
        offs_h = gl.arange(0, _HALF, layout=gl.SliceLayout(0, layout))
        offs_t = gl.arange(0, _DR, layout=gl.SliceLayout(0, layout))
        for t in range(2 * num_pairs):
            s = t % 2
            ph = (t // 2) & 1
            pos = lo + t * _BN + gl.arange(0, _BN, layout=gl.SliceLayout(1, layout))
            ok = pos < hi
            if NOLOAD:
                ok = ok & (pos < 128)
            if PAGED:
                page = gl.load(BlockTable + b.to(gl.int64) * stride_btb + pos // PAGE_SIZE,
                               mask=ok, other=0).to(gl.int64)
                rows = page * stride_k0 + (pos % PAGE_SIZE).to(gl.int64) * stride_k1
            else:
                rows = b.to(gl.int64) * stride_k0 + pos.to(gl.int64) * stride_k1
            base = KV + rows[:, None]
            # the RoPE group is free first (after the owner's score product)
            mbarrier.wait(empty_bars.index(3 * s), ph ^ 1)
            _rec(Dbg, rec, t // 2, 12 + 3 * s, TRACE)
            async_copy.async_copy_global_to_shared(
                kt_bufs.index(s), base + _DL + offs_t[None, :], mask=ok[:, None])
            async_copy.mbarrier_arrive(full_bars.index(3 * s), increment_count=False)
            mbarrier.wait(empty_bars.index(3 * s + 1), ph ^ 1)
            _rec(Dbg, rec, t // 2, 13 + 3 * s, TRACE)
            async_copy.async_copy_global_to_shared(
                kl_bufs.index(s), base + offs_h[None, :], mask=ok[:, None])
            async_copy.mbarrier_arrive(full_bars.index(3 * s + 1), increment_count=False)
            mbarrier.wait(empty_bars.index(3 * s + 2), ph ^ 1)
            _rec(Dbg, rec, t // 2, 14 + 3 * s, TRACE)
            async_copy.async_copy_global_to_shared(
                kr_bufs.index(s), base + _HALF + offs_h[None, :], mask=ok[:, None])
            async_copy.mbarrier_arrive(full_bars.index(3 * s + 2), increment_count=False)

    @gluon.jit
    def _publish(p_buf, m_buf, p, m_new, ready_bar, free_bar, ph):
        """Hand P and the row maxima to the other warpgroup once it is done with the
        previous ones (this warpgroup reads them back from the same buffers)."""
        mbarrier.wait(free_bar, ph ^ 1)
        p_buf.store(p.to(p_buf.dtype))
        m_buf.store(m_new)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ready_bar)

    @gluon.jit
    def _pv(acc, scale, row_o: gl.constexpr, p_buf, v_buf, empty_bar):
        """``acc * scale + P V`` (P and V from shared memory), then release V's group."""
        acc = acc * gl.convert_layout(scale, row_o)[:, None]
        acc = warpgroup_mma(p_buf, v_buf, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        gl.thread_barrier()
        mbarrier.arrive(empty_bar)
        return acc

    @gluon.jit
    def _consumer(args, WG: gl.constexpr, NUM_SPLITS: gl.constexpr, TRACE: gl.constexpr,
                  STAGGER: gl.constexpr):
        (Q, Out, Lse, PartialOut, PartialLse, b, tile, split, lo, hi, num_pairs, qk_scale,
         group_size, stride_qb, stride_qh, stride_pb, stride_ph, stride_ps, stride_plb,
         stride_plh, stride_ob, stride_oh, stride_lb, stride_lh,
         ql_smem, qr_smem, kl_bufs, kr_bufs, kt_bufs, p_bufs, m_bufs, l_bufs,
         full_bars, empty_bars, xbars, Dbg, rec) = args
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, _HALF, 16])
        qt_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout,
                                                      k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_row0 = Q + b.to(gl.int64) * stride_qb
        if WG == 0:
            # the query tile without its RoPE part, once, into shared memory (for both)
            ld: gl.constexpr = gl.BlockedLayout(
                size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                order=[1, 0])
            offs_qh = gl.arange(0, _BH, layout=gl.SliceLayout(1, ld))
            offs_qd = gl.arange(0, _HALF, layout=gl.SliceLayout(0, ld))
            q_ok = (tile * _BH + offs_qh < group_size)[:, None]
            q_ptrs = q_row0 + (tile * _BH + offs_qh)[:, None] * stride_qh + offs_qd[None, :]
            async_copy.async_copy_global_to_shared(ql_smem, q_ptrs, mask=q_ok)
            async_copy.async_copy_global_to_shared(qr_smem, q_ptrs + _HALF, mask=q_ok)
            async_copy.commit_group()
            async_copy.wait_group(0)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(xbars.index(_Q_READY))
        else:
            mbarrier.wait(xbars.index(_Q_READY), 0)
        # the RoPE part of the query tile, as the register A operand of the score product
        offs_th = gl.arange(0, _BH, layout=gl.SliceLayout(1, qt_layout))
        offs_tt = gl.arange(0, _DR, layout=gl.SliceLayout(0, qt_layout))
        q_t = gl.load(q_row0 + (tile * _BH + offs_th)[:, None] * stride_qh + _DL
                      + offs_tt[None, :],
                      mask=(tile * _BH + offs_th < group_size)[:, None], other=0.0)

        offs_ns = gl.arange(0, _BN, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([_BH], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([_BH], gl.float32, layout=row_s)
        acc = gl.zeros([_BH, _HALF], gl.float32, layout=o_layout)
        kt_own = kt_bufs.index(WG)
        kl_own = kl_bufs.index(WG)
        kr_own = kr_bufs.index(WG)
        for i in range(num_pairs):
            ph = i & 1
            # ---- scores of this warpgroup's tile (2 i + WG), group by group as they land
            mbarrier.wait(full_bars.index(3 * WG), ph)
            if STAGGER and WG == 1:  # not beside warpgroup 0's score product
                mbarrier.wait(xbars.index(_SA_DONE), ph)
            _rec(Dbg, rec, i, 6 * WG, TRACE)
            fence_async_shared()
            qk = gl.zeros([_BH, _BN], gl.float32, layout=s_layout)
            qk = warpgroup_mma(q_t, kt_own.permute((1, 0)), qk, use_acc=False, is_async=True)
            mbarrier.wait(full_bars.index(3 * WG + 1), ph)
            fence_async_shared()
            qk = warpgroup_mma(ql_smem, kl_own.permute((1, 0)), qk, is_async=True)
            mbarrier.wait(full_bars.index(3 * WG + 2), ph)
            fence_async_shared()
            qk = warpgroup_mma(qr_smem, kr_own.permute((1, 0)), qk, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
            _rec(Dbg, rec, i, 6 * WG + 1, TRACE)
            gl.thread_barrier()
            mbarrier.arrive(empty_bars.index(3 * WG))  # the RoPE group's last reader
            if STAGGER and WG == 0:
                mbarrier.arrive(xbars.index(_SA_DONE))

            qk = qk * qk_scale
            col_ok = lo + (2 * i + WG) * _BN + offs_ns < hi
            qk = gl.where(col_ok[None, :], qk, float("-inf"))
            if WG == 0:
                m_new = gl.maximum(m_i, gl.max(qk, 1))
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                p = gl.exp2(qk - m_safe[:, None])
                alpha = gl.exp2(m_i - m_safe)
                l_i = l_i * alpha + gl.sum(p, 1)
                _publish(p_bufs.index(0), m_bufs.index(0), p, m_new,
                         xbars.index(_PA_READY), xbars.index(_PA_FREE), ph)
                _rec(Dbg, rec, i, 2, TRACE)
                # stage 0's left half is released after this product
                acc = _pv(acc, alpha, row_o, p_bufs.index(0), kl_bufs.index(0),
                          empty_bars.index(1))
                _rec(Dbg, rec, i, 3, TRACE)
                # tile B: its P and the new maxima from warpgroup 1
                mbarrier.wait(xbars.index(_PB_READY), ph)
                _rec(Dbg, rec, i, 4, TRACE)
                m_b = m_bufs.index(1).load(row_s)
                m_b_safe = gl.where(m_b == float("-inf"), 0.0, m_b)
                alpha_b = gl.exp2(m_new - m_b_safe)
                l_i = l_i * alpha_b
                fence_async_shared()
                acc = _pv(acc, alpha_b, row_o, p_bufs.index(1), kl_bufs.index(1),
                          empty_bars.index(4))  # stage 1, left half
                mbarrier.arrive(xbars.index(_PB_FREE))
                _rec(Dbg, rec, i, 5, TRACE)
                m_i = m_b
            else:
                mbarrier.wait(xbars.index(_PA_READY), ph)
                _rec(Dbg, rec, i, 8, TRACE)
                m_a = m_bufs.index(0).load(row_s)
                m_new = gl.maximum(m_a, gl.max(qk, 1))
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                m_a_safe = gl.where(m_a == float("-inf"), 0.0, m_a)
                p = gl.exp2(qk - m_safe[:, None])
                alpha_a = gl.exp2(m_i - m_a_safe)
                alpha_b = gl.exp2(m_a - m_safe)
                l_i = l_i * (alpha_a * alpha_b) + gl.sum(p, 1)
                _publish(p_bufs.index(1), m_bufs.index(1), p, m_new,
                         xbars.index(_PB_READY), xbars.index(_PB_FREE), ph)
                _rec(Dbg, rec, i, 9, TRACE)
                acc = _pv(acc, alpha_a, row_o, p_bufs.index(0), kr_bufs.index(0),
                          empty_bars.index(2))  # stage 0, right half
                mbarrier.arrive(xbars.index(_PA_FREE))
                _rec(Dbg, rec, i, 10, TRACE)
                acc = _pv(acc, alpha_b, row_o, p_bufs.index(1), kr_bufs.index(1),
                          empty_bars.index(5))  # stage 1, right half
                _rec(Dbg, rec, i, 11, TRACE)
                m_i = m_new

        # ---- both halves' denominators (each warpgroup summed its own tiles)
        l_bufs.index(WG).store(l_i)
        gl.thread_barrier()
        mbarrier.arrive(xbars.index(_L0_READY + WG))
        mbarrier.wait(xbars.index(_L1_READY - WG), 0)
        l_i = l_i + l_bufs.index(1 - WG).load(row_s)

        has_mass = l_i > 0.0
        inv = gl.where(has_mass, 1.0 / gl.where(has_mass, l_i, 1.0), 0.0)
        out = acc * gl.convert_layout(inv, row_o)[:, None]
        heads_o = tile * _BH + gl.arange(0, _BH, layout=row_o)
        offs_do = WG * _HALF + gl.arange(0, _HALF, layout=gl.SliceLayout(0, o_layout))
        ok_o = (heads_o < group_size)[:, None] & (offs_do < _DL)[None, :]
        if NUM_SPLITS == 1:
            o_ptrs = (Out + b.to(gl.int64) * stride_ob + heads_o[:, None] * stride_oh
                      + offs_do[None, :])
            gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=ok_o)
        else:
            p_ptrs = (PartialOut + b.to(gl.int64) * stride_pb + heads_o[:, None] * stride_ph
                      + split * stride_ps + offs_do[None, :])
            gl.store(p_ptrs, out, mask=ok_o)
        if WG == 0:
            lse = gl.where(has_mass, (m_i + gl.log2(gl.where(has_mass, l_i, 1.0))) * _LN2,
                           float("-inf"))
            heads_l = tile * _BH + gl.arange(0, _BH, layout=row_s)
            if NUM_SPLITS == 1:
                gl.store(Lse + b.to(gl.int64) * stride_lb + heads_l * stride_lh, lse,
                         mask=heads_l < group_size)
            else:
                gl.store(PartialLse + b.to(gl.int64) * stride_plb + heads_l * stride_plh
                         + split, lse, mask=heads_l < group_size)

    @gluon.jit
    def _warpgroup0(cargs, NUM_SPLITS: gl.constexpr, TRACE: gl.constexpr,
                    STAGGER: gl.constexpr):
        _consumer(cargs, 0, NUM_SPLITS, TRACE, STAGGER)

    # the worker partitions share one signature; constexprs travel as arguments of their
    # own (inside a tuple they would become run-time values)
    @gluon.jit
    def _warpgroup1(cargs, largs, NUM_SPLITS: gl.constexpr, PAGE_SIZE: gl.constexpr,
                    PAGED: gl.constexpr, NOLOAD: gl.constexpr, TRACE: gl.constexpr,
                    STAGGER: gl.constexpr):
        _consumer(cargs, 1, NUM_SPLITS, TRACE, STAGGER)

    @gluon.jit
    def _loader_part(cargs, largs, NUM_SPLITS: gl.constexpr, PAGE_SIZE: gl.constexpr,
                     PAGED: gl.constexpr, NOLOAD: gl.constexpr, TRACE: gl.constexpr,
                     STAGGER: gl.constexpr):
        _loader(largs, PAGE_SIZE, PAGED, NOLOAD, TRACE)

    @gluon.jit
    def mla_seesaw_stage1(
        Q, KV, BlockTable, SeqLens, PartialOut, PartialLse, Out, Lse,
        sm_scale, max_positions, group_size,
        stride_qb, stride_qh, stride_k0, stride_k1, stride_btb,
        stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
        stride_ob, stride_oh, stride_lb, stride_lh, Dbg,
        HEAD_DA: gl.constexpr, HEAD_DT: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_SPLITS: gl.constexpr,
        PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr, HAS_SEQLENS: gl.constexpr,
        NOLOAD: gl.constexpr = False, TRACE: gl.constexpr = False,
        STAGGER: gl.constexpr = False,
    ):
        gl.static_assert(HEAD_DA == _DL)
        gl.static_assert(HEAD_DT == _DR)
        gl.static_assert(BLOCK_H == _BH)
        gl.static_assert(BLOCK_N == _BN)
        tile = gl.program_id(0)
        b = gl.program_id(1)
        split = gl.program_id(2)
        dtype: gl.constexpr = Q.dtype.element_ty

        wide_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128,
                                                     element_bitwidth=16, rank=2)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BH, _BN], dtype)
        vec_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                       order=[0])
        ql_smem = gl.allocate_shared_memory(dtype, [_BH, _HALF], wide_sl)
        qr_smem = gl.allocate_shared_memory(dtype, [_BH, _HALF], wide_sl)
        kl_bufs = gl.allocate_shared_memory(dtype, [2, _BN, _HALF], wide_sl)
        kr_bufs = gl.allocate_shared_memory(dtype, [2, _BN, _HALF], wide_sl)
        kt_bufs = gl.allocate_shared_memory(dtype, [2, _BN, _DR], wide_sl)
        p_bufs = gl.allocate_shared_memory(dtype, [2, _BH, _BN], p_sl)
        m_bufs = gl.allocate_shared_memory(gl.float32, [2, _BH], vec_sl)
        l_bufs = gl.allocate_shared_memory(gl.float32, [2, _BH], vec_sl)
        full_bars = gl.allocate_shared_memory(gl.int64, [6, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [6, 1], mbarrier.MBarrierLayout())
        xbars = gl.allocate_shared_memory(gl.int64, [_NUM_XBARS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(6):
            # every loader thread arrives once its own copies of a group land
            mbarrier.init(full_bars.index(i), count=4 * 32)
            mbarrier.init(empty_bars.index(i), count=1)
        for i in gl.static_range(_NUM_XBARS):
            mbarrier.init(xbars.index(i), count=1)

        # ---- split bounds (as the other stage-1 kernels, rounded to _BN)
        lo, hi, num_tiles = split_range(SeqLens, b, split, max_positions, NUM_SPLITS, _BN,
                                        HAS_SEQLENS)
        num_pairs = (num_tiles + 1) // 2
        qk_scale = sm_scale * _LOG2E
        rec = (tile == 0) & (b == 0) & (split == 0)  # the traced program

        cargs = (Q, Out, Lse, PartialOut, PartialLse, b, tile, split, lo, hi, num_pairs,
                 qk_scale, group_size, stride_qb, stride_qh, stride_pb, stride_ph, stride_ps,
                 stride_plb, stride_plh, stride_ob, stride_oh, stride_lb, stride_lh,
                 ql_smem, qr_smem, kl_bufs, kr_bufs, kt_bufs, p_bufs, m_bufs, l_bufs,
                 full_bars, empty_bars, xbars, Dbg, rec)
        largs = (KV, BlockTable, b, stride_btb, stride_k0, stride_k1, lo, hi, num_pairs,
                 kl_bufs, kr_bufs, kt_bufs, full_bars, empty_bars, Dbg, rec)
        wargs = (cargs, largs, NUM_SPLITS, PAGE_SIZE, PAGED, NOLOAD, TRACE, STAGGER)
        gl.warp_specialize([
            (_warpgroup0, (cargs, NUM_SPLITS, TRACE, STAGGER)),
            (_warpgroup1, wargs),
            (_loader_part, wargs),
        ], [4, 4], [_CONSUMER_REGS, _LOADER_REGS])
