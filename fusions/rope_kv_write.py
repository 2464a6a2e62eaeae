"""``rope_kv_write``: RoPE on q and k followed by the KV-cache write becomes one op.

Unfused (post-grad ATen, after functionalization)::

    q_rot = rope(q, cos, sin)                      # any spelling, see "RoPE forms"
    k_rot = rope(k, cos, sin)
    new_k = index_put(k_cache, index, k_rot)       # or through a flat view of a paged cache
    new_v = index_put(v_cache, index, v)           # the same index
    ... readers of q_rot, new_k, new_v ...
    copy_(k_cache, new_k); copy_(v_cache, new_v)   # functionalization's epilogue

Fused::

    out = auto_functionalized(attnfuse.rope_write_kv, q=..., k=..., v=..., k_cache=k_cache,
                              v_cache=v_cache, cache_index=index, ...)
    q_rot, k_rot, new_k, new_v = out[0], out[1], out[2], out[3]

Inductor's reinplacing then calls the op on the cache buffers themselves (no clone, no
copy), so one kernel rotates q and k and writes k and v.

How sites are found
-------------------
A plain FX walker, anchored on the cache writes: every ``copy_`` epilogue into a graph
input whose new value comes from an ``index_put`` on that input: directly (HF's
``StaticCache`` ``[None, None, positions]`` on ``(B, H, S, D)``; a flat ``[slots]`` write
on ``(slots, H, D)``; ``[pages, offsets]`` on paged NHD and ``[pages, :, offsets]`` on
paged HND), through a ``reshape`` to ``(blocks * page, H, D)`` and back (a paged NHD cache
written by slot), or, when K and V are halves of one buffer (``kv[0]``, ``kv[1]``),
through the ``select -> reshape -> index_put -> reshape -> select_scatter`` chain of each
half; those become ``auto_functionalized_v2`` with both caches as views of the buffer.
MLA's latent caches, ``(slots, kv_lora_rank)`` for the latent ``ckv`` and ``(slots,
rope_dim)`` for the rotated ``k_pe``, written by slot with no head axis, become the op's
one-head ``flat`` layout: ``k_pe`` (one shared RoPE key) is k and ``ckv`` is v, each
given a head axis of one; q is ``q_pe`` with its heads.

RoPE forms are recognized by meaning, not by spelling: from the written k value the
walker evaluates the subgraph symbolically, feature by feature (slices, split, cat,
stack/unsqueeze + reshape, neg, mul, add, sub, dtype casts, clones and trailing-dim
reshapes), as a polynomial in the features of an input ``x`` and of the tensors that do
not depend on ``x`` (cos and sin). It accepts exactly
``y[i] = x[i] * cos[.] -/+ x[partner(i)] * sin[.]`` on the first ``rotary_dim``
features and ``y[i] = x[i]`` on the rest, and reads the style (neox rotate-half or GPT-J
interleaved), the rotary dim and the cos/sin width (one angle per feature, or per pair)
from the result. That covers rotate-half with ``neg``/``cat`` (HF), the chunk form with
``sub`` (vLLM/SGLang native), GPT-J's ``stack``/``flatten``, partial rotary, cos/sin
computed in the graph or passed in, and fp32 upcast with a cast back. A RoPE that runs
before a ``permute`` into the cache layout (GPT-J) is followed through the permute.
When the output is such a RoPE of x's features in another order, ``y = rope(x[...,
perm])`` (HF DeepSeek-V3 rotates interleaved pairs and writes them out de-interleaved:
``cat([x[0::2] c - x[1::2] s, x[1::2] c + x[0::2] s])``, a neox rotation of the
de-interleaved x), the op is given ``x[..., perm]`` (a concatenation of strided slices,
at most ``MAX_PERMUTATION_RUNS`` of them) and computes exactly the graph's output layout.

Opaque RoPE ops are read through a declared signature (``register_rope_op``):
functional ones ``(q, k, ...) -> (q_rot, k_rot)`` and in-place ones that rotate query
and key where they lie, as FlashInfer's ``apply_rope_with_cos_sin_cache_inplace`` does
(``FLASHINFER_ROPE_SPEC``; the serving-engine ops in ``KNOWN_ROPE_OPS`` are declared
when they exist). After functionalization an in-place call is
``auto_functionalized_v2(op, _query_base_index=..., _query_slice_dim=..., _all_bases=[qkv])``
(or ``auto_functionalized`` v1, whose views are put back with ``slice_scatter``); every
later read of its buffers must be exactly the rotated query, exactly the rotated key, or
a part the op does not write (v in a fused qkv buffer), which the rewrite reads from the
buffer before the call. Query and key given as ``(T, H * head_size)`` are reshaped to
``(T, H, head_size)`` for the op and back for their readers.

q is the rotation with the same cos/sin (structurally equal nodes, or views of one node
that only add size-1 axes or cast it alike, as MLA's ``cos[:, None]`` for q against
``cos`` for the headless ``k_pe``, provided the rows land on the same token axes), not
written to a cache itself, whose input shares the nearest ancestor with k's input; v is the value written with the same index nodes into
a cache of the same layout, again the nearest by ancestry. HF's StaticCache takes RoPE
positions from layer 0's counter and each layer's write index from its own, so the link
between RoPE and write is the data flow of the rotated k into ``index_put``, never a
proof that the positions equal the index.

When it refuses (each a near miss)
----------------------------------
k and v written with different indices; no v write paired with the k write; the
rotated k (or an intermediate of its rotation) also consumed in a form the op does not
return; q missing, or rotated with other cos/sin; mixed dtypes the op cannot honour;
cos/sin that vary per head; a shared K/V buffer read between the two writes; write forms
other than the ones above (an index that is not 1-D integer tensors, accumulating
writes, a one-head cache written through a ``(slots, features)`` view of a paged cache,
fp8 quantization in the graph); a RoPE of permuted features whose permutation needs more
than ``MAX_PERMUTATION_RUNS`` strided slices; for in-place RoPE ops, a read of their
buffer that straddles the rotated query or key, v computed from the rotated buffer,
query/key given as ``as_strided`` views, or views in a ``(T, H, D)`` layout the op's
``view(T, -1, head_size)`` would not produce.
A negative slot or offset is wrapped as ``index_put`` does (the op itself treats
negative slots as padding), so the rewrite computes what the graph did.

Origin: SGLang PR 9014 (fused ``set_kv_buffer`` into the RoPE kernel).
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from ..custom_ops import rope_write_kv as _rope_op  # noqa: F401  (registers the op)
from .base import Fusion, SiteRecorder, fake_value

aten = torch.ops.aten
prims = torch.ops.prims

#: nodes one RoPE evaluation may visit: a rotation with partial rotary, casts and the
#: GPT-J stack/flatten spelling is about 20 nodes; the bound keeps a failed search cheap
MAX_ROPE_NODES = 64
#: how far (in nodes) ancestry is searched when pairing q and v with k: q, k and v of one
#: attention share their input (the normed hidden state or a fused qkv projection) within
#: a handful of reshapes and a matmul
MAX_ANCESTOR_DEPTH = 12
#: strided slices a permutation of the input features may take (DeepSeek's
#: de-interleave takes 2, 3 with partial rotary); anything less regular is refused
MAX_PERMUTATION_RUNS = 4
#: depth of the structural comparison of cos/sin nodes used by q and by k
MAX_SAME_VALUE_DEPTH = 10
#: forward steps from a shared cos/sin node to the end of a q rotation
MAX_FORWARD_STEPS = 12


class _NoMatch(Exception):
    """A subgraph that is not a RoPE; the message says why."""


# ---------------------------------------------------------------- symbolic features
class _Poly:
    """A polynomial over atoms ``(source, feature)``; source 0 is ``x``, others leaves."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple, float] | None = None) -> None:
        self.terms = terms or {}

    @staticmethod
    def atom(source: int, feature: int) -> _Poly:
        return _Poly({((source, feature),): 1.0})

    def __add__(self, other: _Poly) -> _Poly:
        out = dict(self.terms)
        for m, c in other.terms.items():
            out[m] = out.get(m, 0.0) + c
        return _Poly({m: c for m, c in out.items() if c != 0.0})

    def __neg__(self) -> _Poly:
        return _Poly({m: -c for m, c in self.terms.items()})

    def __sub__(self, other: _Poly) -> _Poly:
        return self + (-other)

    def __mul__(self, other: Any) -> _Poly:
        if isinstance(other, (int, float)):
            return _Poly({m: c * other for m, c in self.terms.items() if c * other != 0.0})
        out: dict[tuple, float] = {}
        for (m1, c1), (m2, c2) in itertools.product(self.terms.items(), other.terms.items()):
            m = tuple(sorted(m1 + m2))
            out[m] = out.get(m, 0.0) + c1 * c2
        return _Poly(out)


@dataclass
class _Sym:
    """Symbolic value of a tensor: its trailing ``arr.ndim`` dims as polynomials."""

    arr: np.ndarray

    @property
    def nfeat(self) -> int:
        return self.arr.ndim


@dataclass
class RopeMatch:
    """A recognized rotation ``y = rope(x, cos, sin)``."""

    x: fx.Node
    y: fx.Node
    cos: fx.Node
    sin: fx.Node
    style: str  # "neox" | "interleaved"
    rotary_dim: int
    half_width: bool  # one angle per rotated pair (else one per feature)
    #: trailing dims of each cos/sin node that hold the features (flattened for the op)
    leaf_feat_dims: dict[fx.Node, int]
    #: the nodes strictly between x and y (cos/sin side excluded)
    chain: set[fx.Node] = field(default_factory=set)
    #: an opaque RoPE op (``register_rope_op``): its node (the ``auto_functionalized``
    #: node of an in-place one), and the positions it reads ``cos``/``sin`` from (both
    #: then name the ``[cos | sin]`` cache)
    opaque: fx.Node | None = None
    positions: fx.Node | None = None
    #: the rotation reads x's features in this order (``y = rope(x[..., x_perm])``)
    x_perm: tuple[int, ...] | None = None
    #: opaque ops: how x becomes the op's ``(T, H, D)`` input (``(target, args)`` steps:
    #: a slice out of an in-place op's buffer, a reshape of ``(T, H * D)``), that shape,
    #: and the nodes that hold the rotated tensor, each ``reshape(rotated, node.shape)``
    x_steps: tuple[tuple[Any, tuple[Any, ...]], ...] = ()
    op_shape: tuple[Any, ...] | None = None
    outs: list[fx.Node] = field(default_factory=list)
    #: opaque ops: the q rotation of the same call
    partner: RopeMatch | None = None
    #: in-place opaque ops: how the op's buffers are read (see ``_InplaceRope``)
    inplace: _InplaceRope | None = None


@dataclass(frozen=True)
class RopeOpSpec:
    """How to read an opaque RoPE custom op.

    Serving code often wraps a RoPE kernel in its own ``torch.library`` op; the pass cannot
    look inside it, so the op's meaning is declared: argument names of the query and key
    (``(T, H, D)``, or ``(T, H * D)`` with ``head_size`` naming the argument that holds
    ``D``), the ``(T,)`` positions and the ``(max_pos, rotary_dim)`` cos/sin cache (cos
    half, then sin half: the vLLM/FlashInfer convention), the style (an argument name
    holding ``is_neox``, or a constant) and, for a functional op ``(q, k, ...) -> (q_rot,
    k_rot)``, which outputs are q and k. An op whose schema marks query and key as
    mutated (``Tensor(a!)``) rotates them in place, as FlashInfer's
    ``apply_rope_with_cos_sin_cache_inplace`` does; after functionalization it appears as
    ``auto_functionalized``/``auto_functionalized_v2`` and is read through that.
    """

    query: str
    key: str
    positions: str
    cos_sin_cache: str
    is_neox: str | bool = True
    outputs: tuple[int, int] = (0, 1)
    head_size: str | None = None


#: FlashInfer's in-place RoPE ``apply_rope_with_cos_sin_cache_inplace(positions, query,
#: key, head_size, cos_sin_cache, is_neox)``: query/key ``(T, H * head_size)`` rotated in
#: place. FlashInfer 0.7 registers no torch op for it (its registration helper returns the
#: plain function), so it reaches a graph only inside an op that serving code registers
#: around it, with these argument names; vLLM's own ``_C::rotary_embedding`` has them too.
FLASHINFER_ROPE_SPEC = RopeOpSpec(query="query", key="key", positions="positions",
                                  cos_sin_cache="cos_sin_cache", is_neox="is_neox",
                                  head_size="head_size")

#: in-place RoPE ops that serving engines register, declared when they exist (looked up
#: by name at each run, so importing the engine after attnfuse is enough)
KNOWN_ROPE_OPS: dict[str, RopeOpSpec] = {
    "vllm::flashinfer_rotary_embedding": FLASHINFER_ROPE_SPEC,
    "_C::rotary_embedding": FLASHINFER_ROPE_SPEC,
}

#: opaque RoPE ops the pass understands, by OpOverload (see ``register_rope_op``)
_ROPE_OPS: dict[Any, RopeOpSpec] = {}


def register_rope_op(op: Any, spec: RopeOpSpec) -> None:
    """Declare an opaque RoPE op (functional or in-place) so that ``rope_kv_write`` can
    fuse it.

    >>> register_rope_op(torch.ops.mylib.rope.default,
    ...                  RopeOpSpec(query="q", key="k", positions="pos", cos_sin_cache="cache"))
    """
    if not isinstance(op, torch._ops.OpOverload):
        # the project's convention for bad arguments, type or value: ValueError naming it
        raise ValueError(  # noqa: TRY004
            f"op: expected a torch OpOverload (torch.ops.ns.name.default), got {op!r}")
    args = {a.name: a for a in op._schema.arguments}
    for field_name in ("query", "key", "positions", "cos_sin_cache", "head_size"):
        name = getattr(spec, field_name)
        if name is not None and name not in args:
            raise ValueError(f"spec.{field_name}: expected an argument of {op}, got "
                             f"{name!r} (arguments: {sorted(args)})")
    writes = [_mutated(args[spec.query]), _mutated(args[spec.key])]
    if any(writes) and not all(writes):
        raise ValueError(f"spec: expected {op} to rotate query and key both in place or both "
                         f"functionally, got query mutated={writes[0]}, key mutated={writes[1]}")
    _ROPE_OPS[op] = spec


def register_known_rope_ops(table: dict[str, RopeOpSpec] | None = None) -> list[Any]:
    """Declare the ops of ``table`` (default ``KNOWN_ROPE_OPS``: ``"ns::name"`` -> spec)
    that exist in this process; returns them. ``rope_kv_write`` calls it on every run."""
    found = []
    for qualname, spec in (KNOWN_ROPE_OPS if table is None else table).items():
        ns, _, name = qualname.partition("::")
        try:
            op = getattr(getattr(torch.ops, ns), name).default
        except (AttributeError, RuntimeError):
            continue  # the engine that registers it is not loaded
        if op not in _ROPE_OPS:
            register_rope_op(op, spec)
        found.append(op)
    return found


def _mutated(arg: Any) -> bool:
    return arg.alias_info is not None and arg.alias_info.is_write


def _opaque_arg(node: fx.Node, name: str, op: Any = None) -> Any:
    """Argument ``name`` of an op call (``op``: the op under an ``auto_functionalized``
    node, whose arguments are all keywords)."""
    schema = (op or node.target)._schema
    args = () if op is not None else node.args
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if i < len(args):
                return args[i]
            return a.default_value
    return None


def _opaque_params(node: fx.Node, spec: RopeOpSpec, op: Any = None) -> tuple | str:
    """(cos/sin cache, positions, style, head size or None) of an opaque call, or why not."""
    cache = _opaque_arg(node, spec.cos_sin_cache, op)
    positions = _opaque_arg(node, spec.positions, op)
    neox = spec.is_neox if isinstance(spec.is_neox, bool) else _opaque_arg(node, spec.is_neox, op)
    head = _opaque_arg(node, spec.head_size, op) if spec.head_size is not None else None
    name = op or node.target
    if not all(isinstance(a, fx.Node) for a in (cache, positions)) or not isinstance(neox, bool) \
            or not (head is None or isinstance(head, int)):
        return f"{name}: arguments not understood"
    cshape = _shape(cache)
    if cshape is None or len(cshape) != 2 or not isinstance(cshape[1], int) or cshape[1] % 2:
        return f"{name}: cos/sin cache of shape {cshape}"
    return cache, positions, "neox" if neox else "interleaved", head


def _heads_view(shape: tuple[Any, ...] | None, head: int | None) -> tuple[Any, ...] | str:
    """The ``(T, H, D)`` shape an opaque op sees for a query/key of ``shape``."""
    if shape is None:
        return "no shape"
    if len(shape) == 3 and (head is None or shape[2] == head):
        return shape
    if len(shape) == 2 and head is not None and isinstance(shape[1], int) and shape[1] % head == 0:
        return (shape[0], shape[1] // head, head)
    want = "(T, H, D)" if head is None else f"(T, H, {head}) or (T, H * {head})"
    return f"shape {shape}, expected {want}"


def _reshape_steps(shape: tuple[Any, ...], view: tuple[Any, ...]) -> tuple:
    # -1 for the token count, which may be symbolic
    return () if tuple(shape) == tuple(view) else ((aten.reshape.default, ([-1, *view[1:]],)),)


_VIEW_CHAIN = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
#: reshapes walked back from a written value to an opaque op's output
MAX_OPAQUE_RESHAPES = 4


def _match_opaque(y: fx.Node) -> RopeMatch | str | None:
    """``y = reshape*(out)`` with ``out`` the q or k output of a declared RoPE op (for an
    in-place op, a read of its rotated buffer), or None when it is no such thing."""
    chain: list[fx.Node] = []
    out = y
    while out.target in _VIEW_CHAIN and isinstance(out.args[0], fx.Node) \
            and len(chain) < MAX_OPAQUE_RESHAPES:
        chain.append(out)
        out = out.args[0]
    inplace = _inplace_read(out)
    if inplace is not None:
        return inplace if isinstance(inplace, str) else _match_inplace(y, out, chain, *inplace)
    if out.target is not operator.getitem or not isinstance(out.args[0], fx.Node):
        return None
    node, index = out.args[0], out.args[1]
    spec = _ROPE_OPS.get(node.target)
    if spec is None:
        return None
    if index not in spec.outputs:
        return f"output {index} of {node.target} is not its q or k"
    params = _opaque_params(node, spec)
    if isinstance(params, str):
        return params
    cache, positions, style, head = params
    matches = []
    for which, arg_name in zip(spec.outputs, (spec.query, spec.key)):
        x = _opaque_arg(node, arg_name)
        outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == which]
        if not isinstance(x, fx.Node) or len(outs) != 1:
            return f"{node.target}: output {which} not read exactly once"
        view = _heads_view(_shape(x), head)
        if isinstance(view, str):
            return f"{node.target}: {arg_name} of {view}"
        m = RopeMatch(x, outs[0], cache, cache, style, _cache_width(cache), True, {}, set(),
                      opaque=node, positions=positions, x_steps=_reshape_steps(_shape(x), view),
                      op_shape=view, outs=[outs[0]])
        matches.append(m)
    q, k = matches
    if index == spec.outputs[0]:
        return q  # a write of the rotated query: paired with nothing
    if _shape(y) != k.op_shape:
        return f"written value {_shape(y)} is not the rotated key as (T, H, D) {k.op_shape}"
    k.y, k.chain, k.partner = y, set(chain[1:]) | ({out} if chain else set()), q
    return k


def _cache_width(cache: fx.Node) -> int:
    return _shape(cache)[1]


# ---------------------------------------------------------------- in-place RoPE ops
@dataclass
class _InplaceRope:
    """How an ``auto_functionalized(_v2)`` call of an in-place RoPE op is read.

    ``bases`` are the tensors the op writes into (v2: ``_all_bases``; v1: the query and
    key arguments themselves) and ``new_bases`` the getitems holding them afterwards.
    Each of query and key is ``region`` of one base: ``None`` for all of it or ``(dim,
    start, end)``. Every read of a new base is a *piece*: exactly the rotated query, the
    rotated key, or a region the op does not write (``other``, read from the old base
    after the rewrite)."""

    node: fx.Node
    op: Any
    spec: RopeOpSpec
    bases: list[fx.Node]
    new_bases: dict[fx.Node, int]  # getitem -> base index
    views: dict[str, tuple[int, tuple[int, int, int] | None]]  # "q"/"k" -> (base, region)
    pieces: dict[str, list[fx.Node]]  # "q"/"k"/"other" -> nodes holding that region
    owned: list[fx.Node] = field(default_factory=list)  # its getitems (and scatters)


def _inplace_read(node: fx.Node) -> tuple[_InplaceRope, str] | str | None:
    """For a node reading a buffer an in-place RoPE op wrote: the op and which part it
    reads ("q", "k" or "other"); a reason when the reads cannot be told apart; None when
    ``node`` reads no such buffer."""
    from torch._higher_order_ops.auto_functionalize import (
        auto_functionalized,
        auto_functionalized_v2,
    )

    new_base = node
    if node.target in (aten.slice.Tensor, operator.getitem) and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        if node.target is operator.getitem and src.target in (aten.split.Tensor,
                                                              aten.split_with_sizes.default):
            new_base = src.args[0]
        elif node.target is aten.slice.Tensor:
            new_base = src
    calls = (auto_functionalized, auto_functionalized_v2)
    if new_base.target is aten.slice_scatter.default:  # v1 puts views back by scatter
        new_base = new_base.args[1]
    if not (isinstance(new_base, fx.Node) and new_base.target is operator.getitem
            and isinstance(new_base.args[0], fx.Node) and new_base.args[0].target in calls):
        return None
    af = new_base.args[0]
    if af.args[0] not in _ROPE_OPS:
        return None
    info = _analyse_inplace(af)
    if isinstance(info, str):
        return info
    for kind, nodes in info.pieces.items():
        if node in nodes:
            return info, kind
    return f"{af.args[0]}: {node.name} is not one of the reads of its buffers"


def _region(node: fx.Node, base_shape: tuple[Any, ...]) -> tuple[int, int, int] | None | str:
    """The part of a buffer of ``base_shape`` a piece (a slice, or a getitem of a split
    of it) reads: ``(dim, start, end)``, or the kind of read it is not."""
    if node.target is aten.slice.Tensor:
        args = [*node.args, None, None, None, None][:5]
        return _slice_region(args[1], args[2], args[3], args[4], base_shape)
    split = node.args[0]  # getitem of split
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    dim %= len(base_shape)
    size = base_shape[dim]
    if not isinstance(size, int):
        return "split of a symbolic dim"
    if split.target is aten.split.Tensor:
        sizes = [min(split.args[1], size - o) for o in range(0, size, split.args[1])]
    else:
        sizes = list(split.args[1])
    start = sum(sizes[: node.args[1]])
    return (dim, start, start + sizes[node.args[1]])


def _slice_region(dim: Any, start: Any, end: Any, step: Any,
                  base_shape: tuple[Any, ...]) -> tuple[int, int, int] | str:
    """``slice(dim, start, end, step)`` of ``base_shape`` as ``(dim, start, end)``."""
    dim = (0 if dim is None else dim) % len(base_shape)
    start, step = 0 if start is None else start, 1 if step is None else step
    size = base_shape[dim]
    if step != 1 or not all(isinstance(v, int) for v in (size, start, 0 if end is None else end)):
        return "strided or symbolic slice"
    start = max(0, start + size if start < 0 else start)
    end = size if end is None else min(size, end + size if end < 0 else end)
    return (dim, start, max(start, end))


def _overlaps(a: tuple[int, int, int] | None, b: tuple[int, int, int] | None) -> bool:
    if a is None or b is None or a[0] != b[0]:
        return True
    return a[1] < b[2] and b[1] < a[2]


def _analyse_inplace(af: fx.Node) -> _InplaceRope | str:
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    op = af.args[0]
    spec = _ROPE_OPS[op]
    schema = op._schema
    mutable = [a.name for a in schema.arguments if _mutated(a)]
    if sorted(mutable) != sorted((spec.query, spec.key)):
        return f"{op}: mutates {mutable}, expected the query and key only"
    n_out = max(1, len(schema.returns))
    views: dict[str, tuple[int, Any]] = {}
    if af.target is auto_functionalized_v2:
        bases = list(af.kwargs.get("_all_bases", []))
        for kind, name in (("q", spec.query), ("k", spec.key)):
            index = af.kwargs.get(f"_{name}_base_index")
            if not isinstance(index, int):
                return f"{op}: {name} is not a view of a known buffer"
            if f"_{name}_storage_offset" in af.kwargs:
                return f"{op}: {name} is an as_strided view of its buffer"
            if f"_{name}_slice_dim" in af.kwargs:
                dim = af.kwargs[f"_{name}_slice_dim"]
                start, end = af.kwargs[f"_{name}_slice_start"], af.kwargs[f"_{name}_slice_end"]
                if not all(isinstance(v, int) for v in (dim, start, end)):
                    return f"{op}: {name} is a symbolic slice of its buffer"
                shape = _shape(bases[index])
                views[kind] = (index, (dim % len(shape), start, end))
            else:
                views[kind] = (index, None)
    else:  # v1: the mutated arguments themselves, in schema order, after the outputs
        bases = [af.kwargs.get(name) for name in mutable]
        views = {"q": (mutable.index(spec.query), None), "k": (mutable.index(spec.key), None)}
    if not all(isinstance(b, fx.Node) for b in bases):
        return f"{op}: a buffer is not a tensor"
    if views["q"][0] == views["k"][0] and _overlaps(views["q"][1], views["k"][1]):
        return f"{op}: query and key overlap in one buffer"
    new_bases: dict[fx.Node, int] = {}
    for u in af.users:
        i = u.args[1] - n_out if u.target is operator.getitem else -1
        if not 0 <= i < len(bases):
            return f"{op}: output {u.name} is not one of its buffers"
        new_bases[u] = i
    owned = [*new_bases]
    if af.target is not auto_functionalized_v2:
        scattered = _scattered_back(af, bases, views, new_bases)
        if isinstance(scattered, str):
            return f"{op}: {scattered}"
        if scattered is not None:
            bases, views, new_bases = scattered
            owned += list(new_bases)
    pieces: dict[str, list[fx.Node]] = {"q": [], "k": [], "other": []}
    for nb, i in new_bases.items():
        covering = [kind for kind, (b, region) in views.items() if b == i and region is None]
        if covering:  # the whole buffer is the query (or key): every read reads it
            pieces[covering[0]].append(nb)
            continue
        shape = _shape(nb)
        for u in nb.users:
            if u.target is aten.slice.Tensor and u.args[0] is nb:
                reads = [u]
            elif u.target in (aten.split.Tensor, aten.split_with_sizes.default) and u.args[0] is nb:
                reads = list(u.users)
                if any(r.target is not operator.getitem for r in reads):
                    return f"{op}: split {u.name} of its buffer read other than by getitem"
            else:
                return f"{op}: {u.name} reads its whole buffer, not just the query or key"
            for r in reads:
                region = _region(r, shape)
                if isinstance(region, str):
                    return f"{op}: {r.name} reads its buffer by a {region}"
                kinds = [kind for kind, (b, reg) in views.items() if b == i and reg == region]
                if kinds:
                    pieces[kinds[0]].append(r)
                elif any(_overlaps(region, reg) for b, reg in views.values() if b == i):
                    return f"{op}: {r.name} reads across the query/key it rotates"
                else:
                    pieces["other"].append(r)
    return _InplaceRope(af, op, spec, bases, new_bases, views, pieces, owned)


def _scattered_back(af: fx.Node, args: list[fx.Node], views: dict[str, Any],
                    outs: dict[fx.Node, int]) -> tuple | str | None:
    """auto_functionalized (v1) of query and key that are views of one buffer: each new
    value is put back with ``slice_scatter``, and later reads read the last scatter. Read as
    one buffer (``bases``, ``views``, ``new_bases``), as v2 states it; None when the
    arguments are not scattered back."""
    rotated = {i: g for g, i in outs.items()}
    kinds = {views["q"][0]: "q", views["k"][0]: "k"}
    users = [u for g in rotated.values() for u in g.users]
    if not any(u.target is aten.slice_scatter.default for u in users):
        return None
    buffer, regions, scatters = None, {}, {}
    for i, kind in kinds.items():
        g, arg = rotated.get(i), args[i]
        scatter = next(iter(g.users)) if g is not None and len(g.users) == 1 else None
        if scatter is None or scatter.target is not aten.slice_scatter.default:
            return "a rotated view is read besides being scattered back into its buffer"
        if arg.target is aten.slice.Tensor:
            src = arg.args[0]
        elif arg.target is operator.getitem and arg.args[0].target in (
                aten.split.Tensor, aten.split_with_sizes.default):
            src = arg.args[0].args[0]
        else:
            return f"{kind} is a view of its buffer other than a slice or split"
        if buffer not in (None, src):
            return "query and key are views of different buffers"
        buffer = src
        sargs = [*scatter.args, None, None, None, None, None][:6]
        region = _region(arg, _shape(src))
        if region != _slice_region(sargs[2], sargs[3], sargs[4], sargs[5], _shape(src)):
            return f"{kind} is scattered back elsewhere than it was read from"
        regions[kind], scatters[kind] = region, scatter
    first, second = (scatters["q"], scatters["k"]) if scatters["k"].args[0] is scatters["q"] \
        else (scatters["k"], scatters["q"])
    if first.args[0] is not buffer or second.args[0] is not first or list(first.users) != [second]:
        return "query and key are not scattered back one after the other into their buffer"
    return [buffer], {kind: (0, regions[kind]) for kind in ("q", "k")}, {second: 0}


def _match_inplace(y: fx.Node, out: fx.Node, chain: list[fx.Node], info: _InplaceRope,
                   kind: str) -> RopeMatch | str:
    """The k rotation of an in-place RoPE call whose rotated key ``out`` is written (as
    ``y = reshape*(out)``)."""
    if kind == "other":
        return f"read from a part of {info.op}'s buffer that it does not rotate (not a RoPE output)"
    if kind == "q":
        return f"the rotated query of {info.op} (not a key)"
    params = _opaque_params(info.node, info.spec, info.op)
    if isinstance(params, str):
        return params
    cache, positions, style, head = params
    matches = {}
    for which in ("q", "k"):
        index, region = info.views[which]
        base = info.bases[index]
        bshape = _shape(base)
        shape = bshape if region is None else tuple(
            region[2] - region[1] if i == region[0] else n for i, n in enumerate(bshape))
        view = _heads_view(shape, head)
        if isinstance(view, str):
            return f"{info.op}: {which} of {view}"
        steps = () if region is None else ((aten.slice.Tensor, tuple(region)),)
        if region is not None and region[0] == 0:
            return f"{info.op}: {which} is a slice of its buffer's token dim"
        matches[which] = RopeMatch(
            base, info.node, cache, cache, style, _cache_width(cache), True, {}, set(),
            opaque=info.node, positions=positions,
            x_steps=steps + _reshape_steps(shape, view), op_shape=view,
            outs=list(info.pieces[which]), inplace=info)
    q, k = matches["q"], matches["k"]
    if _shape(y) != k.op_shape:
        return f"written value {_shape(y)} is not the rotated key as (T, H, D) {k.op_shape}"
    # q's buffer afterwards (its old value when nothing reads it)
    q.y = next((nb for nb, i in info.new_bases.items() if i == info.views["q"][0]), q.x)
    k.y, k.chain, k.partner = y, set(chain[1:]) | ({out} if chain else set()), q
    return k


_ELEMENTWISE = {aten.mul.Tensor: "mul", aten.add.Tensor: "add", aten.sub.Tensor: "sub"}
_PASSTHROUGH = {prims.convert_element_type.default, aten.clone.default,
                aten._to_copy.default, aten.alias.default}
#: ops that can only add or drop size-1 axes of a cos/sin leaf when its other sizes stay
#: the same (checked on the shapes): q and k may see one cos through different views
_UNIT_AXIS_OPS = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                  aten.squeeze.default, aten.reshape.default, aten.view.default,
                  aten._unsafe_view.default, aten.alias.default, aten.slice.Tensor}


class _SymDim:
    """A symbolic size (dynamic token count) that compares without adding guards.

    ``int()`` or ``bool(a == b)`` on a SymInt would specialize the graph (and recompile it
    for every size); equality here holds only when provable for all sizes.
    """

    __slots__ = ("sym",)

    def __init__(self, sym: Any) -> None:
        self.sym = sym

    def __eq__(self, other: object) -> bool:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        other = other.sym if isinstance(other, _SymDim) else other
        if not isinstance(other, (int, torch.SymInt)):
            return NotImplemented
        try:
            return bool(statically_known_true(self.sym == other))
        except Exception:  # noqa: BLE001  (an expression the shape env cannot decide)
            return False

    def __ne__(self, other: object) -> bool:
        same = self.__eq__(other)
        return same if same is NotImplemented else not same

    def __hash__(self) -> int:
        return hash(str(self.sym))

    def __repr__(self) -> str:
        return str(self.sym)


def _dim(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        expr = size.node.maybe_as_int() if hasattr(size.node, "maybe_as_int") else None
        return expr if expr is not None else _SymDim(size)
    return int(size)


def _shape(node: Any) -> tuple[Any, ...] | None:
    """Sizes of a node's tensor: ints, or ``_SymDim`` for symbolic ones."""
    val = fake_value(node)
    if isinstance(val, torch.Tensor):
        return tuple(_dim(s) for s in val.shape)
    return None


def _static(sizes: Iterable[Any]) -> bool:
    return all(isinstance(n, int) for n in sizes)


def _dtype(node: Any) -> torch.dtype | None:
    val = fake_value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


class _RopeEvaluator:
    """Evaluates ``y`` symbolically in terms of ``x``; see the module docstring."""

    def __init__(self, x: fx.Node, y: fx.Node, order: dict[fx.Node, int]) -> None:
        self.x, self.y = x, y
        self.order = order
        self.memo: dict[fx.Node, Any] = {}
        self.deps: dict[fx.Node, bool] = {x: True}
        self.leaf_ids: dict[fx.Node, int] = {}
        self.leaf_feat_dims: dict[fx.Node, int] = {}
        self.chain: set[fx.Node] = set()
        self.visited = 0

    # -- does a node depend on x (bounded walk; a leaf otherwise)
    def depends(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node in self.deps:
            return self.deps[node]
        self.deps[node] = False  # cycles cannot happen in a DAG; this bounds the recursion
        if node.op != "call_function" or self.order.get(node, 0) < self.order[self.x]:
            return False  # nodes placed before x cannot read it
        self.visited += 1
        if self.visited > 4 * MAX_ROPE_NODES:
            raise _NoMatch("subgraph too large for a RoPE")
        res = any(self.depends(a) for a in _flat_args(node))
        self.deps[node] = res
        return res

    def run(self) -> _Sym:
        shape = _shape(self.x)
        if not shape:
            raise _NoMatch("input has no static shape")
        out = self.ev(self.y)
        if not isinstance(out, _Sym):
            raise _NoMatch("output does not depend on the input")
        return out

    def leaf(self, node: fx.Node, feat_shape: tuple[int, ...]) -> _Sym:
        """A cos/sin node's trailing dims, broadcast to ``feat_shape``."""
        shape = _shape(node)
        if shape is None:
            raise _NoMatch(f"{node.name} has no static shape")
        nf = len(feat_shape)
        own = (1,) * max(0, nf - len(shape)) + shape[max(0, len(shape) - nf):]
        if not _static(own) or any(o not in (1, f) for o, f in zip(own, feat_shape)):
            raise _NoMatch(f"{node.name} does not broadcast over the features")
        prev = self.leaf_feat_dims.setdefault(node, nf)
        if prev != nf:
            raise _NoMatch(f"{node.name} used with different feature ranks")
        sid = self.leaf_ids.setdefault(node, len(self.leaf_ids) + 1)
        arr = np.empty(own, dtype=object)
        for i, idx in enumerate(np.ndindex(*own)):
            arr[idx] = _Poly.atom(sid, i)
        return _Sym(np.broadcast_to(arr, feat_shape))

    def ev(self, node: Any) -> Any:
        """``_Sym`` for x-dependent tensors, the node itself for leaves, scalars as is."""
        if not isinstance(node, fx.Node):
            return node
        if node is self.x:
            d = _shape(node)[-1]
            if not isinstance(d, int):
                raise _NoMatch("symbolic head_dim")
            arr = np.empty((d,), dtype=object)
            for i in range(d):
                arr[i] = _Poly.atom(0, i)
            return _Sym(arr)
        if not self.depends(node):
            return node  # a leaf: materialized where it meets a symbolic operand
        if node in self.memo:
            return self.memo[node]
        if len(self.chain) > MAX_ROPE_NODES:
            raise _NoMatch("subgraph too large for a RoPE")
        self.chain.add(node)
        res = self._ev_op(node)
        self.memo[node] = res
        return res

    def _binary(self, kind: str, a: Any, b: Any) -> _Sym:
        def as_sym(v: Any, other: _Sym) -> Any:
            if isinstance(v, _Sym):
                return v.arr
            if isinstance(v, fx.Node):
                return self.leaf(v, other.arr.shape).arr
            if isinstance(v, (int, float)) and kind == "mul":
                return float(v)
            raise _NoMatch(f"{kind} with a constant {v!r}")

        ref = a if isinstance(a, _Sym) else b
        xa, xb = as_sym(a, ref), as_sym(b, ref)
        if isinstance(xb, float):
            xa, xb = xb, xa
        if isinstance(xa, float):
            return _Sym(np.vectorize(lambda p: p * xa, otypes=[object])(xb))
        try:
            if kind == "mul":
                return _Sym(np.asarray(xa * xb, dtype=object))
            if kind == "add":
                return _Sym(np.asarray(xa + xb, dtype=object))
            return _Sym(np.asarray(xa - xb, dtype=object))
        except ValueError as exc:
            raise _NoMatch(f"feature shapes do not broadcast: {exc}") from None

    def _feat_dim(self, node: fx.Node, dim: int, sym: _Sym) -> int:
        """Index of tensor dim ``dim`` within the symbolic trailing dims."""
        rank = len(_shape(node))
        dim = dim % rank
        k = dim - (rank - sym.nfeat)
        if k < 0:
            raise _NoMatch(f"{node.target} on a leading dim (not a feature dim)")
        return k

    def _ev_op(self, node: fx.Node) -> _Sym:
        t = node.target
        args = node.args
        if t in _ELEMENTWISE:
            if node.kwargs.get("alpha", 1) != 1:
                raise _NoMatch("add/sub with alpha")
            return self._binary(_ELEMENTWISE[t], self.ev(args[0]), self.ev(args[1]))
        if t is aten.neg.default:
            return _Sym(-self._sym(args[0]).arr)
        if t in _PASSTHROUGH:
            return self._sym(args[0])
        if t is aten.slice.Tensor:
            s = self._sym(args[0])
            dim = args[1] if len(args) > 1 else 0
            k = self._feat_dim(args[0], dim, s)
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            end = args[3] if len(args) > 3 and args[3] is not None else None
            step = args[4] if len(args) > 4 else 1
            index = [slice(None)] * s.nfeat
            index[k] = slice(start, end, step)
            return _Sym(s.arr[tuple(index)])
        if t is operator.getitem and isinstance(args[0], fx.Node) and args[0].target in (
            aten.split.Tensor, aten.split_with_sizes.default
        ):
            split = args[0]
            s = self._sym(split.args[0])
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            k = self._feat_dim(split.args[0], dim, s)
            size = s.arr.shape[k]
            if split.target is aten.split.Tensor:
                sizes = [min(split.args[1], size - o) for o in range(0, size, split.args[1])]
            else:
                sizes = list(split.args[1])
            start = sum(sizes[: args[1]])
            index = [slice(None)] * s.nfeat
            index[k] = slice(start, start + sizes[args[1]])
            self.chain.add(split)
            return _Sym(s.arr[tuple(index)])
        if t is aten.cat.default:
            parts = [self._sym(p) for p in args[0]]
            dim = args[1] if len(args) > 1 else 0
            k = self._feat_dim(node, dim, parts[0])
            if any(p.nfeat != parts[0].nfeat for p in parts):
                raise _NoMatch("cat of different feature ranks")
            return _Sym(np.concatenate([p.arr for p in parts], axis=k))
        if t is aten.unsqueeze.default:
            s = self._sym(args[0])
            rank = len(_shape(node))
            dim = args[1] % rank
            k = dim - (rank - 1 - s.nfeat)
            if k < 0:
                return s  # a new leading dim
            return _Sym(np.expand_dims(s.arr, k))
        if t is aten.expand.default:
            s = self._sym(args[0])
            out_shape = _shape(node)
            feat = out_shape[len(out_shape) - s.nfeat:]
            if not _static(feat):
                raise _NoMatch("expand of the features to a symbolic size")
            return _Sym(np.broadcast_to(s.arr, feat))
        if t in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
            s = self._sym(args[0])
            in_shape, out_shape = _shape(args[0]), _shape(node)
            lead = in_shape[: len(in_shape) - s.nfeat]
            if tuple(out_shape[: len(lead)]) != tuple(lead):
                raise _NoMatch("reshape mixes leading dims into the features")
            new_feat = out_shape[len(lead):]
            if not new_feat or not _static(new_feat):
                raise _NoMatch("reshape drops the feature dims")
            return _Sym(np.ascontiguousarray(s.arr).reshape(new_feat))
        if t is aten.permute.default:
            perm = [p % len(args[1]) for p in args[1]]
            if perm != list(range(len(perm))):
                raise _NoMatch("permute inside the rotation")
            return self._sym(args[0])
        raise _NoMatch(f"{getattr(t, '__name__', t)} is not part of a RoPE")

    def _sym(self, node: Any) -> _Sym:
        v = self.ev(node)
        if not isinstance(v, _Sym):
            raise _NoMatch("operand does not depend on the input")
        return v


def _flat_args(node: fx.Node) -> Iterable[fx.Node]:
    for a in itertools.chain(node.args, node.kwargs.values()):
        if isinstance(a, fx.Node):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, fx.Node))


def _classify(sym: _Sym, ev: _RopeEvaluator, x: fx.Node, y: fx.Node) -> RopeMatch:
    """Check the symbolic result is a RoPE of x and read off its parameters."""
    if sym.nfeat != 1:
        raise _NoMatch("rotation output keeps extra feature dims")
    feats = sym.arr
    d = feats.shape[0]
    if _shape(x) != _shape(y) or d != _shape(x)[-1]:
        raise _NoMatch("output shape differs from the input's")
    try:
        return _classify_features(feats, ev, x, y)
    except _NoMatch as exc:
        # a RoPE of x's features in another order (DeepSeek's interleaved pairs written
        # out de-interleaved): y = rope(x[..., perm]), which the op computes when given
        # x[..., perm]
        perm = _input_permutation(feats)
        if perm is None:
            raise
        runs = _arithmetic_runs(perm)
        if len(runs) > MAX_PERMUTATION_RUNS:
            raise _NoMatch(f"{exc}; as a RoPE of permuted features, the permutation takes "
                           f"{len(runs)} strided slices (at most {MAX_PERMUTATION_RUNS})") from None
        inv = {j: i for i, j in enumerate(perm)}
        renamed = np.empty(feats.shape, dtype=object)
        for i in range(d):
            renamed[i] = _Poly({tuple(sorted((0, inv[a[1]]) if a[0] == 0 else a for a in mono)): c
                                for mono, c in feats[i].terms.items()})
        try:
            m = _classify_features(renamed, ev, x, y)
        except _NoMatch as exc2:
            raise _NoMatch(f"{exc}; as a RoPE of permuted features: {exc2}") from None
        m.x_perm = tuple(perm)
        return m


def _input_permutation(feats: np.ndarray) -> list[int] | None:
    """``perm`` with ``y[i] = x[perm[i]] * cos[.] +/- x[.] * sin[.]`` (or ``x[perm[i]]`` on
    pass-through features): the x feature each output multiplies by cos, cos being the
    one angle that enters every rotated feature with sign +1. None when there is no such
    permutation or it is the identity."""
    d = feats.shape[0]
    perm: list[int | None] = [None] * d
    rotated: dict[int, list[tuple[int, int, float]]] = {}
    for i in range(d):
        terms = feats[i].terms
        if len(terms) == 1:
            (mono, coef), = terms.items()
            if len(mono) != 1 or mono[0][0] != 0 or coef != 1.0:
                return None
            perm[i] = mono[0][1]
            continue
        if len(terms) != 2:
            return None
        pairs = []
        for mono, coef in terms.items():
            xs = [a for a in mono if a[0] == 0]
            ls = [a for a in mono if a[0] != 0]
            if len(mono) != 2 or len(xs) != 1 or len(ls) != 1:
                return None
            pairs.append((xs[0][1], ls[0][0], coef))
        rotated[i] = pairs
    sources = {src for pairs in rotated.values() for _, src, _ in pairs}
    cos_sources = [src for src in sources
                   if all(any(s == src and c == 1.0 for _, s, c in pairs) for pairs in rotated.values())]
    if not rotated or len(cos_sources) != 1:
        return None
    for i, pairs in rotated.items():
        perm[i] = next(j for j, s, _ in pairs if s == cos_sources[0])
    if sorted(perm) != list(range(d)) or perm == list(range(d)):
        return None
    return perm


def _arithmetic_runs(perm: Iterable[int]) -> list[tuple[int, int, int]]:
    """``perm`` as maximal runs ``(start, step, length)`` with a positive step: the
    strided slices whose concatenation gathers ``x[..., perm]``."""
    runs: list[tuple[int, int, int]] = []
    for j in perm:
        if runs:
            start, step, n = runs[-1]
            if n == 1 and j > start:
                runs[-1] = (start, j - start, 2)
                continue
            if n > 1 and j == start + step * n:
                runs[-1] = (start, step, n + 1)
                continue
        runs.append((j, 1, 1))
    return runs


def _classify_features(feats: np.ndarray, ev: _RopeEvaluator, x: fx.Node, y: fx.Node) -> RopeMatch:
    """``_classify`` for features already known to have the input's width."""
    d = feats.shape[0]
    rotated: list[tuple[int, int, int, int, int, float]] = []  # i, partner, cos, sin idx, sign
    cos_id = sin_id = None
    tail_start = None
    for i in range(d):
        terms = feats[i].terms
        if terms == {((0, i),): 1.0}:
            if tail_start is None:
                tail_start = i
            continue
        if tail_start is not None:
            raise _NoMatch("pass-through features before rotated ones")
        if len(terms) != 2:
            raise _NoMatch(f"feature {i} is not x*cos +/- x'*sin")
        own = other = None
        for mono, coef in terms.items():
            if len(mono) != 2:
                raise _NoMatch(f"feature {i} has a term of degree {len(mono)}")
            xs = [a for a in mono if a[0] == 0]
            ls = [a for a in mono if a[0] != 0]
            if len(xs) != 1 or len(ls) != 1:
                raise _NoMatch(f"feature {i} is not linear in x")
            if xs[0][1] == i:
                own = (ls[0], coef)
            else:
                other = (xs[0][1], ls[0], coef)
        if own is None or other is None or own[1] != 1.0 or abs(other[2]) != 1.0:
            raise _NoMatch(f"feature {i} is not x*cos +/- x'*sin")
        (c_src, c_idx), _ = own
        partner, (s_src, s_idx), sign = other
        cos_id = c_src if cos_id is None else cos_id
        sin_id = s_src if sin_id is None else sin_id
        if c_src != cos_id or s_src != sin_id or cos_id == sin_id:
            raise _NoMatch("cos/sin differ between features")
        rotated.append((i, partner, c_idx, s_idx, sign))
    rd = len(rotated)
    if rd == 0 or rd % 2:
        raise _NoMatch("no rotated features" if rd == 0 else "odd rotary dim")
    half = rd // 2
    if rotated[0][1] == half and half != 1:
        style = "neox"
        partner_of = lambda i: i + half if i < half else i - half
        sign_of = lambda i: -1.0 if i < half else 1.0
        pair_of = lambda i: i % half
    else:
        style = "interleaved"
        partner_of = lambda i: i + 1 if i % 2 == 0 else i - 1
        sign_of = lambda i: -1.0 if i % 2 == 0 else 1.0
        pair_of = lambda i: i // 2
    full = all(c == i and s == i for i, _, c, s, _ in rotated)
    halfw = all(c == pair_of(i) and s == pair_of(i) for i, _, c, s, _ in rotated)
    for i, p, _, _, sign in rotated:
        if p != partner_of(i) or sign != sign_of(i):
            raise _NoMatch(f"feature {i} pairs with {p} (sign {sign:+.0f}): not a {style} RoPE")
    if not (full or halfw):
        raise _NoMatch("cos/sin indexed neither per feature nor per pair")
    ids = {v: k for k, v in ev.leaf_ids.items()}
    cos, sin = ids[cos_id], ids[sin_id]
    return RopeMatch(x, y, cos, sin, style, rd, not full, dict(ev.leaf_feat_dims),
                     set(ev.chain) - {y})


def _candidate_inputs(y: fx.Node) -> list[fx.Node]:
    """Inputs of the slices/splits behind ``y``: where a RoPE's x can be."""
    seen: set[fx.Node] = set()
    found: list[fx.Node] = []
    stack = [y]
    while stack and len(seen) < MAX_ROPE_NODES:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in (aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default) \
                and isinstance(n.args[0], fx.Node) and n.args[0] not in found:
            found.append(n.args[0])
        stack.extend(_flat_args(n))
    return found


def match_rope(y: fx.Node, order: dict[fx.Node, int] | None = None) -> RopeMatch | str:
    """The RoPE that produces ``y``, or why there is none (``order``: node positions)."""
    opaque = _match_opaque(y)
    if opaque is not None:
        return opaque
    cands = _candidate_inputs(y)
    if not cands:
        return "not a RoPE output (no slice of an input behind it)"
    reasons = []
    if order is None:
        order = {n: i for i, n in enumerate(y.graph.nodes)}
    for x in sorted(cands, key=lambda n: order.get(n, 0)):
        try:
            ev = _RopeEvaluator(x, y, order)
            m = _classify(ev.run(), ev, x, y)
        except _NoMatch as exc:
            reasons.append(str(exc))
            continue
        # an upcast input: prefer the tensor before the cast when it has y's dtype (the
        # op computes in fp32 anyway and rounds once to y's dtype)
        while (
            m.x.op == "call_function"
            and m.x.target in _PASSTHROUGH
            and isinstance(m.x.args[0], fx.Node)
            and _dtype(m.x.args[0]) == _dtype(y)
            and _dtype(m.x) != _dtype(y)
        ):
            m.chain.add(m.x)
            m.x = m.x.args[0]
        return m
    return "not a RoPE: " + reasons[0]


# ---------------------------------------------------------------- cache writes
@dataclass
class CacheWrite:
    """One functionalized cache write: ``copy_(base, f(index_put(view(base), idx, value)))``."""

    copy: fx.Node
    base: fx.Node  # the graph input (placeholder) the epilogue writes back
    index_put: fx.Node
    new_base: fx.Node  # the node holding the new value of ``base``
    layout: str  # "static" | "flat" | "paged_nhd"
    index: fx.Node | tuple[fx.Node, fx.Node]  # slots / positions, or (pages, offsets)
    value: fx.Node
    roles: tuple[str, ...]  # axis roles of ``value``: b/s (tokens), h (heads), d (features)
    flat_view: tuple[int, ...] | None = None  # the (slots, H, D) view of a paged base
    #: K and V in one buffer: the cache is ``base.select(*select)``; ``base`` is then the
    #: buffer's value before this write and ``new_base`` the ``select_scatter`` after it
    select: tuple[int, int] | None = None
    view_nodes: set[fx.Node] = field(default_factory=set)  # select/reshape/index_put nodes
    cache_shape: tuple[int, ...] = ()  # the cache's shape (the select view's, if any)


def find_writes(graph: fx.Graph) -> tuple[list[CacheWrite], list[tuple[fx.Node, str]]]:
    """Every recognized cache write, and ``(node, reason)`` for index_put writes that are not."""
    writes, misses = [], []
    for node in graph.nodes:
        if node.target is not aten.copy_.default:
            continue
        base, src = node.args[0], node.args[1]
        if not isinstance(base, fx.Node) or base.op != "placeholder" or not isinstance(src, fx.Node):
            continue
        if src.target is aten.select_scatter.default:
            w = _parse_select_scatter_chain(node, base, src)
        else:
            w = _parse_write(node, base, src)
        if isinstance(w, CacheWrite):
            writes.append(w)
        elif isinstance(w, list):
            writes += w
        elif w is not None:
            misses.append((node, w))
    return writes, misses


def _parse_select_scatter_chain(copy: fx.Node, base: fx.Node, src: fx.Node) -> list[CacheWrite] | str:
    """``kv[i].view(...)[index] = x`` on one buffer holding K and V (``kv[0]``, ``kv[1]``):
    after functionalization a chain ``select_scatter(prev, write(select(prev, d, i)), d, i)``
    per write, from the input to the epilogue's source."""
    writes: list[CacheWrite] = []
    node = src
    while node is not base:
        if not (isinstance(node, fx.Node) and node.target is aten.select_scatter.default):
            return "select_scatter chain of cache writes does not start at the cache input"
        prev, written, dim, idx = node.args[:4]
        if not (isinstance(written, fx.Node) and isinstance(prev, fx.Node)):
            return "select_scatter of a non-tensor"
        w = _parse_write(copy, None, written, select=(prev, dim, idx), new_base=node)
        if not isinstance(w, CacheWrite):
            return w or "select_scatter of something other than an index_put cache write"
        writes.append(w)
        node = prev
    return writes


def _parse_write(copy: fx.Node, base: fx.Node | None, src: fx.Node,
                 select: tuple[fx.Node, int, int] | None = None,
                 new_base: fx.Node | None = None) -> CacheWrite | str | None:
    """One write whose new cache value is ``src``. With ``select = (buffer, dim, i)`` the
    cache is ``buffer.select(dim, i)`` (one of K/V in a shared buffer) and ``new_base`` is
    the ``select_scatter`` that puts it back."""
    view_shape = None
    ip = src
    if src.target in (aten.reshape.default, aten.view.default) and isinstance(src.args[0], fx.Node):
        ip = src.args[0]
    if ip.target is not aten.index_put.default:
        if ip.target is aten.select_scatter.default:
            return "cache written through nested select_scatter views: not supported"
        return None
    target = ip.args[0]
    cache = base
    if select is not None:
        # the cache is the select of the buffer's current value
        sel = target.args[0] if ip is not src and isinstance(target, fx.Node) and \
            target.target in (aten.reshape.default, aten.view.default) else target
        if not (isinstance(sel, fx.Node) and sel.target is aten.select.int
                and sel.args[0] is select[0] and tuple(sel.args[1:3]) == tuple(select[1:])):
            return "select_scatter of a write into another view"
        cache = sel
    if ip is not src:  # paged: index_put on a (slots, H, D) view of the cache
        if not (isinstance(target, fx.Node) and target.target in (aten.reshape.default, aten.view.default)
                and target.args[0] is cache and _shape(src) == _shape(cache)):
            return "cache written through a view other than reshape(cache) and back"
        view_shape = _shape(target)
    elif target is not cache:
        return "index_put target is not the cache input"
    w = _parse_index_put(copy, cache, ip, src, view_shape)
    if isinstance(w, CacheWrite):
        w.cache_shape = _shape(cache)
    if isinstance(w, CacheWrite) and select is not None:
        w.base, w.select, w.new_base = select[0], (select[1], select[2]), new_base
        w.view_nodes = {cache, target, ip, src} - {select[0]}
    return w


def _parse_index_put(copy: fx.Node, base: fx.Node, ip: fx.Node, new_base: fx.Node,
                     view_shape: tuple[int, ...] | None) -> CacheWrite | str:
    if len(ip.args) > 3 and ip.args[3]:
        return "index_put accumulates"
    indices = list(ip.args[1])
    value = ip.args[2]
    bshape, vshape = _shape(base), _shape(value)
    if bshape is None or vshape is None:
        return "cache or value has symbolic shape"
    tensor_idx = [i for i in indices if i is not None]
    if any(_dtype(i) not in (torch.int32, torch.int64) or len(_shape(i) or ()) != 1
           for i in tensor_idx):
        return "index is not 1-D integer tensors"
    if len(tensor_idx) == 2 and view_shape is None and len(bshape) == 4:
        # page and offset indexed separately: cache[blocks, offsets] (NHD) or
        # cache[blocks, :, offsets] (HND); index_put moves the indexed dims to the front
        blk, off = tensor_idx
        n = _shape(blk)[0]
        if _shape(off) != (n,):
            return "page and offset indices differ in length"
        row = (bshape[2], bshape[3]) if indices == [blk, off] else (bshape[1], bshape[3])
        value, vshape = _single_token_value(value, vshape, n, row)
        if indices == [blk, off] and vshape == (n, bshape[2], bshape[3]):
            return CacheWrite(copy, base, ip, new_base, "paged_nhd", (blk, off), value,
                              ("s", "h", "d"))
        if indices == [blk, None, off] and vshape == (n, bshape[1], bshape[3]):
            return CacheWrite(copy, base, ip, new_base, "paged_hnd", (blk, off), value,
                              ("s", "h", "d"))
        return f"page/offset write of value {vshape} into cache {bshape}: not a cache-row write"
    if len(tensor_idx) != 1:
        return "index is not one 1-D integer tensor"
    index = tensor_idx[0]
    n_index = _shape(index)[0]
    if (len(indices) == 1 and not isinstance(n_index, int) and vshape
            and isinstance(vshape[0], int) and vshape[0] > 1):
        # a symbolic index length (automatic dynamic shapes mark the slot mapping) with
        # a static token count: index_put broadcasts the value over the indexed rows only
        # when the two are equal (else it raises, as the op's own check does at run time)
        n_index = vshape[0]
    if view_shape is None and len(bshape) == 4 and len(indices) == 3 and indices[:2] == [None, None]:
        b, h, _, d = bshape
        if vshape != (b, h, n_index, d):
            return f"value shape {vshape} does not fill cache rows {(b, h, n_index, d)}"
        return CacheWrite(copy, base, ip, new_base, "static", index, value, ("b", "h", "s", "d"))
    if len(indices) == 1:
        flat = view_shape or bshape
        if len(flat) == 2 and view_shape is None:
            # MLA's latent caches: (slots, kv_lora_rank) and (slots, rope_dim), one head
            # that no axis names; the op takes them as its one-head "flat" layout
            value, vshape = _single_token_value(value, vshape, n_index, (flat[1],))
            if vshape != (n_index, flat[1]):
                return f"value shape {vshape} does not match slots x {flat[1:]}"
            return CacheWrite(copy, base, ip, new_base, "flat", index, value, ("s", "d"))
        if len(flat) == 2:
            return (f"cache {bshape} written through a (slots, features) view: a paged "
                    f"one-head (MLA) cache, which the op takes only as (slots, features)")
        if len(flat) != 3:
            return f"slot-indexed cache of rank {len(flat)}: expected (slots, heads, head_dim)"
        value, vshape = _single_token_value(value, vshape, n_index, tuple(flat[1:]))
        if vshape != (n_index, flat[1], flat[2]):
            return f"value shape {vshape} does not match slots x {flat[1:]}"
        if view_shape is not None:
            if len(bshape) != 4 or not _static(bshape[:2]) or bshape[0] * bshape[1] != flat[0] \
                    or bshape[2:] != flat[1:]:
                return f"paged cache {bshape} is not (blocks, page, heads, head_dim) of {flat}"
            return CacheWrite(copy, base, ip, new_base, "paged_nhd", index, value,
                              ("s", "h", "d"), view_shape)
        return CacheWrite(copy, base, ip, new_base, "flat", index, value, ("s", "h", "d"))
    return f"index_put with indices {['None' if i is None else 'T' for i in indices]}: not a cache-row write"


def _single_token_value(value: Any, vshape: tuple[int, ...], n_index: int,
                        row: tuple[int, ...]) -> tuple[Any, tuple[int, ...]]:
    """With one indexed row, the decomposition writes ``reshape(x, row)`` of a
    ``(1, *row)`` x (index_put broadcasts the value); look through that reshape."""
    if (n_index == 1 and vshape == row and isinstance(value, fx.Node)
            and value.target in (aten.reshape.default, aten.view.default)
            and _shape(value.args[0]) == (1, *row)):
        return value.args[0], (1, *row)
    return value, vshape


# ---------------------------------------------------------------- pairing helpers
def _ancestors(node: fx.Node, depth: int = MAX_ANCESTOR_DEPTH) -> dict[fx.Node, int]:
    """Distance to every ancestor within ``depth`` (placeholders and constants excluded)."""
    dist = {node: 0}
    frontier = [node]
    for step in range(1, depth + 1):
        nxt = []
        for n in frontier:
            for a in _flat_args(n):
                if a not in dist and a.op == "call_function":
                    dist[a] = step
                    nxt.append(a)
        frontier = nxt
    return dist


def _closeness(a: dict[fx.Node, int], b: dict[fx.Node, int]) -> int | None:
    common = [a[n] + b[n] for n in a.keys() & b.keys()]
    return min(common) if common else None


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else None


def _nearest(anchor: fx.Node, cands: list[Any], key, module_of=None) -> tuple[Any | None, str]:
    """The candidate whose ``key`` node shares the nearest ancestor with ``anchor``.

    Ties (layers fed the same input) are broken by the module the nodes were traced in
    (``nn_module_stack``): the k write, its v write and its q come from one attention.
    """
    if not cands:
        return None, "none"
    if len(cands) == 1:
        return cands[0], ""
    base = _ancestors(anchor)
    scored = [(_closeness(base, _ancestors(key(c))), i) for i, c in enumerate(cands)]
    scored = [(s, i) for s, i in scored if s is not None]
    if scored:
        scored.sort()
        best = [i for s, i in scored if s == scored[0][0]]
    else:
        best = list(range(len(cands)))
    if len(best) > 1 and module_of is not None:
        mine = _module_path(anchor)
        same = [i for i in best if mine is not None and _module_path(module_of(cands[i])) == mine]
        best = same or best
    if len(best) > 1:
        return None, "ambiguous (as near as another candidate)"
    return cands[best[0]], ""


def _same_value(a: Any, b: Any, depth: int = MAX_SAME_VALUE_DEPTH) -> bool:
    """Whether two nodes compute the same value by structure (same op on same inputs)."""
    if a is b:
        return True
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return _SymDim(a) == b if isinstance(a, torch.SymInt) else _SymDim(b) == a
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b))
        return type(a) is type(b) and a == b
    if depth == 0 or a.op != "call_function" or b.op != "call_function" or a.target != b.target:
        return False
    if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    return all(_same_value(x, y, depth - 1) for x, y in zip(a.args, b.args)) and all(
        _same_value(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs
    )


def _users_outside(nodes: set[fx.Node], allowed: set[fx.Node]) -> fx.Node | None:
    for n in nodes:
        for u in n.users:
            if u not in nodes and u not in allowed:
                return n
    return None


# ---------------------------------------------------------------- the fusion
@dataclass
class _Plan:
    kw: CacheWrite
    vw: CacheWrite
    k_rope: RopeMatch
    q_rope: RopeMatch
    value_perm: list[int] | None  # permute from y_k to the written value, if any
    #: (reader, node) pairs: ``reader`` reads the rotated k as ``node`` (a reshape of it)
    k_extra_users: list[tuple[fx.Node, fx.Node]]
    #: K and V in one buffer: the buffer's value before both writes, and the
    #: select_scatter holding it after both
    shared_buffer: fx.Node | None = None
    shared_final: fx.Node | None = None


class RopeKVWriteFusion(Fusion):
    """RoPE + KV-cache write -> ``attnfuse::rope_write_kv`` (see the module docstring)."""

    name = "rope_kv_write"
    origin = "SGLang PR 9014 (fused set_kv_buffer into the RoPE kernel)"
    source_modules = ("attnfuse.custom_ops.rope_write_kv", "attnfuse.custom_ops.kernels.rope_write_kv")

    def apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
        # node positions, taken once: every match reads them and none is rewritten before
        # all sites are planned
        self._order = {n: i for i, n in enumerate(graph.nodes)}
        self._ropes: dict[fx.Node, RopeMatch | str] = {}
        #: match_rope of each node the q search tried: every k's search walks the cos/sin
        #: users of all layers (HF shares them), so without it the pass is quadratic in
        #: the layer count
        self._matches: dict[fx.Node, RopeMatch | str] = {}
        self._angle_starts: dict[fx.Node, list[fx.Node]] = {}
        try:
            self._apply(graph, sites)
        finally:
            self._order, self._ropes, self._matches, self._angle_starts = {}, {}, {}, {}

    def _apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
        register_known_rope_ops()
        writes, misses = find_writes(graph)
        for node, reason in misses:
            sites.near_miss(node, reason)
        plans: list[_Plan] = []
        claimed: set[fx.Node] = set()  # v writes and q rotations already used
        ropes: dict[fx.Node, RopeMatch | str] = {}
        for w in writes:
            y, _ = _rope_source(w.value)
            try:
                ropes[w.index_put] = match_rope(y, self._order) if y is not None else "value is not a tensor"
            except Exception as exc:  # noqa: BLE001  (never raise on an unfamiliar graph)
                ropes[w.index_put] = f"not analysable ({type(exc).__name__}: {exc})"
        self._ropes = ropes
        for kw in writes:
            rope = ropes[kw.index_put]
            if isinstance(rope, str):
                continue  # a v write, or not ours; reported below if left unpaired
            try:
                plan = self._plan(kw, rope, writes, ropes, claimed)
            except Exception as exc:  # noqa: BLE001  (planning only reads the graph)
                plan = f"could not analyse this write ({type(exc).__name__}: {exc})"
            if isinstance(plan, str):
                sites.near_miss(kw.index_put, plan)
                continue
            claimed.update({plan.vw.index_put, plan.q_rope.y, kw.index_put})
            plans.append(plan)
        for w in writes:
            if w.index_put not in claimed and isinstance(ropes[w.index_put], str):
                same_index = [o for o in writes if o is not w and _same_value(o.index, w.index)]
                if not any(o.index_put in claimed for o in same_index):
                    sites.near_miss(w.index_put, f"cache write of a value that is {ropes[w.index_put]}")
        for plan in plans:
            sites.rewritten(plan.kw.index_put, _describe(plan))
            self._rewrite(graph, plan)
        if plans:
            from torch._inductor.fx_passes.post_grad import stable_topological_sort

            # the op goes after its last input; readers of q placed before that move down
            stable_topological_sort(graph)

    # ------------------------------------------------------------ checks
    def _plan(self, kw: CacheWrite, rope: RopeMatch, writes: list[CacheWrite],
              ropes: dict[fx.Node, Any], claimed: set[fx.Node]) -> _Plan | str:
        y_k, perm = _rope_source(kw.value)
        roles = kw.roles if perm is None else tuple(kw.roles[perm.index(i)] for i in range(len(perm)))
        # v: same index node(s), same layout, not rotated, nearest by ancestry
        partners = [w for w in writes if w is not kw and w.index_put not in claimed
                    and isinstance(ropes[w.index_put], str) and w.layout == kw.layout]
        same_index = [w for w in partners if w.index is kw.index or _same_value(w.index, kw.index)]
        if not same_index:
            if partners:
                return "k and v written with different indices"
            return "no v written beside the rotated k"
        vw, why = _nearest(rope.x, same_index, key=lambda w: w.value,
                           module_of=lambda w: w.value)
        if vw is None:
            return f"v write for this k is {why}"
        shared = _shared_buffer(kw, vw)
        if isinstance(shared, str):
            return shared
        if shared is None and vw.base is kw.base:
            return "k and v written into the same cache"
        # q: same cos/sin (structurally), nearest input by ancestry
        qs = self._q_candidates(rope, claimed)
        if isinstance(qs, str):
            return qs
        q, why = _nearest(rope.x, qs, key=lambda m: m.x, module_of=lambda m: m.x)
        if q is None:
            return f"q rotation for this k is {why}"
        # dtypes and shapes
        reason = _check_dtypes(kw, vw, rope, q)
        if reason:
            return reason
        q_roles = _q_roles(roles, _xshape(q))
        if q_roles is None:
            return (f"q {_xshape(q)} and k {_xshape(rope)} differ in rank beyond a head axis "
                    f"k lacks (k's axes: {roles})")
        reason = _check_layout(rope, q, roles, q_roles, _shape(vw.value), vw.roles)
        if reason:
            return reason
        # rotated k consumed elsewhere: only the rotation's result may be (k_out); the
        # decomposition's reshape of a single written token is part of the write
        write = {kw.index_put, kw.value}

        def part_of_write(u: fx.Node) -> bool:
            return u in write or bool(u.users) and set(u.users) <= {kw.index_put}

        if rope.opaque is not None:
            # every node between the op's output and the written value is a reshape of
            # the rotated k: any other reader gets k_out in that shape
            holders = [*rope.outs, *rope.chain, y_k]
            inside = set(rope.chain) | {y_k}
            extra = [(u, n) for n in dict.fromkeys(holders) for u in n.users
                     if u not in inside and not part_of_write(u)]
        else:
            extra = [(u, y_k) for u in y_k.users if not part_of_write(u)]
            inner = _users_outside(rope.chain, rope.chain | {y_k})
            if inner is not None:
                return f"an intermediate of the k rotation ({inner.name}) is used outside it"
        if rope.inplace is not None:
            reason = _inplace_cycle(rope.inplace, vw.value, self._order)
            if reason:
                return reason
        inner = _users_outside(q.chain, q.chain | {q.y})
        if inner is not None:
            return f"an intermediate of the q rotation ({inner.name}) is used outside it"
        if perm is not None and len(kw.value.users) > 1:
            return "the permuted rotated k is also read besides the cache write"
        plan = _Plan(kw, vw, rope, q, perm, extra)
        if shared is not None:
            plan.shared_buffer, plan.shared_final = shared
        return plan

    def _match_once(self, y: fx.Node) -> RopeMatch | str:
        """``match_rope(y)``, computed once per apply (shared: copy before changing it)."""
        if y not in self._matches:
            self._matches[y] = match_rope(y, self._order)
        return self._matches[y]

    def _angle_users(self, leaf: fx.Node) -> list[fx.Node]:
        """Users of ``leaf``, of its views and of structurally equal copies (once per apply)."""
        if leaf not in self._angle_starts:
            root, views, _ = _angle_root(leaf)
            self._angle_starts[leaf] = [
                u for n in dict.fromkeys([*views, *_siblings(leaf), *_siblings(root)])
                for u in n.users]
        return self._angle_starts[leaf]

    def _q_candidates(self, k: RopeMatch, claimed: set[fx.Node]) -> list[RopeMatch] | str:
        """Rotations with the same cos/sin as ``k`` (not ``k`` itself)."""
        if k.opaque is not None:  # q comes out of the same op call
            if k.partner is None or k.partner.y in claimed:
                return f"the q rotation of {k.opaque.target} is not available"
            return [k.partner]
        # q may read the same cos/sin node, a view of it with its own head axis, or a
        # structurally equal copy of it (no CSE across them)
        starts = [*self._angle_users(k.cos), *self._angle_users(k.sin)]
        ends: dict[fx.Node, RopeMatch] = {}
        seen: set[fx.Node] = set()
        frontier = [s for s in starts if s not in k.chain and s is not k.y]
        for _ in range(MAX_FORWARD_STEPS):
            nxt = []
            for n in frontier:
                if n in seen or n in k.chain or n is k.y or n.op != "call_function":
                    continue
                seen.add(n)
                if _shape(n) is not None and n.target in (aten.add.Tensor, aten.sub.Tensor,
                                                          aten.cat.default, aten.reshape.default,
                                                          prims.convert_element_type.default):
                    m = self._match_once(n)
                    if isinstance(m, RopeMatch) and _same_angles(m.cos, k.cos) and _same_angles(m.sin, k.sin) \
                            and m.style == k.style and m.rotary_dim == k.rotary_dim \
                            and m.half_width == k.half_width and m.x_perm == k.x_perm:
                        ends[n] = dataclasses.replace(m, chain=set(m.chain),
                                                      leaf_feat_dims=dict(m.leaf_feat_dims))
                nxt += list(n.users)
            frontier = nxt
        # keep the outermost rotations (not inside another one's chain)
        inner = set().union(*(m.chain for m in ends.values())) if ends else set()
        # a rotation written to a cache is another attention's k (HF shares cos/sin
        # across layers), never this one's q
        written = {m.y for m in self._ropes.values() if isinstance(m, RopeMatch)}
        found = [m for y, m in ends.items() if y not in inner and y not in claimed
                 and y not in written]
        if not found:
            return "no q rotated with the same cos/sin"
        return found

    # ------------------------------------------------------------ rewrite
    def _rewrite(self, graph: fx.Graph, p: _Plan) -> None:
        kw, vw, k, q = p.kw, p.vw, p.k_rope, p.q_rope
        y_roles = kw.roles if p.value_perm is None else tuple(
            kw.roles[p.value_perm.index(i)] for i in range(len(p.value_perm)))
        token_roles = ("b", "s", "h", "d") if "b" in y_roles else ("s", "h", "d")
        q_roles = _q_roles(y_roles, _xshape(q))
        if k.inplace is not None:
            _read_unrotated_before(graph, k.inplace)
        inputs = [q.x, k.x, vw.value, k.cos, k.sin]
        inputs += [p.shared_buffer] if p.shared_buffer is not None else [kw.base, vw.base]
        inputs += list(kw.index) if isinstance(kw.index, tuple) else [kw.index]
        if k.positions is not None:
            inputs.append(k.positions)
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = max(inputs, key=lambda n: order[n]).next
        em = _Emitter(graph, anchor, kw.index_put)

        def to_op(x: fx.Node, roles: tuple[str, ...]) -> fx.Node:
            """``x`` with axes in the op's token order; a missing head axis added."""
            present = [r for r in token_roles if r in roles]
            perm = [roles.index(r) for r in present]
            if perm != list(range(len(perm))):
                x = em(aten.permute.default, x, perm)
            if "h" not in roles:
                x = em(aten.unsqueeze.default, x, token_roles.index("h"))
            return x

        def from_op(x: fx.Node, roles: tuple[str, ...]) -> fx.Node:
            """The inverse of ``to_op``: an op output in the graph's axis order."""
            if "h" not in roles:
                x = em(aten.squeeze.dim, x, token_roles.index("h"))
            present = [r for r in token_roles if r in roles]
            inv = [present.index(r) for r in roles]
            return x if inv == list(range(len(inv))) else em(aten.permute.default, x, inv)

        qx, kx = _apply_steps(em, q.x, q.x_steps), _apply_steps(em, k.x, k.x_steps)
        if k.x_perm is not None:  # the rotation reads the features in another order
            qx, kx = (_gather_features(em, x, k.x_perm) for x in (qx, kx))
        qt, kt = to_op(qx, q_roles), to_op(kx, y_roles)
        vt = to_op(vw.value, vw.roles)
        head_axis = y_roles.index("h") if "h" in y_roles else None
        if k.opaque is not None:
            half = k.rotary_dim // 2
            cos = em(aten.slice.Tensor, k.cos, 1, 0, half)
            sin = em(aten.slice.Tensor, k.sin, 1, half, k.rotary_dim)
        else:
            cos = _angle_arg(em, k, k.cos, head_axis, y_roles)
            sin = _angle_arg(em, k, k.sin, head_axis, y_roles)
        if isinstance(kw.index, tuple):
            # index_put wraps negative pages and offsets (Python indexing) before the
            # slot is formed: slot = wrap(page) * page_size + wrap(offset)
            blocks, page_size = _paged_dims(kw)
            pages = _wrap_negative(em, kw.index[0], blocks)
            offsets = _wrap_negative(em, kw.index[1], page_size)
            index = em(aten.add.Tensor, em(aten.mul.Tensor, pages, page_size), offsets)
        elif kw.layout != "static":
            # index_put wraps negative slots (Python indexing); the op skips them: wrap here
            # so that the rewrite computes exactly what the graph did
            index = _wrap_negative(em, kw.index, (kw.flat_view or kw.cache_shape)[0])
        else:
            index = kw.index  # the op wraps negative static positions itself
        return_k = bool(p.k_extra_users)
        from torch._higher_order_ops.auto_functionalize import (
            auto_functionalized,
            auto_functionalized_v2,
        )

        op = torch.ops.attnfuse.rope_write_kv.default
        kwargs = {"q": qt, "k": kt, "v": vt, "cos": cos, "sin": sin, "positions": k.positions,
                  "cache_index": index, "cache_layout": kw.layout, "rotary_dim": k.rotary_dim,
                  "style": k.style, "k_scale": None, "v_scale": None, "return_k": return_k}
        if p.shared_buffer is not None:
            # K and V are views of one buffer: auto_functionalized_v2 names each as a
            # view (size, stride, offset) of that base, which Inductor reinplaces
            buffer = fake_value(p.shared_buffer)
            for name, w in (("k_cache", kw), ("v_cache", vw)):
                view = buffer.select(*w.select)
                kwargs[f"_{name}_base_index"] = 0
                kwargs[f"_{name}_size"] = tuple(int(n) for n in view.size())
                kwargs[f"_{name}_stride"] = tuple(int(n) for n in view.stride())
                kwargs[f"_{name}_storage_offset"] = int(view.storage_offset())
            kwargs["_all_bases"] = [p.shared_buffer]
            out = em(auto_functionalized_v2, op, kwargs=kwargs)
        else:
            out = em(auto_functionalized, op, kwargs=dict(kwargs, k_cache=kw.base, v_cache=vw.base))
        q_out = em(operator.getitem, out, 0)
        if p.shared_buffer is not None:
            new_k = new_v = None
            p.shared_final.replace_all_uses_with(em(operator.getitem, out, 2))
        else:
            new_k = em(operator.getitem, out, 2)
            new_v = em(operator.getitem, out, 3)
        if q.opaque is not None:  # each holder of the rotated q is a reshape of it
            for n in q.outs:
                n.replace_all_uses_with(_reshaped_like(em, q_out, n))
        else:
            q.y.replace_all_uses_with(from_op(q_out, q_roles))
        if return_k:
            k_out = em(operator.getitem, out, 1)
            k_res: dict[fx.Node, fx.Node] = {}
            for u, n in p.k_extra_users:
                if n not in k_res:
                    k_res[n] = (_reshaped_like(em, k_out, n) if k.opaque is not None
                                else from_op(k_out, y_roles))
                u.replace_input_with(n, k_res[n])
        for w, new in ((kw, new_k), (vw, new_v)):
            if new is None:
                continue  # the shared buffer's final value was replaced above
            if w.flat_view is not None:
                w.new_base.replace_all_uses_with(new)
                _erase_dead(graph, w.new_base)
                others = list(w.index_put.users)
                if others:  # readers of the (slots, H, D) view after the write
                    flat = em(aten.reshape.default, new, list(w.flat_view))
                    for u in others:
                        u.replace_input_with(w.index_put, flat)
            else:
                w.index_put.replace_all_uses_with(new)
        for n in (kw.index_put, vw.index_put):
            _erase_dead(graph, n)
        if k.inplace is not None:
            _erase_inplace_call(graph, k)


def _apply_steps(em: _Emitter, x: fx.Node, steps: Iterable[tuple[Any, tuple]]) -> fx.Node:
    for target, args in steps:
        x = em(target, x, *args)
    return x


def _reshaped_like(em: _Emitter, t: fx.Node, like: fx.Node) -> fx.Node:
    """``t`` (an op output, ``(T, H, D)``) reshaped to ``like``'s shape (-1 for T)."""
    shape = _shape(like)
    if shape == _shape(t):
        return t
    return em(aten.reshape.default, t, [-1, *shape[1:]])


def _read_unrotated_before(graph: fx.Graph, info: _InplaceRope) -> None:
    """Reads of the parts of an in-place RoPE's buffers that it does not write now read
    the buffers before the call (the same values), so that nothing the fused op consumes
    (v, typically, in a fused qkv buffer) depends on the call it replaces."""
    em = _Emitter(graph, info.node, info.node)
    splits: dict[fx.Node, fx.Node] = {}
    for r in info.pieces["other"]:
        src = r.args[0]
        new_base = src if r.target is aten.slice.Tensor else src.args[0]
        base = info.bases[info.new_bases[new_base]]
        em.anchor = src if r.target is not aten.slice.Tensor else r
        if r.target is aten.slice.Tensor:
            fresh = em(aten.slice.Tensor, base, *r.args[1:])
        else:
            if src not in splits:
                splits[src] = em(src.target, base, *src.args[1:], kwargs=dict(src.kwargs))
            fresh = em(operator.getitem, splits[src], r.args[1])
        r.replace_all_uses_with(fresh)


def _erase_inplace_call(graph: fx.Graph, k: RopeMatch) -> None:
    """Erase the replaced in-place call and its reads once nothing uses them."""
    info = k.inplace
    nodes = [*info.pieces["q"], *info.pieces["k"], *info.pieces["other"], *k.chain, k.y]
    nodes += [n.args[0] for n in nodes if n.target in (operator.getitem, aten.slice.Tensor)
              and n.args[0] is not info.node]
    nodes += [*reversed(info.owned), info.node]
    erased: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for n in dict.fromkeys(nodes):
            if n not in erased and not n.users:
                graph.erase_node(n)
                erased.add(n)
                changed = True


def _describe(p: _Plan) -> str:
    k = p.k_rope
    text = f"{p.kw.layout}, {k.style}, rotary_dim={k.rotary_dim}"
    if p.kw.layout == "flat" and "h" not in p.kw.roles:
        text += ", one-head latent caches"
    if k.x_perm is not None:
        text += f", input features permuted ({len(_arithmetic_runs(k.x_perm))} strided slices)"
    if k.inplace is not None:
        text += f", in-place {k.inplace.op}"
    elif k.opaque is not None:
        text += f", {k.opaque.target}"
    return text


def _shared_buffer(kw: CacheWrite, vw: CacheWrite) -> tuple[fx.Node, fx.Node] | str | None:
    """For K and V written into views of one buffer: (buffer before, buffer after), or why
    the pair cannot be fused; None when the caches are separate tensors."""
    if kw.select is None and vw.select is None:
        return None
    if kw.select is None or vw.select is None:
        return "only one of k and v is a view of a shared buffer"
    if vw.base is kw.new_base:
        inner, outer = kw, vw
    elif kw.base is vw.new_base:
        inner, outer = vw, kw
    else:
        return "k and v writes into the shared buffer are not consecutive"
    # nothing may read the buffer between the two writes (it would see k written, v not)
    allowed = inner.view_nodes | outer.view_nodes | {inner.new_base, outer.new_base}
    for n in inner.view_nodes | outer.view_nodes | {inner.new_base}:
        if any(u not in allowed for u in n.users):
            return f"the shared K/V buffer is read between the k and v writes ({n.name})"
    return inner.base, outer.new_base


def _rope_source(value: Any) -> tuple[fx.Node | None, list[int] | None]:
    """The rotation output behind a written value (through one permute), and the permute."""
    if not isinstance(value, fx.Node):
        return None, None
    if value.target is aten.permute.default and isinstance(value.args[0], fx.Node):
        return value.args[0], [p % len(value.args[1]) for p in value.args[1]]
    return value, None


def _siblings(node: fx.Node) -> list[fx.Node]:
    """Nodes structurally equal to ``node`` (copies nobody merged, e.g. a cos/sin
    ``repeat_interleave`` traced once for q and once for k): found by going up to a shared
    ancestor and back down as many steps."""
    out: list[fx.Node] = []
    up = node
    for depth in range(1, MAX_SAME_VALUE_DEPTH + 1):
        args = [a for a in _flat_args(up)]
        if len(args) != 1:
            break
        up = args[0]
        frontier = [up]
        for _ in range(depth):
            frontier = [u for n in frontier for u in n.users]
        out += [n for n in frontier if n is not node and n not in out and _same_value(n, node)]
    return out


def _check_dtypes(kw: CacheWrite, vw: CacheWrite, k: RopeMatch, q: RopeMatch) -> str | None:
    float_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    dk, dq, dv = _dtype(k.x), _dtype(q.x), _dtype(vw.value)
    if dk not in float_dtypes or dq not in float_dtypes or dv not in float_dtypes:
        return f"dtypes q={dq}, k={dk}, v={dv}: expected fp16/bf16/fp32"
    if dq != dk or _dtype(q.y) != dq or _dtype(k.y) != dk:
        return f"mixed dtypes: q {dq}->{_dtype(q.y)}, k {dk}->{_dtype(k.y)}"
    if _dtype(kw.base) != dk or _dtype(vw.base) != dv:
        return f"cache dtypes {_dtype(kw.base)}/{_dtype(vw.base)} differ from k {dk} / v {dv}"
    for leaf in (k.cos, k.sin):
        if _dtype(leaf) not in float_dtypes:
            return f"cos/sin dtype {_dtype(leaf)}"
    return None


def _q_roles(k_roles: tuple[str, ...], qshape: tuple[Any, ...] | None) -> tuple[str, ...] | None:
    """Axis roles of q, given k's: the same, or, when k has no head axis (MLA's one
    latent head, ``(tokens, rope_dim)``), k's with the heads just before the features."""
    if qshape is None:
        return None
    if "h" in k_roles:
        return k_roles if len(qshape) == len(k_roles) else None
    if len(qshape) == len(k_roles) + 1 and k_roles[-1] == "d":
        return k_roles[:-1] + ("h", "d")
    return None


def _role_size(shape: tuple[Any, ...], roles: tuple[str, ...], role: str) -> Any:
    """Size of the axis playing ``role`` (an absent head axis is one head)."""
    return shape[roles.index(role)] if role in roles else 1


def _xshape(m: RopeMatch) -> tuple[Any, ...] | None:
    """The shape of the rotation's input as the op reads it."""
    return m.op_shape if m.op_shape is not None else _shape(m.x)


def _inplace_cycle(info: _InplaceRope, value: fx.Node, order: dict[fx.Node, int]) -> str | None:
    """Why ``value`` (the written v) cannot feed an op that replaces ``info``'s call:
    it reads the rotated query or key (parts of the buffer the op does not write are read
    from the buffer before it, see ``_rewrite``)."""
    floor = info.node
    stop = set(info.pieces["other"])
    rotated = set(info.pieces["q"]) | set(info.pieces["k"]) | {floor}
    seen: set[fx.Node] = set()
    stack = [value]
    while stack:
        n = stack.pop()
        if n in seen or n in stop or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        if order.get(n, 0) < order[floor]:
            continue  # placed before the call: cannot read what it wrote
        if n in rotated:
            return f"v is computed from the buffer {info.op} rotates in place"
        seen.add(n)
        if len(seen) > 4 * MAX_ROPE_NODES:
            return "v's computation is too large to tell it apart from the rotated buffer"
        stack.extend(_flat_args(n))
    return None


def _check_layout(k: RopeMatch, q: RopeMatch, roles: tuple[str, ...], q_roles: tuple[str, ...],
                  vshape: tuple[int, ...] | None, v_roles: tuple[str, ...]) -> str | None:
    ks, qs = _xshape(k), _xshape(q)
    if ks is None or qs is None or len(ks) != len(roles) or len(qs) != len(q_roles):
        return "q and k ranks differ"
    for r in roles:
        if r != "h" and ks[roles.index(r)] != qs[q_roles.index(r)]:
            return f"q {qs} and k {ks} differ outside the head axis"
    if vshape is None or len(vshape) != len(v_roles):
        return "v has no static shape"
    if "d" not in v_roles or any(r not in roles and r != "h" for r in v_roles):
        return f"v's axes {v_roles} are not k's {roles}"
    for r in set(roles) | set(v_roles):
        if r != "d" and _role_size(vshape, v_roles, r) != _role_size(ks, roles, r):
            return f"v {vshape} and k {ks} differ in tokens or heads"
    if k.opaque is not None:
        if tuple(roles) != ("s", "h", "d") or _shape(k.positions) != (ks[0],):
            return "opaque RoPE op outside the (tokens, heads, head_dim) layout"
        return None
    if [r for r in roles if r not in "hd"] not in (["b", "s"], ["s"]):
        return f"token dims in the order {roles}: not (batch, sequence)"
    for m, m_roles in ((k, roles), (q, q_roles)):
        for leaf in (m.cos, m.sin):
            if m.leaf_feat_dims.get(leaf, 1) > 1 and not _static(_shape(leaf)):
                return "cos/sin with features over several dims and a symbolic size"
            lead = _leaf_leading(m, leaf, len(m_roles))
            if lead is None:
                return "cos/sin do not broadcast over q and k"
            if "h" in m_roles and lead[m_roles.index("h")] != 1:
                return "cos/sin vary per head"
    # q may read the angles through its own view of k's cos/sin (an unsqueeze for its
    # head axis): the same rows must then land on the same token axes
    for kl, ql in ((k.cos, q.cos), (k.sin, q.sin)):
        if ql is not kl and _angle_layout(k, kl, roles) != _angle_layout(q, ql, q_roles):
            return "q and k read cos/sin with different token axes"
    return None


def _angle_root(node: fx.Node) -> tuple[fx.Node, list[fx.Node], tuple[Any, ...]]:
    """The tensor a cos/sin leaf views, through ops that only add or drop size-1 axes
    (unsqueeze, squeeze, such reshapes and full slices) or cast it, the nodes on the way,
    and the dtypes it passes through from the root (casts and unit-axis views commute,
    so two leaves with one root and the same dtypes hold the same values)."""
    chain = [node]
    dtypes = [_dtype(node)]
    while (node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node)
           and (node.target in _UNIT_AXIS_OPS or _is_cast(node))):
        src = node.args[0]
        a, b = _shape(src), _shape(node)
        if a is None or b is None or not a or not b or a[-1] != b[-1]:
            break
        if [n for n in a if n != 1] != [n for n in b if n != 1]:
            break
        node = src
        chain.append(node)
        dtypes.append(_dtype(node))
    path = tuple(d for i, d in enumerate(reversed(dtypes)) if i == 0 or d != dtypes[-i])
    return node, chain, path


def _is_cast(node: fx.Node) -> bool:
    """A dtype cast (or a copy) that changes nothing else."""
    if node.target in (prims.convert_element_type.default, aten.clone.default, aten.alias.default):
        return True
    return node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}


def _same_angles(a: fx.Node, b: fx.Node) -> bool:
    """Whether two cos/sin leaves hold the same values (see ``_angle_root``); how the
    rows align with the tokens is checked against the axis roles in ``_check_layout``."""
    if a is b or _same_value(a, b):
        return True
    (ra, _, da), (rb, _, db) = _angle_root(a), _angle_root(b)
    return da == db and _same_value(ra, rb)


def _angle_layout(m: RopeMatch, leaf: fx.Node, roles: tuple[str, ...]) -> tuple | None:
    """(role, size) of each leading axis of ``leaf`` longer than one, in order, and its
    feature dims: equal for two leaves of one root means equal angles per token."""
    lead = _leaf_leading(m, leaf, len(roles))
    if lead is None:
        return None
    shape = _shape(leaf)
    nf = m.leaf_feat_dims.get(leaf, 1)
    return (tuple((roles[i], n) for i, n in enumerate(lead) if n != 1),
            tuple(shape[len(shape) - nf:]))


def _leaf_leading(k: RopeMatch, leaf: fx.Node, rank: int) -> tuple[int, ...] | None:
    shape = _shape(leaf)
    nf = k.leaf_feat_dims.get(leaf, 1)
    lead = shape[: max(0, len(shape) - nf)]
    if len(lead) > rank - 1:
        if any(s != 1 for s in lead[: len(lead) - (rank - 1)]):
            return None
        lead = lead[len(lead) - (rank - 1):]
    return (1,) * (rank - 1 - len(lead)) + tuple(lead)


def _angle_arg(em: _Emitter, k: RopeMatch, leaf: fx.Node, head_axis: int | None,
               roles: tuple[str, ...]) -> fx.Node:
    """cos/sin for the op: ``(tokens..., W)``, broadcastable to the op's token dims.

    Built from selects (of size-1 dims) rather than a reshape, so that symbolic token
    counts never need to be spelled out."""
    rank = len(roles)
    shape = _shape(leaf)
    nf = k.leaf_feat_dims.get(leaf, 1)
    arg = leaf
    if nf > 1:  # features spread over trailing dims (static: checked in _check_layout)
        width = int(np.prod(shape[len(shape) - nf:]))
        arg = em(aten.reshape.default, leaf, list(shape[: len(shape) - nf]) + [width])
        shape = shape[: len(shape) - nf] + (width,)
    lead_rank = len(shape) - 1
    while lead_rank > rank - 1:  # extra leading dims (all of size 1)
        arg = em(aten.select.int, arg, 0, 0)
        lead_rank -= 1
    # leading dims align to the right; k without a head axis (MLA) has none to drop
    head = -1 if head_axis is None else head_axis - ((rank - 1) - lead_rank)
    if head >= 0:
        arg = em(aten.select.int, arg, head, 0)
    need = k.rotary_dim // 2 if k.half_width else k.rotary_dim
    if shape[-1] != need:
        arg = em(aten.slice.Tensor, arg, -1, 0, need)
    return arg


def _gather_features(em: _Emitter, x: fx.Node, perm: tuple[int, ...]) -> fx.Node:
    """``x[..., perm]`` as a concatenation of strided slices (one per arithmetic run)."""
    parts = [em(aten.slice.Tensor, x, -1, start, start + step * (n - 1) + 1, step)
             for start, step, n in _arithmetic_runs(perm)]
    return parts[0] if len(parts) == 1 else em(aten.cat.default, parts, -1)


def _wrap_negative(em: _Emitter, index: fx.Node, size: int) -> fx.Node:
    return em(aten.where.self, em(aten.lt.Scalar, index, 0), em(aten.add.Tensor, index, size), index)


def _paged_dims(w: CacheWrite) -> tuple[int, int]:
    """(pages, page size) of a paged cache written by page and offset."""
    shape = w.cache_shape
    return (shape[0], shape[1]) if w.layout == "paged_nhd" else (shape[0], shape[2])


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    if not node.users:
        graph.erase_node(node)


class _Emitter:
    """Inserts nodes (with fake-tensor metadata) before ``anchor``."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, meta_from: fx.Node) -> None:
        from torch._guards import detect_fake_mode

        self.graph = graph
        self.anchor = anchor
        self.meta_from = meta_from
        # the first fake tensor names the mode (all of a graph's share it); scanning
        # every node at each rewrite made the pass quadratic in the layer count
        first = next((v for v in map(fake_value, graph.nodes) if isinstance(v, torch.Tensor)), None)
        self.fake_mode = detect_fake_mode([first] if first is not None else [])

    def __call__(self, target: Any, *args: Any, kwargs: dict[str, Any] | None = None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), kwargs)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        fa, fk = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fa, **fk)
        else:
            node.meta["val"] = target(*fa, **fk)
        return node
