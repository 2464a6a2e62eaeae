"""``mla_short_prefill``: absorbed MLA prefill attention becomes ``attnfuse::mla_prefill``.

Matched (post-grad ATen, after Inductor's decompositions), for DeepSeek-style MLA written
in the absorbed form the way serving engines write it::

    q_lat = bmm(q_nope.transpose(0, 1), W_UK).transpose(0, 1)        # (T, H, R)
    q     = cat([q_lat, q_pe], -1);  kv = cat([ckv, k_pe], -1)
    dense:  o_lat = attention(q, kv, ckv) over each prompt, causal  # SDPA, or
            matmul/einsum -> scale -> causal mask -> softmax -> matmul, with the scores
            whole or split as q_lat.ckv^T + q_pe.k_pe^T (DeepSeek's reference code);
            one prompt or a batch of equal-length prompts
    sparse: g = kv[topk.clamp(min=0)]; s = bmm(q, g^T) * scale;    # DeepSeek-V3.2
            s = s.masked_fill(topk < 0, -inf); o_lat = bmm(softmax(s), g[..., :R])
    out   = bmm(o_lat.transpose(0, 1), W_UV)                        # (H, T, D_v)

becomes ``mla_prefill(q_nope, q_pe, ckv, k_pe, W_UK, W_UV, None, S, ...)`` (``None``: equal-length
sequences of S tokens, so the op needs no offsets tensor and never reads one back), which picks
the decompressed MHA form or the absorbed form at run time (``custom_ops/mla_prefill.py``).

How equivalence is proved. The walker anchors on each softmax (decomposed ``amax``/``exp``
/``sum``/``div``, ``_softmax``) and each SDPA backend op, and walks the operands back
through layout ops (reshape, permute, expand, clone, select, dtype casts) and scalar
multiplies. Every layout chain is *replayed on an index probe* (``arange`` of the source's
shape), which tells, for every element of every matmul operand, which (token, head,
feature) of q_nope/q_pe/ckv/k_pe it is. From that the walker checks, element by element,
that each score pairs one (token, head) with one key token, that each softmax row holds
every token of exactly the query's own prompt, that probabilities meet the values of the
same keys, and that the output reaches the W_UV bmm as (heads, tokens, latent). So any
reshape/permute/expand/einsum spelling that moves the same elements is accepted and any
other is refused. The causal mask is a constant subgraph, evaluated and compared with
the causal pattern; the scale is the product of every scalar on the query, key and
score paths. Sparse calls keep the
absorbed form (``topk_covers_visible=False``): neither sequence boundaries nor the
indexer's coverage can be proved from the graph.

Refusals (near misses, with the reason) are recorded for attention sites that carry
evidence of the absorbed form (a W_UV-style bmm after attention, or a W_UK bmm feeding
the query) but fail a check; other attention (ordinary MHA/GQA) is not a candidate.
Dynamic shapes are refused: the probes need concrete sizes.

Origin: SGLang PR 12788 / 11892 (MHA path for short-sequence MLA prefill).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnfuse.custom_ops import mla_prefill as _mla_prefill_module  # noqa: F401  (registers the op)

from .base import Fusion, SiteRecorder, fake_value, sdpa_ops

aten = torch.ops.aten
prims = torch.ops.prims

#: ops that only move or re-type elements: walked through, then replayed on probes
_LAYOUT_OPS = {
    aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.expand.default, aten.clone.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.alias.default, aten.t.default,
    aten.select.int,
}
_CAST_OPS = {prims.convert_element_type.default, aten._to_copy.default}
_SCALE_MUL = {aten.mul.Scalar, aten.mul.Tensor}
_SCALE_DIV = {aten.div.Scalar, aten.div.Tensor}
#: the longest chain of layout ops walked between two anchors; real graphs need < 10
MAX_CHAIN_LEN = 32
#: constant subgraphs (masks) larger than this are not evaluated at compile time
MAX_CONSTANT_ELEMENTS = 1 << 24


class Refusal(Exception):
    """A candidate that cannot be proved equivalent; the message is the near-miss reason."""


# ----------------------------------------------------------------- chain helpers
def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _scalar_operand(node: fx.Node) -> Optional[float]:
    """The Python scalar of ``mul/div(x, scalar)``, else None."""
    if len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool):
        return float(node.args[1])
    return None


@dataclass
class Chain:
    """``node`` = ops applied to ``source`` (first to last), times ``scale``."""

    source: fx.Node
    ops: list[fx.Node]
    scale: float = 1.0


def chain(node: fx.Node, stop: tuple[fx.Node, ...] = ()) -> Chain:
    """Walk back through layout ops, casts and scalar multiplies/divides (not past ``stop``)."""
    ops: list[fx.Node] = []
    scale = 1.0
    cur = node
    for _ in range(MAX_CHAIN_LEN):
        if not isinstance(cur, fx.Node) or cur.op != "call_function" or cur in stop:
            break
        if cur.target in _LAYOUT_OPS or cur.target in _CAST_OPS:
            ops.append(cur)
            cur = cur.args[0]
            continue
        if cur.target in _SCALE_MUL and _scalar_operand(cur) is not None:
            scale *= _scalar_operand(cur)
            ops.append(cur)
            cur = cur.args[0]
            continue
        if cur.target in _SCALE_DIV and _scalar_operand(cur) not in (None, 0.0):
            scale /= _scalar_operand(cur)
            ops.append(cur)
            cur = cur.args[0]
            continue
        break
    return Chain(cur, list(reversed(ops)), scale)


def _static_shape(node: fx.Node) -> tuple[int, ...]:
    val = fake_value(node)
    if not isinstance(val, torch.Tensor):
        raise Refusal(f"{node.name}: no tensor metadata")
    shape = tuple(val.shape)
    if not all(isinstance(s, int) for s in shape):
        raise Refusal(f"{node.name}: dynamic shape {shape} (layout proofs need concrete sizes)")
    return shape


def replay(ops: list[fx.Node], probe: torch.Tensor) -> torch.Tensor:
    """Apply a chain's layout ops to an index probe (casts and scales leave it alone)."""
    for op in ops:
        if op.target in _CAST_OPS or op.target in _SCALE_MUL or op.target in _SCALE_DIV:
            continue
        target = op.target
        if target in (aten.view.default, aten._unsafe_view.default):
            # same element order; the probe's strides need not allow a view
            target = aten.reshape.default
        probe = target(probe, *op.args[1:], **op.kwargs)
    return probe


def _probe(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int64).view(shape)


def check_layout(c: Chain, expected: Callable[[torch.Tensor], torch.Tensor], what: str) -> None:
    """Raise unless the chain moves elements exactly as ``expected`` does."""
    probe = _probe(_static_shape(c.source))
    got = replay(c.ops, probe)
    want = expected(probe)
    if tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want):
        raise Refusal(f"{what}: layout is not the one MLA attention implies "
                      f"(got shape {tuple(got.shape)}, expected {tuple(want.shape)})")


def evaluate_constant(node: fx.Node, budget: list[int]) -> torch.Tensor:
    """Evaluate a subgraph built from constants only (masks); raise if it reads inputs."""
    if node.op != "call_function":
        raise Refusal(f"mask depends on graph input {node.name}")
    val = fake_value(node)
    if isinstance(val, torch.Tensor):
        if not all(isinstance(s, int) for s in val.shape):
            raise Refusal("mask of dynamic shape (cannot be evaluated at compile time)")
        budget[0] -= val.numel()
        if budget[0] < 0:
            raise Refusal("mask too large to evaluate at compile time")

    def ev(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return evaluate_constant(a, budget)
        if isinstance(a, (list, tuple)):
            return type(a)(ev(x) for x in a)
        return a

    kwargs = {k: ("cpu" if k == "device" else ev(v)) for k, v in node.kwargs.items()}
    return node.target(*ev(node.args), **kwargs)


def _users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def _forward_through_layout(node: fx.Node) -> fx.Node:
    """Follow a single-user chain of layout ops/casts forward; return its last node."""
    cur = node
    for _ in range(MAX_CHAIN_LEN):
        users = _users(cur)
        if len(users) != 1 or users[0].target not in (_LAYOUT_OPS | _CAST_OPS):
            break
        cur = users[0]
    return cur


def _bmm_after(node: fx.Node, targets: tuple = (aten.bmm.default,)) -> Optional[fx.Node]:
    """The bmm (or another of ``targets``) consuming ``node``, through layout ops, as its
    first operand."""
    last = _forward_through_layout(node)
    for user in _users(last):
        if _is(user, *targets) and user.args[0] is last:
            return user
    return None


_MATMULS = (aten.bmm.default, aten.mm.default)


# ------------------------------------------------------------------ site matching
@dataclass
class Site:
    anchor: fx.Node          # the W_UV bmm whose output the op replaces
    q_nope: fx.Node
    q_pe: fx.Node
    ckv: fx.Node
    k_pe: fx.Node
    w_uk: fx.Node
    w_uv: fx.Node
    num_tokens: int
    seq_len: int
    scale: float
    causal: bool
    topk_indices: Optional[fx.Node] = None
    detail: str = ""


def _softmax_of(anchor: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(scores S, probabilities P) of a softmax anchored at ``amax`` or ``_softmax``."""
    if _is(anchor, aten._softmax.default):
        if anchor.args[1] not in (-1, len(_static_shape(anchor)) - 1):
            raise Refusal("softmax is not over the last dimension")
        return anchor.args[0], anchor
    scores = anchor.args[0]
    ndim = len(_static_shape(scores))
    if list(anchor.args[1]) not in ([-1], [ndim - 1]):
        raise Refusal("softmax is not over the last dimension")
    sub = next((u for u in _users(anchor) if _is(u, aten.sub.Tensor) and u.args[0] is scores), None)
    exp = next((u for u in _users(sub) if _is(u, aten.exp.default)), None) if sub else None
    if exp is None:
        raise Refusal("amax without the exp(x - max) of a softmax")
    total = next((u for u in _users(exp) if _is(u, aten.sum.dim_IntList)), None)
    div = next((u for u in _users(exp) if _is(u, aten.div.Tensor) and total is not None
                and u.args[1] is total), None)
    if div is None or list(total.args[1]) not in ([-1], [ndim - 1]):
        raise Refusal("exp without the normalising sum/div of a softmax over the last dim")
    probs = div
    # SDPA's safe softmax: rows with every score masked give 0 instead of NaN
    safe = [u for u in _users(div) if _is(u, aten.where.self) and u.args[2] is div]
    if len(safe) == 1 and _is(safe[0].args[1], aten.full.default) and safe[0].args[1].args[1] == 0:
        probs = safe[0]
    return scores, probs


def _strip_masks(scores: fx.Node) -> tuple[fx.Node, list[tuple[str, fx.Node]]]:
    """Peel ``where(hide, -inf, x)`` and ``x + bias`` off the scores."""
    masks: list[tuple[str, fx.Node]] = []
    cur = scores
    for _ in range(MAX_CHAIN_LEN):
        if (_is(cur, aten.where.self) and _is(cur.args[1], aten.full.default)
                and cur.args[1].args[1] == float("-inf")):
            masks.append(("hide", cur.args[0]))
            cur = cur.args[2]
        elif _is(cur, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in cur.args):
            a, b = cur.args
            if _is(chain(a).source, *_MATMULS) and _is(chain(b).source, *_MATMULS):
                break  # q_lat.ckv + q_pe.k_pe: the scores themselves, split in two
            # the bias is the operand that reads no graph input: try b, then a
            bias, rest = (b, a) if not _reads_input(b) else (a, b)
            if _reads_input(bias):
                raise Refusal("scores plus an input-dependent bias (not a causal mask)")
            masks.append(("bias", bias))
            cur = rest
        elif cur.target in _CAST_OPS:
            cur = cur.args[0]
        else:
            break
    return cur, masks


def _reads_input(node: fx.Node, seen: Optional[set] = None) -> bool:
    seen = set() if seen is None else seen
    if node in seen:
        return False
    seen.add(node)
    if node.op in ("placeholder", "get_attr"):
        return True
    return any(_reads_input(a, seen) for a in node.all_input_nodes)


def _hidden_mask(masks: list[tuple[str, fx.Node]], shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """The positions the masks hide, as a bool tensor of ``shape``; None when unmasked."""
    if not masks:
        return None
    budget = [MAX_CONSTANT_ELEMENTS]
    hidden = torch.zeros(shape, dtype=torch.bool)
    for kind, node in masks:
        val = evaluate_constant(node, budget)
        if kind == "hide":
            hidden = hidden | val.to(torch.bool).expand(shape)
        else:
            bias = val.expand(shape)
            finite = torch.isfinite(bias)
            if not (bias[finite] == 0).all() or (bias[~finite] > 0).any():
                raise Refusal("additive mask holds values other than 0 and -inf")
            hidden = hidden | ~finite
    return hidden


def _absorbed_query(q_src: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    """cat([q_lat, q_pe], -1) with q_lat = bmm(q_nope^T, W_UK)^T -> (q_nope, q_pe, w_uk, cat)."""
    if not _is(q_src, aten.cat.default) or len(q_src.args[0]) != 2:
        raise Refusal("query is not cat([q_nope @ W_UK, q_pe], -1)")
    cat_dim = q_src.args[1] if len(q_src.args) > 1 else 0
    if cat_dim not in (-1, 2):
        raise Refusal("query cat is not along the head dim")
    q_lat_node, q_pe = q_src.args[0]
    lat = chain(q_lat_node)
    if not _is(lat.source, aten.bmm.default):
        raise Refusal("query latent part is not a bmm with W_UK")
    bmm_uk = lat.source
    check_layout(lat, lambda p: p.permute(1, 0, 2), "q_lat (bmm output to tokens-heads)")
    qn = chain(bmm_uk.args[0])
    check_layout(qn, lambda p: p.permute(1, 0, 2), "q_nope (tokens-heads to heads-tokens)")
    if lat.scale != 1.0 or qn.scale != 1.0:
        raise Refusal("scalar on the W_UK projection path")
    return qn.source, q_pe, bmm_uk.args[1], q_src


def _latent_key(k_src: fx.Node) -> tuple[fx.Node, fx.Node]:
    if not _is(k_src, aten.cat.default) or len(k_src.args[0]) != 2:
        raise Refusal("key is not cat([ckv, k_pe], -1) (one latent KV head)")
    ckv, k_pe = k_src.args[0]
    if len(_static_shape(ckv)) != 2 or len(_static_shape(k_pe)) != 2:
        raise Refusal("latent key parts are not (tokens, width) matrices")
    return ckv, k_pe


def _value_is_latent(v_chain: Chain, ckv: fx.Node, kv: fx.Node, width: int) -> Chain:
    """The value must be the key's latent: ``ckv`` itself or ``kv[..., :R]``."""
    if v_chain.scale != 1.0:
        raise Refusal("values are not the latent of the keys (scaled)")
    if v_chain.source is ckv:
        return v_chain
    src = v_chain.source
    if (_is(src, aten.slice.Tensor) and src.args[0] is kv and src.args[1] in (-1, len(_static_shape(kv)) - 1)
            and (src.args[2] if len(src.args) > 2 else 0) == 0
            and (src.args[3] if len(src.args) > 3 else None) == width
            and (src.args[4] if len(src.args) > 4 else 1) == 1):
        return Chain(src, v_chain.ops, v_chain.scale)
    raise Refusal("values are not the latent of the keys (ckv)")


def _output_projection(o: fx.Node, expected: Callable[[torch.Tensor], torch.Tensor]) -> tuple[fx.Node, fx.Node]:
    """The W_UV bmm fed by the attention output ``o`` -> (bmm node, w_uv)."""
    bmm_uv = _bmm_after(o)
    if bmm_uv is None:
        raise Refusal("attention output does not feed a bmm with W_UV")
    oc = chain(bmm_uv.args[0])
    if oc.source is not o:
        raise Refusal("attention output reaches the W_UV bmm through more than layout ops")
    if oc.scale != 1.0:
        raise Refusal("scalar between attention output and W_UV")
    check_layout(oc, expected, "attention output into the W_UV bmm")
    return bmm_uv, bmm_uv.args[1]


def _check_weights(site: Site) -> None:
    H = _static_shape(site.q_nope)[1]
    R = _static_shape(site.ckv)[1]
    if _static_shape(site.w_uk)[:1] != (H,) or _static_shape(site.w_uk)[2] != R:
        raise Refusal(f"W_UK shape {_static_shape(site.w_uk)} does not match {H} heads and latent {R}")
    if _static_shape(site.w_uv)[:2] != (H, R):
        raise Refusal(f"W_UV shape {_static_shape(site.w_uv)} does not match ({H}, {R}, D_v)")
    tensors = [site.q_nope, site.q_pe, site.ckv, site.k_pe, site.w_uk, site.w_uv]
    dtypes = {fake_value(n).dtype for n in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float16, torch.bfloat16, torch.float32):
        raise Refusal(f"operands do not share one float dtype: {sorted(map(str, dtypes))}")
    devices = {fake_value(n).device for n in tensors}
    if len(devices) != 1:
        raise Refusal(f"operands on several devices: {sorted(map(str, devices))}")


def _rows(c: Chain, decode: Callable, what: str) -> tuple[torch.Tensor, ...]:
    """Query operand (..., rows, D) of a matmul: the source coordinates of each row.

    ``decode(flat_index)`` gives (token, head, feature) of the source; every row must
    hold features 0..D-1 of one (token, head), in order."""
    idx = replay(c.ops, _probe(_static_shape(c.source)))
    t, h, f = decode(idx)
    width = idx.shape[-1]
    if not (torch.equal(f, torch.arange(width).expand(idx.shape))
            and torch.equal(t, t[..., :1].expand(idx.shape)) and torch.equal(h, h[..., :1].expand(idx.shape))):
        raise Refusal(f"{what}: a row is not the features of one (token, head)")
    return t[..., 0], h[..., 0], width


def _columns(c: Chain, what: str) -> tuple[torch.Tensor, int]:
    """Key operand (..., D, n) of a matmul over a (tokens, D) source: each column's token."""
    T, D = _static_shape(c.source)
    idx = replay(c.ops, _probe((T, D)))
    if idx.dim() < 2 or idx.shape[-2] != D:
        raise Refusal(f"{what}: keys are not contracted over their features")
    if not (torch.equal(idx % D, torch.arange(D)[:, None].expand(idx.shape))
            and torch.equal(idx // D, (idx // D)[..., :1, :].expand(idx.shape))):
        raise Refusal(f"{what}: a column is not the features of one key token")
    return (idx // D)[..., 0, :], D


def _decode_thd(T: int, H: int, D: int) -> Callable:
    return lambda i: (i // (H * D), (i // D) % H, i % D)


def _decode_htd(T: int, H: int, D: int) -> Callable:
    return lambda i: ((i // D) % T, i // (T * D), i % D)


def _score_coords(mm: fx.Node, q: Chain, q_decode: Callable, k: Chain, what: str):
    """(token, head, key) of every element of a scores matmul's output."""
    t, h, dq = _rows(q, q_decode, f"{what} queries")
    s, dk = _columns(k, f"{what} keys")
    if dq != dk:
        raise Refusal(f"{what}: query and key widths differ")
    out = _static_shape(mm)
    t = t.unsqueeze(-1).expand(out)
    h = h.unsqueeze(-1).expand(out)
    s = s.unsqueeze(-2).expand(out)
    return t, h, s


def _bmm_uk(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """bmm(q_nope^T, W_UK) -> (q_nope, W_UK); its output is (heads, tokens, R)."""
    if not _is(node, aten.bmm.default):
        raise Refusal("query latent part is not a bmm with W_UK")
    qn = chain(node.args[0])
    check_layout(qn, lambda p: p.permute(1, 0, 2), "q_nope (tokens-heads to heads-tokens)")
    wc = chain(node.args[1])
    if qn.scale != 1.0 or wc.scale != 1.0:
        raise Refusal("scalar on the W_UK projection path")
    check_layout(wc, lambda p: p, "W_UK (heads, D_nope, R)")
    return qn.source, wc.source


def match_math(anchor: fx.Node) -> Site:
    """A softmax between scores matmul(s) and a values matmul (decomposed SDPA, matmuls,
    einsums; uniform batches of prompts), proved element by element with index probes."""
    scores, probs = _softmax_of(anchor)
    pv = _bmm_after(probs, _MATMULS)
    if pv is None:
        raise Refusal("softmax output does not feed a bmm with the values")
    pc = chain(pv.args[0])
    if pc.source is not probs or pc.scale != 1.0:
        raise Refusal("probabilities reach the values bmm through more than layout ops")
    raw, masks = _strip_masks(scores)
    sc = chain(raw)
    if _is(sc.source, aten.add.Tensor):  # q_lat.ckv + q_pe.k_pe
        parts = [chain(a) for a in sc.source.args]
    else:
        parts = [Chain(sc.source, [], 1.0)]
    if not all(_is(p.source, *_MATMULS) for p in parts):
        raise Refusal("scores are not a bmm of queries and keys")
    first = parts[0].source
    qc, kc = chain(first.args[0]), chain(first.args[1])
    if len(parts) == 1 and _is(kc.source, aten.index.Tensor):
        if not (_is(first, aten.bmm.default) and _is(pv, aten.bmm.default)):
            raise Refusal("sparse attention spelled with other matmuls")
        return _match_sparse(first, qc, kc, sc, masks, probs, pc, pv, sc.scale * qc.scale * kc.scale)
    if len(parts) == 1:
        q_nope, q_pe, w_uk, cat_q = _absorbed_query(qc.source)
        ckv, k_pe = _latent_key(kc.source)
        T, H, D = _static_shape(cat_q)
        t, h, s = _score_coords(first, qc, _decode_thd(T, H, D), kc, "scores")
        scale = sc.scale * qc.scale * kc.scale
        coords = [(t, h, s, parts[0])]
        kv_source = kc.source
    else:
        coords, found, scales = [], {}, set()
        for part in parts:
            mm = part.source
            pq, pk = chain(mm.args[0]), chain(mm.args[1])
            if _is(pq.source, aten.bmm.default):  # latent part: q_nope @ W_UK, (H, T, R)
                found["q_nope"], found["w_uk"] = _bmm_uk(pq.source)
                found["ckv"] = pk.source
                Hq, Tq, Dq = _static_shape(pq.source)
                decode = _decode_htd(Tq, Hq, Dq)
            else:  # RoPE part: q_pe (T, H, D_rope) against k_pe (T, D_rope)
                found["q_pe"], found["k_pe"] = pq.source, pk.source
                Tq, Hq, Dq = _static_shape(pq.source)
                decode = _decode_thd(Tq, Hq, Dq)
            t_, h_, s_ = _score_coords(mm, pq, decode, pk, "split scores")
            coords.append((t_, h_, s_, part))
            scales.add(round(part.scale * pq.scale * pk.scale, 12))
        if set(found) != {"q_nope", "w_uk", "ckv", "q_pe", "k_pe"}:
            raise Refusal("split scores are not q_lat.ckv + q_pe.k_pe")
        if len(scales) != 1:
            raise Refusal("the two halves of the scores are scaled differently")
        q_nope, q_pe, w_uk, ckv, k_pe = (found[k] for k in ("q_nope", "q_pe", "w_uk", "ckv", "k_pe"))
        T, H = _static_shape(q_pe)[:2]
        scale = sc.scale * scales.pop()
        kv_source = None
    # the scores as the softmax sees them: (token, head, key) of every element
    views = []
    for t_, h_, s_, part in coords:
        where_ = replay(part.ops + sc.ops, _probe(tuple(t_.shape)))
        views.append(tuple(x.flatten()[where_] for x in (t_, h_, s_)))
    if any(any(not torch.equal(a, b) for a, b in zip(views[0], v)) for v in views[1:]):
        raise Refusal("the two halves of the scores do not line up")
    tS, hS, sS = views[0]
    L = tS.shape[-1]
    if not (torch.equal(tS, tS[..., :1].expand(tS.shape)) and torch.equal(hS, hS[..., :1].expand(hS.shape))):
        raise Refusal("softmax is not over the keys")
    pairs = (tS[..., 0] * H + hS[..., 0]).flatten().sort().values
    if not torch.equal(pairs, torch.arange(T * H)):
        raise Refusal("scores do not hold every (token, head) exactly once")
    if T % L:
        raise Refusal(f"{T} tokens are not a whole number of {L}-token prompts")
    block = (tS // L) * L
    if not torch.equal(sS.sort(-1).values, block[..., :1] + torch.arange(L)):
        raise Refusal("each query does not attend exactly its own prompt's tokens")
    causal = _mask_kind(_hidden_mask(masks, tuple(tS.shape)), tS, sS)
    # values: the keys' latent, row for row
    R = _static_shape(ckv)[1]
    vc = _value_is_latent(chain(pv.args[1], stop=(ckv,)), ckv, kv_source, R)
    v_idx = replay(vc.ops, _probe(_static_shape(vc.source)))
    if v_idx.shape[-1] != R or not torch.equal(v_idx % R, torch.arange(R).expand(v_idx.shape)):
        raise Refusal("values are not whole latent rows")
    sV = (v_idx // R)[..., 0]  # (..., keys)
    p_idx = replay(pc.ops, _probe(tuple(tS.shape)))
    tP, hP, sP = (x.flatten()[p_idx] for x in (tS, hS, sS))
    try:
        if not torch.equal(sP, sV.unsqueeze(-2).expand(sP.shape)):
            raise Refusal("probabilities and values pair different keys")
    except RuntimeError:
        raise Refusal("probabilities and values do not broadcast") from None
    # output rows: (token, head) of each probability row, then into the W_UV bmm
    out_shape = _static_shape(pv)
    tO = tP[..., 0].unsqueeze(-1).expand(out_shape)
    hO = hP[..., 0].unsqueeze(-1).expand(out_shape)
    rO = torch.arange(R).expand(out_shape)
    bmm_uv = _bmm_after(pv)
    if bmm_uv is None:
        raise Refusal("attention output does not feed a bmm with W_UV")
    oc = chain(bmm_uv.args[0])
    if oc.source is not pv or oc.scale != 1.0:
        raise Refusal("attention output reaches the W_UV bmm through more than layout ops")
    x_idx = replay(oc.ops, _probe(out_shape))
    want = _probe((H, T, R))
    if tuple(x_idx.shape) != (H, T, R) or not (
            torch.equal(tO.flatten()[x_idx], (want // R) % T) and torch.equal(hO.flatten()[x_idx], want // (T * R))
            and torch.equal(rO.flatten()[x_idx], want % R)):
        raise Refusal("attention output does not reach the W_UV bmm as (heads, tokens, latent)")
    return Site(bmm_uv, q_nope, q_pe, ckv, k_pe, w_uk, bmm_uv.args[1], T, L, scale, causal,
                detail=f"dense, {T // L} x {L} tokens, {H} heads")


def _mask_kind(hidden: Optional[torch.Tensor], row: torch.Tensor, col: torch.Tensor) -> bool:
    """True for causal, False for no mask; refuse anything else."""
    if hidden is None or not hidden.any():
        return False
    if torch.equal(hidden, col > row):
        return True
    raise Refusal("mask is neither causal nor empty")


def _match_sparse(qk, qc, kc, sc, masks, probs, pc, pv, scale) -> Site:
    gather = kc.source
    kv_all, index_list = gather.args
    if len(index_list) != 1 or index_list[0] is None:
        raise Refusal("keys gathered with more than one index tensor")
    idx = index_list[0]
    if _is(idx, aten.clamp_min.default) and idx.args[1] == 0:
        indices = idx.args[0]
    elif _is(idx, aten.clamp.default) and idx.args[1] == 0 and (len(idx.args) < 3 or idx.args[2] is None):
        indices = idx.args[0]
    else:
        raise Refusal("top-k indices are not clamped at 0 before the gather (-1 slots unclear)")
    q_nope, q_pe, w_uk, cat_q = _absorbed_query(qc.source)
    ckv, k_pe = _latent_key(kv_all)
    T, H, D = _static_shape(cat_q)
    R = _static_shape(ckv)[1]
    idx_shape = _static_shape(indices)
    if len(idx_shape) != 2 or idx_shape[0] != T:
        raise Refusal(f"top-k indices of shape {idx_shape}, expected ({T}, K)")
    K = idx_shape[1]
    check_layout(qc, lambda p: p, "queries (tokens, heads, width)")
    check_layout(kc, lambda p: p.transpose(1, 2), "gathered keys")
    vc = _value_is_latent(chain(pv.args[1], stop=(ckv,)), ckv, gather, R)
    if vc.source is ckv:
        raise Refusal("sparse values are not the gathered latents")
    check_layout(vc, lambda p: p, "gathered values")
    check_layout(sc, lambda p: p, "scores")
    check_layout(pc, lambda p: p, "probabilities")
    # exactly one mask: the unused (-1) slots of the same indices
    if len(masks) != 1 or masks[0][0] != "hide":
        raise Refusal("sparse scores need exactly the masked_fill of the -1 slots")
    cond = chain(masks[0][1])
    if not (_is(cond.source, aten.lt.Scalar) and cond.source.args[0] is indices and cond.source.args[1] == 0):
        raise Refusal("sparse mask is not (indices < 0)")
    mask_probe = replay(cond.ops, _probe((T, K)))
    try:
        mask_probe = mask_probe.expand(T, H, K)  # the mask broadcasts over heads
    except RuntimeError:
        raise Refusal(f"sparse mask of shape {tuple(mask_probe.shape)} does not broadcast to "
                      f"the scores {(T, H, K)}") from None
    if not torch.equal(mask_probe, _probe((T, K)).unsqueeze(1).expand(T, H, K)):
        raise Refusal("sparse mask does not line up with the scores (query, slot)")
    bmm_uv, w_uv = _output_projection(pv, lambda p: p.permute(1, 0, 2))
    return Site(bmm_uv, q_nope, q_pe, ckv, k_pe, w_uk, w_uv, T, T, scale, True,
                topk_indices=indices, detail=f"sparse top-{K}, {T} tokens, {H} heads")


def _sdpa_arg(node: fx.Node, name: str, default: Any) -> Any:
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == name:
            if arg.kwarg_only or i >= len(node.args):
                return node.kwargs.get(name, default)
            return node.args[i]
    return default


def match_sdpa(sdpa: fx.Node) -> Site:
    """An SDPA backend op over 4-D (batch, heads, prompt, width) queries/keys/values."""
    out = next((u for u in _users(sdpa) if u.target is operator.getitem and u.args[1] == 0), None)
    if out is None:
        raise Refusal("SDPA output unused")
    if _sdpa_arg(sdpa, "attn_mask", None) is not None or _sdpa_arg(sdpa, "attn_bias", None) is not None:
        raise Refusal("SDPA with an explicit mask")
    if _sdpa_arg(sdpa, "dropout_p", 0.0) not in (0, 0.0):
        raise Refusal("SDPA with dropout")
    qc, kc = chain(sdpa.args[0]), chain(sdpa.args[1])
    q_nope, q_pe, w_uk, cat_q = _absorbed_query(qc.source)
    ckv, k_pe = _latent_key(kc.source)
    vc = chain(sdpa.args[2], stop=(ckv,))
    T, H, D = _static_shape(cat_q)
    B, _, S, _ = _static_shape(sdpa.args[0])
    R = _static_shape(ckv)[1]
    if B * S != T:
        raise Refusal(f"SDPA batch {B} x {S} does not cover the {T} query tokens")
    check_layout(qc, lambda p: p.view(B, S, H, D).permute(0, 2, 1, 3), "queries")
    check_layout(kc, lambda p: p.view(B, 1, S, D).expand(B, H, S, D), "keys")
    vc = _value_is_latent(vc, ckv, kc.source, R)
    check_layout(vc, lambda p: p.view(B, 1, S, R).expand(B, H, S, R), "values")
    scale = _sdpa_arg(sdpa, "scale", None)
    scale = (1.0 / math.sqrt(D) if scale is None else float(scale)) * qc.scale * kc.scale
    causal = bool(_sdpa_arg(sdpa, "is_causal", False))
    bmm_uv, w_uv = _output_projection(
        out, lambda p: p.permute(1, 0, 2, 3).reshape(H, T, R))
    return Site(bmm_uv, q_nope, q_pe, ckv, k_pe, w_uk, w_uv, T, S, scale, causal,
                detail=f"dense SDPA, {B} x {S} tokens, {H} heads")


def _matmul_under(scores: fx.Node) -> Optional[fx.Node]:
    """The scores matmul beneath masks, biases, casts and scales (no checks)."""
    frontier = [scores]
    for _ in range(MAX_CHAIN_LEN):
        if not frontier:
            return None
        cur = chain(frontier.pop(0)).source
        if _is(cur, *_MATMULS):
            return cur
        if _is(cur, aten.where.self):
            frontier.append(cur.args[2])
        elif _is(cur, aten.add.Tensor):
            frontier.extend(a for a in cur.args if isinstance(a, fx.Node))
    return None


def _absorbed_evidence(anchor: fx.Node) -> bool:
    """Whether an attention site looks like absorbed MLA (worth a near miss if refused)."""
    try:
        if anchor.target in sdpa_ops():
            q_src = chain(anchor.args[0]).source
            out = next((u for u in _users(anchor) if u.target is operator.getitem), None)
        else:
            scores, probs = _softmax_of(anchor)
            qk = _matmul_under(scores)
            q_src = chain(qk.args[0]).source if _is(qk, *_MATMULS) else None
            out = _bmm_after(probs, _MATMULS)
        if _is(q_src, aten.bmm.default) or (
                _is(q_src, aten.cat.default) and _is(chain(q_src.args[0][0]).source, aten.bmm.default)):
            return True  # queries projected by W_UK
        bmm_uv = _bmm_after(out) if out is not None else None
        if bmm_uv is not None:  # output projected by a 3-D weight (W_UV)
            w = chain(bmm_uv.args[1]).source
            return (isinstance(fake_value(w), torch.Tensor) and fake_value(w).dim() == 3
                    and w.op in ("placeholder", "get_attr"))
    except Exception:
        return False
    return False


# ----------------------------------------------------------------------- rewrite
def _emit(graph: fx.Graph, site: Site) -> fx.Node:
    from torch._guards import detect_fake_mode

    vals = [fake_value(n) for n in (site.q_nope, site.q_pe, site.ckv)]
    fake_mode = detect_fake_mode(vals)
    S = site.seq_len

    def call(target: Any, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
        node = graph.call_function(target, args, kwargs or {})
        fargs = tuple(fake_value(a) if isinstance(a, fx.Node) else a for a in args)
        fkwargs = {k: fake_value(v) if isinstance(v, fx.Node) else v for k, v in (kwargs or {}).items()}
        if fake_mode is not None:
            with fake_mode:
                node.meta["val"] = target(*fargs, **fkwargs)
        return node

    with graph.inserting_before(site.anchor):
        # equal-length prompts back to back (sequence b owns rows [b*S, (b+1)*S)): no
        # offsets tensor (cu_seqlens=None), so the op knows them without a device read
        op = call(torch.ops.attnfuse.mla_prefill.default,
                  (site.q_nope, site.q_pe, site.ckv, site.k_pe, site.w_uk, site.w_uv, None,
                   S, float(site.scale), site.causal, site.topk_indices, False, "auto"))
        out = call(aten.permute.default, (op, [1, 0, 2]))
    out.meta.update({k: v for k, v in site.anchor.meta.items() if k not in ("val", "tensor_meta")})
    site.anchor.replace_all_uses_with(out)
    _erase_dead(graph, site.anchor)
    return op


def _erase_dead(graph: fx.Graph, root: fx.Node) -> None:
    """Remove the replaced site: ``root`` and the inputs only it used. SDPA backend ops
    count as impure (random-seeded for dropout), so ``eliminate_dead_code`` keeps them;
    other impure nodes (mutations) are never touched."""
    sdpa = sdpa_ops()
    stack = [root]
    while stack:
        node = stack.pop()
        if node.op != "call_function" or node.graph is not graph:
            continue
        for user in list(node.users):  # unused tuple elements (SDPA's logsumexp, seeds)
            if user.target is operator.getitem and not user.users:
                graph.erase_node(user)
        if node.users:
            continue
        if node.is_impure() and node.target not in sdpa:
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        stack.extend(inputs)


class MLAShortPrefillFusion(Fusion):
    """Absorbed MLA prefill attention (dense or sparse top-k) -> ``attnfuse::mla_prefill``."""

    name = "mla_short_prefill"
    origin = "SGLang PR 12788 (MHA path for short-sequence MLA prefill)"
    source_modules = ("attnfuse.custom_ops.mla_prefill",)

    def apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
        sdpa = sdpa_ops()
        anchors = [n for n in graph.nodes
                   if n.op == "call_function"
                   and (n.target in (aten.amax.default, aten._softmax.default) or n.target in sdpa)]
        for anchor in anchors:
            if getattr(anchor, "_erased", False):  # part of a site rewritten just before
                continue
            with unset_fake_temporarily():
                if not _absorbed_evidence(anchor):
                    continue
            try:
                # probes and masks are real tensors, evaluated outside the compile's fake mode
                with unset_fake_temporarily():
                    site = match_sdpa(anchor) if anchor.target in sdpa else match_math(anchor)
                    _check_weights(site)
            except Refusal as exc:
                sites.near_miss(anchor, str(exc))
                continue
            except Exception as exc:  # an unfamiliar graph never breaks compilation
                sites.near_miss(anchor, f"matcher error {type(exc).__name__}: {exc}")
                continue
            op = _emit(graph, site)  # also erases the replaced site's nodes
            sites.rewritten(op, site.detail)


__all__ = ["MLAShortPrefillFusion", "match_math", "match_sdpa"]
