"""Triton kernel: the MHA form's attention inputs of MLA prefill, in one launch.

The decompressed form of MLA prefill (``custom_ops/mla_prefill.py``) runs ragged MHA on

    q[t, h] = [q_nope[t, h] ; q_pe[t, h]]                   (D_nope + D_rope)
    k[t, h] = [ckv[t] @ W_UK[h]^T ; k_pe[t]]                (D_nope + D_rope)
    v[t, h] =  ckv[t] @ W_UV[h]                             (D_v)

In torch that is two batched GEMMs, a broadcast copy of the shared RoPE key into K and a
concatenation for q: four launches of about 10-20 us of host time each, which dominate
short (host-bound) prefill calls (``benchmarks/results/mla_prefill_host.md``). This
kernel writes q, K and V in one launch.

Grid ``(cdiv(T, BLOCK_T), H)`` (``block_t``): program ``(i, h)`` multiplies a
``BLOCK_T x R`` latent tile with head ``h``'s two weight slices in ``BLOCK_R``-wide steps
(the latent tile is loaded once for both products, fp32 accumulation, one rounding at the
store), then stores its tokens' K, V and q rows of head ``h``. Weights are read through
their strides, so the strided views serving engines and HF hold of kv_b_proj are used as
they are.

Scope (``supported``): a CUDA device (CPU tensors inside ``kernel_on_cpu()``, under
``TRITON_INTERPRET=1``: the tests), fp16 or bf16 everywhere, head dims that are powers of
two of at least 16 and a latent width divisible by ``BLOCK_R``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import use_kernel
from ._launch import Launcher, cdiv

#: latent features per step (the K of both products), warps and pipeline stages
BLOCK_R = 64
NUM_WARPS = 8
NUM_STAGES = 3
#: tokens per program (the M of both products): 128, unless that leaves fewer than
#: ``MIN_PROGRAMS`` programs (short calls at few heads), then 64. H100, GPU time against
#: cuBLAS for the torch form (benchmarks/results/mla_prefill_host.md): 16 heads 0.68x at
#: 128 tokens (64), 0.56x at 512 (64), 0.64x at 1024, 0.92x at 2048, 1.03x at 4096; 128
#: heads 0.78x at 128, 1.06x at 512, 1.07x at 1024, 1.15x at 2048. The kernel saves about
#: 35 us of host time per call, so ``mla_prefill.FUSED_INPUTS_MAX_TOKEN_HEADS`` stops it at
#: 128k token-heads, where it costs at most about 11 us more GPU time than cuBLAS.
MIN_PROGRAMS = 128


def block_t(num_tokens: int, num_heads: int) -> int:
    return 128 if cdiv(num_tokens, 128) * num_heads >= MIN_PROGRAMS else 64


@triton.jit
def _mla_mha_inputs_kernel(
    QNope, QPe, Ckv, KPe, WUK, WUV, Q, K, V,
    num_tokens,
    s_qn_t, s_qn_h, s_qp_t, s_qp_h, s_c_t, s_c_r, s_kp_t,
    s_wk_h, s_wk_d, s_wk_r, s_wv_h, s_wv_r, s_wv_d,
    s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h,
    R: tl.constexpr, D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < num_tokens
    t = rows.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, D_NOPE)
    offs_e = tl.arange(0, D_ROPE)
    offs_v = tl.arange(0, D_V)

    acc_k = tl.zeros([BLOCK_T, D_NOPE], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_T, D_V], dtype=tl.float32)
    w_k = WUK + h * s_wk_h
    w_v = WUV + h * s_wv_h
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        a = tl.load(Ckv + t[:, None] * s_c_t + r[None, :] * s_c_r, mask=ok[:, None], other=0.0)
        b_k = tl.load(w_k + r[:, None] * s_wk_r + offs_n[None, :] * s_wk_d)  # W_UK[h]^T
        b_v = tl.load(w_v + r[:, None] * s_wv_r + offs_v[None, :] * s_wv_d)
        if UPCAST:  # the interpreter's bf16 dot is wrong (Triton 3.9): exact fp32 products
            a, b_k, b_v = a.to(tl.float32), b_k.to(tl.float32), b_v.to(tl.float32)
        acc_k = tl.dot(a, b_k, acc=acc_k)
        acc_v = tl.dot(a, b_v, acc=acc_v)

    dtype = K.dtype.element_ty
    k_rows = K + t[:, None] * s_k_t + h * s_k_h
    tl.store(k_rows + offs_n[None, :], acc_k.to(dtype), mask=ok[:, None])
    k_pe = tl.load(KPe + t[:, None] * s_kp_t + offs_e[None, :], mask=ok[:, None])
    tl.store(k_rows + D_NOPE + offs_e[None, :], k_pe, mask=ok[:, None])
    tl.store(V + t[:, None] * s_v_t + h * s_v_h + offs_v[None, :], acc_v.to(dtype),
             mask=ok[:, None])
    q_rows = Q + t[:, None] * s_q_t + h * s_q_h
    q_nope = tl.load(QNope + t[:, None] * s_qn_t + h * s_qn_h + offs_n[None, :], mask=ok[:, None])
    tl.store(q_rows + offs_n[None, :], q_nope, mask=ok[:, None])
    q_pe = tl.load(QPe + t[:, None] * s_qp_t + h * s_qp_h + offs_e[None, :], mask=ok[:, None])
    tl.store(q_rows + D_NOPE + offs_e[None, :], q_pe, mask=ok[:, None])


_MHA_INPUTS = Launcher(_mla_mha_inputs_kernel)


def _pow2_dim(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def supported(q_nope, q_pe, ckv, k_pe, w_uk, w_uv) -> bool:
    """Whether ``mha_inputs`` can run for these tensors (see the module docstring)."""
    tensors = (q_nope, q_pe, ckv, k_pe, w_uk, w_uv)
    dtype = q_nope.dtype
    return (dtype in (torch.float16, torch.bfloat16)
            and all(x.dtype == dtype and x.device == q_nope.device for x in tensors)
            and use_kernel(q_nope.device)
            and all(_pow2_dim(d) for d in (q_nope.shape[2], q_pe.shape[2], w_uv.shape[2]))
            and ckv.shape[1] % BLOCK_R == 0
            and q_nope.stride(2) == 1 and q_pe.stride(2) == 1 and k_pe.stride(1) == 1)


def mha_inputs(q_nope, q_pe, ckv, k_pe, w_uk, w_uv) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """q ``(T, H, D_nope + D_rope)``, K ``(T, H, D_nope + D_rope)`` and V ``(T, H, D_v)``,
    contiguous, from one launch (``supported`` must hold)."""
    T, H, d_nope = q_nope.shape
    d_rope, d_v, R = q_pe.shape[2], w_uv.shape[2], ckv.shape[1]
    q = q_nope.new_empty(T, H, d_nope + d_rope)
    k = q_nope.new_empty(T, H, d_nope + d_rope)
    v = q_nope.new_empty(T, H, d_v)
    if T == 0 or H == 0:
        return q, k, v
    args = (q_nope, q_pe, ckv, k_pe, w_uk, w_uv, q, k, v, T,
            q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
            ckv.stride(0), ckv.stride(1), k_pe.stride(0),
            w_uk.stride(0), w_uk.stride(1), w_uk.stride(2),
            w_uv.stride(0), w_uv.stride(1), w_uv.stride(2),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    tile = block_t(T, H)
    _MHA_INPUTS((cdiv(T, tile), H, 1), args,
                dict(R=R, D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v, BLOCK_T=tile,
                     BLOCK_R=BLOCK_R, UPCAST=not q_nope.is_cuda),
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return q, k, v
