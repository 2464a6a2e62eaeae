"""The split-KV grouped decode kernel (interpreted on CPU) against a float64 reference.

Shapes are tiny on purpose: every launch is interpreted. The interpreter computes
``tl.dot`` on bf16 operands wrongly, so these tests use fp16 and fp32; bf16 is checked
on the GPU by ``benchmarks/bench_decode.py``.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.custom_ops.grouped_decode import reference
from attnfuse.custom_ops.kernels import grouped_decode as kernel_module
from attnfuse.custom_ops.kernels.grouped_decode import (
    AUTO_MAX_KV_SPLITS,
    MERGE_DV_CHUNK,
    choose_merge_dv,
    choose_num_kv_splits,
    decode_settings,
    grouped_decode_kernel,
)

#: fp16 inputs, fp32 accumulation: output error is dominated by the fp16 output rounding
FP16_TOL = dict(atol=2e-3, rtol=2e-3)
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
#: the smallest KV block the kernel accepts (tl.dot's minimum): keeps interpreted loops short
SMALL_BLOCK_N = 16


def _reference64(q, k_cache, v_cache, *, block_table=None, seq_lens=None, mask=None, scale,
                 softcap=0.0, window=-1, k_scale=None, v_scale=None, v_head_dim=-1):
    """The op's reference evaluated in float64 (fp8 caches are upcast exactly)."""
    def up(t):
        return None if t is None else t.double()

    out, lse = reference(up(q), up(k_cache), up(v_cache), block_table, seq_lens,
                         mask if mask is None or mask.dtype == torch.bool else mask.double(),
                         scale, softcap, window, up(k_scale), up(v_scale), v_head_dim)
    return out, lse


def _check(out, lse, ref_out, ref_lse, tol):
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    torch.testing.assert_close(out.double(), ref_out, **tol)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse.double()[finite], atol=1e-4, rtol=1e-4)
    assert (lse[~finite] == float("-inf")).all()


def _static(batch, hq, hkv, cap, d, dtype, dv=None):
    q = torch.randn(batch, hq, d, dtype=dtype)
    k = torch.randn(batch, hkv, cap, d, dtype=dtype)
    v = torch.randn(batch, hkv, cap, dv or d, dtype=dtype)
    return q, k, v


# --------------------------------------------------------------- group sizes, static
@pytest.mark.parametrize(
    "hq,hkv",
    [
        (4, 4),   # group 1 (MHA): heads padded to the 16-row tile
        (8, 2),   # group 4
        (16, 2),  # group 8
        (8, 1),   # MQA
    ],
)
def test_static_group_sizes_ragged(hq, hkv):
    torch.manual_seed(hq * 10 + hkv)
    q, k, v = _static(4, hq, hkv, 40, 32, torch.float16)
    lens = torch.tensor([0, 1, 23, 40], dtype=torch.int32)
    out, lse, cfg = grouped_decode_kernel(q, k, v, seq_lens=lens, scale=0.3, num_kv_splits=3,
                                          block_n=SMALL_BLOCK_N)
    _check(out, lse, *_reference64(q, k, v, seq_lens=lens, scale=0.3), FP16_TOL)
    assert cfg.num_kv_splits == 3
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


def test_mha_group_larger_than_tile():
    """A group wider than one head tile (BLOCK_H=16): several tiles per KV head."""
    torch.manual_seed(1)
    q, k, v = _static(2, 32, 1, 24, 16, torch.float32)
    out, lse, _ = grouped_decode_kernel(q, k, v, scale=0.25, num_kv_splits=2, block_h=16,
                                        block_n=SMALL_BLOCK_N)
    _check(out, lse, *_reference64(q, k, v, scale=0.25), FP32_TOL)


# --------------------------------------------------------------- paged
@pytest.mark.parametrize("page", [1, 16, 64])
def test_paged_page_sizes_with_poisoned_tails(page):
    torch.manual_seed(page)
    batch, hq, hkv, d = 3, 8, 2, 32
    lens = torch.tensor([1, 0, 70], dtype=torch.int32)
    blocks_per_seq = -(-70 // page)
    num_blocks = batch * blocks_per_seq + 1
    k = torch.randn(num_blocks, page, hkv, d, dtype=torch.float16)
    v = torch.randn(num_blocks, page, hkv, d, dtype=torch.float16)
    table = (torch.randperm(num_blocks - 1)[: batch * blocks_per_seq] + 1).view(batch, -1).int()
    # every slot past a sequence's length holds NaN: masked loads must never let it through
    pos = torch.arange(blocks_per_seq * page)
    for b in range(batch):
        dead = pos >= lens[b]
        blk, slot = table[b, pos[dead] // page].long(), pos[dead] % page
        k[blk, slot] = float("nan")
        v[blk, slot] = float("nan")
    q = torch.randn(batch, hq, d, dtype=torch.float16)
    out, lse, _ = grouped_decode_kernel(q, k, v, block_table=table, seq_lens=lens, scale=0.2,
                                        num_kv_splits=2, block_n=SMALL_BLOCK_N)
    _check(out, lse, *_reference64(q, k, v, block_table=table, seq_lens=lens, scale=0.2), FP16_TOL)


# --------------------------------------------------------------- MLA (shared latent)
@pytest.mark.parametrize("splits", [1, 4])
def test_mla_shared_latent_paged(splits):
    torch.manual_seed(splits)
    batch, hq, dk, dv, page = 2, 16, 576, 512, 16
    lens = torch.tensor([37, 5], dtype=torch.int32)
    kv = (torch.randn(6, page, 1, dk) * 0.3).to(torch.float16)
    table = torch.tensor([[3, 1, 5], [0, 2, 4]], dtype=torch.int32)
    q = torch.randn(batch, hq, dk, dtype=torch.float16)
    out, lse, _ = grouped_decode_kernel(q, kv, None, block_table=table, seq_lens=lens,
                                        scale=dk ** -0.5, v_head_dim=dv, num_kv_splits=splits,
                                        block_n=SMALL_BLOCK_N)
    assert out.shape == (batch, hq, dv)
    _check(out, lse, *_reference64(q, kv, None, block_table=table, seq_lens=lens,
                                   scale=dk ** -0.5, v_head_dim=dv), FP16_TOL)


# --------------------------------------------------------------- masks, softcap, window
def test_masks_bool_additive_and_broadcast():
    torch.manual_seed(3)
    q, k, v = _static(2, 8, 2, 48, 16, torch.float32)
    keep = torch.rand(2, 48) > 0.4
    keep[1] = False  # a fully masked row: zeros and -inf, never NaN
    additive = torch.where(keep, 0.0, float("-inf"))
    finite_min = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:1]  # (1, C), HF eager
    for mask in (keep, additive, finite_min, torch.randn(1, 48)):
        out, lse, _ = grouped_decode_kernel(q, k, v, mask=mask, scale=0.5, num_kv_splits=3,
                                            block_n=SMALL_BLOCK_N)
        _check(out, lse, *_reference64(q, k, v, mask=mask, scale=0.5), FP32_TOL)


def test_softcap_and_window():
    torch.manual_seed(4)
    q, k, v = _static(2, 8, 2, 48, 16, torch.float32)
    q = q * 4  # large logits so that the cap matters
    lens = torch.tensor([45, 6], dtype=torch.int32)
    kw = dict(seq_lens=lens, scale=0.5, softcap=3.0, window=20)
    out, lse, _ = grouped_decode_kernel(q, k, v, num_kv_splits=3, block_n=SMALL_BLOCK_N, **kw)
    _check(out, lse, *_reference64(q, k, v, **kw), FP32_TOL)


# --------------------------------------------------------------- fp8
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_distinct_scales(fp8):
    torch.manual_seed(5)
    q, k, v = _static(2, 8, 2, 40, 32, torch.float16)
    k8, v8 = k.to(fp8), v.to(fp8)
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([3.0])
    out, lse, _ = grouped_decode_kernel(q, k8, v8, scale=0.2, k_scale=k_scale, v_scale=v_scale,
                                        num_kv_splits=2, block_n=SMALL_BLOCK_N)
    ref = _reference64(q, k8, v8, scale=0.2, k_scale=k_scale, v_scale=v_scale)
    _check(out, lse, *ref, dict(atol=6e-3, rtol=2e-3))  # outputs scaled by v_scale=3


# --------------------------------------------------------------- split invariance
def test_forced_split_counts_agree(monkeypatch):
    monkeypatch.setattr(kernel_module, "MERGE_CHUNK", 2)
    torch.manual_seed(6)
    q, k, v = _static(3, 8, 2, 64, 16, torch.float32)
    lens = torch.tensor([64, 17, 0], dtype=torch.int32)
    # up to 5 splits (some empty for the short rows); merging 2 splits per chunk makes
    # stage 2 run its chunk loop several times
    results = [grouped_decode_kernel(q, k, v, seq_lens=lens, scale=0.3, num_kv_splits=s,
                                     block_n=SMALL_BLOCK_N)[:2] for s in (1, 2, 3, 4, 5)]
    ref_out, ref_lse = _reference64(q, k, v, seq_lens=lens, scale=0.3)
    for out, lse in results:
        _check(out, lse, ref_out, ref_lse, FP32_TOL)
        torch.testing.assert_close(out, results[0][0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("merge", [dict(merge_chunk=2, merge_dv=16, merge_warps=1),
                                   dict(merge_chunk=128, merge_dv=32, merge_warps=2)])
def test_merge_shapes_agree(merge):
    # stage 2 merging 2 splits per step over 16-feature slices, or all splits in one step
    torch.manual_seed(12)
    q, k, v = _static(2, 8, 2, 64, 64, torch.float32)
    lens = torch.tensor([64, 0], dtype=torch.int32)
    out, lse, cfg = grouped_decode_kernel(q, k, v, seq_lens=lens, scale=0.3, num_kv_splits=4,
                                          block_n=SMALL_BLOCK_N, **merge)
    assert (cfg.merge_chunk, cfg.merge_dv, cfg.merge_warps) == tuple(merge.values())
    _check(out, lse, *_reference64(q, k, v, seq_lens=lens, scale=0.3), FP32_TOL)
    with pytest.raises(ValueError, match="merge_dv"):
        grouped_decode_kernel(q, k, v, scale=0.3, merge_dv=24)


def test_merge_width_rule():
    # many (batch, head) rows merging few splits: whole rows per stage-2 program
    assert choose_merge_dv(64, 16, 512, 2, 132) == 512     # MLA-16 B=64
    assert choose_merge_dv(16, 128, 512, 4, 132) == 512    # MLA-128 B=16: 8 KB of partials
    assert choose_merge_dv(16, 32, 128, 4, 132) == 128     # GQA B=16
    # capped by the partials one program reads (8 splits x 256 x 4 bytes = 8 KB)
    assert choose_merge_dv(16, 16, 512, 8, 132) == 256
    # batch 1: many splits and a small grid keep the narrow chunks
    assert choose_merge_dv(1, 32, 128, 66, 132) == MERGE_DV_CHUNK
    assert choose_merge_dv(1, 16, 512, 128, 132) == MERGE_DV_CHUNK
    assert choose_merge_dv(1, 32, 128, 16, 132) == MERGE_DV_CHUNK  # 64 programs < 132 SMs
    # never wider than V's (padded) head dim
    assert choose_merge_dv(64, 8, 48, 2, 8) == 64
    # the settings use it unless merge_dv is forced; V's head dim comes from head_dim_v
    cfg = decode_settings(batch=64, num_kv_heads=1, group_size=16, head_dim_k=576,
                          head_dim_v=512, capacity=4096, device=torch.device("cpu"),
                          num_kv_splits=2)
    assert cfg.merge_dv == 512
    cfg = decode_settings(batch=64, num_kv_heads=1, group_size=16, head_dim_k=576,
                          head_dim_v=512, capacity=4096, device=torch.device("cpu"),
                          num_kv_splits=2, merge_dv=32)
    assert cfg.merge_dv == 32


def test_split_rule():
    # small batch, long context: split to fill 132 SMs (four programs each; two if wide)
    assert choose_num_kv_splits(1, 8, 1, 32768, 132) == 66
    assert choose_num_kv_splits(16, 1, 1, 32768, 132, wide=True) == 17
    # capped by what a long context can carry, and by the hard maximum
    assert choose_num_kv_splits(1, 8, 1, 1024, 132) == 1024 // 64
    assert choose_num_kv_splits(1, 1, 1, 1 << 20, 132) == AUTO_MAX_KV_SPLITS
    # unsplit programs numbering half the SMs or more: three programs per SM, not four
    assert choose_num_kv_splits(16, 8, 1, 32768, 132) == 3
    assert choose_num_kv_splits(8, 8, 1, 32768, 132) == 8
    # one program per SM: never past a whole wave (7 x 19 = 133 > 132 programs)
    assert choose_num_kv_splits(7, 1, 1, 32768, 132, per_sm=1) == 18
    assert choose_num_kv_splits(2, 1, 2, 32768, 132, per_sm=1) == 33
    # a batch that already fills the GPU is not split
    assert choose_num_kv_splits(64, 8, 1, 32768, 132) == 1
    assert choose_num_kv_splits(1 << 12, 8, 1, 32768, 132) == 1
