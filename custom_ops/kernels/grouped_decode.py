"""Split-KV grouped decode attention (flash-decoding) in Triton.

Algorithm
---------
One query token per sequence attends to its cached keys and values. Query heads that
share one KV head (GQA, MQA, MLA) are computed together: a tile of ``BLOCK_H`` such
heads is one matrix, so every KV block is loaded from memory once per tile instead of
once per query head. To fill the GPU when ``batch x kv_heads`` programs are too few
(small batch, long context), each sequence's KV range is cut into ``num_kv_splits``
contiguous splits (vLLM PR 19774 split the grouped stage 1 of the vLLM/SGLang Triton
decode kernel the same way):

* stage 1, grid ``(batch, kv_heads * head_tiles, num_kv_splits)``: online softmax over
  one split; writes the split's normalized partial output and its log-sum-exp to fp32
  scratch.
* stage 2, grid ``(batch, q_heads, Dv / MERGE_DV_CHUNK)``: merges the splits by
  log-sum-exp, MERGE_CHUNK splits per step.

With one split, stage 1 writes the final output and stage 2 is not launched. On SM90,
MLA calls run stage 1 as the Gluon kernel of ``mla_decode_sm90.py`` and GQA calls as
the one of ``gqa_decode_sm90.py`` (same outputs, same split bounds;
``decode_settings`` picks them), merged by the same stage 2.

Invariants (each one a bug seen elsewhere; see research/anchors-kernels.md section 4)
* Both stages compute split bounds with the same ``_split_bounds`` helper (rounded to
  stage 1's BLOCK_N); stage 1 writes every split (an empty one as (0, -inf)) and stage 2
  merges only the splits that helper finds non-empty, so the scratch is never
  zero-filled and never read where unwritten.
* A sequence with no visible key (length 0, as CUDA-graph padding produces, or fully
  masked) writes output 0 and LSE -inf, never NaN: the running max is made finite
  before it is subtracted, and a zero denominator is guarded.
* Every K/V load is masked with ``other=0``: an uninitialized page tail holding NaN
  can otherwise poison ``p @ V`` through ``0 * NaN``.

Shapes and strides
------------------
q          (B, Hq, Dk)                      last dim contiguous
k_cache    static (B, Hkv, S, Dk)           paged (num_blocks, page, Hkv, Dk)
v_cache    static (B, Hkv, S, Dv)           paged (num_blocks, page, Hkv, Dv)
           (absent in shared-latent mode: V is ``k_cache[..., :Dv]``, MLA)
block_table (B, max_blocks) int32           paged only
seq_lens   (B,) int32                       optional; default: the cache capacity
mask       (B or 1, S_mask) bool or float   True / additive; positions are logical
partial_out (B, Hq, splits, Dv) fp32        scratch, uninitialized
partial_lse (B, Hq, splits) fp32            scratch, uninitialized
out        (B, Hq, Dv) q.dtype;  lse (B, Hq) fp32 (natural log)

The KV position ``p`` of sequence ``b`` lives at ``k_cache[b, :, p]`` (static) or at
``k_cache[block_table[b, p // page], p % page]`` (paged); the launcher passes the two
leading strides so both layouts share one address computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import gqa_decode_sm90 as sm90_gqa
from . import mla_decode_sm90 as sm90
from ._launch import KernelLaunch, Launcher, cdiv, next_pow2

# ------------------------------------------------------------------ named limits
#: tl.dot needs at least 16 rows; a tile of query heads is padded up to this
MIN_BLOCK_H = 16
#: query heads computed together at most: 64 x 512 fp32 accumulators already fill the
#: register file of 8 warps (MLA); H100 sweep at 128 MLA heads: 64 (360 us) beat 32
MAX_BLOCK_H = 64
#: head dims above this are "wide" (MLA latent rows, 576): other block shapes pay
WIDE_HEAD_DIM = 256
#: a split shorter than this costs more in partial writes and merging than it gains;
#: H100, GQA B=1 ctx 1k: 16 splits of 64 positions 6.5 us, 4 splits of 256 10.6 us
MIN_KV_PER_SPLIT = 64
#: upper bound of the automatic split count; stage 2 merges MERGE_CHUNK splits per step
AUTO_MAX_KV_SPLITS = 128
#: upper bound of a forced split count (tests, tuning)
MAX_KV_SPLITS = 512
#: stage 2 (H100, benchmarks/results/bench_decode_sweep_v7.md): the automatic split
#: counts merged in one step, 32 output features and one warp per program. At batch 1
#: stage 2 is latency-bound (stage 1 alone: GQA ctx 8k 10.3 of 14.5 us with 32 splits
#: per step, 64 features, 4 warps); one step and twice the programs: 12.4 us; MLA-16
#: ctx 32k 27.4 -> 24.4 us. Within 4% of the best of 18 shapes at each of 7 points.
MERGE_CHUNK = AUTO_MAX_KV_SPLITS
#: output features one stage-2 program merges, at least: at batch 1 the (B, Hq) merge grid
#: is only Hq programs, each reading splits x Dv fp32 partials; cutting Dv spreads that
#: over SMs. ``choose_merge_dv`` widens it where the grid is large anyway
MERGE_DV_CHUNK = 32
#: partials one stage-2 program reads at most when its width is chosen (splits x width x
#: fp32). H100 (benchmarks/results/bench_decode_sweep_v10.md): with few splits and many
#: rows, whole rows per program beat 32-feature chunks (MLA-16 B=64 ctx 4k, 2 splits:
#: 123.3 -> 114.6 us; MLA-128 B=16 ctx 32k, 4 splits: 412 -> 366 us; GQA B=16 ctx 1k:
#: 31.4 -> 30.7 us); at batch 1 (64-128 splits) wider chunks lose (GQA ctx 8k, 66 splits:
#: 12.7 us at 32 features, 15.9 at 128)
MERGE_MAX_BYTES = 8 * 1024
MERGE_WARPS = 1
#: programs per SM stage 1 aims for. More, shorter programs shrink the tail of the last
#: wave; measured on H100 (benchmarks/results/bench_decode_sweep_v1.md): GQA B=16 ctx 8k
#: 4 splits (4 per SM) 187 us vs 2 splits 199 us; MLA-16 B=16 ctx 32k 16 splits (2 per
#: SM: a 576-wide tile leaves room for fewer resident programs) 271 us vs 8 splits 386 us
TARGET_PROGRAMS_PER_SM = 4
TARGET_PROGRAMS_PER_SM_WIDE = 2
#: ... and where the unsplit programs alone number at least half the SMs: fewer, longer
#: splits. H100 (benchmarks/results/bench_decode_sweep_v11.md), GQA 32/8 heads at B=16
#: (128 unsplit programs), two runs: 3 splits beat 4 at ctx 1k-128k by 0.6-2.6% (ctx 8k
#: 186 vs 188 us and 183.5 vs 185.9); at B=8 (64 programs) 6 and 8 splits tie
TARGET_PROGRAMS_PER_SM_FILLED = 3
#: a split count from which stage 1 is latency-bound (few KV blocks per program), which
#: changes the best block shape (see ``decode_settings``)
MANY_SPLITS = 16
#: SM count assumed where no GPU is present (interpreter runs); small on purpose
INTERPRETER_SM_COUNT = 8
#: the SM90 Gluon MLA stage 1 (``mla_decode_sm90.py``): keys per tile, tiles in flight and
#: programs per SM the split count aims for (222 KB of shared memory: one program per SM).
#: H100 sweep (benchmarks/results/bench_decode_sm90_sweep.md, the kernel's earlier
#: in-step version): 64/2 beat 32/3 and 32/4 at all 8 points (by 15-38%); one program per
#: SM beat two at all 8 (MLA-128 B=64 ctx 4k: 196 us with 1 split, 288 us with 2). The
#: warp-specialized kernel is built for 64/2 (``sm90.BLOCK_N``, ``sm90.NUM_STAGES``: two
#: 72 KB stages next to the query tile)
SM90_PROGRAMS_PER_SM = 1
#: the SM90 Gluon GQA stage 1 (``gqa_decode_sm90.py``, static and paged caches): keys per
#: tile and tiles in flight (fewer where they would not fit ``SM90_SMEM_BYTES``). Where
#: the (sequence, KV head) programs number from half to twice the SMs, 3 stages and
#: splits for one program per SM (usually 1 split: no merge); elsewhere 2 stages and
#: splits for as many programs as fit on an SM (2 at head dim 128). H100, 12 GQA
#: 32/8-head points: static caches 0.997-1.28x SDPA's time ratio, where the Triton stage
#: 1 gave 0.85-1.24x (B=16 ctx 1k: 26.2 us with 3 stages and 1 split, 28.3 us with 2
#: stages and 2 splits, 30.9 us Triton; bench_decode_sweep_v13.md); paged caches (page
#: 16) 0.959-1.22x the best of FlashInfer and SDPA, 1.003-1.15x the Triton stage 1's
#: speed at 11 points and 0.996x at B=16 ctx 128k (bench_decode_sweep_v14.md)
SM90_GQA_BLOCK_N = 64
SM90_GQA_NUM_STAGES_FILLED = 3
SM90_GQA_NUM_STAGES = 2
#: shared memory one SM90 program may use (227 KB)
SM90_SMEM_BYTES = 227 * 1024


@triton.jit
def _kv_range(SeqLens, b, max_positions, window,
              HAS_SEQLENS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[start, end) of the positions sequence ``b`` attends to."""
    if HAS_SEQLENS:
        end = tl.load(SeqLens + b).to(tl.int32)
    else:
        end = max_positions
    start = end * 0
    if HAS_WINDOW:
        start = tl.maximum(end - window, 0)
    return start, end


@triton.jit
def _split_bounds(kv_start, kv_end, split, NUM_SPLITS: tl.constexpr, SPLIT_ALIGN: tl.constexpr):
    """[lo, hi) of one split; shared by both stages (empty when lo >= hi)."""
    span = tl.maximum(kv_end - kv_start, 0)
    per_split = (span + NUM_SPLITS - 1) // NUM_SPLITS
    per_split = (per_split + SPLIT_ALIGN - 1) // SPLIT_ALIGN * SPLIT_ALIGN
    lo = kv_start + split * per_split
    hi = tl.minimum(lo + per_split, kv_end)
    return lo, hi


@triton.jit
def _softmax_step(qk, m_i, l_i):
    """Online-softmax update for one block of logits ``qk`` (rows: heads): the block's
    weights ``p``, the rescale ``alpha`` of what came before, the new max and sum."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # all-masked so far: subtract 0 instead of -inf so exp gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(qk - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _grouped_decode_stage1(
    Q, K, V, BlockTable, SeqLens, Mask, KScale, VScale,
    PartialOut, PartialLse, Out, Lse,
    sm_scale, softcap, window, max_positions, group_size, tiles_per_group,
    stride_qb, stride_qh,
    stride_k0, stride_k1, stride_kh,
    stride_v0, stride_v1, stride_vh,
    stride_btb, stride_mb, stride_ms,
    stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
    stride_ob, stride_oh, stride_lb, stride_lh,
    HEAD_DA: tl.constexpr, HEAD_DT: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, SHARED_KV: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr,
):
    # K's head dim is HEAD_DA (+ HEAD_DT): in shared-latent mode the first part is V.
    tl.static_assert(BLOCK_H >= 16)
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // tiles_per_group
    tile = tl.program_id(1) % tiles_per_group
    split = tl.program_id(2)

    kv_start, kv_end = _kv_range(SeqLens, b, max_positions, window, HAS_SEQLENS, HAS_WINDOW)
    # an empty split (lo >= hi) still writes its (0, -inf) row; stage 2 skips it anyway
    lo, hi = _split_bounds(kv_start, kv_end, split, NUM_SPLITS, BLOCK_N)

    offs_g = tile * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = offs_g < group_size
    heads = kv_head * group_size + offs_g
    offs_da = tl.arange(0, BLOCK_DA)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_a = tl.load(q_rows + offs_da[None, :],
                  mask=head_ok[:, None] & (offs_da[None, :] < HEAD_DA), other=0.0)
    if HEAD_DT > 0:
        offs_dt = tl.arange(0, BLOCK_DT)
        q_t = tl.load(q_rows + HEAD_DA + offs_dt[None, :],
                      mask=head_ok[:, None] & (offs_dt[None, :] < HEAD_DT), other=0.0)

    # float scalars come as fp32 from Triton's launcher, as fp64 from Inductor's code
    sm_scale = tl.cast(sm_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    if HAS_K_SCALE:
        # dequantization of fp8 K (cache * k_scale) folds into the logit scale
        sm_scale = sm_scale * tl.load(KScale).to(tl.float32)
    v_scale = 1.0
    if HAS_V_SCALE:
        v_scale = tl.load(VScale).to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        pos_ok = pos < hi
        if PAGED:
            page = tl.load(BlockTable + b.to(tl.int64) * stride_btb + pos // PAGE_SIZE,
                           mask=pos_ok, other=0).to(tl.int64)
            slot = pos % PAGE_SIZE
            k_rows = page * stride_k0 + slot * stride_k1
            v_rows = page * stride_v0 + slot * stride_v1
        else:
            k_rows = b.to(tl.int64) * stride_k0 + pos.to(tl.int64) * stride_k1
            v_rows = b.to(tl.int64) * stride_v0 + pos.to(tl.int64) * stride_v1
        k_ptrs = K + k_rows[:, None] + kv_head * stride_kh
        k_a = tl.load(k_ptrs + offs_da[None, :],
                      mask=pos_ok[:, None] & (offs_da[None, :] < HEAD_DA), other=0.0)
        k_a = k_a.to(q_a.dtype)
        qk = tl.dot(q_a, tl.trans(k_a))
        if HEAD_DT > 0:
            k_t = tl.load(k_ptrs + HEAD_DA + offs_dt[None, :],
                          mask=pos_ok[:, None] & (offs_dt[None, :] < HEAD_DT), other=0.0)
            qk += tl.dot(q_t, tl.trans(k_t.to(q_t.dtype)))
        qk = qk * sm_scale
        if HAS_SOFTCAP:
            # tanh through exp (1 - 2 / (e^2x + 1)): saturates to +-1 without overflow NaN
            qk = softcap * (1.0 - 2.0 / (tl.exp(2.0 * qk / softcap) + 1.0))
        if HAS_MASK:
            mval = tl.load(Mask + b.to(tl.int64) * stride_mb + pos.to(tl.int64) * stride_ms,
                           mask=pos_ok, other=0)
            if MASK_IS_BOOL:
                qk = tl.where(mval[None, :] != 0, qk, float("-inf"))
            else:
                qk = qk + mval.to(tl.float32)[None, :]
        qk = tl.where(pos_ok[None, :], qk, float("-inf"))

        p, alpha, m_new, l_i = _softmax_step(qk, m_i, l_i)
        if SHARED_KV:
            v = k_a
        else:
            v = tl.load(V + v_rows[:, None] + kv_head * stride_vh + offs_dv[None, :],
                        mask=pos_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
            v = v.to(q_a.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_mass = l_i > 0.0
    out = tl.where(has_mass[:, None], acc * (v_scale / tl.where(has_mass, l_i, 1.0))[:, None], 0.0)
    lse = tl.where(has_mass, m_i + tl.log(tl.where(has_mass, l_i, 1.0)), float("-inf"))
    if NUM_SPLITS == 1:
        o_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty),
                 mask=head_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
        tl.store(Lse + b.to(tl.int64) * stride_lb + heads * stride_lh, lse, mask=head_ok)
    else:
        p_rows = (PartialOut + b.to(tl.int64) * stride_pb + heads[:, None] * stride_ph
                  + split * stride_ps)
        tl.store(p_rows + offs_dv[None, :], out,
                 mask=head_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
        tl.store(PartialLse + b.to(tl.int64) * stride_plb + heads * stride_plh + split, lse,
                 mask=head_ok)


@triton.jit
def _grouped_decode_stage2(
    PartialOut, PartialLse, SeqLens, Out, Lse,
    max_positions, window,
    stride_pb, stride_ph, stride_ps, stride_plb, stride_plh,
    stride_ob, stride_oh, stride_lb, stride_lh,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_ALIGN: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_start, kv_end = _kv_range(SeqLens, b, max_positions, window, HAS_SEQLENS, HAS_WINDOW)
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    lse_row = PartialLse + b.to(tl.int64) * stride_plb + h * stride_plh
    part_row = PartialOut + b.to(tl.int64) * stride_pb + h * stride_ph

    # online log-sum-exp merge over chunks of BLOCK_S splits
    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), 0)
    total = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lo, hi = _split_bounds(kv_start, kv_end, offs_s, NUM_SPLITS, SPLIT_ALIGN)
        # exactly the splits stage 1 covered (it writes the empty ones too, as (0, -inf))
        written = (offs_s < NUM_SPLITS) & (lo < hi)
        lse = tl.load(lse_row + offs_s, mask=written, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        weight = tl.where(written, tl.exp(lse - m_safe), 0.0)
        alpha = tl.exp(m_run - m_safe)
        part = tl.load(part_row + offs_s[:, None] * stride_ps + offs_dv[None, :],
                       mask=written[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        acc = acc * alpha + tl.sum(part * weight[:, None], 0)
        total = total * alpha + tl.sum(weight, 0)
        m_run = m_new

    has_mass = total > 0.0
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    out = acc / tl.where(has_mass, total, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_dv,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DV)
    lse_out = tl.where(has_mass, m_safe + tl.log(tl.where(has_mass, total, 1.0)), float("-inf"))
    if tl.program_id(2) == 0:
        tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh, lse_out)


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DecodeConfig:
    """Launch settings of one call (``decode_settings`` picks them)."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    num_kv_splits: int
    #: stage 2: splits merged per step, output features per program, warps per program
    merge_chunk: int = MERGE_CHUNK
    merge_dv: int = MERGE_DV_CHUNK
    merge_warps: int = MERGE_WARPS
    #: stage 1: ``"triton"`` (any call), ``"sm90"`` (the Gluon MLA kernel) or
    #: ``"sm90_gqa"`` (the Gluon GQA kernel)
    kernel: str = "triton"


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_kv_splits(batch: int, num_kv_heads: int, head_tiles: int, capacity: int,
                         num_sms: int, wide: bool = False, per_sm: int | None = None) -> int:
    """Split count: enough programs to fill the GPU, never splits too short to pay.

    ``batch * num_kv_heads * head_tiles`` programs exist without splitting. Splitting
    multiplies them to the multiple nearest ``TARGET_PROGRAMS_PER_SM * num_sms``
    (``..._WIDE`` for wide latent rows, of which fewer programs fit on one SM;
    ``..._FILLED`` where the unsplit programs number at least half the SMs), so a batch
    that already fills the GPU gets 1 split. At one program per SM (the SM90 MLA kernel)
    it rounds down instead: programs past a whole wave would run alone in a second one.
    It is bounded by ``capacity / MIN_KV_PER_SPLIT`` (each split must carry enough KV to
    amortize its partial write and merge) and by ``AUTO_MAX_KV_SPLITS``. ``capacity`` is
    the static bound of the sequence length (cache length, or pages x page size): the
    actual per-sequence lengths live on the device and reading them would synchronize;
    stage 1 divides each sequence's own length by the split count, so ragged batches
    stay balanced.
    """
    programs = batch * num_kv_heads * head_tiles
    programs = max(programs, 1)
    if per_sm is None:
        per_sm = (TARGET_PROGRAMS_PER_SM_WIDE if wide
                  else TARGET_PROGRAMS_PER_SM_FILLED if 2 * programs >= num_sms
                  else TARGET_PROGRAMS_PER_SM)
    if per_sm == 1:
        # one resident program per SM: programs past a whole wave run in a second one of
        # their own, so round down (H100, MLA-16 B=7 ctx 32k: 18 splits, 126 programs,
        # 102.5 us; 19 splits, 133 programs, 161 us; bench_decode_sweep_v11.md)
        wanted = max(num_sms // programs, 1)
    else:
        wanted = (per_sm * num_sms + programs // 2) // programs  # nearest whole multiple
    worthwhile = max(capacity // MIN_KV_PER_SPLIT, 1)
    return max(1, min(wanted, worthwhile, AUTO_MAX_KV_SPLITS))


def sm90_gqa_smem_bytes(head_dim: int, block_n: int, num_stages: int,
                        paged: bool = True) -> int:
    """Shared memory of one program of the SM90 GQA kernel (16-bit elements): the query
    tile, ``num_stages`` K and V tiles of ``block_n`` keys (and their page ids on a paged
    cache), and P."""
    block_h = sm90_gqa.BLOCK_H
    ids = num_stages * 4 * block_n if paged else 0  # int32 page ids
    tiles = block_h * head_dim + num_stages * 2 * block_n * head_dim + block_h * block_n
    return 2 * tiles + ids


def sm90_gqa_max_stages(head_dim: int, block_n: int, paged: bool = True) -> int:
    fixed = sm90_gqa_smem_bytes(head_dim, block_n, 0, paged)
    per_stage = sm90_gqa_smem_bytes(head_dim, block_n, 1, paged) - fixed
    return (SM90_SMEM_BYTES - fixed) // per_stage


def choose_merge_dv(batch: int, num_q_heads: int, head_dim_v: int, num_kv_splits: int,
                    num_sms: int) -> int:
    """Output features per stage-2 program: the widest power of two from ``MERGE_DV_CHUNK``
    up to the padded ``head_dim_v`` whose program reads at most ``MERGE_MAX_BYTES`` of
    partials and whose grid (``batch * num_q_heads * cdiv(head_dim_v, width)`` programs)
    still has one program per SM. Many (batch, head) rows merging few splits thus take
    whole rows (fewer, fuller programs); batch 1 with many splits keeps narrow chunks.
    Programs of several heads were no faster (``bench_decode_sweep_v18.md``).
    """
    width = MERGE_DV_CHUNK
    widest = next_pow2(head_dim_v)
    rows = next_pow2(num_kv_splits)  # stage 2 pads its split tile to a power of two
    while (width * 2 <= widest and rows * width * 2 * 4 <= MERGE_MAX_BYTES
           and batch * num_q_heads * cdiv(head_dim_v, width * 2) >= num_sms):
        width *= 2
    return width


def decode_settings(*, batch: int, num_kv_heads: int, group_size: int, head_dim_k: int,
                    capacity: int, device: torch.device, paged: bool = True,
                    num_kv_splits: int | None = None,
                    block_h: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None,
                    merge_chunk: int | None = None, merge_dv: int | None = None,
                    merge_warps: int | None = None, sm90_eligible: bool = False,
                    sm90_gqa_eligible: bool = False,
                    kernel: str | None = None, head_dim_v: int | None = None) -> DecodeConfig:
    """The one place launch settings are chosen; every argument may be forced (tests, tuning).

    Defaults are the winners of the H100 sweeps (``benchmarks/results/bench_decode_sweep*.md``):

    =========  ===========================  =======  =========  ==========
    head dim   cache, splits                BLOCK_N  num_warps  num_stages
    =========  ===========================  =======  =========  ==========
    <= 256     paged; static >= MANY_SPLITS 64       4          3
    <= 256     static, fewer splits         128      4          3
    576 (MLA)  >= MANY_SPLITS or BLOCK_H 64 64       8          2
    576 (MLA)  otherwise                    32       4          2
    =========  ===========================  =======  =========  ==========

    A call the SM90 Gluon MLA kernel can run (``sm90_eligible``, from
    ``mla_decode_sm90.supports``) runs it unless ``kernel="triton"`` is forced: 64-head
    tiles, ``sm90.BLOCK_N`` keys, ``sm90.NUM_STAGES`` tiles in flight, two partitions of
    4 warps (scorer and streamer; ``num_warps`` is the scorer's), and
    ``SM90_PROGRAMS_PER_SM`` as the split target. A call the SM90 Gluon GQA kernel can run
    (``sm90_gqa_eligible``, from ``gqa_decode_sm90.supports``; static or paged cache) runs
    that one unless ``kernel="triton"`` is forced: 64-row head tiles,
    ``SM90_GQA_BLOCK_N`` keys, 4 warps, and the stage count and split target of the
    ``SM90_GQA_*`` comment.

    Stage 2 merges up to ``MERGE_CHUNK`` splits per step (all of an automatic split
    count) with ``MERGE_WARPS`` per program; its width in output features comes from
    ``choose_merge_dv`` (``head_dim_v``: V's head dim, ``head_dim_k`` when not given).
    """
    if kernel not in (None, "triton", "sm90", "sm90_gqa"):
        raise ValueError(f"kernel: expected 'triton', 'sm90' or 'sm90_gqa', got {kernel!r}")
    if kernel == "sm90" and not sm90_eligible:
        raise ValueError("kernel='sm90' needs an SM90 GPU, Gluon, and an MLA call it supports "
                         "(see attnfuse.custom_ops.kernels.mla_decode_sm90.supports)")
    if kernel == "sm90_gqa" and not sm90_gqa_eligible:
        raise ValueError("kernel='sm90_gqa' needs an SM90 GPU, Gluon, and a GQA call it "
                         "supports (see attnfuse.custom_ops.kernels.gqa_decode_sm90.supports)")
    if kernel is None:
        kernel = "sm90" if sm90_eligible else "sm90_gqa" if sm90_gqa_eligible else "triton"
    for name, value in (("merge_chunk", merge_chunk), ("merge_dv", merge_dv)):
        if value is not None and (value < 2 or value & (value - 1)):
            raise ValueError(f"{name}: expected a power of two >= 2, got {value}")

    def merge_width(splits: int) -> int:
        return merge_dv or choose_merge_dv(batch, num_kv_heads * group_size,
                                           head_dim_v or head_dim_k, splits, sm_count(device))

    if kernel == "sm90":
        if block_h not in (None, sm90.BLOCK_H):
            raise ValueError(f"block_h: the sm90 kernel computes {sm90.BLOCK_H} heads per program")
        if block_n not in (None, sm90.BLOCK_N) or num_stages not in (None, sm90.NUM_STAGES):
            raise ValueError(f"block_n, num_stages: the sm90 kernel runs {sm90.NUM_STAGES} "
                             f"tiles of {sm90.BLOCK_N} keys in flight, got {block_n}, {num_stages}")
        head_tiles = cdiv(group_size, sm90.BLOCK_H)
        if num_kv_splits is None:
            num_kv_splits = choose_num_kv_splits(batch, num_kv_heads, head_tiles, capacity,
                                                 sm_count(device), per_sm=SM90_PROGRAMS_PER_SM)
        if not 1 <= num_kv_splits <= MAX_KV_SPLITS:
            raise ValueError(f"num_kv_splits: expected 1..{MAX_KV_SPLITS}, got {num_kv_splits}")
        return DecodeConfig(sm90.BLOCK_H, sm90.BLOCK_N, sm90.NUM_WARPS, sm90.NUM_STAGES,
                            num_kv_splits,
                            merge_chunk or MERGE_CHUNK, merge_width(num_kv_splits),
                            merge_warps or MERGE_WARPS, kernel="sm90")
    if kernel == "sm90_gqa":
        if block_h not in (None, sm90_gqa.BLOCK_H):
            raise ValueError(f"block_h: the sm90_gqa kernel computes {sm90_gqa.BLOCK_H} heads "
                             f"per program")
        block_n = block_n or SM90_GQA_BLOCK_N
        if block_n > sm90_gqa.MAX_BLOCK_N or block_n & (block_n - 1) or block_n < 16:
            raise ValueError(f"block_n: expected a power of two in 16..{sm90_gqa.MAX_BLOCK_N}, "
                             f"got {block_n}")
        fits = sm90_gqa_max_stages(head_dim_k, block_n, paged)
        if fits < 2:
            raise ValueError(f"block_n: two sm90_gqa stages of {block_n} x {head_dim_k} do not "
                             f"fit {SM90_SMEM_BYTES} bytes of shared memory")
        if num_stages is not None and not 2 <= num_stages <= fits:
            raise ValueError(f"num_stages: the sm90_gqa kernel fits 2..{fits} stages of "
                             f"{block_n} x {head_dim_k}, got {num_stages}")
        num_sms = sm_count(device)
        filled = num_sms <= 2 * batch * num_kv_heads < 4 * num_sms
        num_stages = num_stages or min(
            SM90_GQA_NUM_STAGES_FILLED if filled else SM90_GQA_NUM_STAGES, fits)
        if num_kv_splits is None:
            resident = SM90_SMEM_BYTES // sm90_gqa_smem_bytes(head_dim_k, block_n, num_stages,
                                                              paged)
            num_kv_splits = choose_num_kv_splits(batch, num_kv_heads, 1, capacity, num_sms,
                                                 per_sm=1 if filled else resident)
        if not 1 <= num_kv_splits <= MAX_KV_SPLITS:
            raise ValueError(f"num_kv_splits: expected 1..{MAX_KV_SPLITS}, got {num_kv_splits}")
        return DecodeConfig(sm90_gqa.BLOCK_H, block_n, sm90_gqa.NUM_WARPS, num_stages,
                            num_kv_splits, merge_chunk or MERGE_CHUNK,
                            merge_width(num_kv_splits), merge_warps or MERGE_WARPS,
                            kernel="sm90_gqa")
    wide = head_dim_k > WIDE_HEAD_DIM
    if block_h is None:
        block_h = min(max(next_pow2(group_size), MIN_BLOCK_H), MAX_BLOCK_H)
    if block_h < MIN_BLOCK_H or block_h & (block_h - 1):
        raise ValueError(f"block_h: expected a power of two >= {MIN_BLOCK_H}, got {block_h}")
    head_tiles = cdiv(group_size, block_h)
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(batch, num_kv_heads, head_tiles, capacity,
                                             sm_count(device), wide)
    if not 1 <= num_kv_splits <= MAX_KV_SPLITS:
        raise ValueError(f"num_kv_splits: expected 1..{MAX_KV_SPLITS}, got {num_kv_splits}")
    many = num_kv_splits >= MANY_SPLITS
    if wide:
        big = many or block_h >= MAX_BLOCK_H
        default_n, default_warps, default_stages = (64, 8, 2) if big else (32, 4, 2)
    else:
        # static caches (one contiguous region per sequence and head) stream better in
        # wider blocks: B=16 ctx 32k 711 us at 128 vs 793 us at 64 (paged: 64 wins); with
        # many short splits a 128 block leaves one load per program, nothing to pipeline
        # (B=1 ctx 8k, 66 splits: static at 128 19.7 us, paged at 64 14.7 us)
        wide_block = not paged and not many
        default_n, default_warps, default_stages = (128, 4, 3) if wide_block else (64, 4, 3)
    return DecodeConfig(block_h, block_n or default_n, num_warps or default_warps,
                        num_stages or default_stages, num_kv_splits,
                        merge_chunk or MERGE_CHUNK, merge_width(num_kv_splits),
                        merge_warps or MERGE_WARPS)


# ------------------------------------------------------------------ launcher
_STAGE1 = Launcher(_grouped_decode_stage1)
_STAGE2 = Launcher(_grouped_decode_stage2)
_STAGE1_SM90 = (Launcher(sm90.mla_decode_sm90_stage1, maxnreg=sm90.MAX_REGS)
                if sm90.HAVE_GLUON else None)
_STAGE1_SM90_GQA = Launcher(sm90_gqa.gqa_decode_sm90_stage1) if sm90_gqa.HAVE_GLUON else None

def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def grouped_decode_kernel(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, *,
    block_table: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, scale: float, softcap: float = 0.0, window: int = -1,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    v_head_dim: int | None = None,
    config: DecodeConfig | None = None, **overrides: int,
) -> tuple[torch.Tensor, torch.Tensor, DecodeConfig]:
    """Launch the kernel on validated inputs (see ``attnfuse.custom_ops.grouped_decode``).

    Returns ``(out (B, Hq, Dv) in q.dtype, lse (B, Hq) fp32, config used)``.
    ``overrides`` (``num_kv_splits``, ``block_h``, ``block_n``, ``num_warps``,
    ``num_stages``) force settings for tests and tuning.
    """
    q = _last_dim_contiguous(q)
    k_cache = _last_dim_contiguous(k_cache)
    if v_cache is not None:
        v_cache = _last_dim_contiguous(v_cache)
    mask_is_bool = mask is not None and mask.dtype == torch.bool
    if mask_is_bool:
        mask = mask.view(torch.uint8)
    device = q.device

    def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    out, lse, config, launches = plan_grouped_decode(
        q, k_cache, v_cache, block_table=block_table, seq_lens=seq_lens, mask=mask,
        mask_is_bool=mask_is_bool, scale=scale,
        softcap=softcap, window=window, k_scale=k_scale, v_scale=v_scale,
        v_head_dim=v_head_dim, empty=empty, config=config, **overrides)
    for launch in launches:
        launch()
    return out, lse, config


def call_settings(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                  block_table: torch.Tensor | None, mask: torch.Tensor | None, softcap: float,
                  window: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                  v_head_dim: int | None, **overrides: int) -> DecodeConfig:
    """``decode_settings`` for one call's tensors (real or fake): which stage-1 kernel
    runs it (``kernel``) and its launch settings."""
    paged = block_table is not None
    batch, num_q_heads, head_dim_k = q.shape
    if paged:
        num_kv_heads, capacity = k_cache.shape[2], block_table.shape[1] * k_cache.shape[1]
    else:
        num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    return decode_settings(
        batch=batch, num_kv_heads=num_kv_heads, group_size=num_q_heads // num_kv_heads,
        head_dim_k=head_dim_k, capacity=capacity, device=q.device, paged=paged,
        sm90_eligible=sm90.supports(q, k_cache, v_cache, block_table, mask, softcap, window,
                                    k_scale, v_scale, v_head_dim),
        sm90_gqa_eligible=sm90_gqa.supports(q, k_cache, v_cache, block_table, mask, softcap,
                                            window, k_scale, v_scale),
        head_dim_v=v_head_dim if v_cache is None else v_cache.shape[-1], **overrides)


def plan_grouped_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, *,
    block_table: torch.Tensor | None, seq_lens: torch.Tensor | None,
    mask: torch.Tensor | None, mask_is_bool: bool, scale: float, softcap: float, window: int,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, v_head_dim: int | None,
    empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
    config: DecodeConfig | None = None, **overrides: int,
) -> tuple[torch.Tensor, torch.Tensor, DecodeConfig, list[KernelLaunch]]:
    """Outputs, settings and the kernel launches of one call, without launching.

    Inputs must have a contiguous last dim and a bool mask must come as its uint8 view
    (``mask_is_bool``). Every buffer, scratch included, comes from ``empty(shape,
    dtype)`` (contiguous): real tensors for a call, fake ones when the launches are put
    into a compiled graph (``attnfuse.passes.inline_kernels``).
    """
    paged = block_table is not None
    shared_kv = v_cache is None
    batch, num_q_heads, head_dim_k = q.shape
    if paged:
        page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        capacity = block_table.shape[1] * page_size
    else:
        page_size, num_kv_heads, capacity = 1, k_cache.shape[1], k_cache.shape[2]
    group_size = num_q_heads // num_kv_heads
    head_dv = v_head_dim if shared_kv else v_cache.shape[-1]
    if config is None:
        config = call_settings(q, k_cache, v_cache, block_table, mask, softcap, window,
                               k_scale, v_scale, v_head_dim, **overrides)
    v = k_cache if shared_kv else v_cache
    # K splits into the part multiplied with V's columns (shared-latent mode) and a tail
    head_da = head_dv if shared_kv else head_dim_k
    head_dt = head_dim_k - head_da
    block_da = next_pow2(head_da)
    block_dt = next_pow2(head_dt) if head_dt else 0
    block_dv = block_da if shared_kv else next_pow2(head_dv)
    if head_dt:
        block_dt = max(block_dt, MIN_BLOCK_H)  # tl.dot's minimum inner size

    if paged:
        k0, k1, kh = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
        v0, v1, vh = v.stride(0), v.stride(1), v.stride(2)
    else:
        k0, k1, kh = k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)
        v0, v1, vh = v.stride(0), v.stride(2), v.stride(1)

    out = empty((batch, num_q_heads, head_dv), q.dtype)
    lse = empty((batch, num_q_heads), torch.float32)
    has_mask = mask is not None
    if has_mask:
        stride_mb = 0 if mask.shape[0] == 1 else mask.stride(0)
        stride_ms = mask.stride(1)
    else:
        mask, stride_mb, stride_ms = q, 0, 0  # never read
    needs_int = not paged or seq_lens is None
    dummy_int = empty((1,), torch.int32) if needs_int else None  # never read
    splits = config.num_kv_splits
    if splits > 1:
        # uninitialized on purpose: stage 2 reads only what stage 1 wrote
        partial_out = empty((batch, num_q_heads, splits, head_dv), torch.float32)
        partial_lse = empty((batch, num_q_heads, splits), torch.float32)
    else:
        partial_out, partial_lse = out, lse  # never written
    tiles_per_group = cdiv(group_size, config.block_h)
    has_window = window is not None and window >= 0

    if config.kernel == "sm90":
        stage1 = KernelLaunch(
            _STAGE1_SM90,
            (tiles_per_group, batch, splits),
            (q, k_cache, block_table if paged else dummy_int,
             seq_lens if seq_lens is not None else dummy_int,
             partial_out, partial_lse, out, lse,
             scale, capacity, group_size, q.stride(0), q.stride(1), k0, k1,
             block_table.stride(0) if paged else 0,
             partial_out.stride(0), partial_out.stride(1),
             partial_out.stride(2) if splits > 1 else 0,
             partial_lse.stride(0), partial_lse.stride(1),
             out.stride(0), out.stride(1), lse.stride(0), lse.stride(1)),
            dict(HEAD_DA=head_da, HEAD_DT=head_dt, BLOCK_H=config.block_h,
                 BLOCK_N=config.block_n, NUM_STAGES=config.num_stages, NUM_SPLITS=splits,
                 PAGE_SIZE=page_size, PAGED=paged, HAS_SEQLENS=seq_lens is not None),
            num_warps=config.num_warps, num_stages=config.num_stages,
            writes=(4, 5) if splits > 1 else (6, 7),
        )
    elif config.kernel == "sm90_gqa":
        stage1 = KernelLaunch(
            _STAGE1_SM90_GQA,
            (num_kv_heads, batch, splits),
            (q, k_cache, v, block_table if paged else dummy_int,
             seq_lens if seq_lens is not None else dummy_int,
             partial_out, partial_lse, out, lse,
             scale, capacity, group_size, q.stride(0), q.stride(1), k0, k1, kh, v0, v1, vh,
             block_table.stride(0) if paged else 0,
             partial_out.stride(0), partial_out.stride(1),
             partial_out.stride(2) if splits > 1 else 0,
             partial_lse.stride(0), partial_lse.stride(1),
             out.stride(0), out.stride(1), lse.stride(0), lse.stride(1)),
            dict(HEAD_D=head_dim_k, BLOCK_H=config.block_h, BLOCK_N=config.block_n,
                 NUM_STAGES=config.num_stages, NUM_SPLITS=splits, PAGE_SIZE=page_size,
                 PAGED=paged, HAS_SEQLENS=seq_lens is not None,
                 SAME_KV_ROWS=(k0, k1) == (v0, v1)),
            num_warps=config.num_warps, num_stages=config.num_stages,
            writes=(5, 6) if splits > 1 else (7, 8),
        )
    else:
        stage1 = KernelLaunch(
            _STAGE1,
            (batch, num_kv_heads * tiles_per_group, splits),
            (q, k_cache, v, block_table if paged else dummy_int,
             seq_lens if seq_lens is not None else dummy_int, mask,
             k_scale if k_scale is not None else lse, v_scale if v_scale is not None else lse,
             partial_out, partial_lse, out, lse,
             scale, softcap, window if has_window else 0, capacity, group_size,
             tiles_per_group,
             q.stride(0), q.stride(1),
             k0, k1, kh, v0, v1, vh,
             block_table.stride(0) if paged else 0, stride_mb, stride_ms,
             partial_out.stride(0), partial_out.stride(1), partial_out.stride(2) if splits > 1 else 0,
             partial_lse.stride(0), partial_lse.stride(1),
             out.stride(0), out.stride(1), lse.stride(0), lse.stride(1)),
            dict(HEAD_DA=head_da, HEAD_DT=head_dt, HEAD_DV=head_dv,
                 BLOCK_DA=block_da, BLOCK_DT=block_dt, BLOCK_DV=block_dv,
                 BLOCK_H=config.block_h, BLOCK_N=config.block_n, NUM_SPLITS=splits,
                 PAGE_SIZE=page_size, PAGED=paged, SHARED_KV=shared_kv,
                 HAS_SEQLENS=seq_lens is not None, HAS_MASK=has_mask, MASK_IS_BOOL=mask_is_bool,
                 HAS_SOFTCAP=softcap > 0.0, HAS_WINDOW=has_window,
                 HAS_K_SCALE=k_scale is not None, HAS_V_SCALE=v_scale is not None),
            num_warps=config.num_warps, num_stages=config.num_stages,
            # (partial_out, partial_lse) with splits to merge, else (out, lse)
            writes=(8, 9) if splits > 1 else (10, 11),
        )
    if splits == 1:
        return out, lse, config, [stage1]
    merge_dv = min(block_dv, config.merge_dv)
    stage2 = KernelLaunch(
        _STAGE2,
        (batch, num_q_heads, cdiv(head_dv, merge_dv)),
        (partial_out, partial_lse, seq_lens if seq_lens is not None else dummy_int, out, lse,
         capacity, window if has_window else 0,
         partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
         partial_lse.stride(0), partial_lse.stride(1),
         out.stride(0), out.stride(1), lse.stride(0), lse.stride(1)),
        dict(HEAD_DV=head_dv, BLOCK_DV=merge_dv, NUM_SPLITS=splits,
             BLOCK_S=min(max(next_pow2(splits), 2), config.merge_chunk),
             SPLIT_ALIGN=config.block_n,
             HAS_SEQLENS=seq_lens is not None, HAS_WINDOW=has_window),
        num_warps=config.merge_warps, num_stages=3, writes=(3, 4),  # out, lse
    )
    return out, lse, config, [stage1, stage2]
