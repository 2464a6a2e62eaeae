"""``attnfuse::mla_prefill``: MLA prefill attention that picks its form at run time.

DeepSeek-style multi-head latent attention (MLA) caches one latent vector ``ckv`` (width
``R = kv_lora_rank``) and one shared RoPE key ``k_pe`` per token. Per head ``h`` the
keys and values are linear in the latent::

    k_h = [W_UK[h] @ ckv ; k_pe]        (D_nope + D_rope)
    v_h =  W_UV[h] @ ckv                (D_v)

Prefill can compute the same attention in two forms:

* **absorbed** (the "MQA over the latent" form): project the queries into the latent
  space, ``q_lat = q_nope @ W_UK`` (per head), attend with ``[q_lat ; q_pe]`` against
  ``[ckv ; k_pe]`` (keys ``R + D_rope`` wide, one KV head), and project the latent
  output back with ``W_UV``. Dense over every visible token, or sparse over the top-k
  tokens an indexer picked per query (DeepSeek-V3.2).
* **MHA** (decompressed): materialise ``k_nope`` and ``v`` for every attended token and
  every head with one GEMM against the kv_b_proj weight, then run ordinary ragged causal
  MHA with head dims (``D_nope + D_rope``, ``D_v``) = (192, 128) for DeepSeek-V3. Far
  fewer FLOPs per (query, key) pair, but quadratic in the sequence length and
  ``T x H x 320`` elements of scratch.

The choice is made by ``choose_path`` from one per-GPU ``PrefillRule`` (see ``RULES``),
grounded in ``benchmarks/bench_mla_prefill.py``: sparse attention may take the MHA form
only where it is exact (every sequence no longer than the top-k and the indexer selects
every visible token); the MHA form decompresses and attends groups of whole sequences
whose K/V fit ``DECOMPRESSED_KV_BUDGET_BYTES``, so only a sequence too long for the budget
on its own goes to the absorbed form. Measured on H100: dense MHA's kernels are faster at
every length from 128 to 16k tokens at 16 and 128 heads, and short calls, which are
host-bound, cost no more host work in the MHA form than in the absorbed one (its q, K and
V come from one Triton launch, ``kernels/mla_decompress.py``), so the SM90 rule takes the
MHA form for every dense call within the budget, wherever the offsets are; for sparse
calls the crossover is the top-k itself.

Back ends: on CUDA the MHA form runs flashinfer's ``BatchPrefillWithRaggedKVCacheWrapper``
(fa3 on SM90 at head dims (192, 128)), or ``trtllm_ragged_attention_deepseek`` on SM100
(wired behind a capability check, **untested here**: no Blackwell GPU was available); the
dense absorbed form runs flashinfer's ``BatchMLAPagedAttentionWrapper`` (page size 1 over
the attended latents; plans are split where flashinfer's work-item capacity ends, long
sequences into query chunks); the sparse absorbed form gathers the top-k latents per query
chunk and runs two batched GEMMs with an fp32 softmax in plain torch (no sparse MLA kernel
for SM90 here: 10-70x slower than the MHA form where both apply). Where flashinfer is
missing or does not support the shapes, and on CPU, both forms run in plain torch.

The GPU back ends need the offsets on the host (flashinfer's ``plan``). Offsets given on
the host cost nothing: ``cu_seqlens`` as a CPU tensor (serving engines keep one, e.g. a
``query_start_loc_cpu``) or ``cu_seqlens=None`` for equal-length sequences of
``max_seqlen`` tokens back to back (what ``mla_short_prefill`` emits for batched prompts).
Offsets on the GPU are copied to the host, one synchronisation per call. Either way the
op is not CUDA-graph capturable; prefill runs outside graphs in
serving engines. The op carries ``torch.Tag.cudagraph_unsafe``: under
``mode="reduce-overhead"`` Inductor runs it outside the CUDA graph (graph partitions) or
skips CUDA graphs for that graph, and a call made while a stream is capturing raises a
``RuntimeError`` saying so instead of failing inside CUDA.

Parameters (all tensors on one device; ``T`` query tokens, ``H`` heads)
----------
q_nope : (T, H, D_nope)              float16 / bfloat16 / float32
q_pe : (T, H, D_rope)                RoPE already applied
ckv : (T, R)                         latent of the attended tokens (same tokens as q)
k_pe : (T, D_rope)                   RoPE key of the attended tokens, shared by all heads
w_uk : (H, D_nope, R)                ``q_lat = q_nope @ w_uk`` (kv_b_proj's K rows)
w_uv : (H, R, D_v)                   ``out = o_lat @ w_uv`` (kv_b_proj's V rows, transposed)
cu_seqlens : (B + 1,) int32/int64 or None
    ragged batch: sequence b owns rows [cu[b], cu[b+1]); on q's device or on the CPU
    (no sync). None: T / max_seqlen sequences of exactly max_seqlen tokens.
max_seqlen : int                     the longest sequence (``max(diff(cu_seqlens))``)
scale : float                        softmax scale (1/sqrt(D_nope + D_rope) usually)
causal : bool                        each query sees its sequence's tokens up to itself
topk_indices : (T, K) int32/int64 or None
    sparse attention: rows of ``ckv`` each query attends (distinct within a row), ``-1``
    for unused slots. The indexer's guarantee (rows of the query's own sequence, visible
    to it) is trusted.
topk_covers_visible : bool
    the caller promises that a query with at most K visible tokens lists all of them
    (DeepSeek-V3.2's indexer does: it returns every candidate when there are no more
    than K). Only then may sparse attention take the dense MHA form.
path : "auto" | "mha" | "absorbed"
    force a form (tests, benchmarks); "mha" on a sparse call needs the promise above.

Returns
-------
out : (T, H, D_v), dtype of q_nope. A query whose top-k list is empty gets zeros.

Example
-------
>>> out = torch.ops.attnfuse.mla_prefill(q_nope, q_pe, ckv, k_pe, w_uk, w_uv,
...                                      cu_seqlens, max_seqlen, scale, True)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ._dispatch import cuda_major, register_direct_kernels
from .kernels import mla_decompress

# --------------------------------------------------------------------------- limits
#: Scratch the MHA form may allocate at once for the decompressed K (D_nope + D_rope per
#: head) and V (D_v per head). Bigger batches are decompressed and attended in groups of
#: whole sequences that fit; only a single sequence whose K/V exceed it (26k tokens at
#: DeepSeek-V3's 128 heads, 210k at 16 heads, bf16) takes the absorbed form, whose scratch
#: does not grow with the head count. 2 GiB holds a 16k-token chunk at 128 heads (1.34 GB).
DECOMPRESSED_KV_BUDGET_BYTES = 2 * 1024**3
#: Query rows gathered at once by the torch sparse absorbed form: the gathered latents are
#: (rows, K, R + D_rope) elements, 256 x 2048 x 576 x 2 B = 0.6 GB at DeepSeek-V3 sizes.
SPARSE_GATHER_BUDGET_ELEMENTS = 256 * 2048 * 576
#: flashinfer's float workspace for split-k scratch ("128 MB is the usual starting point").
FLASHINFER_WORKSPACE_BYTES = 128 * 1024**2
#: token x head counts up to which the MHA form's q, K and V come from one Triton launch
#: (``mla_decompress``) rather than two cuBLAS GEMMs, a copy and a concatenation: it saves
#: about 35 us of host time per call and costs up to about 11 us more GPU time at 128k
#: (16 heads x 8k tokens, 128 heads x 1k; H100), more beyond (mla_prefill_host.md)
FUSED_INPUTS_MAX_TOKEN_HEADS = 128 * 1024
#: fa3's MLA kernels exist for these latent widths and for a 64-wide RoPE part only.
FLASHINFER_MLA_CKV_DIMS = (128, 256, 512)
FLASHINFER_MLA_KPE_DIM = 64
#: fa3 ragged prefill head dims (qk, vo) besides equal dims; (192, 128) is DeepSeek MHA.
FLASHINFER_FA3_UNEQUAL_HEAD_DIMS = ((192, 128),)
FLASHINFER_FA3_EQUAL_HEAD_DIMS = (64, 128, 256)
#: SM100 (Blackwell) head dims of trtllm_ragged_attention_deepseek (qk, vo).
TRTLLM_RAGGED_HEAD_DIMS = ((192, 128), (128, 128), (256, 256))

PATHS = ("auto", "mha", "absorbed")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------- rule
@dataclass(frozen=True)
class PrefillRule:
    """When a GPU takes the MHA form (every number measured in bench_mla_prefill.py).

    ``short_absorbed``: rows ``(max_heads, max_seqs, max_tokens[, max_seqlen])``; a dense
    call with at most that many heads, sequences, query tokens (and tokens in its longest
    sequence) takes the absorbed form: there a call's time is host work (its kernels take
    tens of microseconds) and the absorbed form's was measured lower.
    ``short_absorbed_host_offsets``: the rows for calls whose offsets are on the host
    (``cu_seqlens`` on the CPU or None): such calls never wait for the GPU, so back-to-back
    calls cost the larger of host and GPU time rather than about their sum, and the form
    with less host work wins over more GPU work. None: the same rows as ``short_absorbed``.
    ``dense_mha_max_seqlen``: dense calls longer than this take the absorbed form.
    ``sparse_mha_max_seqlen_over_topk`` bounds sparse calls by ``max_seqlen <= f * K``;
    it never exceeds 1, the point past which the MHA form stops being exact.
    ``kv_budget_bytes``: the decompressed K/V of a call must fit, else absorbed.
    """

    name: str
    short_absorbed: tuple[tuple[int, ...], ...] = ()
    short_absorbed_host_offsets: tuple[tuple[int, ...], ...] | None = None
    dense_mha_max_seqlen: int = 1 << 62
    sparse_mha_max_seqlen_over_topk: float = 1.0
    kv_budget_bytes: int = DECOMPRESSED_KV_BUDGET_BYTES

    def prefers_absorbed_when_short(self, num_heads: int, num_seqs: int, num_tokens: int,
                                    max_seqlen: int = 0, offsets_on_host: bool = False) -> bool:
        rows = self.short_absorbed
        if offsets_on_host and self.short_absorbed_host_offsets is not None:
            rows = self.short_absorbed_host_offsets
        return any(num_heads <= row[0] and num_seqs <= row[1] and num_tokens <= row[2]
                   and (len(row) < 4 or max_seqlen <= row[3]) for row in rows)


RULES: dict[str, PrefillRule] = {
    # H100 (SM90), flashinfer fa3 for both forms, DeepSeek-V3 sizes, bf16. GPU time (CUDA
    # graphs): dense MHA beat dense absorbed at every measured point, 128 to 16k tokens,
    # 16 and 128 heads (1.3x at 128 tokens, 3.7x at 16k: benchmarks/results/mla_prefill.md).
    # The op runs outside CUDA graphs (it plans from host offsets), and up to about 2k
    # tokens a call is host work: 130-250 us against 15-130 us of kernels. There the form
    # with less host work wins, and in runs 2-14 that was the absorbed form (one projection
    # before the attention against the MHA form's two GEMMs, a copy and a concatenation,
    # about 70 us of host time): those rules sent short calls to the absorbed form, and
    # the points near their limits went either way with the host's speed (one or two of
    # 76 points per run off by 5-25%). The MHA form's inputs now come from one launch
    # (37-70 instead of 76-137 us of host time; mla_prefill_host.md), its calls cost no
    # more host time than the absorbed form's, and the MHA form was the faster at all 38
    # points with either kind of offsets in runs 15, 16 and 18 (mla_prefill_op_run15.md ..
    # run18.md; absorbed calls 1.05-1.1x slower at the shortest points, up to 3.8x at the
    # longest; run 17's one miss, 1.08 at 128 heads x 8 x 128 tokens, was a call the fused
    # launch's limit then left to the four launches). So: MHA for every dense call within
    # the budget.
    # Sparse: MHA wherever it is exact (<= k): the torch sparse absorbed form is 23-130x
    # slower.
    "sm90": PrefillRule("sm90"),
    # Blackwell: not measured here; SGLang routes prefill the same way (MHA for short).
    "sm100": PrefillRule("sm100"),
    # CPU and other GPUs run the torch forms; the MHA form does fewer FLOPs per pair.
    "default": PrefillRule("default"),
}


def rule_for(device: torch.device) -> PrefillRule:
    """The rule of the GPU (or CPU) that runs the call."""
    if device.type == "cuda":
        major = cuda_major(device)
        if major == 9:
            return RULES["sm90"]
        if major == 10:
            return RULES["sm100"]
    return RULES["default"]


def decompressed_kv_bytes(num_tokens: int, num_heads: int, qk_head_dim: int, v_head_dim: int,
                          element_size: int) -> int:
    """Scratch of the MHA form: K and V for every attended token and head."""
    return num_tokens * num_heads * (qk_head_dim + v_head_dim) * element_size


def choose_path(*, num_tokens: int, num_heads: int, num_seqs: int, qk_nope_dim: int,
                rope_dim: int, v_head_dim: int, element_size: int, max_seqlen: int,
                topk: Optional[int], topk_covers_visible: bool, rule: PrefillRule,
                offsets_on_host: bool = False) -> str:
    """``"mha"`` or ``"absorbed"`` for one call (a pure function of sizes and of where the
    offsets are: no device sync)."""
    # The MHA form decompresses one group of whole sequences at a time (mha_groups), so
    # only a sequence whose own K/V exceed the budget rules it out.
    kv_bytes = decompressed_kv_bytes(min(max_seqlen, num_tokens), num_heads, qk_nope_dim + rope_dim,
                                     v_head_dim, element_size)
    if kv_bytes > rule.kv_budget_bytes:
        return "absorbed"
    if topk is None:
        if rule.prefers_absorbed_when_short(num_heads, num_seqs, num_tokens, max_seqlen,
                                            offsets_on_host):
            return "absorbed"
        return "mha" if max_seqlen <= rule.dense_mha_max_seqlen else "absorbed"
    # Sparse: the dense MHA form equals sparse attention only when the top-k list of
    # every query is its whole visible prefix. (The sparse absorbed form never beat it.)
    exact_limit = topk if topk_covers_visible else 0
    sparse_limit = min(exact_limit, int(rule.sparse_mha_max_seqlen_over_topk * topk),
                       rule.dense_mha_max_seqlen)
    return "mha" if max_seqlen <= sparse_limit else "absorbed"


# ---------------------------------------------------------------------- validation
_RANKS = (("q_nope", 3), ("q_pe", 3), ("ckv", 2), ("k_pe", 2), ("w_uk", 3), ("w_uv", 3))


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, max_seqlen, scale, causal,
             topk_indices, topk_covers_visible, path) -> None:
    """Raise ``ValueError`` naming the bad argument, its value and what was expected."""
    dtype, device = q_nope.dtype, q_nope.device
    for (name, rank), t in zip(_RANKS, (q_nope, q_pe, ckv, k_pe, w_uk, w_uv)):
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor, got shape {_shape(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected float16/bfloat16/float32, got {t.dtype}")
        if t.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (q_nope's), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (q_nope's), got {t.device}")
    T, H, d_nope = q_nope.shape
    R = ckv.shape[1]
    d_rope = q_pe.shape[2]
    if _shape(q_pe)[:2] != (T, H):
        raise ValueError(f"q_pe: expected shape ({T}, {H}, D_rope), got {_shape(q_pe)}")
    if ckv.shape[0] != T:
        raise ValueError(f"ckv: expected {T} rows (one latent per query token), got {_shape(ckv)}")
    if _shape(k_pe) != (T, d_rope):
        raise ValueError(f"k_pe: expected shape ({T}, {d_rope}), got {_shape(k_pe)}")
    if _shape(w_uk) != (H, d_nope, R):
        raise ValueError(f"w_uk: expected shape ({H}, {d_nope}, {R}) = (heads, D_nope, R), got {_shape(w_uk)}")
    if w_uv.shape[0] != H or w_uv.shape[1] != R:
        raise ValueError(f"w_uv: expected shape ({H}, {R}, D_v) = (heads, R, D_v), got {_shape(w_uv)}")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen: expected a positive int, got {max_seqlen!r}")
    if cu_seqlens is None:
        if T % max_seqlen:
            raise ValueError(f"cu_seqlens: None means sequences of max_seqlen = {max_seqlen} "
                             f"tokens each, but {T} tokens are not a multiple of it")
    else:
        if (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
                or cu_seqlens.dtype not in _INDEX_DTYPES):
            raise ValueError(f"cu_seqlens: expected a 1-D int32/int64 tensor of batch + 1 >= 2 "
                             f"entries, got shape {_shape(cu_seqlens)} dtype {cu_seqlens.dtype}")
        if cu_seqlens.device != q_nope.device and cu_seqlens.device.type != "cpu":
            raise ValueError(f"cu_seqlens: expected device {q_nope.device} or the CPU, "
                             f"got {cu_seqlens.device}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive float, got {scale!r}")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if topk_indices is not None:
        if (topk_indices.dim() != 2 or topk_indices.shape[0] != T or topk_indices.shape[1] < 1
                or topk_indices.dtype not in _INDEX_DTYPES):
            raise ValueError(f"topk_indices: expected a ({T}, K >= 1) int32/int64 tensor, "
                             f"got shape {_shape(topk_indices)} dtype {topk_indices.dtype}")
        if topk_indices.device != q_nope.device:
            raise ValueError(f"topk_indices: expected device {q_nope.device}, got {topk_indices.device}")
        if path == "mha" and not topk_covers_visible:
            raise ValueError("path: 'mha' on a sparse call needs topk_covers_visible=True "
                             "(otherwise dense MHA is not the same attention)")
        if path == "mha" and max_seqlen > topk_indices.shape[1]:
            raise ValueError(f"path: 'mha' on a sparse call needs max_seqlen <= K = "
                             f"{topk_indices.shape[1]}, got max_seqlen {max_seqlen}")
    # Host-side metadata checks: cheap for offsets on the host; offsets on the GPU are
    # checked once read (the read the GPU back ends need anyway), in prepare_path.
    if cu_seqlens is None or cu_seqlens.device.type == "cpu":
        _check_seqlens(host_offsets(cu_seqlens, T, max_seqlen), T, max_seqlen)


def host_offsets(cu_seqlens: torch.Tensor | None, num_tokens: int,
                 max_seqlen: int) -> list[int] | None:
    """The offsets as host ints where that needs no device read (CPU tensor, or None for
    equal-length sequences); None for offsets that live on the GPU."""
    if cu_seqlens is None:
        return list(range(0, num_tokens + 1, max_seqlen)) if num_tokens else [0, 0]
    if cu_seqlens.device.type == "cpu":
        return cu_seqlens.tolist()
    return None


def _num_seqs(cu_seqlens: torch.Tensor | None, num_tokens: int, max_seqlen: int) -> int:
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else max(num_tokens // max_seqlen, 1)


def _check_seqlens(cu: list[int], num_tokens: int, max_seqlen: int) -> None:
    if cu[0] != 0 or cu[-1] != num_tokens:
        raise ValueError(f"cu_seqlens: expected to start at 0 and end at {num_tokens} (tokens), "
                         f"got {cu[0]} ... {cu[-1]}")
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if min(lens) < 0:
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got lengths {lens}")
    if max(lens) > max_seqlen:
        raise ValueError(f"max_seqlen: expected >= the longest sequence {max(lens)}, got {max_seqlen}")


# ------------------------------------------------------------ plain-torch reference
def mla_prefill_reference(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, max_seqlen, scale,
                          causal=True, topk_indices=None) -> torch.Tensor:
    """The definition, in float32: decompressed keys/values, explicit masks, per sequence."""
    f = torch.float32
    qn, qp, c, kp = q_nope.to(f), q_pe.to(f), ckv.to(f), k_pe.to(f)
    k_nope = torch.einsum("tr,hdr->thd", c, w_uk.to(f))
    v = torch.einsum("tr,hrv->thv", c, w_uv.to(f))
    T, H, _ = q_nope.shape
    out = torch.zeros(T, H, v.shape[-1], dtype=f, device=q_nope.device)
    cu = host_offsets(cu_seqlens, T, max_seqlen) or cu_seqlens.tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        if end == start:
            continue
        rows = torch.arange(start, end, device=q_nope.device)
        if topk_indices is None:
            cols = rows
            visible = torch.ones(end - start, end - start, dtype=torch.bool, device=q_nope.device)
            if causal:
                visible = visible.tril()
        else:
            cols = torch.arange(T, device=q_nope.device)
            idx = topk_indices[start:end].long()
            # unused slots (-1) land in a spare last column, dropped afterwards
            visible = torch.zeros(end - start, T + 1, dtype=torch.bool, device=q_nope.device)
            visible.scatter_(1, torch.where(idx >= 0, idx, T), True)
            visible = visible[:, :T]
        scores = (torch.einsum("qhd,khd->hqk", qn[rows], k_nope[cols])
                  + torch.einsum("qhd,kd->hqk", qp[rows], kp[cols])) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty top-k list -> zeros
        out[rows] = torch.einsum("hqk,khv->qhv", probs, v[cols])
    return out.to(q_nope.dtype)


# --------------------------------------------------------------- torch forms (any device)
def _seq_bounds(cu_seqlens: torch.Tensor | list[int]) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
    return [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]


def decompress_kv(ckv, k_pe, w_uk, w_uv) -> tuple[torch.Tensor, torch.Tensor]:
    """K (T, H, D_nope + D_rope) and V (T, H, D_v), both contiguous: one batched GEMM over
    heads each, the latent broadcast (not copied) and the results written in place into
    K and V (cuBLAS takes the strided outputs), so neither the weights (whatever their
    strides: SGLang's and HF's kv_b_proj views are not contiguous) nor K's no-RoPE part
    are copied; only the shared RoPE key is broadcast into K."""
    H, d_nope, R = w_uk.shape
    T, d_rope = k_pe.shape
    latent = ckv.expand(H, T, R)
    k = ckv.new_empty(T, H, d_nope + d_rope)
    torch.bmm(latent, w_uk.transpose(1, 2), out=k.narrow(2, 0, d_nope).transpose(0, 1))
    k.narrow(2, d_nope, d_rope).copy_(k_pe.unsqueeze(1))
    v = ckv.new_empty(T, H, w_uv.shape[2])
    torch.bmm(latent, w_uv, out=v.transpose(0, 1))
    return k, v


def mha_inputs_torch(q_nope, q_pe, ckv, k_pe, w_uk, w_uv) -> tuple[torch.Tensor, ...]:
    """The MHA form's q (T, H, D_nope + D_rope), K and V in torch: ``decompress_kv`` and a
    concatenation for q."""
    k, v = decompress_kv(ckv, k_pe, w_uk, w_uv)
    return torch.cat([q_nope, q_pe], dim=-1), k, v


def mla_prefill_mha_torch(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, scale, causal):
    """The MHA form in torch: decompress, then SDPA per sequence."""
    q, k, v = mha_inputs_torch(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for start, end in _seq_bounds(cu_seqlens):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
            v[start:end].transpose(0, 1), is_causal=causal, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def _head_bmm(x, w):
    """``(T, H, K) x (H, K, N) -> (T, H, N)``, contiguous: one batched GEMM over heads
    that writes the token-major result in place (cuBLAS takes the strided output), so no
    transposed copy follows."""
    out = x.new_empty(x.shape[0], x.shape[1], w.shape[2])
    torch.bmm(x.transpose(0, 1), w, out=out.transpose(0, 1))
    return out


def _absorb_q(q_nope, w_uk):
    # (H, T, D_nope) @ (H, D_nope, R) -> (T, H, R)
    return _head_bmm(q_nope, w_uk)


def _unabsorb_o(o_lat, w_uv):
    # (H, T, R) @ (H, R, D_v) -> (T, H, D_v)
    return _head_bmm(o_lat, w_uv)


def mla_prefill_absorbed_dense_torch(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, scale,
                                     causal):
    """The dense absorbed form in torch: one KV head of width R + D_rope over the latent."""
    q_lat = _absorb_q(q_nope, w_uk)
    o_lat = q_lat.new_zeros(q_lat.shape)
    for start, end in _seq_bounds(cu_seqlens):
        scores = (torch.einsum("qhr,kr->hqk", q_lat[start:end], ckv[start:end])
                  + torch.einsum("qhd,kd->hqk", q_pe[start:end], k_pe[start:end])).float() * scale
        if causal:
            n = end - start
            hidden = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(ckv.dtype)
        o_lat[start:end] = torch.einsum("hqk,kr->qhr", probs, ckv[start:end])
    return _unabsorb_o(o_lat, w_uv)


def mla_prefill_absorbed_sparse_torch(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, topk_indices, scale):
    """The sparse absorbed form in torch: gather each query's top-k latents (in chunks of
    query rows bounded by SPARSE_GATHER_BUDGET_ELEMENTS), two batched GEMMs, fp32 softmax."""
    q_lat = _absorb_q(q_nope, w_uk)
    T, H, R = q_lat.shape
    K = topk_indices.shape[1]
    kv = torch.cat([ckv, k_pe], dim=-1)  # (T, R + D_rope): one gather for key and value
    q = torch.cat([q_lat, q_pe], dim=-1)
    o_lat = q_lat.new_empty(T, H, R)
    chunk = max(1, SPARSE_GATHER_BUDGET_ELEMENTS // (K * kv.shape[1]))
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        idx = topk_indices[start:end]
        gathered = kv[idx.clamp(min=0).long()]  # (rows, K, R + D_rope)
        scores = torch.bmm(q[start:end], gathered.transpose(1, 2)).float() * scale
        scores = scores.masked_fill((idx < 0)[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(ckv.dtype)
        o_lat[start:end] = torch.bmm(probs, gathered[..., :R])
    return _unabsorb_o(o_lat, w_uv)


# ------------------------------------------------------------------ GPU back ends
def _flashinfer():
    try:
        import flashinfer  # noqa: F401  (optional dependency: attnfuse[flashinfer])

        return flashinfer
    except Exception:
        return None


def _fa3_head_dims_ok(qk: int, vo: int) -> bool:
    return (qk == vo and qk in FLASHINFER_FA3_EQUAL_HEAD_DIMS) or (qk, vo) in FLASHINFER_FA3_UNEQUAL_HEAD_DIMS


def _gpu_backend_ok(q_nope) -> bool:
    return q_nope.is_cuda and q_nope.dtype in (torch.float16, torch.bfloat16) and _flashinfer() is not None


def _workspace(device, zeroed: bool = False) -> torch.Tensor:
    # Per call from the stream-ordered caching allocator: no buffer shared across streams.
    alloc = torch.zeros if zeroed else torch.empty
    return alloc(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)


class FlashinferWrappers:
    """flashinfer wrappers kept for reuse, one per (device, stream, kind, slot).

    Building a wrapper allocates its workspaces and pinned host buffers (about 0.5 ms per
    call measured on H100), so calls reuse them, as serving engines do. A plan writes the
    wrapper's pinned host buffer and queues its copy to the GPU; re-planning a wrapper
    therefore first waits for the stream that owns it (a pending copy or run of the old
    plan must not see the new one). That is one wait per new batch layout: offsets given
    on the host otherwise never make the op wait.

    flashinfer plans once per batch layout and then runs any number of times with that
    plan (serving engines plan once per forward for all layers). ``planned`` does the same
    for consecutive calls: the layers of one prefill pass the same layout, and only the
    first of them plans. The key holds every argument of the plan (the layout's offsets
    included), so a wrapper runs with a kept plan only if planning again would make the
    same one.
    """

    def __init__(self) -> None:
        self._wrappers: dict[tuple, Any] = {}
        self._plan_keys: dict[tuple, tuple] = {}

    @staticmethod
    def _slot_key(kind: str, device: torch.device, slot: int) -> tuple:
        # the raw stream handle (as Inductor's generated code reads it): no Stream object
        stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
        return (kind, device.type, device.index, stream, slot)

    def planned(self, kind: str, device: torch.device, slot: int, build: Callable[[], Any],
                plan_key: tuple, plan: Callable[[Any], None]) -> Any:
        """The wrapper of ``(kind, device, stream, slot)``, planned for ``plan_key``:
        ``plan(wrapper)`` runs unless its last plan had the same key."""
        key = self._slot_key(kind, device, slot)
        fresh = key not in self._wrappers
        if fresh:
            self._wrappers[key] = build()
        wrapper = self._wrappers[key]
        if self._plan_keys.get(key) != plan_key:
            self._plan_keys.pop(key, None)  # a plan that raises leaves no key behind
            if not fresh and device.type == "cuda":
                # an old plan's host-to-device copy and runs may still be queued
                torch.cuda.current_stream(device).synchronize()
            plan(wrapper)
            self._plan_keys[key] = plan_key
        return wrapper


WRAPPERS = FlashinferWrappers()


def mha_groups(cu: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Token ranges of consecutive whole sequences, each group at most ``max_tokens`` long
    (a longer sequence forms a group of its own), so that the MHA form's decompressed K/V
    of one group stay within the budget."""
    groups: list[tuple[int, int]] = []
    start = cu[0]
    for a, b in zip(cu[:-1], cu[1:]):
        if b - start > max_tokens and a > start:
            groups.append((start, a))
            start = a
    if cu[-1] > start or not groups:
        groups.append((start, cu[-1]))
    return groups


def mha_inputs(q_nope, q_pe, ckv, k_pe, w_uk, w_uv) -> tuple[torch.Tensor, ...]:
    """The MHA form's attention inputs: q (T, H, D_nope + D_rope), decompressed K and V.

    Up to ``FUSED_INPUTS_MAX_TOKEN_HEADS`` one Triton launch writes all three
    (``kernels/mla_decompress.py``): there a call is host-bound and the torch form's four
    launches cost more host time than its GEMMs save; beyond, cuBLAS GEMMs."""
    if (q_nope.shape[0] * q_nope.shape[1] <= FUSED_INPUTS_MAX_TOKEN_HEADS
            and mla_decompress.supported(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)):
        return mla_decompress.mha_inputs(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)
    return mha_inputs_torch(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)


def prepare_mha_gpu(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu: list[int], max_seqlen, scale,
                    causal, slot: int = 0, inputs: tuple[torch.Tensor, ...] | None = None):
    """Plan the MHA form on CUDA for the offsets ``cu`` (host ints); returns ``run()``
    (decompress + attention; with ``inputs``, ``mha_inputs`` computed already, attention
    only, once).

    flashinfer ragged prefill (fa3 on SM90 at (192, 128)); trtllm-gen on SM100."""
    fi = _flashinfer()
    H, qk_dim, vo_dim = q_nope.shape[1], q_nope.shape[2] + q_pe.shape[2], w_uv.shape[2]
    dev = q_nope.device
    major = cuda_major(dev)

    def attention_inputs():
        return inputs if inputs is not None else mha_inputs(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)

    if major == 10 and hasattr(fi, "prefill") and (qk_dim, vo_dim) in TRTLLM_RAGGED_HEAD_DIMS:
        cu_dev = torch.tensor(cu, dtype=torch.int32, device=dev)
        return lambda: _mha_trtllm_blackwell(fi, *attention_inputs(), cu_dev, max_seqlen, scale,
                                             causal)
    backend = "fa3" if major == 9 and _fa3_head_dims_ok(qk_dim, vo_dim) else "auto"
    plan_key = (tuple(cu), H, qk_dim, vo_dim, causal, scale, q_nope.dtype, ckv.dtype)

    def plan(w):
        indptr = torch.tensor(cu, dtype=torch.int32)
        w.plan(indptr, indptr, H, H, qk_dim, head_dim_vo=vo_dim, causal=causal, sm_scale=scale,
               q_data_type=q_nope.dtype, kv_data_type=ckv.dtype)

    wrapper = WRAPPERS.planned(
        f"ragged-{backend}", dev, slot,
        lambda: fi.BatchPrefillWithRaggedKVCacheWrapper(_workspace(dev), "NHD", backend=backend),
        plan_key, plan)
    return lambda: wrapper.run(*attention_inputs())


def _mha_trtllm_blackwell(fi, q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """SM100 path through trtllm-gen (SGLang PR 12788). UNTESTED here (no Blackwell GPU):
    wired after flashinfer 0.7.2's signature; its cubins are downloaded at first use."""
    cu = cu_seqlens.to(torch.int32)
    seq_lens = (cu[1:] - cu[:-1]).contiguous()
    return fi.prefill.trtllm_ragged_attention_deepseek(
        q, k, v, _workspace(q.device, zeroed=True), seq_lens, max_seqlen, max_seqlen,
        scale, 1.0, 1.0, seq_lens.numel(), -1, cu, cu, False, causal, False)


#: flashinfer's fa3/fa2 MLA plans hold a bounded number of work items: on H100 a plan of
#: 16384 tokens x 128 heads succeeded and one of 30038 tokens x 128 heads was refused
#: ("native capacity is 16384"), so one plan covers at most this many token-heads.
MLA_PLAN_MAX_TOKEN_HEADS = 16384 * 128


def mla_plan_groups(cu: list[int], max_tokens: int) -> list[list[tuple[int, int, int, int]]]:
    """Split a ragged batch into plans of at most ``max_tokens`` query rows.

    Each piece is ``(q_start, q_end, kv_start, kv_end)``: queries ``[q_start, q_end)`` of a
    sequence starting at ``kv_start`` attend its keys ``[kv_start, kv_end = q_end)``
    (causal, aligned bottom-right), so a long sequence may be cut into query chunks.
    Query rows of one group are contiguous."""
    groups: list[list[tuple[int, int, int, int]]] = []
    current: list[tuple[int, int, int, int]] = []
    room = max_tokens
    for start, end in zip(cu[:-1], cu[1:]):
        a = start
        while a < end:
            if room == 0:
                groups.append(current)
                current, room = [], max_tokens
            take = min(end - a, room)
            current.append((a, a + take, start, a + take))
            room -= take
            a += take
    if current:
        groups.append(current)
    return groups


def absorbed_query(q_nope, w_uk) -> torch.Tensor:
    """The absorbed form's latent queries ``q_nope @ W_UK`` (T, H, R), contiguous."""
    return _absorb_q(q_nope, w_uk)


def prepare_absorbed_dense_gpu(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu: list[int], scale, causal,
                               q_lat: torch.Tensor | None = None):
    """Plan the dense absorbed form on CUDA (flashinfer MLA, one page per token) for the
    offsets ``cu`` (host ints); returns ``run()`` (W_UK projection + attention over the
    latent + W_UV projection; with ``q_lat``, ``absorbed_query`` computed already, the
    projection is not repeated)."""
    from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata

    H, R = q_nope.shape[1], ckv.shape[1]
    dev = q_nope.device
    max_tokens = max(1, MLA_PLAN_MAX_TOKEN_HEADS // H)
    groups = mla_plan_groups(cu, max_tokens) if causal else [
        [(a, b, a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]]
    if not causal and any(b - a > max_tokens for g in groups for a, b, _, _ in g):
        raise ValueError(f"max_seqlen: a non-causal sequence longer than {max_tokens} tokens "
                         f"does not fit one flashinfer MLA plan at {H} heads")
    plans = []
    for slot, pieces in enumerate(groups):
        def plan(wrapper, pieces=pieces):
            q_lens = torch.tensor([0] + [b - a for a, b, _, _ in pieces], dtype=torch.int32).cumsum(0)
            kv_lens = torch.tensor([e - s for _, _, s, e in pieces], dtype=torch.int32)
            kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int32), kv_lens.cumsum(0)]).to(torch.int32)
            kv_indices = torch.cat([torch.arange(s, e, dtype=torch.int32) for _, _, s, e in pieces])
            wrapper.plan(metadata=MLAPlanMetadata.csr(q_lens.to(torch.int32).to(dev), kv_indptr.to(dev),
                                                      kv_indices.to(dev), kv_lens.to(dev)),
                         num_heads=H, head_dim_ckv=R, head_dim_kpe=k_pe.shape[1], page_size=1,
                         causal=causal, sm_scale=scale, q_data_type=q_nope.dtype,
                         kv_data_type=ckv.dtype, query_layout="split", kv_cache_layout="split")

        plan_key = (tuple(pieces), H, R, k_pe.shape[1], causal, scale, q_nope.dtype, ckv.dtype)
        wrapper = WRAPPERS.planned("mla", dev, slot, lambda: BatchMLAPagedAttentionWrapper(_workspace(dev)),
                                   plan_key, plan)
        plans.append((pieces[0][0], pieces[-1][1], wrapper))

    def run():
        q_l = q_lat if q_lat is not None else absorbed_query(q_nope, w_uk)
        q_rope = q_pe.contiguous()
        kv = (ckv[:, None, :], k_pe[:, None, :])
        if len(plans) == 1 and plans[0][:2] == (0, q_l.shape[0]):
            o_lat = plans[0][2].run(query=(q_l, q_rope), kv_cache=kv)
        else:
            o_lat = q_l.new_empty(q_l.shape)  # the plans cover every row
            for a, b, wrapper in plans:
                wrapper.run(query=(q_l[a:b], q_rope[a:b]), kv_cache=kv, out=o_lat[a:b])
        return _unabsorb_o(o_lat, w_uv)

    return run


def _flashinfer_mla_ok(q_nope, ckv, k_pe) -> bool:
    return (_gpu_backend_ok(q_nope) and ckv.shape[1] in FLASHINFER_MLA_CKV_DIMS
            and k_pe.shape[1] == FLASHINFER_MLA_KPE_DIM)


def _flashinfer_mha_ok(q_nope, q_pe, w_uv) -> bool:
    if not _gpu_backend_ok(q_nope):
        return False
    qk, vo = q_nope.shape[2] + q_pe.shape[2], w_uv.shape[2]
    return _fa3_head_dims_ok(qk, vo) or cuda_major(q_nope.device) != 9  # fa2 JIT-compiles other dims


# ------------------------------------------------------------------------- the op
def mla_prefill_path(q_nope, q_pe, ckv, k_pe, w_uv, cu_seqlens, max_seqlen, topk_indices,
                     topk_covers_visible, path="auto") -> str:
    """The form the op takes for these inputs (``path`` other than "auto" wins)."""
    if path != "auto":
        return path
    return choose_path(
        num_tokens=q_nope.shape[0], num_heads=q_nope.shape[1],
        num_seqs=_num_seqs(cu_seqlens, q_nope.shape[0], max_seqlen),
        qk_nope_dim=q_nope.shape[2],
        rope_dim=q_pe.shape[2], v_head_dim=w_uv.shape[2], element_size=q_nope.element_size(),
        max_seqlen=max_seqlen, topk=None if topk_indices is None else topk_indices.shape[1],
        topk_covers_visible=topk_covers_visible, rule=rule_for(q_nope.device),
        offsets_on_host=cu_seqlens is None or cu_seqlens.device.type == "cpu")


def _per_token_kv_bytes(q_nope, q_pe, w_uv) -> int:
    return decompressed_kv_bytes(1, q_nope.shape[1], q_nope.shape[2] + q_pe.shape[2],
                                 w_uv.shape[2], q_nope.element_size())


def start_host_read(cu_seqlens: torch.Tensor | None, num_tokens: int,
                    max_seqlen: int) -> Callable[[], list[int]]:
    """The offsets as host ints, through the returned function: at once where they are
    on the host already (``host_offsets``); else a copy of ``cu_seqlens`` to the host
    starts now and the function waits for that copy only (not for GPU work queued after)."""
    known = host_offsets(cu_seqlens, num_tokens, max_seqlen)
    if known is not None or not cu_seqlens.is_cuda:
        return lambda: known if known is not None else cu_seqlens.tolist()
    host = torch.empty(cu_seqlens.shape, dtype=cu_seqlens.dtype, pin_memory=True)
    host.copy_(cu_seqlens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def finish() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return finish


def early_work(chosen, q_nope, q_pe, ckv, k_pe, w_uk, w_uv, topk_indices) -> dict:
    """Launch the GPU work of a form that does not depend on ``cu_seqlens`` (the MHA
    form's decompression when one group holds the call; the absorbed form's W_UK
    projection), so the GPU computes it while the host reads the offsets and plans."""
    if chosen == "mha" and _flashinfer_mha_ok(q_nope, q_pe, w_uv):
        if q_nope.shape[0] * _per_token_kv_bytes(q_nope, q_pe, w_uv) <= DECOMPRESSED_KV_BUDGET_BYTES:
            return {"inputs": mha_inputs(q_nope, q_pe, ckv, k_pe, w_uk, w_uv)}
    if chosen == "absorbed" and topk_indices is None and _flashinfer_mla_ok(q_nope, ckv, k_pe):
        return {"q_lat": absorbed_query(q_nope, w_uk)}
    return {}


def prepare_path(chosen, q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, max_seqlen, scale,
                 causal, topk_indices, cu: list[int] | None = None, early: dict | None = None):
    """Plan one form ("mha" or "absorbed") on the best back end for the device; returns a
    callable that computes the attention (host work such as flashinfer's plan is done).

    ``cu``: the offsets already read to the host (else read here); ``early``: what
    ``early_work`` launched for this call (the callable then runs once)."""
    if cu is None:
        cu = host_offsets(cu_seqlens, q_nope.shape[0], max_seqlen) or cu_seqlens.tolist()
    early = early or {}
    if cu_seqlens is not None and cu_seqlens.is_cuda:  # read from the GPU: not checked yet
        _check_seqlens(cu, q_nope.shape[0], max_seqlen)
    args = (q_nope, q_pe, ckv, k_pe, w_uk, w_uv)
    if chosen == "mha":
        max_tokens = max(1, DECOMPRESSED_KV_BUDGET_BYTES // _per_token_kv_bytes(q_nope, q_pe, w_uv))
        groups = mha_groups(cu, max_tokens)
        on_flashinfer = _flashinfer_mha_ok(q_nope, q_pe, w_uv)
        runs = []
        for slot, (a, b) in enumerate(groups):
            if len(groups) == 1:  # the whole call (no views to make)
                g_args, g_cu = args, cu
            else:
                g_args = tuple(t[a:b] for t in args[:4]) + args[4:]
                g_cu = [c - a for c in cu if a <= c <= b]
            if on_flashinfer:
                g_max = max(y - x for x, y in zip(g_cu[:-1], g_cu[1:]))
                runs.append(prepare_mha_gpu(*g_args, g_cu, g_max, scale, causal, slot=slot,
                                            inputs=early.get("inputs") if len(groups) == 1 else None))
            else:
                runs.append(functools.partial(mla_prefill_mha_torch, *g_args, g_cu, scale, causal))
        if len(runs) == 1:
            return runs[0]
        return lambda: torch.cat([run() for run in runs])
    if topk_indices is not None:
        return lambda: mla_prefill_absorbed_sparse_torch(*args, topk_indices, scale)
    if _flashinfer_mla_ok(q_nope, ckv, k_pe):
        return prepare_absorbed_dense_gpu(*args, cu, scale, causal, q_lat=early.get("q_lat"))
    return lambda: mla_prefill_absorbed_dense_torch(*args, cu, scale, causal)


def _stream_capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, k_pe: torch.Tensor,
                w_uk: torch.Tensor, w_uv: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                max_seqlen: int, scale: float, causal: bool = True,
                topk_indices: Optional[torch.Tensor] = None, topk_covers_visible: bool = False,
                path: str = "auto") -> torch.Tensor:
    if _stream_capturing(q_nope):
        raise RuntimeError(
            "attnfuse::mla_prefill cannot run inside a CUDA-graph capture: it reads cu_seqlens "
            "on the host to plan its kernels. Run prefill outside the graph (the op is tagged "
            "cudagraph_unsafe, so torch.compile's reduce-overhead mode does this itself).")
    validate(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, max_seqlen, scale, causal,
             topk_indices, topk_covers_visible, path)
    chosen = mla_prefill_path(q_nope, q_pe, ckv, k_pe, w_uv, cu_seqlens, max_seqlen,
                              topk_indices, topk_covers_visible, path)
    # offsets on the GPU: their host read waits for the GPU work queued before this call,
    # and the work queued after it (early_work) runs while the host plans; offsets on the
    # host (CPU tensor, or None) are known at once and nothing waits
    read_offsets = start_host_read(cu_seqlens, q_nope.shape[0], max_seqlen)
    early = early_work(chosen, q_nope, q_pe, ckv, k_pe, w_uk, w_uv, topk_indices)
    out = prepare_path(chosen, q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, max_seqlen,
                       scale, causal, topk_indices, cu=read_offsets(), early=early)()
    return out.to(q_nope.dtype).contiguous()


#: Inductor keeps ops with this tag out of CUDA graphs (absent in torch without it)
_CUDAGRAPH_UNSAFE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)
mla_prefill = torch.library.custom_op("attnfuse::mla_prefill", _mla_prefill, mutates_args=(),
                                      tags=_CUDAGRAPH_UNSAFE)


@mla_prefill.register_fake
def _(q_nope, q_pe, ckv, k_pe, w_uk, w_uv, cu_seqlens, max_seqlen, scale, causal=True,
      topk_indices=None, topk_covers_visible=False, path="auto"):
    torch._check(q_nope.dim() == 3 and q_pe.dim() == 3, lambda: "q_nope, q_pe: expected 3-D")
    torch._check(ckv.dim() == 2 and k_pe.dim() == 2, lambda: "ckv, k_pe: expected 2-D")
    torch._check(w_uk.dim() == 3 and w_uv.dim() == 3, lambda: "w_uk, w_uv: expected 3-D")
    T, H, d_nope = q_nope.shape
    torch._check(q_pe.shape[0] == T and q_pe.shape[1] == H,
                 lambda: f"q_pe: expected ({T}, {H}, D_rope), got {tuple(q_pe.shape)}")
    torch._check(ckv.shape[0] == T and k_pe.shape[0] == T,
                 lambda: f"ckv, k_pe: expected {T} rows, got {ckv.shape[0]}, {k_pe.shape[0]}")
    torch._check(k_pe.shape[1] == q_pe.shape[2], lambda: "k_pe: expected D_rope columns (q_pe's)")
    torch._check(w_uk.shape[0] == H and w_uk.shape[1] == d_nope and w_uk.shape[2] == ckv.shape[1],
                 lambda: f"w_uk: expected ({H}, {d_nope}, {ckv.shape[1]}), got {tuple(w_uk.shape)}")
    torch._check(w_uv.shape[0] == H and w_uv.shape[1] == ckv.shape[1],
                 lambda: f"w_uv: expected ({H}, {ckv.shape[1]}, D_v), got {tuple(w_uv.shape)}")
    torch._check(cu_seqlens is None or cu_seqlens.dim() == 1, lambda: "cu_seqlens: expected 1-D")
    if topk_indices is not None:
        torch._check(topk_indices.dim() == 2 and topk_indices.shape[0] == T,
                     lambda: f"topk_indices: expected ({T}, K), got {tuple(topk_indices.shape)}")
    return q_nope.new_empty(T, H, w_uv.shape[2])


#: whether calls reach ``_mla_prefill`` through one Python kernel (``_dispatch``)
DIRECT_DISPATCH = register_direct_kernels(mla_prefill, _mla_prefill)


__all__ = [
    "DECOMPRESSED_KV_BUDGET_BYTES",
    "PrefillRule",
    "RULES",
    "choose_path",
    "decompress_kv",
    "mha_groups",
    "mla_plan_groups",
    "mla_prefill",
    "mla_prefill_path",
    "mla_prefill_reference",
    "prepare_path",
    "rule_for",
]
