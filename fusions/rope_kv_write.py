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
Opaque functional RoPE ops declared with ``register_rope_op`` are read through their
declared signature.

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

q is the rotation with the same cos/sin (structurally equal nodes) whose input shares the
nearest ancestor with k's input; v is the value written with the same index nodes into
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
writes, a cache of rank 2 such as MLA's latent cache, fp8 quantization in the graph).
A negative slot or offset is wrapped as ``index_put`` does (the op itself treats
negative slots as padding), so the rewrite computes what the graph did.

Origin: SGLang PR 9014 (fused ``set_kv_buffer`` into the RoPE kernel).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

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
    #: an opaque RoPE op (``register_rope_op``): its node, and the positions it reads
    #: ``cos``/``sin`` from (both then name the ``[cos | sin]`` cache)
    opaque: fx.Node | None = None
    positions: fx.Node | None = None


@dataclass(frozen=True)
class RopeOpSpec:
    """How to read an opaque, functional RoPE custom op ``(q, k, ...) -> (q_rot, k_rot)``.

    Serving code often wraps a RoPE kernel in its own ``torch.library`` op; the pass cannot
    look inside it, so the op's meaning is declared: argument names of the ``(T, H, D)``
    query and key, the ``(T,)`` positions and the ``(max_pos, rotary_dim)`` cos/sin cache
    (cos half, then sin half: the vLLM/FlashInfer convention), the style (an argument
    name holding ``is_neox``, or a constant) and which outputs are q and k.
    """

    query: str
    key: str
    positions: str
    cos_sin_cache: str
    is_neox: str | bool = True
    outputs: tuple[int, int] = (0, 1)


#: opaque RoPE ops the pass understands, by OpOverload (see ``register_rope_op``)
_ROPE_OPS: dict[Any, RopeOpSpec] = {}


def register_rope_op(op: Any, spec: RopeOpSpec) -> None:
    """Declare an opaque functional RoPE op so that ``rope_kv_write`` can fuse it.

    >>> register_rope_op(torch.ops.mylib.rope.default,
    ...                  RopeOpSpec(query="q", key="k", positions="pos", cos_sin_cache="cache"))
    """
    if not isinstance(op, torch._ops.OpOverload):
        raise ValueError(f"op: expected a torch OpOverload (torch.ops.ns.name.default), got {op!r}")
    names = {a.name for a in op._schema.arguments}
    for field_name in ("query", "key", "positions", "cos_sin_cache"):
        if getattr(spec, field_name) not in names:
            raise ValueError(f"spec.{field_name}: expected an argument of {op}, got "
                             f"{getattr(spec, field_name)!r} (arguments: {sorted(names)})")
    _ROPE_OPS[op] = spec


def _opaque_arg(node: fx.Node, name: str) -> Any:
    schema = node.target._schema
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if i < len(node.args):
                return node.args[i]
            return a.default_value
    return None


def _match_opaque(y: fx.Node) -> RopeMatch | str | None:
    """``y = getitem(op(...), i)`` of a registered RoPE op, or None when it is not one."""
    if y.target is not operator.getitem or not isinstance(y.args[0], fx.Node):
        return None
    node, out = y.args[0], y.args[1]
    spec = _ROPE_OPS.get(node.target)
    if spec is None:
        return None
    if out not in spec.outputs:
        return f"output {out} of {node.target} is not its q or k"
    x = _opaque_arg(node, spec.query if out == spec.outputs[0] else spec.key)
    cache = _opaque_arg(node, spec.cos_sin_cache)
    positions = _opaque_arg(node, spec.positions)
    neox = spec.is_neox if isinstance(spec.is_neox, bool) else _opaque_arg(node, spec.is_neox)
    if not all(isinstance(a, fx.Node) for a in (x, cache, positions)) or not isinstance(neox, bool):
        return f"{node.target}: arguments not understood"
    cshape = _shape(cache)
    if cshape is None or len(cshape) != 2 or cshape[1] % 2:
        return f"{node.target}: cos/sin cache of shape {cshape}"
    return RopeMatch(x, y, cache, cache, "neox" if neox else "interleaved", cshape[1], True, {},
                     set(), opaque=node, positions=positions)


_ELEMENTWISE = {aten.mul.Tensor: "mul", aten.add.Tensor: "add", aten.sub.Tensor: "sub"}
_PASSTHROUGH = {prims.convert_element_type.default, aten.clone.default,
                aten._to_copy.default, aten.alias.default}


class _SymDim:
    """A symbolic size (dynamic token count) that compares without adding guards.

    ``int()`` or ``bool(a == b)`` on a SymInt would specialize the graph (and recompile it
    for every size); equality here holds only when provable for all sizes.
    """

    __slots__ = ("sym",)

    def __init__(self, sym: Any) -> None:
        self.sym = sym

    def __eq__(self, other: Any) -> bool:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        other = other.sym if isinstance(other, _SymDim) else other
        if not isinstance(other, (int, torch.SymInt)):
            return NotImplemented
        try:
            return bool(statically_known_true(self.sym == other))
        except Exception:  # an expression the shape env cannot decide
            return False

    def __ne__(self, other: Any) -> bool:
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
        partner_of = lambda i: i + half if i < half else i - half  # noqa: E731
        sign_of = lambda i: -1.0 if i < half else 1.0  # noqa: E731
        pair_of = lambda i: i % half  # noqa: E731
    else:
        style = "interleaved"
        partner_of = lambda i: i + 1 if i % 2 == 0 else i - 1  # noqa: E731
        sign_of = lambda i: -1.0 if i % 2 == 0 else 1.0  # noqa: E731
        pair_of = lambda i: i // 2  # noqa: E731
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
        if n.target in (aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default):
            if isinstance(n.args[0], fx.Node) and n.args[0] not in found:
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
    if view_shape is None and len(bshape) == 4 and len(indices) == 3 and indices[:2] == [None, None]:
        b, h, _, d = bshape
        if vshape != (b, h, n_index, d):
            return f"value shape {vshape} does not fill cache rows {(b, h, n_index, d)}"
        return CacheWrite(copy, base, ip, new_base, "static", index, value, ("b", "h", "s", "d"))
    if len(indices) == 1:
        flat = view_shape or bshape
        if len(flat) != 3:
            return f"slot-indexed cache of rank {len(flat)}: expected (slots, heads, head_dim)"
        value, vshape = _single_token_value(value, vshape, n_index, tuple(flat[1:]))
        if vshape != (n_index, flat[1], flat[2]):
            return f"value shape {vshape} does not match slots x {flat[1:]}"
        if view_shape is not None:
            if len(bshape) != 4 or bshape[0] * bshape[1] != flat[0] or bshape[2:] != flat[1:]:
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
    k_extra_users: list[fx.Node]
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
        try:
            self._apply(graph, sites)
        finally:
            self._order = {}

    def _apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
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
            except Exception as exc:  # never raise on an unfamiliar graph
                ropes[w.index_put] = f"not analysable ({type(exc).__name__}: {exc})"
        for kw in writes:
            rope = ropes[kw.index_put]
            if isinstance(rope, str):
                continue  # a v write, or not ours; reported below if left unpaired
            try:
                plan = self._plan(kw, rope, writes, ropes, claimed)
            except Exception as exc:  # planning reads the graph only: leave it as it is
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
            sites.rewritten(plan.kw.index_put,
                            f"{plan.kw.layout}, {plan.k_rope.style}, rotary_dim={plan.k_rope.rotary_dim}")
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
        reason = _check_layout(rope, q, roles, _shape(vw.value), vw.roles)
        if reason:
            return reason
        # rotated k consumed elsewhere: only the rotation's result may be (k_out)
        extra = [u for u in y_k.users if u is not kw.index_put and u is not kw.value]
        inner = _users_outside(rope.chain, rope.chain | {y_k})
        if inner is not None:
            return f"an intermediate of the k rotation ({inner.name}) is used outside it"
        inner = _users_outside(q.chain, q.chain | {q.y})
        if inner is not None:
            return f"an intermediate of the q rotation ({inner.name}) is used outside it"
        if perm is not None and len(kw.value.users) > 1:
            return "the permuted rotated k is also read besides the cache write"
        plan = _Plan(kw, vw, rope, q, perm, extra)
        if shared is not None:
            plan.shared_buffer, plan.shared_final = shared
        return plan

    def _q_candidates(self, k: RopeMatch, claimed: set[fx.Node]) -> list[RopeMatch] | str:
        """Rotations with the same cos/sin as ``k`` (not ``k`` itself)."""
        if k.opaque is not None:  # q comes out of the same op call
            q_out = _ROPE_OPS[k.opaque.target].outputs[0]
            found = [u for u in k.opaque.users
                     if u.target is operator.getitem and u.args[1] == q_out and u not in claimed]
            if len(found) != 1:
                return f"the q output of {k.opaque.target} is not read exactly once"
            m = match_rope(found[0], self._order)
            return [m] if isinstance(m, RopeMatch) else m
        starts: list[fx.Node] = []
        for leaf in (k.cos, k.sin):
            starts += [u for u in leaf.users]
            # q may use a structurally equal copy of the cos/sin node (no CSE across them)
            for sib in _siblings(leaf):
                starts += list(sib.users)
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
                    m = match_rope(n, self._order)
                    if isinstance(m, RopeMatch) and _same_value(m.cos, k.cos) and _same_value(m.sin, k.sin) \
                            and m.style == k.style and m.rotary_dim == k.rotary_dim \
                            and m.half_width == k.half_width:
                        ends[n] = m
                nxt += list(n.users)
            frontier = nxt
        # keep the outermost rotations (not inside another one's chain)
        inner = set().union(*(m.chain for m in ends.values())) if ends else set()
        found = [m for y, m in ends.items() if y not in inner and y not in claimed]
        if not found:
            return "no q rotated with the same cos/sin"
        return found

    # ------------------------------------------------------------ rewrite
    def _rewrite(self, graph: fx.Graph, p: _Plan) -> None:
        kw, vw, k, q = p.kw, p.vw, p.k_rope, p.q_rope
        y_roles = kw.roles if p.value_perm is None else tuple(
            kw.roles[p.value_perm.index(i)] for i in range(len(p.value_perm)))
        token_roles = ("b", "s", "h", "d") if "b" in y_roles else ("s", "h", "d")
        to_tok = [y_roles.index(r) for r in token_roles]
        ident = to_tok == list(range(len(to_tok)))
        inv = [to_tok.index(i) for i in range(len(to_tok))]
        v_to_tok = [vw.roles.index(r) for r in token_roles]
        inputs = [q.x, k.x, vw.value, k.cos, k.sin]
        inputs += [p.shared_buffer] if p.shared_buffer is not None else [kw.base, vw.base]
        inputs += list(kw.index) if isinstance(kw.index, tuple) else [kw.index]
        if k.positions is not None:
            inputs.append(k.positions)
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = max(inputs, key=lambda n: order[n]).next
        em = _Emitter(graph, anchor, kw.index_put)

        def tok(x: fx.Node, perm: list[int]) -> fx.Node:
            return x if perm == list(range(len(perm))) else em(aten.permute.default, x, perm)

        qt, kt = tok(q.x, to_tok), tok(k.x, to_tok)
        vt = tok(vw.value, v_to_tok)
        head_axis = y_roles.index("h")
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
        kwargs = dict(q=qt, k=kt, v=vt, cos=cos, sin=sin, positions=k.positions,
                      cache_index=index, cache_layout=kw.layout, rotary_dim=k.rotary_dim,
                      style=k.style, k_scale=None, v_scale=None, return_k=return_k)
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
        q.y.replace_all_uses_with(q_out if ident else em(aten.permute.default, q_out, inv))
        if return_k:
            k_out = em(operator.getitem, out, 1)
            k_res = k_out if ident else em(aten.permute.default, k_out, inv)
            for u in p.k_extra_users:
                u.replace_input_with(k.y, k_res)
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


def _check_layout(k: RopeMatch, q: RopeMatch, roles: tuple[str, ...],
                  vshape: tuple[int, ...] | None, v_roles: tuple[str, ...]) -> str | None:
    ks, qs = _shape(k.x), _shape(q.x)
    if ks is None or qs is None or len(ks) != len(qs) or len(ks) != len(roles):
        return "q and k ranks differ"
    for i, r in enumerate(roles):
        if r != "h" and ks[i] != qs[i]:
            return f"q {qs} and k {ks} differ outside the head axis"
    if vshape is None or len(vshape) != len(v_roles):
        return "v has no static shape"
    for r in roles:
        if r != "d" and vshape[v_roles.index(r)] != ks[roles.index(r)]:
            return f"v {vshape} and k {ks} differ in tokens or heads"
    if k.opaque is not None:
        if tuple(roles) != ("s", "h", "d") or _shape(k.positions) != (ks[0],):
            return "opaque RoPE op outside the (tokens, heads, head_dim) layout"
        return None
    if [r for r in roles if r not in "hd"] not in (["b", "s"], ["s"]):
        return f"token dims in the order {roles}: not (batch, sequence)"
    for leaf in (k.cos, k.sin):
        if k.leaf_feat_dims.get(leaf, 1) > 1 and not _static(_shape(leaf)):
            return "cos/sin with features over several dims and a symbolic size"
        lead = _leaf_leading(k, leaf, len(roles))
        if lead is None:
            return "cos/sin do not broadcast over q and k"
        if lead[roles.index("h")] != 1:
            return "cos/sin vary per head"
    return None


def _leaf_leading(k: RopeMatch, leaf: fx.Node, rank: int) -> tuple[int, ...] | None:
    shape = _shape(leaf)
    nf = k.leaf_feat_dims.get(leaf, 1)
    lead = shape[: max(0, len(shape) - nf)]
    if len(lead) > rank - 1:
        if any(s != 1 for s in lead[: len(lead) - (rank - 1)]):
            return None
        lead = lead[len(lead) - (rank - 1):]
    return (1,) * (rank - 1 - len(lead)) + tuple(lead)


def _angle_arg(em: _Emitter, k: RopeMatch, leaf: fx.Node, head_axis: int,
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
    head = head_axis - ((rank - 1) - lead_rank)  # leading dims align to the right
    if head >= 0:
        arg = em(aten.select.int, arg, head, 0)
    need = k.rotary_dim // 2 if k.half_width else k.rotary_dim
    if shape[-1] != need:
        arg = em(aten.slice.Tensor, arg, -1, 0, need)
    return arg


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
        vals = [fake_value(n) for n in graph.nodes if isinstance(fake_value(n), torch.Tensor)]
        self.fake_mode = detect_fake_mode(vals)

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
