"""``grouped_decode``: decode attention over shared KV heads becomes ``attnfuse::grouped_decode``.

Forms matched (post-grad ATen, query length 1 known statically)
-----------------------------------------------------------------
1. **repeat_kv + SDPA** (HF ``sdpa`` attention over a StaticCache; ``research/hf-graphs.md``
   A1): ``reshape|view|_unsafe_view(clone(expand(unsqueeze(cache, 2), [B, Hkv, n_rep, S,
   D])))`` for K and V, feeding any SDPA op the graph may hold (CPU flash, CUDA flash /
   efficient / cudnn, math, or the undecomposed op), with the materialized mask
   (``where(mask, 0, -inf)``) carried into the op::

       k = repeat_kv(k_cache); v = repeat_kv(v_cache)      # copies the cache n_rep times
       o = sdpa(q, k, v, attn_mask=m, scale=s)[0]          # q: (B, Hq, 1, D)
     ->
       o = grouped_decode(q[:, :, 0], k_cache, v_cache, mask=m[:, 0, 0], scale=s)[:, :, None]

2. **SDPA with fewer KV heads** (``enable_gqa=True``; the CPU flash op takes them
   directly): same rewrite without the repeat.
3. **One KV row broadcast to every head** (MQA, and MLA decode written with SDPA as
   serving code does): ``expand(unsqueeze(x (B, S, D), 1), [B, Hq, S, D])`` (a clone
   may follow) in place of the repeat, in any of the SDPA or matmul forms. The op reads
   ``x`` as ``(B, 1, S, D)``. Where V is the leading ``Dv`` features of K's own rows
   (``K = cat([x, k_rope], -1)`` with ``V = x``, the gather read twice, or ``V =
   K[..., :Dv]``), the op's shared-latent mode reads the cache once.
4. **matmul-softmax-matmul** (HF ``eager`` attention, A3): ``bmm(q, repeat_kv(k)^T)``,
   ``* scale`` (or ``/``), optional softcap ``tanh(x / c) * c``, then the mask: ``+ mask``
   (additive), or ``-inf`` written over masked logits (``masked_fill(~keep, -inf)``,
   ``where(keep, x, -inf)``: the bool mask goes to the op, negated where the graph holds
   the positions to drop), fp32 softmax decomposed into ``amax/sub/exp/sum/div`` (or
   ``_softmax``), ``bmm(p, repeat_kv(v))``. Converts around K and V (fp32 math on 16-bit
   caches) are allowed: exact upcasts are left to the op, others are applied to the
   (unrepeated) cache.
5. **SDPA's math path, decomposed** (CPU SDPA when K and V head dims differ, as in MLA
   decode through SDPA; any backend without a fused kernel): form 4 with the scale split
   as ``sqrt(s)`` on q and on ``k^T`` and the softmax inside ``_safe_softmax``'s guard
   ``where(all(x == -inf, -1), 0, softmax(x))``. The guard is exactly the op's semantics:
   a row with a finite logit passes the softmax through, a row with every logit -inf is
   0, which is what the op writes for a row with no visible key (output 0, LSE -inf; the
   kernel's invariant, ``tests/test_grouped_decode_kernel.py``, and the reference's).
6. **MLA absorbed decode** over one latent cache ``C (B, S, Dk)`` (or ``(B, 1, S, Dk)``):
   scores ``bmm(q (B, H, Dk), C^T)`` — or the sum of the nope/rope parts
   ``bmm(q[..., :Dv], C[..., :Dv]^T) + bmm(q_pe, C[..., Dv:]^T)`` — softmax as in 4, and
   ``bmm(p, C[..., :Dv])``. V is the first ``Dv`` features of the latent row: the op's
   shared-latent mode (no second read of the cache).

Where the cache tensor comes from does not matter (a placeholder, ``index_put``, or the
getitem of ``rope_kv_write``'s ``auto_functionalized`` op): the match starts at the
attention and walks back only through the repeat. The replaced attention's nodes are
erased with the rewrite, so fusions that run later do not see (and report) them.

Refusals (left alone, recorded as near misses)
----------------------------------------------
* query length > 1 (prefill) or not static;
* no KV head sharing (``Hq == Hkv``, MHA: HF's DeepSeek-V3, which attends over K/V
  decompressed per head): the unfused kernel already reads each KV head once, so the
  rewrite would gain nothing but a kernel change;
* a mask that varies per query head, or whose shape is not ``(B|1, 1, 1, S)`` after
  broadcasting; two masks on the logits; masked logits filled with a finite value
  (``finfo.min``: a fully masked row then averages every position, the op writes 0);
  ``is_causal`` with one query (top-left causal: position 0 only); dropout; SDPA
  outputs besides the attention output in use (backward);
* softmax results (attention weights) used elsewhere; a guard around the softmax that
  is not the fully-masked-row guard of the same logits;
* dtypes the op does not take.

Origin: vLLM PR 19774 (split grouped stage 1 for occupancy), made automatic.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ..custom_ops import grouped_decode as _grouped_decode_op  # noqa: F401  (registers the op)
from .base import Fusion, SiteRecorder, fake_value, sdpa_ops

aten = torch.ops.aten
prims = torch.ops.prims

#: reshapes that may close a repeat_kv or wrap a bmm operand (Inductor turns views into
#: reshapes before post-grad passes, but CUDA dumps still show ``view`` names and
#: decompositions emit ``_unsafe_view``)
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_CONVERTS = (prims.convert_element_type.default, aten._to_copy.default)
#: ops between the softmax and the P @ V bmm (HF: expand + reshape; einsum: unsqueeze)
_PROBS_VIEWS = _RESHAPES + (aten.expand.default, aten.unsqueeze.default)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_ARG_NAMES = ("attn_mask", "attn_bias")
#: conversions that change no value (a 16-bit float widened to fp32): the op reads the
#: narrower tensor and widens it itself, exactly
_EXACT_UPCASTS = frozenset({(torch.float16, torch.float32), (torch.bfloat16, torch.float32)})
#: multiplications / divisions by a Python scalar (the logit scale; SDPA's math path
#: splits it as sqrt(scale) on q and on k^T)
_SCALE_MULS = (aten.mul.Tensor, aten.mul.Scalar)
_SCALE_DIVS = (aten.div.Tensor, aten.div.Scalar)
#: pure ops that, given the same inputs, give the same tensor: two such nodes with equal
#: arguments are one value read twice (the functional graph is not CSE'd before our pass)
_REREADS = _RESHAPES + _CONVERTS + (aten.index.Tensor, aten.slice.Tensor, aten.select.int,
                                    aten.permute.default, aten.unsqueeze.default,
                                    aten.clone.default)
#: ``full``-like constants a mask or a guard writes
_FULLS = (aten.full.default, aten.full_like.default)
_NOTS = (aten.bitwise_not.default, aten.logical_not.default)


class _Refuse(Exception):
    """A candidate that will not be rewritten; the message is the near-miss reason."""


# ------------------------------------------------------------------ small helpers
def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: Any) -> tuple:
    val = fake_value(node)
    if not isinstance(val, torch.Tensor):
        raise _Refuse(f"no tensor metadata on {getattr(node, 'name', node)}")
    return tuple(val.shape)


def _static(shape: Sequence[Any], what: str) -> tuple[int, ...]:
    if not all(isinstance(s, int) for s in shape):
        raise _Refuse(f"{what} has a symbolic shape {tuple(shape)}")
    return tuple(shape)


def _skip(node: Any, targets: tuple) -> Any:
    while _is(node, *targets):
        node = node.args[0]
    return node


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _scalar(arg: Any) -> float | None:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    return None


def _op_name(node: Any) -> str:
    if isinstance(node, fx.Node) and node.op == "call_function":
        return str(node.target) if isinstance(node.target, torch._ops.OpOverload) \
            else getattr(node.target, "__name__", str(node.target))
    return getattr(node, "op", type(node).__name__)


def _dtype(node: Any) -> torch.dtype | None:
    val = fake_value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def _skip_exact_upcasts(node: Any) -> Any:
    while _is(node, *_CONVERTS) and (_dtype(node.args[0]), _dtype(node)) in _EXACT_UPCASTS:
        node = node.args[0]
    return node


def _peel_scale(node: Any) -> tuple[Any, float]:
    """``(x, c)`` for ``x * c`` (or ``x / (1 / c)``) with Python scalars, nested."""
    factor = 1.0
    while True:
        if _is(node, *_SCALE_MULS) and _scalar(node.args[1]) is not None:
            factor *= _scalar(node.args[1])
        elif _is(node, *_SCALE_DIVS) and _scalar(node.args[1]) not in (None, 0.0):
            factor /= _scalar(node.args[1])
        else:
            return node, factor
        node = node.args[0]


def _constant_fill(arg: Any) -> float | None:
    """The value of a Python scalar or of a ``full``/``zeros`` node, else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if _is(arg, *_FULLS):
        return _scalar(arg.args[1])
    if _is(arg, aten.zeros.default, aten.zeros_like.default):
        return 0.0
    return None


def _same_value(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are one tensor: the same node, or one pure op on the same inputs."""
    if a is b:
        return True
    return (_is(a, *_REREADS) and _is(b, a.target) and a.args == b.args
            and a.kwargs == b.kwargs)


def _strip_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """``(cache, n_rep)`` of a repeat_kv chain, or ``(node, 1)`` when there is none."""
    if not _is(node, *_RESHAPES):
        return node, 1
    inner = node.args[0]
    if _is(inner, aten.clone.default):
        inner = inner.args[0]
    if not _is(inner, aten.expand.default):
        return node, 1
    unsq = inner.args[0]
    if not (_is(unsq, aten.unsqueeze.default) and unsq.args[1] in (2, -3)):
        return node, 1
    src = unsq.args[0]
    b, hkv, s, d = _static(_shape(src), "the KV cache")
    eb, ehkv, n_rep, es, ed = _static(_shape(inner), "the repeated KV")
    if (eb, ehkv, es, ed) != (b, hkv, s, d) or _shape(node) != (b, hkv * n_rep, s, d):
        raise _Refuse(f"repeat_kv-like chain with unexpected shapes "
                      f"{_shape(src)} -> {_shape(node)}")
    return src, n_rep


class _KV:
    """What one K or V operand ``(B, Hq, S, D)`` of the attention reads.

    ``node`` holds the values; the op reads it as ``shape`` ``(B, Hkv, S, D)`` (a reshape is
    emitted where ``node`` has another shape) converted to ``dtype`` (the dtype the
    attention computed with; exact upcasts are left to the op); each of its heads serves
    ``n_rep`` query heads.
    """

    def __init__(self, node: fx.Node, shape: tuple[int, ...], n_rep: int,
                 dtype: torch.dtype | None) -> None:
        self.node, self.shape, self.n_rep, self.dtype = node, shape, n_rep, dtype


def _kv_source(node: fx.Node, what: str) -> _KV:
    """Walks back from a K or V operand through converts and one head repeat: HF's
    ``repeat_kv`` (``_strip_repeat_kv``), or one KV row broadcast to every head
    (``expand(unsqueeze(x, 1))``, with or without a clone: MQA, MLA decode through SDPA)."""
    used = _dtype(node)
    inner = _skip(node, _CONVERTS)
    src, n_rep = _strip_repeat_kv(inner)
    if n_rep > 1:
        return _KV(src, _shape(src), n_rep, used)
    shape = _static(_shape(inner), what)
    base, dims = _view_dims(_skip(inner, (aten.clone.default,)))
    if len(shape) == 4 and len(dims) == 4 and dims[1] is None and shape[1] > 1:
        kept = [(size, d) for size, d in zip((shape[0], shape[2], shape[3]),
                                             (dims[0], dims[2], dims[3]))]
        real = [d for _, d in kept if d is not None]
        base_shape = _shape(base)
        if (all(d is not None or size == 1 for size, d in kept) and real == sorted(set(real))
                and all(size == 1 for i, size in enumerate(base_shape) if i not in real)):
            # the base's non-1 dims are (batch, position, feature) in order: reshaping it
            # to (B, 1, S, D) is a view, and every head reads that one row
            return _KV(base, (shape[0], 1, shape[2], shape[3]), shape[1], used)
    return _KV(inner, shape, 1, used)


def _latent_prefix(k: _KV, v: _KV) -> bool:
    """V is the leading features of K's own rows (``K = cat([V, k_rope], -1)`` or ``V =
    K[..., :Dv]``): the op's shared-latent mode then reads the cache once."""
    if k.dtype != v.dtype or _dtype(k.node) != _dtype(v.node) or k.shape[:3] != v.shape[:3]:
        return False
    k_shape, v_shape = _shape(k.node), _shape(v.node)
    if k_shape[-1] != k.shape[-1] or v_shape[-1] != v.shape[-1] or \
            k_shape[:-1] != v_shape[:-1] or v.shape[-1] >= k.shape[-1]:
        return False
    if _is(k.node, aten.cat.default):
        parts = k.node.args[0]
        dim = k.node.args[1] if len(k.node.args) > 1 else k.node.kwargs.get("dim", 0)
        return dim % len(k_shape) == len(k_shape) - 1 and _same_value(parts[0], v.node)
    src, lo, hi = _latent(v.node)
    return src is k.node and lo == 0 and hi == v.shape[-1]


def _emit(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A new node with its FakeTensor metadata computed from its inputs'."""
    node = graph.call_function(target, args, kwargs or {})
    fake_args = torch.fx.node.map_arg(args, fake_value)
    fake_kwargs = torch.fx.node.map_arg(kwargs or {}, fake_value)
    mode = torch._guards.detect_fake_mode(
        [a for a in torch.utils._pytree.tree_leaves((fake_args, fake_kwargs))
         if isinstance(a, torch.Tensor)])
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    else:  # graphs built without fake tensors (never from torch.compile)
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


# ------------------------------------------------------------------ the site
class _Site:
    """What the op needs, gathered from one matched attention."""

    def __init__(self) -> None:
        self.q: fx.Node | None = None         # (B, Hq, 1, Dk) or (B, Hq, Dk) (MLA form)
        self.q_has_len_dim = True
        self.k: fx.Node | None = None         # (B, Hkv, S, Dk)
        self.v: fx.Node | None = None         # (B, Hkv, S, Dv) or None (shared latent)
        self.k_shape: tuple[int, ...] | None = None   # read as (a reshape when it differs)
        self.v_shape: tuple[int, ...] | None = None
        self.k_dtype: torch.dtype | None = None       # computed in (a convert when needed)
        self.v_dtype: torch.dtype | None = None
        self.v_head_dim = -1
        self.mask: fx.Node | None = None
        self.mask_rank = 4                    # rank of the logits the mask broadcasts to
        self.mask_invert = False              # bool mask marks masked positions (True = drop)
        self.scale = 1.0
        self.softcap = 0.0
        self.q_parts: tuple[fx.Node, ...] | None = None  # MLA query parts (nope, rope)
        self.detail = ""


def _set_kv(site: _Site, k: _KV, v: _KV) -> None:
    site.k, site.k_shape, site.k_dtype = k.node, k.shape, k.dtype
    if _latent_prefix(k, v):
        site.v, site.v_head_dim = None, v.shape[-1]
    else:
        site.v, site.v_shape, site.v_dtype = v.node, v.shape, v.dtype


def _decode_q(q: fx.Node) -> tuple[int, int, int]:
    shape = _shape(q)
    if len(shape) != 4:
        raise _Refuse(f"query of rank {len(shape)}, expected (B, H, L, D)")
    q_len = shape[2]
    if not isinstance(q_len, int):
        raise _Refuse(f"query length {q_len} is not static")
    if q_len != 1:
        raise _Refuse(f"query length {q_len} > 1 (not decode)")
    b, h, _, d = _static(shape, "the query")
    return b, h, d


def _check_sharing(hq: int, hkv: int, n_rep: int) -> None:
    """``n_rep`` > 1: K/V were repeated to ``hq`` heads; 1: the attention op itself takes
    ``hkv`` heads (``enable_gqa``, CPU flash) or there is no sharing."""
    if n_rep > 1 and hkv * n_rep != hq:
        raise _Refuse(f"{hq} query heads over {hkv} KV heads x {n_rep} repeats")
    if hkv == hq:
        raise _Refuse("no KV head sharing (Hq == Hkv, MHA): nothing to gain")
    if hq % hkv:
        raise _Refuse(f"{hq} query heads not a multiple of {hkv} KV heads")


def _carry_mask(mask: Any, batch: int, hq: int, s: int, rank: int = 4) -> fx.Node | None:
    """The mask node if the op can carry it (``_rewrite`` reshapes it to (B|1, S)), or a
    refusal. ``rank`` is the rank of the logits it is added to: 4 (B, H, 1, S), or 3
    (B, H, S) for the MLA form."""
    if mask is None:
        return None
    if not isinstance(mask, fx.Node):
        raise _Refuse(f"mask is a constant {mask!r}")
    val = fake_value(mask)
    if not isinstance(val, torch.Tensor):
        raise _Refuse("mask has no tensor metadata")
    if val.dtype != torch.bool and val.dtype not in _FLOAT_DTYPES:
        raise _Refuse(f"mask dtype {val.dtype}")
    shape = _static(val.shape, "the mask")
    if len(shape) > rank:
        raise _Refuse(f"mask of rank {len(shape)}")
    padded = (1,) * (rank - len(shape)) + shape
    mb, mh, mq, ms = padded if rank == 4 else (padded[0], padded[1], 1, padded[2])
    if mh != 1 and _is(mask, aten.expand.default):
        # a head-broadcast mask expanded to every head is still one mask for all heads
        src_shape = _shape(mask.args[0])
        if len(src_shape) == len(shape) and src_shape[-3 if rank == 4 else -2] == 1:
            return _carry_mask(mask.args[0], batch, hq, s, rank)
    if mh != 1:
        raise _Refuse(f"mask varies per head (shape {shape})")
    if mq != 1:
        raise _Refuse(f"mask has {mq} query rows")
    if mb not in (1, batch):
        raise _Refuse(f"mask batch {mb} for batch {batch}")
    if ms != s:
        raise _Refuse(f"mask covers {ms} positions, the cache {s}")
    return mask


def _softmax_input(probs: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """``x`` of ``softmax(x, -1)`` written as amax/sub/exp/sum/div (or ``_softmax``),
    possibly inside a fully-masked-row guard, plus the internal nodes (checked for
    outside users; the first is the one the attention weights leave from)."""
    node = _skip(probs, _CONVERTS)
    if _is(node, aten.where.self):
        # SDPA's math path decomposes _safe_softmax into where(row all -inf, 0, softmax)
        guarded, guard = _fully_masked_row_guard(node)
        node = node.args[2]
        while _is(node, *_CONVERTS):
            guard.append(node)
            node = node.args[0]
        x, internals = _plain_softmax_input(node)
        if _skip_exact_upcasts(guarded) is not _skip_exact_upcasts(x):
            raise _Refuse("fully-masked-row guard tests another tensor than the softmax's")
        return x, guard + internals
    return _plain_softmax_input(node)


def _fully_masked_row_guard(where: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """``X`` of ``where(all(X == -inf, -1, keepdim), 0, probs)`` and the guard's nodes
    (``where`` first). ``all`` may be spelled ``not(any(not(...)))`` (its decomposition).

    Rewriting it is exact: where a row of ``X`` has a finite logit the guard passes the
    softmax through, and where every logit is -inf the guard writes 0, as the op does
    for a row with no visible key (output 0, LSE -inf: ``custom_ops/grouped_decode.py``).
    """
    cond, zero = where.args[0], where.args[1]
    if _constant_fill(zero) != 0.0:
        raise _Refuse("softmax guard that writes something other than 0")
    nodes = [where, cond] + ([zero] if isinstance(zero, fx.Node) else [])
    if _is(cond, *_NOTS) and _is(cond.args[0], aten.any.dim, aten.any.dims):
        red = cond.args[0]
        test = red.args[0]
        if not _is(test, *_NOTS):
            raise _Refuse("softmax guard that is not all(x == -inf) over the row")
        nodes += [red, test]
        test = test.args[0]
    elif _is(cond, aten.all.dim, aten.all.dims):
        red, test = cond, cond.args[0]
    else:
        raise _Refuse("softmax behind a where that is not a fully-masked-row guard")
    if not (_is(test, aten.eq.Scalar) and _scalar(test.args[1]) == float("-inf")):
        raise _Refuse("softmax guard that is not all(x == -inf) over the row")
    nodes.append(test)
    args = _bind(red)
    dims = args["dim"] if isinstance(args["dim"], (list, tuple)) else [args["dim"]]
    rank = len(_shape(test))
    if None in dims or [d % rank for d in dims] != [rank - 1] or not args["keepdim"]:
        raise _Refuse("softmax guard over a dim other than the last")
    return test.args[0], nodes


def _plain_softmax_input(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    if _is(node, aten._softmax.default, aten._safe_softmax.default):
        if node.args[1] not in (-1, len(_shape(node)) - 1):
            raise _Refuse("softmax over a dim other than the last")
        return node.args[0], [node]
    if not _is(node, aten.div.Tensor):
        raise _Refuse("attention weights are not a softmax")
    exp, denom = node.args
    if not (_is(exp, aten.exp.default) and _is(denom, aten.sum.dim_IntList)
            and denom.args[0] is exp):
        raise _Refuse("attention weights are not exp / sum(exp)")
    sub = exp.args[0]
    if _is(sub, aten.where.self):
        # Inductor's softmax(x * scale) rewrite computes the max on the unscaled input and
        # keeps the plain form for non-finite rows: where(finite, folded, x - amax(x))
        sub = sub.args[2]
    if not (_is(sub, aten.sub.Tensor) and _is(sub.args[1], aten.amax.default)
            and sub.args[1].args[0] is sub.args[0]):
        raise _Refuse("softmax without the max subtraction")
    rank = len(_shape(sub))
    for red in (denom, sub.args[1]):
        dims = list(red.args[1])
        if dims not in ([-1], [rank - 1]):
            raise _Refuse("softmax over a dim other than the last")
    internals = [node, exp, denom, sub, sub.args[1]]
    if exp.args[0] is not sub:
        internals.append(exp.args[0])
    return sub.args[0], internals


def _logit_transforms(site: _Site, x: fx.Node, batch: int, hq: int, s: int) -> fx.Node:
    """Peel mask, softcap and scale off the logits; returns the raw score node."""
    x = _skip(x, _CONVERTS)
    rank = len(_shape(x))
    # the mask is applied last: added (HF: additive mask) or written over the logits
    # (masked_fill(~keep, -inf), a where after decomposition); the op carries one. An add
    # below it is the scores' own (MLA: nope + rope parts).
    if _is(x, aten.add.Tensor):
        x = _skip(_peel_additive_mask(site, x, batch, hq, s, rank), _CONVERTS)
    elif _is(x, aten.where.self, aten.masked_fill.Scalar):
        x = _skip(_peel_bool_mask(site, x, batch, hq, s, rank), _CONVERTS)
    if site.mask is not None:
        site.mask_rank = rank
        if _is(x, aten.where.self, aten.masked_fill.Scalar):
            raise _Refuse("logits carry two masks (the op takes one)")
    if _is(x, aten.mul.Tensor) and _is(x.args[0], aten.tanh.default):
        cap = _scalar(x.args[1])
        inner = x.args[0].args[0]
        if cap is None or not _is(inner, aten.div.Tensor) or _scalar(inner.args[1]) != cap:
            raise _Refuse("tanh on the logits that is not a softcap c * tanh(x / c)")
        site.softcap = cap
        x = _skip(inner.args[0], _CONVERTS)
    x, site.scale = _peel_scale(x)
    x = _skip(x, _CONVERTS)
    if site.scale != 1.0 and _is(x, aten.add.Tensor):
        from_bmm = [_is(_skip(a, _CONVERTS + _RESHAPES), aten.bmm.default) for a in x.args]
        if sum(from_bmm) == 1:
            # (scores + mask) * s: the op adds the mask after scaling (an MLA sum of two
            # score bmms, scaled together, is the scores' own add)
            raise _Refuse("mask added before the logit scale")
    return x


def _peel_additive_mask(site: _Site, x: fx.Node, batch: int, hq: int, s: int,
                        rank: int) -> fx.Node:
    a, b = x.args
    # the mask is the operand that is not a bmm result (scores come from a bmm,
    # possibly scaled or capped); which one that is gets settled by the checks
    b_is_scores = _is(_skip(b, _CONVERTS + _RESHAPES), aten.bmm.default, *_SCALE_MULS,
                      *_SCALE_DIVS)
    scores, mask = (b, a) if b_is_scores else (a, b)
    if not isinstance(mask, fx.Node):
        raise _Refuse(f"logits plus a constant {mask!r}")
    site.mask = _carry_mask(mask, batch, hq, s, rank)
    return scores


def _peel_bool_mask(site: _Site, x: fx.Node, batch: int, hq: int, s: int,
                    rank: int) -> fx.Node:
    """``where(keep, logits, -inf)``, ``where(drop, -inf, logits)`` or
    ``masked_fill(logits, drop, -inf)``: the bool mask goes to the op (True = attend)."""
    if _is(x, aten.masked_fill.Scalar):
        scores, cond, fill, drop = x.args[0], x.args[1], x.args[2], True
    else:
        cond, a, b = x.args
        a_fill, b_fill = _constant_fill(a), _constant_fill(b)
        if a_fill is None and b_fill is not None:
            scores, fill, drop = a, b, False
        elif a_fill is not None and b_fill is None:
            scores, fill, drop = b, a, True
        else:
            raise _Refuse("logits pass through a where that is not a mask")
    fill = _constant_fill(fill)
    if fill != float("-inf"):
        # a finite fill differs from masking on a fully masked row (the softmax then
        # averages every position; the op writes 0)
        raise _Refuse(f"logits masked with {fill} instead of -inf")
    if not isinstance(scores, fx.Node) or _shape(scores) != _shape(x):
        raise _Refuse("mask broadcasts the logits to another shape")
    if _dtype(cond) != torch.bool:
        raise _Refuse(f"where condition of dtype {_dtype(cond)}")
    if drop and _is(cond, *_NOTS) and _dtype(cond.args[0]) == torch.bool:
        cond, drop = cond.args[0], False
    site.mask = _carry_mask(cond, batch, hq, s, rank)
    site.mask_invert = drop
    return scores


def _bmm_operand(node: Any) -> fx.Node:
    """The 4-D tensor behind ``reshape(expand(t))`` feeding a bmm.

    Only one reshape is stripped: when the (same-shape) expand was removed as a no-op,
    the next reshape up is repeat_kv's own, which ``_strip_repeat_kv`` must still see.
    """
    if _is(node, *_RESHAPES):
        node = node.args[0]
    return _skip(node, (aten.expand.default,))


# ------------------------------------------------------------------ matchers
def _match_sdpa(node: fx.Node) -> tuple[_Site, fx.Node]:
    """Returns the site and the node whose uses the op output replaces."""
    args = _bind(node)
    q, k, v = args["query"], args["key"], args["value"]
    batch, hq, dk = _decode_q(q)
    if _scalar(args.get("dropout_p")) not in (None, 0.0):
        raise _Refuse(f"dropout_p={args['dropout_p']}")
    if args.get("is_causal"):
        raise _Refuse("is_causal with one query (top-left causal: only position 0)")
    if args.get("dropout_mask") is not None:
        raise _Refuse("dropout mask")
    k_src, v_src = _kv_source(k, "K"), _kv_source(v, "V")
    kb, hkv, s, kd = _static(k_src.shape, "K")
    vb, vh, vs, _ = _static(v_src.shape, "V")
    if (vb, vh, vs) != (kb, hkv, s) or kb != batch or kd != dk or k_src.n_rep != v_src.n_rep:
        raise _Refuse(f"K {k_src.shape} and V {v_src.shape} do not pair up for q {_shape(q)}")
    _check_sharing(hq, hkv, k_src.n_rep)

    # outputs besides the attention output (logsumexp, ...) must be unused
    if node.target in (aten.scaled_dot_product_attention.default,):
        out_node = node
    else:
        uses = list(node.users)
        if not all(_is(u, operator.getitem) for u in uses):
            raise _Refuse("SDPA result used as a tuple")
        if any(u.args[1] != 0 for u in uses if u.users):
            raise _Refuse("SDPA outputs besides the attention output are used")
        firsts = [u for u in uses if u.args[1] == 0]
        if len(firsts) != 1:
            raise _Refuse("SDPA attention output not taken exactly once")
        out_node = firsts[0]

    site = _Site()
    site.q = q
    _set_kv(site, k_src, v_src)
    mask = next((args[n] for n in _MASK_ARG_NAMES if n in args), None)
    site.mask = _carry_mask(mask, batch, hq, s)
    scale = args.get("scale")
    site.scale = float(scale) if scale is not None else 1.0 / math.sqrt(dk)
    site.detail = f"sdpa {node.target.__name__.split('.')[0]} n_rep={hq // hkv}"
    return site, out_node


def _match_eager(bmm2: fx.Node) -> tuple[_Site, fx.Node]:
    """``bmm(softmax(scale * bmm(q, k^T) + mask), v)`` with repeat_kv'd (or latent) K/V."""
    probs_op, v_op = bmm2.args
    probs = _skip(probs_op, _PROBS_VIEWS)
    v_rep = _bmm_operand(v_op)
    logits, internals = _softmax_input(probs)
    path = []  # softmax output -> converts -> expand -> reshape -> bmm2
    node = probs_op
    while node is not internals[0]:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            raise _Refuse("attention weights reach the bmm through unexpected ops")
        path.append(node)
        node = node.args[0]
    allowed = set(internals) | set(path) | {bmm2}
    for n in internals + path:
        if any(u not in allowed for u in n.users):
            raise _Refuse("attention weights are used elsewhere")

    prob_shape = _shape(probs)
    if len(prob_shape) == 4:
        batch, hq, q_len, s = prob_shape
    elif len(prob_shape) == 3:
        batch, hq, s = prob_shape
        q_len = 1
    else:
        raise _Refuse(f"attention weights of rank {len(prob_shape)}")
    if q_len != 1:
        raise _Refuse(f"query length {q_len} > 1 (not decode)")

    if _shape(probs_op)[-1] != s or _shape(bmm2)[-2] * _shape(bmm2)[0] != batch * hq:
        raise _Refuse("attention weights reshaped across the key dim before the bmm")

    site = _Site()
    scores = _logit_transforms(site, logits, batch, hq, s)
    bmm1 = _skip(scores, _RESHAPES)
    q, q_factor = _peel_scale(_bmm_operand(bmm1.args[0])) if _is(bmm1, aten.bmm.default) \
        else (None, 1.0)
    if q is None or len(_shape(q)) != 4:
        # not HF's (B, H, 1, D) query: an absorbed MLA decode over a latent cache
        return _match_mla(site, scores, v_op, bmm2, batch, hq, s)
    # SDPA's math path scales q and k^T by sqrt(scale) each, before the bmm
    kt, k_factor = _peel_scale(_bmm_operand(bmm1.args[1]))
    if _is(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2]:
        k_rep, k_factor2 = _peel_scale(kt.args[0])
    else:
        raise _Refuse("keys are not transposed before the score bmm")
    site.scale *= q_factor * k_factor * k_factor2

    _, _, dk = _decode_q(q)
    k_src, v_src = _kv_source(k_rep, "K"), _kv_source(v_rep, "V")
    kb, hkv, ks, kd = _static(k_src.shape, "K")
    vb, vh, vs, _ = _static(v_src.shape, "V")
    if (kb, ks, kd) != (batch, s, dk) or (vb, vh, vs) != (kb, hkv, ks) \
            or k_src.n_rep != v_src.n_rep:
        raise _Refuse(f"K {k_src.shape} and V {v_src.shape} do not pair up")
    _check_sharing(hq, hkv, k_src.n_rep)
    site.q = q
    _set_kv(site, k_src, v_src)
    form = "eager safe_softmax" if internals[0].target is aten.where.self else "eager"
    site.detail = f"{form} n_rep={hq // hkv}" + (" shared-latent" if site.v is None else "")
    return site, bmm2


def _view_dims(node: Any) -> tuple[Any, list[int | None]]:
    """``(base, dims)``: ``node`` re-indexes ``base`` without copying values, its dim
    ``i`` being ``base`` dim ``dims[i]`` (``None``: a size-1 or broadcast dim).

    Follows unsqueeze, squeeze, permute, expand and reshapes that only add or drop
    size-1 dims (what einsum's lowering and HF's ``[:, :, None]`` produce); stops at
    anything else, which becomes the base.
    """
    if not isinstance(node, fx.Node) or not isinstance(fake_value(node), torch.Tensor):
        return node, []
    rank = len(_shape(node))
    identity = (node, list(range(rank)))
    if _is(node, aten.unsqueeze.default):
        base, dims = _view_dims(node.args[0])
        dims = list(dims)
        dims.insert(node.args[1] % rank, None)
        return base, dims
    if _is(node, aten.squeeze.dim, aten.squeeze.dims):
        base, dims = _view_dims(node.args[0])
        in_rank = len(dims)
        drop = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        drop = {d % in_rank for d in drop if _shape(node.args[0])[d % in_rank] == 1}
        return base, [d for i, d in enumerate(dims) if i not in drop]
    if _is(node, aten.permute.default):
        base, dims = _view_dims(node.args[0])
        return base, [dims[p % rank] for p in node.args[1]]
    if _is(node, aten.expand.default):
        base, dims = _view_dims(node.args[0])
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        lead = len(out_shape) - len(in_shape)
        dims = [None] * lead + list(dims)
        for i, (a, b) in enumerate(zip(in_shape, out_shape[lead:])):
            if a != b:
                dims[lead + i] = None  # broadcast: every index reads the same value
        return base, dims
    if _is(node, *_RESHAPES):
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if [x for x in in_shape if x != 1] != [x for x in out_shape if x != 1]:
            return identity
        base, dims = _view_dims(node.args[0])
        real = iter([d for d, x in zip(dims, in_shape) if x != 1])
        return base, [next(real) if x != 1 else None for x in out_shape]
    return identity


def _axes(operand: Any, want: int) -> tuple[fx.Node, list[int]]:
    """Base of a bmm operand and the base dim behind each of its ``want`` dims; every
    base dim not behind one must have size 1 (no hidden broadcast or reduction)."""
    base, dims = _view_dims(operand)
    if len(dims) != want or any(d is None for d in dims):
        raise _Refuse("MLA operand broadcast or reshaped beyond adding size-1 dims")
    base_shape = _shape(base)
    if any(size != 1 for i, size in enumerate(base_shape) if i not in dims):
        raise _Refuse("MLA operand drops a dim of its source")
    return base, dims


def _latent(node: fx.Node) -> tuple[fx.Node, int, int]:
    """``(cache, lo, hi)`` for a last-dim feature slice of a cache (or the whole of it)."""
    if _is(node, aten.slice.Tensor):
        src, dim = node.args[0], node.args[1]
        rank = len(_shape(src))
        step = node.args[4] if len(node.args) > 4 else 1
        if dim % rank == rank - 1 and step == 1:
            width = _shape(src)[-1]
            lo = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
            hi = node.args[3] if len(node.args) > 3 and node.args[3] is not None else width
            return src, max(lo, 0), min(hi, width)
    return node, 0, _shape(node)[-1]


def _mla_term(term: Any, batch: int, hq: int, s: int):
    """One score bmm ``q (B, H, Dq) x cache[..., lo:hi]^T``: ``(q, cache, lo, hi)``."""
    bmm, dims = _view_dims(term)
    if not _is(bmm, aten.bmm.default):
        raise _Refuse(f"scores come from {_op_name(bmm)}, not from a bmm")
    if [d for d in dims if d is not None] != [0, 1, 2]:
        raise _Refuse(f"MLA score bmm of shape {_shape(bmm)} reshaped to {_shape(term)}")
    q, q_axes = _axes(bmm.args[0], 3)
    kv, k_axes = _axes(bmm.args[1], 3)
    cache, lo, hi = _latent(kv)
    q_rank, c_rank = len(_shape(q)), len(_shape(cache))
    # q (b, m, k) = (batch, head, feature); keys (b, k, n) = (batch, feature, position)
    if q_axes[0] != 0 or q_axes[2] != q_rank - 1 or not q_axes[0] < q_axes[1] < q_axes[2]:
        raise _Refuse("MLA query is not (batch, heads, features)")
    if k_axes != [0, c_rank - 1, c_rank - 2]:
        raise _Refuse("MLA keys are not (batch, positions, features) transposed")
    if _shape(bmm) != (batch, hq, s):
        raise _Refuse(f"MLA scores of shape {_shape(bmm)}")
    return q, cache, lo, hi


def _match_mla(site: _Site, scores: fx.Node, v_op: Any, bmm2: fx.Node, batch: int, hq: int,
               s: int) -> tuple[_Site, fx.Node]:
    root, _ = _view_dims(scores)
    terms = root.args if _is(root, aten.add.Tensor) else (scores,)
    parts = sorted((_mla_term(t, batch, hq, s) for t in terms), key=lambda p: p[2])
    cache = parts[0][1]
    tiles = all(p[1] is cache for p in parts) and parts[0][2] == 0 and \
        all(a[3] == b[2] for a, b in itertools.pairwise(parts)) and parts[-1][3] == _shape(cache)[-1]
    if not tiles:
        raise _Refuse("MLA score parts do not cover one latent cache")
    cshape = _static(_shape(cache), "the latent cache")
    if not (len(cshape) == 3 or (len(cshape) == 4 and cshape[1] == 1)) or cshape[0] != batch \
            or cshape[-2] != s:
        raise _Refuse(f"latent cache of shape {cshape}, expected (B, S, D) or (B, 1, S, D)")
    v, v_axes = _axes(v_op, 3)
    v_cache, v_lo, dv = _latent(v)
    if v_cache is not cache or v_lo != 0 or v_axes != [0, len(cshape) - 2, len(cshape) - 1]:
        raise _Refuse("values are not the leading features of the latent cache the keys use")
    queries = [p[0] for p in parts]
    for q, (_, _, lo, hi) in zip(queries, parts):
        qs = _shape(q)
        if qs[0] != batch or qs[-1] != hi - lo or math.prod(qs) != batch * hq * (hi - lo):
            raise _Refuse(f"MLA query part of shape {qs}")
    site.q, site.q_parts = queries[0], tuple(queries)
    site.q_has_len_dim = False
    site.k, site.v, site.v_head_dim = cache, None, dv
    site.detail = f"mla absorbed heads={hq} dk={cshape[-1]} dv={dv} parts={len(parts)}"
    return site, bmm2


def _cache_operand(graph: fx.Graph, node: fx.Node | None, shape: tuple[int, ...] | None,
                   dtype: torch.dtype | None) -> fx.Node | None:
    """``node`` as the op reads it: converted where the attention used another dtype (an
    exact upcast is left to the op, which widens to q's dtype itself), reshaped to
    ``shape`` (a view: only size-1 dims move)."""
    if node is None:
        return None
    src = _dtype(node)
    if dtype is not None and src != dtype and (src, dtype) not in _EXACT_UPCASTS:
        node = _emit(graph, prims.convert_element_type.default, (node, dtype))
    if shape is not None and _shape(node) != tuple(shape):
        node = _emit(graph, aten.reshape.default, (node, list(shape)))
    return node


# ------------------------------------------------------------------ the fusion
class GroupedDecodeFusion(Fusion):
    """Rewrites decode attention over shared KV heads into ``attnfuse::grouped_decode``."""

    name = "grouped_decode"
    origin = "vLLM PR 19774 (split grouped stage 1 for occupancy)"
    source_modules = ("attnfuse.custom_ops.grouped_decode",
                      "attnfuse.custom_ops.kernels.grouped_decode")

    def apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
        sdpa = sdpa_ops()
        for node in list(graph.nodes):
            if node.op != "call_function" or getattr(node, "_erased", False):
                continue
            if node.target in sdpa:
                matcher = _match_sdpa
            elif node.target is aten.bmm.default and self._looks_like_pv(node):
                matcher = _match_eager
            else:
                continue
            existing = set(graph.nodes)
            try:
                site, anchor = matcher(node)
                self._rewrite(graph, site, anchor, node)
            except Exception as exc:  # noqa: BLE001  (a pass never raises on an unfamiliar graph)
                # a failure part-way through a rewrite leaves only unused new nodes behind
                for new in reversed([n for n in graph.nodes if n not in existing]):
                    if not new.users:
                        graph.erase_node(new)
                reason = str(exc) if isinstance(exc, _Refuse) else \
                    f"matcher failed: {type(exc).__name__}: {exc}"
                sites.near_miss(node, reason)
                continue
            sites.rewritten(node, site.detail)

    @staticmethod
    def _looks_like_pv(bmm: fx.Node) -> bool:
        """Cheap filter: the first operand comes from a softmax (so the projections' and
        the score bmms are not reported as near misses)."""
        probs = _skip(_skip(bmm.args[0], _PROBS_VIEWS), _CONVERTS)
        if _is(probs, aten.where.self):  # _safe_softmax's guard: a candidate, reported
            probs = _skip(probs.args[2], _CONVERTS)
        return _is(probs, aten.div.Tensor, aten._softmax.default, aten._safe_softmax.default) \
            and (not _is(probs, aten.div.Tensor) or _is(probs.args[0], aten.exp.default))

    def _rewrite(self, graph: fx.Graph, site: _Site, anchor: fx.Node, origin: fx.Node) -> None:
        out_val = fake_value(anchor)
        q_val = fake_value(site.q)
        if q_val.dtype not in _FLOAT_DTYPES:
            raise _Refuse(f"query dtype {q_val.dtype}")
        if not site.scale > 0:
            raise _Refuse(f"logit scale {site.scale} is not positive")
        for node, dtype in ((site.k, site.k_dtype), (site.v, site.v_dtype)):
            if node is not None and dtype not in (None,) + _FLOAT_DTYPES:
                raise _Refuse(f"K/V computed in {dtype}")
        with graph.inserting_before(anchor):
            if site.q_parts is not None:
                batch, hq = _shape(anchor)[0], _shape(anchor)[1]
                parts = [_emit(graph, aten.reshape.default, (p, [batch, hq, _shape(p)[-1]]))
                         for p in site.q_parts]
                q3 = parts[0] if len(parts) == 1 else _emit(graph, aten.cat.default, (parts, -1))
            elif site.q_has_len_dim:
                q3 = _emit(graph, aten.squeeze.dim, (site.q, 2))
            else:
                q3 = site.q
            k = _cache_operand(graph, site.k, site.k_shape, site.k_dtype)
            v = _cache_operand(graph, site.v, site.v_shape, site.v_dtype)
            if site.v is None and len(_shape(k)) == 3:
                k = _emit(graph, aten.unsqueeze.default, (k, 1))
            mask = site.mask
            if mask is not None:
                mshape = _shape(mask)
                mask_batch = ((1,) * (site.mask_rank - len(mshape)) + mshape)[0]
                mask = _emit(graph, aten.reshape.default, (mask, [mask_batch, mshape[-1]]))
                if site.mask_invert:
                    mask = _emit(graph, aten.logical_not.default, (mask,))
            call = _emit(graph, torch.ops.attnfuse.grouped_decode.default,
                         (q3, k, v, None, None, mask, float(site.scale),
                          float(site.softcap), -1, None, None, int(site.v_head_dim)))
            out = _emit(graph, operator.getitem, (call, 0))
            target_shape = list(_shape(anchor))
            if out_val.dtype != q_val.dtype:
                out = _emit(graph, prims.convert_element_type.default, (out, out_val.dtype))
            out = _emit(graph, aten.reshape.default, (out, target_shape))
        for n in (q3, call, out):
            n.meta.setdefault("stack_trace", origin.meta.get("stack_trace"))
        anchor.replace_all_uses_with(out)
        # SDPA ops with a dropout seed count as impure, so dead-code elimination would keep
        # them (and the repeat_kv copies feeding them): erase the replaced site here
        for user in list(origin.users):
            if _is(user, operator.getitem) and not user.users:
                graph.erase_node(user)
        dead = [anchor, origin]
        # the replaced attention (softmax, repeats, guard) goes now, not at the final
        # dead-code elimination: fusions that run later must not report it as a near miss
        while dead:
            node = dead.pop()
            if not getattr(node, "_erased", False) and node.op == "call_function" \
                    and not node.users \
                    and (node is origin or not node.is_impure()):
                dead.extend(n for n in node.all_input_nodes if n not in dead)
                graph.erase_node(node)
