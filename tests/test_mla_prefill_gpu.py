"""``attnfuse::mla_prefill`` on a CUDA GPU at DeepSeek-V3 sizes (flashinfer back ends).

The op launches the GPU work that does not need ``cu_seqlens`` (decompression, the W_UK
projection) before it reads the offsets on the host and plans; both forms, forced and
automatic, must still equal the float32 reference, call after call of one layout (the
plan is kept) and after a layout change (planned again). Skipped without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.custom_ops import mla_prefill as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

R, D_ROPE, D_NOPE, D_V = 512, 64, 128, 128
#: bf16 inputs and outputs: 2% of the largest reference value
BF16_REL_TOL = 2e-2


def _inputs(lens, H, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lens)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * s).to(torch.bfloat16)

    w = rnd(H, D_NOPE + D_V, R, s=1 / math.sqrt(R))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return (rnd(T, H, D_NOPE), rnd(T, H, D_ROPE), rnd(T, R), rnd(T, D_ROPE),
            w[:, :D_NOPE].contiguous(), w[:, D_NOPE:].contiguous().transpose(1, 2), cu,
            max(lens), 1 / math.sqrt(D_NOPE + D_ROPE))


@pytest.mark.parametrize("H", [16, 128])
def test_op_forms_match_reference_across_calls_and_layouts(H):
    if mp._flashinfer() is None:
        pytest.skip("flashinfer is not installed")
    for seed, lens in ((1, [1, 37, 262, 100]), (2, [1, 37, 262, 100]), (3, [300, 5])):
        args = _inputs(lens, H, seed)
        ref = mp.mla_prefill_reference(*args, True).float()
        tol = BF16_REL_TOL * max(ref.abs().max().item(), 1.0)
        for path in ("auto", "mha", "absorbed"):
            out = torch.ops.attnfuse.mla_prefill(*args, True, None, False, path)
            err = (out.float() - ref).abs().max().item()
            assert err <= tol, (path, lens, err, tol)


@pytest.mark.parametrize("H", [16, 128])
def test_host_offsets_need_no_sync_and_replan_safely(H):
    """Offsets on the host (a CPU cu_seqlens, or None for equal lengths) let calls queue
    without waiting for the GPU; alternating layouts re-plan the same wrappers, which must
    wait for the old plan's queued runs (else a run would read the next layout's plan)."""
    if mp._flashinfer() is None:
        pytest.skip("flashinfer is not installed")
    layouts = ([1, 37, 262, 100], [300, 5], [128, 128])
    calls = []
    for seed in range(6):
        lens = layouts[seed % len(layouts)]
        args = list(_inputs(lens, H, seed))
        args[6] = None if len(set(lens)) == 1 else args[6].cpu()
        calls.append((args, mp.mla_prefill_reference(*args, True).float()))
    for path in ("auto", "mha", "absorbed"):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # keep the GPU busy: the calls below queue behind it
        outs = [torch.ops.attnfuse.mla_prefill(*args, True, None, False, path) for args, _ in calls]
        for (args, ref), out in zip(calls, outs):
            tol = BF16_REL_TOL * max(ref.abs().max().item(), 1.0)
            err = (out.float() - ref).abs().max().item()
            assert err <= tol, (path, args[7], err, tol)


@pytest.mark.parametrize("H,T", [(16, 300), (128, 1), (128, 513)])
def test_fused_mha_inputs_match_reference(H, T):
    """The MHA form's one-launch q/K/V (both token tiles) against float32, with kv_b_proj
    given as strided views of one weight."""
    from attnfuse.custom_ops.kernels import mla_decompress as md

    q_nope, q_pe, ckv, k_pe, _, _, _, _, _ = _inputs([T], H, seed=T)
    g = torch.Generator(device="cuda").manual_seed(5)
    w = (torch.randn(H, D_NOPE + D_V, R, generator=g, device="cuda") / math.sqrt(R)).to(torch.bfloat16)
    w_uk, w_uv = w[:, :D_NOPE], w[:, D_NOPE:].transpose(1, 2)
    assert md.supported(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)
    q, k, v = md.mha_inputs(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)
    assert torch.equal(q, torch.cat([q_nope, q_pe], -1))
    assert torch.equal(k[..., D_NOPE:], k_pe[:, None, :].expand(T, H, D_ROPE))
    k_ref = torch.einsum("tr,hdr->thd", ckv.float(), w_uk.float())
    v_ref = torch.einsum("tr,hrd->thd", ckv.float(), w_uv.float())
    torch.testing.assert_close(k[..., :D_NOPE].float(), k_ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(v.float(), v_ref, atol=2e-2, rtol=1e-2)
