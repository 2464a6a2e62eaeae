"""The direct launch path (``custom_ops.kernels._launch``) on a CUDA GPU.

A repeated call launches the remembered compiled kernel without Triton's argument binder;
these checks make sure it computes what the ordinary launch computes: on fresh data at
every call, when a pointer loses its 16-byte alignment or a stride changes (new keys: new
specializations), and with the direct path switched off.

Skipped without a GPU (CI is CPU-only); run on the device with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, HQ, HKV, S, D = 2, 8, 2, 300, 64
TOL = {"atol": 2e-2, "rtol": 2e-2}


def _decode_args(q, k, v, mask):
    return (q, k, v, None, None, mask, D ** -0.5, 0.0, -1, None, None, -1)


def _check_decode(q, k, v, mask):
    from attnfuse.custom_ops.grouped_decode import reference

    out, lse = torch.ops.attnfuse.grouped_decode(*_decode_args(q, k, v, mask))
    ref_out, ref_lse = reference(*_decode_args(q.double(), k.double(), v.double(), mask))
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse.double(), **TOL)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_repeated_calls_fresh_data(dtype, monkeypatch):
    monkeypatch.setenv("ATTNFUSE_FAST_LAUNCH", "1")
    from attnfuse.custom_ops.kernels import grouped_decode as kmod

    for step in range(4):
        torch.manual_seed(step)
        q = torch.randn(B, HQ, D, device="cuda", dtype=dtype)
        k = torch.randn(B, HKV, S, D, device="cuda", dtype=dtype)
        v = torch.randn(B, HKV, S, D, device="cuda", dtype=dtype)
        mask = torch.rand(B, S, device="cuda") > 0.3
        _check_decode(q, k, v, mask)
    assert kmod._STAGE1._cache, "the direct path remembered no kernel"


def test_alignment_and_strides_change(monkeypatch):
    monkeypatch.setenv("ATTNFUSE_FAST_LAUNCH", "1")
    torch.manual_seed(7)
    base = torch.randn(B * HQ * D + 1, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(B, S, device="cuda", dtype=torch.bool)
    aligned = base[: B * HQ * D].view(B, HQ, D)
    shifted = base[1:].view(B, HQ, D)  # 2-byte offset: not 16-byte aligned
    for q in (aligned, shifted, aligned, shifted):
        _check_decode(q, k, v, mask)
    # a cache with a different S stride (a slice of a longer cache), then the original
    long_k = torch.randn(B, HKV, S + 37, D, device="cuda", dtype=torch.bfloat16)
    long_v = torch.randn_like(long_k)
    for kk, vv in ((long_k[:, :, :S], long_v[:, :, :S]), (k, v), (long_k[:, :, :S], long_v[:, :, :S])):
        _check_decode(aligned, kk, vv, mask)


def test_direct_path_off_matches(monkeypatch):
    torch.manual_seed(3)
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
    args = _decode_args(q, k, v, None)
    monkeypatch.setenv("ATTNFUSE_FAST_LAUNCH", "1")
    torch.ops.attnfuse.grouped_decode(*args)
    fast = torch.ops.attnfuse.grouped_decode(*args)
    monkeypatch.setenv("ATTNFUSE_FAST_LAUNCH", "0")
    slow = torch.ops.attnfuse.grouped_decode(*args)
    torch.testing.assert_close(fast[0], slow[0], atol=0, rtol=0)
    torch.testing.assert_close(fast[1], slow[1], atol=0, rtol=0)


def test_rope_write_kv_repeated(monkeypatch):
    from attnfuse.custom_ops.rope_write_kv import reference

    monkeypatch.setenv("ATTNFUSE_FAST_LAUNCH", "1")
    dt = torch.bfloat16
    kc = torch.randn(B, HKV, S, D, device="cuda", dtype=dt)
    vc = torch.randn(B, HKV, S, D, device="cuda", dtype=dt)
    for step in range(3):
        torch.manual_seed(100 + step)
        q = torch.randn(B, 1, HQ, D, device="cuda", dtype=dt)
        k = torch.randn(B, 1, HKV, D, device="cuda", dtype=dt)
        v = torch.randn(B, 1, HKV, D, device="cuda", dtype=dt)
        cos = torch.randn(B, 1, D, device="cuda", dtype=dt)
        sin = torch.randn(B, 1, D, device="cuda", dtype=dt)
        idx = torch.tensor([[10 + step], [200 + step]], device="cuda")
        args = (q, k, v, cos, sin, None)
        tail = (idx, "static", D, "neox", None, None, False)
        ref_k, ref_v = kc.clone(), vc.clone()
        ref_q, _ = reference(*args, ref_k, ref_v, *tail)
        got_q, _ = torch.ops.attnfuse.rope_write_kv(*args, kc, vc, *tail)
        torch.testing.assert_close(got_q, ref_q, **TOL)
        torch.testing.assert_close(kc, ref_k, **TOL)
        torch.testing.assert_close(vc, ref_v, **TOL)
