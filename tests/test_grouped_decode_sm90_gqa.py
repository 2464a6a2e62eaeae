"""The SM90 Gluon GQA stage 1 (``custom_ops/kernels/gqa_decode_sm90.py``).

GPU tests (skipped elsewhere; run on the device with ``pytest -m gpu``) compare it with a
float64 reference on fresh random data: group sizes 1, 4, 8 and 64 (MQA), head dims 64,
128 and 256, ragged lengths with 0 and 1, static caches and paged ones (page sizes 1, 16
and 64, poisoned page tails), fp16, forced split counts and tile shapes. The CPU tests
cover which calls take it, its settings and the errors of forcing it.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse.custom_ops.grouped_decode import reference
from attnfuse.custom_ops.kernels import gqa_decode_sm90 as sm90_gqa
from attnfuse.custom_ops.kernels import grouped_decode as gd
from attnfuse.custom_ops.kernels.grouped_decode import decode_settings, grouped_decode_kernel

#: bf16 output rounding plus bf16 P in the second product (fp32 accumulation)
TOL = {"atol": 2e-2, "rtol": 2e-2}
CPU = torch.device("cpu")


def _on_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not (_on_sm90() and sm90_gqa.HAVE_GLUON), reason="needs an SM90 GPU")]


def _check(q, k, v, table, lens, scale, **over):
    out, lse, cfg = grouped_decode_kernel(q, k, v, block_table=table, seq_lens=lens,
                                          scale=scale, kernel="sm90_gqa", **over)
    assert cfg.kernel == "sm90_gqa"
    clean = (lambda t: torch.nan_to_num(t.double(), nan=0.0)) if table is not None else (
        lambda t: t.double())
    ref_out, ref_lse = reference(q.double(), clean(k), clean(v), table, lens, None, scale, 0.0,
                                 -1, None, None, -1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-3, rtol=1e-3)
    assert (lse[~finite] == float("-inf")).all()
    return out, lse, cfg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (8, 8, 64), (16, 1, 256), (64, 1, 128),
                                      (28, 4, 128)])
@pytest.mark.parametrize("splits", [None, 1, 5])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_static_against_float64(hq, hkv, d, splits, dtype, mark):
    torch.manual_seed(hq + d + (splits or 0))
    b, cap = 5, 700
    q = torch.randn(b, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, cap, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.tensor([0, 1, 64, 333, 700], device="cuda", dtype=torch.int32)
    over = {} if splits is None else {"num_kv_splits": splits}
    out, lse, _ = _check(q, k, v, None, lens, d ** -0.5, **over)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()


@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize("block_n,stages", [(64, 3), (32, 2), (128, 2)])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_paged_with_poisoned_tails(page, block_n, stages, mark):
    """Paged caches: rows past every length hold NaN and must never be read; the page ids
    go through their own shared-memory ring (1, 16 and 64 pages per tile and less)."""
    torch.manual_seed(page + block_n)
    b, hq, hkv, d, cap = 4, 32, 8, 128, 640
    pages = cap // page
    k = torch.randn(b * pages + 3, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.randperm(b * pages + 3, device="cuda", dtype=torch.int32)[: b * pages]
    table = table.view(b, pages)
    lens = torch.tensor([0, 1, 300, 640], device="cuda", dtype=torch.int32)
    for i in range(b):
        for pos in range(int(lens[i]), cap):
            blk = table[i, pos // page].long()
            k[blk, pos % page] = float("nan")
            v[blk, pos % page] = float("nan")
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    for splits in (1, 3):
        _check(q, k, v, table, lens, 0.1, block_n=block_n, num_stages=stages,
               num_kv_splits=splits)


@pytest.mark.parametrize("d,block_n,stages", [(64, 16, 4), (64, 256, 2), (256, 64, 2),
                                               (128, 16, 3)])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_paged_tile_shapes(d, block_n, stages, mark):
    """Paged caches at the other head dims and at the smallest and largest tiles: the
    page-id ring's copies cover 16 to 256 positions, fewer or more than the 128 threads."""
    torch.manual_seed(d + block_n)
    b, hq, hkv, cap, page = 3, 16, 4, 512, 16
    k = torch.randn(b * cap // page, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.randperm(b * cap // page, device="cuda", dtype=torch.int32).view(b, -1)
    lens = torch.tensor([5, 300, 512], device="cuda", dtype=torch.int32)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    for splits in (1, 2):
        _check(q, k, v, table, lens, d ** -0.5, block_n=block_n, num_stages=stages,
               num_kv_splits=splits)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_distinct_kv_strides(paged, mark):
    """V's rows strided unlike K's (V a view into a wider buffer): the kernel computes
    V's row offsets separately instead of reusing K's."""
    torch.manual_seed(paged)
    b, hq, hkv, d, cap, page = 3, 32, 8, 128, 448, 16
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([1, 200, 448], device="cuda", dtype=torch.int32)
    if paged:
        k = torch.randn(b * cap // page, page, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b * cap // page, page, hkv, 2 * d, device="cuda",
                        dtype=torch.bfloat16)[..., d:]
        table = torch.randperm(b * cap // page, device="cuda", dtype=torch.int32).view(b, -1)
    else:
        k = torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, hkv, cap, 2 * d, device="cuda", dtype=torch.bfloat16)[..., :d]
        table = None
    assert k.stride() != v.stride()
    for splits in (1, 4):
        _check(q, k, v, table, lens, d ** -0.5, num_kv_splits=splits)


@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu)])
def test_default_takes_it_for_static_and_paged_caches(mark):
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
    assert grouped_decode_kernel(q, k, k, scale=0.1)[2].kernel == "sm90_gqa"
    kp = k.transpose(1, 2).contiguous()  # (blocks=2, page=256, Hkv, D)
    table = torch.arange(2, device="cuda", dtype=torch.int32).view(2, 1)
    assert grouped_decode_kernel(q, kp, kp, block_table=table, scale=0.1)[2].kernel == "sm90_gqa"
    assert grouped_decode_kernel(q, kp, kp, block_table=table, scale=0.1,
                                 kernel="triton")[2].kernel == "triton"
    # a mask, softcap, window or fp8 scale keeps the Triton stage 1
    mask = torch.ones(2, 256, device="cuda", dtype=torch.bool)
    assert grouped_decode_kernel(q, k, k, mask=mask, scale=0.1)[2].kernel == "triton"
    assert grouped_decode_kernel(q, k, k, scale=0.1, softcap=5.0)[2].kernel == "triton"


# ------------------------------------------------------------------ CPU: which calls take it
def _settings(**kw):
    args = dict(batch=16, num_kv_heads=8, group_size=4, head_dim_k=128, capacity=1024,
                device=CPU, paged=False, sm90_gqa_eligible=True)
    return decode_settings(**{**args, **kw})


def test_cpu_calls_never_take_it():
    q = torch.randn(2, 32, 128, dtype=torch.bfloat16)
    k = torch.randn(2, 8, 64, 128, dtype=torch.bfloat16)
    assert not sm90_gqa.supports(q, k, k, None, None, 0.0, -1, None, None)


def test_settings_follow_the_measured_rule(monkeypatch):
    monkeypatch.setattr(gd, "sm_count", lambda device: 132)
    # B x Hkv = 128 programs, between half and twice the SMs: 3 stages, one program per SM
    cfg = _settings()
    assert (cfg.kernel, cfg.block_n, cfg.num_stages, cfg.num_kv_splits) == ("sm90_gqa", 64, 3, 1)
    # 8 programs: 2 stages (two programs per SM at head dim 128), splits to fill the GPU
    cfg = _settings(batch=1, capacity=8192)
    assert (cfg.num_stages, cfg.num_kv_splits) == (2, 33)
    # 512 programs already fill it
    cfg = _settings(batch=64)
    assert (cfg.num_stages, cfg.num_kv_splits) == (2, 1)
    # head dim 256: 3 stages do not fit, 2 do
    assert _settings(head_dim_k=256).num_stages == 2
    # paged caches take it too (same rule), unless the Triton stage 1 is forced
    cfg = _settings(paged=True)
    assert (cfg.kernel, cfg.num_stages, cfg.num_kv_splits) == ("sm90_gqa", 3, 1)
    assert _settings(paged=True, kernel="triton").kernel == "triton"
    assert _settings(kernel="triton").kernel == "triton"


def test_forcing_it_wrongly_is_an_error():
    with pytest.raises(ValueError, match="kernel='sm90_gqa' needs"):
        _settings(sm90_gqa_eligible=False, kernel="sm90_gqa")
    with pytest.raises(ValueError, match="64 heads per program"):
        _settings(block_h=16)
    with pytest.raises(ValueError, match="fits 2..2 stages"):
        _settings(head_dim_k=256, num_stages=3)
    with pytest.raises(ValueError, match="block_n: expected a power of two"):
        _settings(block_n=48)
    with pytest.raises(ValueError, match="do not fit"):
        _settings(head_dim_k=256, block_n=256)


def test_smem_budget_matches_the_compiled_kernel():
    """The launcher's shared-memory arithmetic is the kernel's allocation (compiled for
    sm_90 with Triton 3.6: 155,648 bytes at head dim 128, 64 keys, 4 stages on a static
    cache; 123,648 with 3 stages on a paged one, whose page-id ring adds 3 x 256)."""
    assert gd.sm90_gqa_smem_bytes(128, 64, 4, paged=False) == 155_648
    assert gd.sm90_gqa_smem_bytes(128, 64, 3, paged=True) == 123_648
    assert gd.sm90_gqa_max_stages(128, 64) == 6
    assert gd.sm90_gqa_max_stages(256, 64) == 2
