"""The MHA form's fused input kernel (``kernels/mla_decompress.py``) under
``TRITON_INTERPRET=1`` (set by conftest) against a float64 reference, and its routing in
``mla_prefill.mha_inputs``."""

import math

import pytest
import torch

from attnfuse.custom_ops import mla_prefill as mp
from attnfuse.custom_ops._dispatch import kernel_on_cpu
from attnfuse.custom_ops.kernels import mla_decompress as md

R, D_NOPE, D_ROPE, D_V = 128, 32, 16, 32


def make(T, H, dtype=torch.bfloat16, seed=0, kv_b_view=True, q_view=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    if q_view:  # q_nope as a slice of the projected q, as DeepSeek code splits it
        q_nope = rnd(T, H, D_NOPE + D_ROPE)[..., :D_NOPE]
    else:
        q_nope = rnd(T, H, D_NOPE)
    q_pe, ckv, k_pe = rnd(T, H, D_ROPE), rnd(T, R), rnd(T, D_ROPE)
    w = rnd(H, D_NOPE + D_V, R, s=1 / math.sqrt(R))  # kv_b_proj as (H, D_nope + D_v, R)
    if kv_b_view:  # strided views of one weight (HF, SGLang)
        w_uk, w_uv = w[:, :D_NOPE], w[:, D_NOPE:].transpose(1, 2)
    else:
        w_uk, w_uv = w[:, :D_NOPE].contiguous(), w[:, D_NOPE:].contiguous().transpose(1, 2)
    return q_nope, q_pe, ckv, k_pe, w_uk, w_uv


def reference(q_nope, q_pe, ckv, k_pe, w_uk, w_uv):
    T, H = q_nope.shape[:2]
    d = [x.double() for x in (q_nope, q_pe, ckv, k_pe, w_uk, w_uv)]
    k_nope = torch.einsum("tr,hdr->thd", d[2], d[4])
    k = torch.cat([k_nope, d[3][:, None, :].expand(T, H, -1)], dim=-1)
    v = torch.einsum("tr,hrd->thd", d[2], d[5])
    return torch.cat([d[0], d[1]], dim=-1), k, v


def check(out, ref, dtype):
    q, k, v = out
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    # q and the RoPE part of K are copies: exact
    assert torch.equal(q.double(), ref[0])
    assert torch.equal(k[..., D_NOPE:].double(), ref[1][..., D_NOPE:])
    # the products: fp32 accumulation, one rounding to the storage dtype
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for got, want in ((k[..., :D_NOPE], ref[1][..., :D_NOPE]), (v, ref[2])):
        torch.testing.assert_close(got.double(), want, atol=tol * 2, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,H", [(1, 2), (70, 3), (129, 1)])
def test_matches_float64_reference(T, H, dtype):
    args = make(T, H, dtype, seed=T + H)
    with kernel_on_cpu():
        assert md.supported(*args)
        out = md.mha_inputs(*args)
    check(out, reference(*args), dtype)


@pytest.mark.parametrize("kv_b_view,q_view", [(False, False), (True, True)])
def test_strided_inputs(kv_b_view, q_view):
    args = make(33, 2, kv_b_view=kv_b_view, q_view=q_view, seed=7)
    with kernel_on_cpu():
        out = md.mha_inputs(*args)
    check(out, reference(*args), torch.bfloat16)


def test_128_token_tiles(monkeypatch):
    """The tile of long calls (128 tokens) with a partial last tile."""
    monkeypatch.setattr(md, "MIN_PROGRAMS", 1)
    assert md.block_t(200, 1) == 128
    args = make(200, 1, seed=3)
    with kernel_on_cpu():
        out = md.mha_inputs(*args)
    check(out, reference(*args), torch.bfloat16)


def test_tile_rule():
    assert md.block_t(128, 16) == 64  # 16 programs of 128 tokens would leave SMs idle
    assert md.block_t(1024, 16) == 128
    assert md.block_t(128, 128) == 128


def test_empty_call():
    args = make(0, 2)
    with kernel_on_cpu():
        q, k, v = md.mha_inputs(*args)
    assert q.shape == (0, 2, D_NOPE + D_ROPE) and k.shape == q.shape and v.shape == (0, 2, D_V)


def test_unsupported_inputs():
    args = make(4, 2)
    assert not md.supported(*args)  # CPU tensors outside kernel_on_cpu
    with kernel_on_cpu():
        assert not md.supported(*(x.float() for x in args))  # fp32
        odd = make(4, 2)
        odd = (odd[0], odd[1][..., :12].contiguous(), odd[2], odd[3][:, :12].contiguous(), *odd[4:])
        assert not md.supported(*odd)  # a RoPE width that is not a power of two


def test_mha_inputs_routing(monkeypatch):
    """``mla_prefill.mha_inputs`` takes the kernel up to FUSED_INPUTS_MAX_TOKEN_HEADS and
    the torch GEMMs beyond; both give the same inputs."""
    args = make(40, 2, seed=11)
    calls = []
    real = md.mha_inputs
    monkeypatch.setattr(md, "mha_inputs", lambda *a: calls.append(1) or real(*a))
    with kernel_on_cpu():
        fused = mp.mha_inputs(*args)
        assert calls == [1]
        monkeypatch.setattr(mp, "FUSED_INPUTS_MAX_TOKEN_HEADS", 79)
        torch_form = mp.mha_inputs(*args)
        assert calls == [1]
    for a, b in zip(fused, torch_form):
        torch.testing.assert_close(a, b, atol=2 ** -6, rtol=2 ** -7)
