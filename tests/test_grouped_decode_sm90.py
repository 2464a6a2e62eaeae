"""The SM90 Gluon MLA stage 1 (``custom_ops/kernels/mla_decode_sm90.py``).

GPU tests (skipped elsewhere; run on the device with ``pytest -m gpu``) compare it with a
float64 reference on fresh random data: 16, 128 and partial 64-head tiles, ragged lengths
with 0 and 1, poisoned page tails, page sizes 1, 16 and 64, static caches, fp16, forced
split counts. The CPU tests cover which calls take it and the errors of forcing it or
its tile shape.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.custom_ops.grouped_decode import reference
from attnfuse.custom_ops.kernels import mla_decode_sm90 as sm90
from attnfuse.custom_ops.kernels._gluon_sm90 import aligned
from attnfuse.custom_ops.kernels.grouped_decode import decode_settings, grouped_decode_kernel

CKV, KPE = 512, 64
D = CKV + KPE
#: bf16 output rounding plus bf16 P in the second product (fp32 accumulation)
TOL = {"atol": 2e-2, "rtol": 2e-2}


def _on_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not (_on_sm90() and sm90.HAVE_GLUON), reason="needs an SM90 GPU")]


def _paged(batch, heads, capacity, page, dtype, poison_from=None):
    pages = -(-capacity // page)
    num_pages = batch * pages + 3
    kv = torch.randn(num_pages, page, 1, D, device="cuda", dtype=dtype)
    table = torch.randperm(num_pages, device="cuda", dtype=torch.int32)[: batch * pages]
    table = table.view(batch, pages)
    q = torch.randn(batch, heads, D, device="cuda", dtype=dtype)
    if poison_from is not None:  # rows past every length hold NaN: never to be read
        for pos in range(poison_from, pages * page):
            kv[table[:, pos // page].long(), pos % page] = float("nan")
    return q, kv, table


def _check(q, kv, table, lens, scale=0.1, **over):
    out, lse, cfg = grouped_decode_kernel(q, kv, None, block_table=table, seq_lens=lens,
                                          scale=scale, v_head_dim=CKV, **over)
    assert cfg.kernel == "sm90"
    kv_ref = torch.nan_to_num(kv.double(), nan=0.0) if table is not None else kv.double()
    ref_out, ref_lse = reference(q.double(), kv_ref, None, table, lens, None, scale, 0.0, -1,
                                 None, None, CKV)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-3, rtol=1e-3)
    assert (lse[~finite] == float("-inf")).all()
    return out, lse, cfg


@pytest.mark.parametrize("heads", [16, 128, 40, 65])
@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize("splits", [None, 1, 5])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_paged_ragged_against_float64(heads, page, splits, mark):
    torch.manual_seed(heads * 100 + page)
    capacity = 700  # page tails at every page size but 1
    lens = torch.tensor([capacity - 3, 0, 1, 333], device="cuda", dtype=torch.int32)
    q, kv, table = _paged(4, heads, capacity, page, torch.bfloat16, poison_from=capacity - 3)
    over = {} if splits is None else {"num_kv_splits": splits}
    _check(q, kv, table, lens, **over)


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_static_cache(heads, mark):
    torch.manual_seed(heads)
    batch, capacity = 3, 513
    q = torch.randn(batch, heads, D, device="cuda", dtype=torch.float16)
    kv = torch.randn(batch, 1, capacity, D, device="cuda", dtype=torch.float16)
    lens = torch.tensor([513, 64, 65], device="cuda", dtype=torch.int32)
    for splits in (1, 3, 9):
        _check(q, kv, None, lens, num_kv_splits=splits)
    # no lengths: the whole static cache
    out, lse, _ = grouped_decode_kernel(q, kv, None, scale=0.1, v_head_dim=CKV)
    ref_out, _ = reference(q.double(), kv.double(), None, None, None, None, 0.1, 0.0, -1, None,
                           None, CKV)
    torch.testing.assert_close(out.double(), ref_out, **TOL)


@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_split_counts_agree_with_the_triton_kernel(mark):
    torch.manual_seed(7)
    q, kv, table = _paged(2, 128, 4096, 64, torch.bfloat16)
    lens = torch.tensor([4096, 2500], device="cuda", dtype=torch.int32)
    outs = [_check(q, kv, table, lens, num_kv_splits=s)[0] for s in (1, 2, 7, 64)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-2, rtol=2e-2)
    triton_out = grouped_decode_kernel(q, kv, None, block_table=table, seq_lens=lens, scale=0.1,
                                       v_head_dim=CKV, kernel="triton")[0]
    torch.testing.assert_close(outs[0], triton_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch", [sm90.MAX_BATCH, sm90.MAX_BATCH + 1])
@pytest.mark.gpu
@pytest.mark.skipif(not (_on_sm90() and sm90.HAVE_GLUON), reason="needs an SM90 GPU")
def test_batch_past_the_grid_limit_is_left_to_triton(batch):
    # the batch is the grid's second dimension; expanded views: nothing is allocated
    q = torch.randn(1, 16, D, device="cuda", dtype=torch.bfloat16).expand(batch, 16, D)
    kv = torch.randn(1, 64, 1, D, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(1, 1, device="cuda", dtype=torch.int32).expand(batch, 1)
    takes_it = sm90.supports(q, kv, None, table, None, 0.0, -1, None, None, CKV)
    assert takes_it == (batch <= sm90.MAX_BATCH)


# ------------------------------------------------------------------ CPU: which calls take it
def test_cpu_calls_never_take_it():
    q = torch.randn(2, 16, D, dtype=torch.float16)
    kv = torch.randn(2, 1, 64, D, dtype=torch.float16)
    assert not sm90.supports(q, kv, None, None, None, 0.0, -1, None, None, CKV)


def test_forcing_it_where_it_cannot_run_is_an_error():
    with pytest.raises(ValueError, match="kernel='sm90' needs"):
        decode_settings(batch=1, num_kv_heads=1, group_size=16, head_dim_k=D, capacity=64,
                        device=torch.device("cpu"), kernel="sm90")
    with pytest.raises(ValueError, match="expected 'triton', 'sm90' or 'sm90_gqa'"):
        decode_settings(batch=1, num_kv_heads=1, group_size=16, head_dim_k=D, capacity=64,
                        device=torch.device("cpu"), kernel="cuda")
    with pytest.raises(ValueError, match="64 heads per program"):
        decode_settings(batch=1, num_kv_heads=1, group_size=16, head_dim_k=D, capacity=64,
                        device=torch.device("cpu"), sm90_eligible=True, block_h=16)
    for over in ({"block_n": 32}, {"num_stages": 3}):
        with pytest.raises(ValueError, match="2 tiles of 64 keys in flight"):
            decode_settings(batch=1, num_kv_heads=1, group_size=16, head_dim_k=D, capacity=64,
                            device=torch.device("cpu"), sm90_eligible=True, **over)


def test_eligible_settings():
    cfg = decode_settings(batch=1, num_kv_heads=1, group_size=128, head_dim_k=D, capacity=32768,
                          device=torch.device("cpu"), sm90_eligible=True)
    assert (cfg.kernel, cfg.block_h, cfg.block_n, cfg.num_stages, cfg.num_warps) == (
        "sm90", 64, 64, 2, 4)
    assert cfg.num_kv_splits > 1  # 2 programs cannot fill the GPU
    cfg = decode_settings(batch=1, num_kv_heads=1, group_size=128, head_dim_k=D, capacity=32768,
                          device=torch.device("cpu"), sm90_eligible=True, kernel="triton")
    assert cfg.kernel == "triton"


def test_alignment_rule():
    flat = torch.zeros(4 * 16 * D + 16, dtype=torch.bfloat16)
    base = flat[: 4 * 16 * D].view(4, 16, D)
    assert aligned(base, (base.stride(0), base.stride(1)))
    shifted = flat[8:8 + 4 * 16 * D].view(4, 16, D)  # 16 bytes in: still aligned
    assert aligned(shifted, (shifted.stride(0), shifted.stride(1)))
    odd = flat[1:1 + 4 * 16 * D].view(4, 16, D)
    assert not aligned(odd, (odd.stride(0), odd.stride(1)))
    assert not aligned(base, (584, 16))  # a row stride Triton does not specialize
