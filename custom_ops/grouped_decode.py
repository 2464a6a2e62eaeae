"""``attnfuse::grouped_decode``: decode attention where query heads share KV heads.

One query token per sequence attends to a KV cache whose ``Hkv`` heads are each shared by
``Hq / Hkv`` query heads (GQA; MQA when ``Hkv = 1``; MLA, where V is the leading
``v_head_dim`` features of the shared latent K). No K/V head is ever repeated: on CUDA
this is the split-KV grouped Triton kernel (``custom_ops.kernels.grouped_decode``), which
loads each KV block once per tile of query heads and splits long sequences across SMs.

Parameters
----------
q : ``(B, Hq, Dk)`` fp16 / bf16 / fp32
    The one query token of each sequence.
k_cache : floating or fp8
    ``(B, Hkv, S, Dk)`` (static: HF ``StaticCache``; position ``p`` of sequence ``b`` at
    ``[b, :, p]``) or, with ``block_table``, ``(num_blocks, page, Hkv, Dk)`` (paged NHD;
    position ``p`` at ``[block_table[b, p // page], p % page]``).
v_cache : same layout as ``k_cache`` with head dim ``Dv``, or ``None``
    ``None`` selects the shared-latent (MLA) mode: V is ``k_cache[..., :v_head_dim]``.
block_table : ``(B, max_blocks)`` int32 / int64, optional
    Pages of each sequence; its presence selects the paged layout.
seq_lens : ``(B,)`` int32 / int64, optional
    Visible positions per sequence (``0`` is allowed: CUDA-graph padding; that row's
    output is 0 and its LSE ``-inf``). Default: the whole capacity (``S``, or
    ``max_blocks * page``).
mask : ``(B, C)`` or ``(1, C)``, optional; ``C`` = the capacity
    Bool (True = attend) or additive floating mask over cache positions (HF static
    caches pass one over the whole cache). Combined with ``seq_lens`` and ``window``.
scale : float
    Logit scale (usually ``Dk ** -0.5``).
softcap : float
    ``> 0``: logits become ``softcap * tanh(logits / softcap)`` after scaling and before
    the mask (Gemma 2). ``0`` disables.
window : int
    ``>= 0``: sliding window, only the last ``window`` visible positions
    (``[len - window, len)``) are attended. ``-1`` disables.
k_scale, v_scale : fp32 one-element tensors, optional
    Dequantization multipliers of fp8 caches (``cache * scale`` recovers the value);
    required with an fp8 cache and only then. Separate for K and V.
v_head_dim : int
    ``Dv``. Required (``> 0``, ``<= Dk``) in shared-latent mode; otherwise ``-1`` or
    ``v_cache``'s head dim.

Returns
-------
``(out, lse)``: ``out (B, Hq, Dv)`` in q's dtype; ``lse (B, Hq)`` fp32, the natural-log
sum of exponentiated (scaled, capped, masked) logits, ``-inf`` where nothing is visible.

Example
-------
>>> out, lse = torch.ops.attnfuse.grouped_decode(q, k_cache, v_cache, None, None, mask,
...     128 ** -0.5, 0.0, -1, None, None, -1)
"""

from __future__ import annotations

import torch

from ._dispatch import (  # noqa: F401
    FLOAT_DTYPES,
    INDEX_DTYPES,
    kernel_on_cpu,
    register_direct_kernels,
    use_kernel,
)
from .kernels._launch import Allocations, CallPlan, PlanCache, tensor_signature

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
CACHE_DTYPES = FLOAT_DTYPES + FP8_DTYPES

# ------------------------------------------------------------------ validation
def _describe(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype} tensor of shape {tuple(t.shape)}"


def problem(q, k_cache, v_cache, block_table, seq_lens, mask, scale, softcap, window,
            k_scale, v_scale, v_head_dim) -> str | None:
    """The first thing wrong with the arguments, as ``"<arg>: expected ..., got ..."``."""
    def bad(arg, value, expected):
        return f"{arg}: expected {expected}, got {value}"

    if q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        return bad("q", _describe(q), f"a (B, Hq, Dk) tensor of a dtype in {FLOAT_DTYPES}")
    batch, num_q_heads, head_dim_k = q.shape
    paged = block_table is not None
    layout = "(num_blocks, page, Hkv, Dk)" if paged else "(B, Hkv, S, Dk)"
    if k_cache.dim() != 4 or k_cache.dtype not in CACHE_DTYPES or k_cache.shape[-1] != head_dim_k:
        return bad("k_cache", _describe(k_cache),
                   f"a {layout} tensor with Dk={head_dim_k} (q's) and a dtype in {CACHE_DTYPES}")
    if k_cache.device != q.device:
        return bad("k_cache", f"device {k_cache.device}", f"q's device {q.device}")
    num_kv_heads = k_cache.shape[2] if paged else k_cache.shape[1]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return bad("k_cache", _describe(k_cache),
                   f"a KV head count dividing Hq={num_q_heads} at dim {2 if paged else 1}")
    if not paged and k_cache.shape[0] != batch:
        return bad("k_cache", _describe(k_cache), f"batch {batch} (q's) at dim 0")
    if v_cache is None:
        if not 0 < v_head_dim <= head_dim_k:
            return bad("v_head_dim", v_head_dim,
                       f"0 < v_head_dim <= Dk={head_dim_k} when v_cache is None (shared latent)")
        if v_scale is not None:
            return bad("v_scale", _describe(v_scale), "None when v_cache is None (k_scale applies)")
    else:
        if (v_cache.dim() != 4 or v_cache.dtype not in CACHE_DTYPES
                or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3])):
            return bad("v_cache", _describe(v_cache),
                       f"k_cache's leading dims {tuple(k_cache.shape[:3])} and a dtype in "
                       f"{CACHE_DTYPES}")
        if v_cache.device != q.device:
            return bad("v_cache", f"device {v_cache.device}", f"q's device {q.device}")
        if v_head_dim not in (-1, v_cache.shape[-1]):
            return bad("v_head_dim", v_head_dim, f"-1 or v_cache's head dim {v_cache.shape[-1]}")
    for name, cache, sc in (("k_scale", k_cache, k_scale), ("v_scale", v_cache, v_scale)):
        if cache is None:
            continue
        if cache.dtype in FP8_DTYPES and sc is None:
            return bad(name, None,
                       f"a float32 one-element tensor because the cache is {cache.dtype}")
        if sc is not None:
            if cache.dtype not in FP8_DTYPES:
                return bad(name, _describe(sc), f"None because the cache is {cache.dtype}, not fp8")
            if sc.dtype != torch.float32 or sc.numel() != 1 or sc.device != q.device:
                return bad(name, _describe(sc), "a float32 tensor with one element on q's device")
    if paged:
        if (block_table.dim() != 2 or block_table.dtype not in INDEX_DTYPES
                or block_table.shape[0] != batch):
            return bad("block_table", _describe(block_table),
                       f"a (B={batch}, max_blocks) int32/int64 tensor")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[2]
    if seq_lens is not None and (seq_lens.dim() != 1 or seq_lens.dtype not in INDEX_DTYPES
                                 or seq_lens.shape[0] != batch):
        return bad("seq_lens", _describe(seq_lens), f"a (B={batch},) int32/int64 tensor")
    if mask is not None:
        if (mask.dim() != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != capacity
                or not (mask.dtype == torch.bool or mask.dtype in FLOAT_DTYPES)):
            return bad("mask", _describe(mask),
                       f"a bool or floating (B={batch} or 1, capacity={capacity}) tensor")
    if not scale > 0:
        return bad("scale", scale, "a positive float")
    if softcap < 0:
        return bad("softcap", softcap, "0 (off) or a positive float")
    if window < -1:
        return bad("window", window, "-1 (off) or a window length >= 0")
    return None


def validate(*args) -> None:
    """Raise ``ValueError`` naming the first bad argument."""
    msg = problem(*args)
    if msg is not None:
        raise ValueError(msg)


def _v_head_dim(k_cache, v_cache, v_head_dim) -> int:
    return v_head_dim if v_cache is None else v_cache.shape[-1]


# ------------------------------------------------------------------ reference
def _dense(cache: torch.Tensor, block_table: torch.Tensor | None,
           visible: torch.Tensor) -> torch.Tensor:
    """``(B, H, C, D)`` view-or-gather of a cache over logical positions."""
    if block_table is None:
        return cache
    page = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * page, device=cache.device)
    # entries past a sequence's length may be garbage: read block 0 there (masked anyway)
    blocks = torch.where(visible, block_table[:, pos // page].long(), 0)
    return cache[blocks, pos % page].permute(0, 2, 1, 3)


def _reference(q, k_cache, v_cache, block_table, seq_lens, mask, scale, softcap, window,
               k_scale, v_scale, v_head_dim):
    batch, num_q_heads, head_dim_k = q.shape
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
    pos = torch.arange(capacity, device=q.device)
    lens = (seq_lens.long() if seq_lens is not None
            else torch.full((batch,), capacity, device=q.device, dtype=torch.long))
    # fp32 math for 16-bit inputs; float64 inputs (tests) stay float64
    work = torch.promote_types(q.dtype, torch.float32)
    visible = pos[None, :] < lens[:, None]
    if window >= 0:
        visible &= pos[None, :] >= lens[:, None] - window

    k = _dense(k_cache, block_table, visible).to(work)
    if k_scale is not None:
        k = k * k_scale.to(work).reshape(())
    if v_cache is None:
        v = k[..., :v_head_dim]
    else:
        v = _dense(v_cache, block_table, visible).to(work)
        if v_scale is not None:
            v = v * v_scale.to(work).reshape(())
    # masked positions may hold anything (uninitialized pages): never let them reach p @ V
    k = torch.where(visible[:, None, :, None], k, 0.0)
    v = torch.where(visible[:, None, :, None], v, 0.0)

    num_kv_heads = k.shape[1]
    qg = q.to(work).reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim_k)
    logits = torch.einsum("bhgd,bhsd->bhgs", qg, k) * scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        m = mask.expand(batch, capacity)
        if m.dtype == torch.bool:
            visible = visible & m
        else:
            logits = logits + m.to(work)[:, None, None, :]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    p = torch.exp(logits - row_max)
    denom = p.sum(-1, keepdim=True)
    has_mass = denom > 0
    out = torch.einsum("bhgs,bhsd->bhgd", p, v) / torch.where(has_mass, denom, 1.0)
    lse = torch.where(has_mass, row_max + torch.log(torch.where(has_mass, denom, 1.0)),
                      float("-inf"))
    return out.reshape(batch, num_q_heads, -1).to(q.dtype), lse.reshape(batch, num_q_heads)


# ------------------------------------------------------------------ backends
def choose_backend(q, k_cache, v_cache, block_table, seq_lens, mask, softcap, window,
                   k_scale, v_scale) -> str:
    """The one place a backend is picked: ``"reference"`` or ``"triton"``.

    CPU tensors run the plain-torch reference (the Triton kernel under the interpreter
    inside ``kernel_on_cpu()``); CUDA tensors run the split-KV kernel, whose stage 1 is the
    Triton kernel or, on SM90, a Gluon kernel: ``kernels/mla_decode_sm90.py`` for MLA calls
    (1.02-2.82x the Triton stage 1 on H100, ``benchmarks/results/bench_decode.md``) and
    ``kernels/gqa_decode_sm90.py`` for GQA calls on static and paged caches (static:
    0.995-1.27x SDPA at the 12 GQA points, where the Triton stage 1 gave 0.85-1.24x).
    ``kernels.grouped_decode.decode_settings`` decides.

    FlashInfer is never picked, although it is installed where this runs on H100:

    * its decode wrappers need a host-side ``plan()`` for every batch layout (``.item()``
      calls and pinned-memory copies), which cannot run inside a CUDA-graph capture and
      would synchronize every call of a compiled graph;
    * where a plan could be hoisted, ``benchmarks/results/bench_decode.md`` shows no GQA
      point where it is faster than this kernel by more than noise (at most 1.002x), and
      for MLA (SM90 stage 1) two points where it is: 128 heads at batch 16, context 4k
      (1.04x: its single kernel against our stage 1 plus the merge) and batch 128,
      context 128k (1.01x, within the run's noise: the identical one-split call of that
      row was 0.96x its time). Those are the shapes an engine that plans once per step
      outside the graph could route to ``BatchMLAPagedAttentionWrapper``; this op does not.
    """
    if use_kernel(q.device):
        return "triton"
    return "reference"


def _kernel(q, k_cache, v_cache, block_table, seq_lens, mask, scale, softcap, window,
            k_scale, v_scale, v_head_dim, remember=None):
    """The Triton path; with ``remember`` (a call signature, ``_signature``) the call's
    launches are also kept in ``_PLANS`` under it for later calls of that signature."""
    from .kernels.grouped_decode import grouped_decode_kernel, plan_grouped_decode

    dv = _v_head_dim(k_cache, v_cache, v_head_dim)
    if remember is None or any(t is not None and t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        # (a feature dim that is not contiguous is copied first: nothing to remember)
        out, lse, _ = grouped_decode_kernel(
            q, k_cache, v_cache, block_table=block_table, seq_lens=seq_lens, mask=mask,
            scale=scale, softcap=softcap, window=window, k_scale=k_scale, v_scale=v_scale,
            v_head_dim=dv)
        return out, lse
    inputs = _call_inputs(q, k_cache, v_cache, block_table, seq_lens, mask, k_scale, v_scale)
    buffers = Allocations(q.device)
    out, lse, _, launches = plan_grouped_decode(
        q, k_cache, v_cache, block_table=block_table, seq_lens=seq_lens, mask=inputs[5],
        mask_is_bool=mask is not None and mask.dtype == torch.bool, scale=scale, softcap=softcap,
        window=window, k_scale=k_scale, v_scale=v_scale, v_head_dim=dv, empty=buffers)
    for launch in launches:
        launch()
    plan = CallPlan.of(launches, inputs, buffers, (out, lse))
    if plan is not None:
        _PLANS.remember(remember, plan)
    return out, lse


# ------------------------------------------------------------------ planned calls
# Decode calls the op with the same shapes, strides and dtypes step after step. The first
# call of each signature is validated and planned; its launches and buffers are remembered
# (``CallPlan``) and later calls only allocate the buffers and launch. Validation and
# planning read nothing but the signature (shapes, strides, dtypes, devices) and the
# scalar arguments, all of which are in the key, so a remembered call would have passed
# validation and planned the same launches.
_PLANS = PlanCache()


def _signature(q, k_cache, v_cache, block_table, seq_lens, mask, scale, softcap, window,
               k_scale, v_scale, v_head_dim) -> tuple:
    return (scale, softcap, window, v_head_dim,
            *map(tensor_signature, (q, k_cache, v_cache, block_table, seq_lens, mask, k_scale,
                                    v_scale)))


def _call_inputs(q, k_cache, v_cache, block_table, seq_lens, mask, k_scale, v_scale) -> tuple:
    """The tensors a call's launches read, in plan order (a bool mask as its uint8 view)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return (q, k_cache, v_cache, block_table, seq_lens, mask, k_scale, v_scale)


# ------------------------------------------------------------------ the op
def _grouped_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
    block_table: torch.Tensor | None, seq_lens: torch.Tensor | None, mask: torch.Tensor | None,
    scale: float, softcap: float, window: int,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, v_head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k_cache, v_cache, block_table, seq_lens, mask, scale, softcap, window,
            k_scale, v_scale, v_head_dim)
    backend = choose_backend(q, k_cache, v_cache, block_table, seq_lens, mask, softcap,
                             window, k_scale, v_scale)
    if backend == "reference":
        validate(*args)
        return _reference(*args)
    key = _signature(*args)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan.run(_call_inputs(q, k_cache, v_cache, block_table, seq_lens, mask,
                                     k_scale, v_scale), q.device)
    validate(*args)  # raises for bad input; only calls that pass are remembered
    return _kernel(*args, remember=key)


grouped_decode_op = torch.library.custom_op("attnfuse::grouped_decode", _grouped_decode,
                                            mutates_args=())


@grouped_decode_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, mask, scale, softcap, window,
      k_scale, v_scale, v_head_dim):
    torch._check(q.dim() == 3, lambda: f"q: expected rank 3 (B, Hq, Dk), got {q.dim()}")
    torch._check(k_cache.dim() == 4, lambda: f"k_cache: expected rank 4, got {k_cache.dim()}")
    torch._check(k_cache.shape[-1] == q.shape[-1], lambda: "k_cache: expected q's head dim")
    torch._check(v_cache is not None or v_head_dim > 0,
                 lambda: f"v_head_dim: expected > 0 with no v_cache, got {v_head_dim}")
    dv = _v_head_dim(k_cache, v_cache, v_head_dim)
    out = q.new_empty(q.shape[0], q.shape[1], dv)
    lse = q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)
    return out, lse


#: whether calls reach ``_grouped_decode`` through one Python kernel (``_dispatch``)
DIRECT_DISPATCH = register_direct_kernels(grouped_decode_op, _grouped_decode)


def grouped_decode(q, k_cache, v_cache=None, *, block_table=None, seq_lens=None, mask=None,
                   scale=None, softcap=0.0, window=-1, k_scale=None, v_scale=None,
                   v_head_dim=-1, return_lse=False):
    """Keyword-friendly entry point; ``scale`` defaults to ``Dk ** -0.5``.

    Returns ``out`` or, with ``return_lse``, ``(out, lse)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = torch.ops.attnfuse.grouped_decode(
        q, k_cache, v_cache, block_table, seq_lens, mask, float(scale), float(softcap),
        int(window), k_scale, v_scale, int(v_head_dim))
    return (out, lse) if return_lse else out


def reference(*args):
    """The plain-torch reference (tests, benchmarks): the op's positional arguments."""
    return _reference(*args)
