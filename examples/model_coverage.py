"""Which fusions fire on the decoder-only models installed ``transformers`` offers.

The passes must not be tuned to the named example families: any decoder-only model that
runs with a ``StaticCache`` should get its RoPE/KV-write and decode-attention sites
rewritten, or each site reported as a near miss with a reason. This module checks that
claim without trusting the fusions' own bookkeeping:

1. ``count_candidate_sites`` counts the sites in the post-grad graph *before* our passes
   run, from structure alone: cache writes (an ``index_put`` / ``index_copy`` /
   ``scatter`` whose result is copied back into the cache input it was computed from)
   and attention (every SDPA backend op, and every softmax ``amax`` between two
   ``bmm``\\ s), each with the module it came from;
2. the fusions run, and the report says what they rewrote and what they refused;
3. ``coverage_gaps`` lists the candidate sites of each fusion that the report does not
   mention at all: silent non-matches.

``walk_families`` does this for one decode step of every family with a CausalLM class
that builds from a tiny version of its default config; ``python
examples/model_coverage.py [--all] [families...]`` prints the table and writes
``benchmarks/results/model_coverage.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx

# ---------------------------------------------------------------------- fusions
#: the fusions whose sites the walker counts independently: name -> kind of site
COUNTED_FUSIONS: dict[str, str] = {
    "rope_kv_write": "kv_writes",
    "grouped_decode": "decode_attention",
}


def available_fusions() -> list[str]:
    """The built-in fusions whose module imports (they land one by one)."""
    from attnfuse.fusions import fusion_class, fusion_names

    names = []
    for name in fusion_names():
        try:
            fusion_class(name)
        except Exception:  # module not written yet, or broken: not available
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------------- site counting
def _aten(name: str, overload: str = "default") -> Any:
    packet = getattr(torch.ops.aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


def _ops(*specs: str) -> frozenset[Any]:
    out = []
    for spec in specs:
        name, _, overload = spec.partition(".")
        op = _aten(name, overload or "default")
        if op is not None:
            out.append(op)
    return frozenset(out)


#: ops that only re-describe their first argument's storage (walked through)
_VIEW_OPS = _ops(
    "reshape", "view", "_unsafe_view", "permute", "transpose.int", "unsqueeze", "squeeze.dim",
    "squeeze.dims", "expand", "slice.Tensor", "select.int", "as_strided", "alias",
)
#: ops that produce a copy of their first argument with some entries replaced
_SCATTER_OPS = _ops(
    "index_put", "index_put_", "_unsafe_index_put", "index_copy", "index_copy_",
    "scatter.src", "scatter.value", "slice_scatter", "select_scatter",
)
#: batched matmuls of attention scores and outputs (ALiBi models add the bias by baddbmm)
_SCORE_OPS = _ops("bmm", "baddbmm")
#: steps of the decomposed softmax between the two attention bmms
_SOFTMAX_HOPS = 8


def _through_views(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEW_OPS:
        node = node.args[0]
    return node


def _writes_into(src: Any, dst: fx.Node) -> fx.Node | None:
    """The scatter node ``src`` comes from, if it rewrites (a view of) ``dst``."""
    node = src
    # a chain of scatters (K and V of one buffer, select_scatter of a paged view) ends in
    # the outermost one; walk until we leave view/scatter territory
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _VIEW_OPS:
            node = node.args[0]
            continue
        if node.target in _SCATTER_OPS:
            if _through_views(node.args[0]) is dst or _writes_into(node.args[0], dst) is not None:
                return node
            return None
        return None
    return None


@dataclasses.dataclass
class CandidateSites:
    """Sites in one graph, found from structure alone (before any rewrite)."""

    #: one per cache buffer written (K and V of a layer are two)
    kv_writes: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: attention sites with one query token (decode)
    decode_attention: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: attention sites with several query tokens (prefill)
    prefill_attention: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def modules(self, kind: str) -> set[str]:
        return {module for _, module in getattr(self, kind)}


def _module_of(node: fx.Node) -> str:
    from attnfuse.passes.report import node_location

    return node_location(node)[1]


def _query_len(node: fx.Node) -> int | None:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if val is None or val.dim() < 2:
        return None
    return int(val.shape[-2])


def _near(node: fx.Node, targets: frozenset[Any], hops: int, upward: bool) -> fx.Node | None:
    frontier = [node]
    seen = {node}
    for _ in range(hops):
        nxt = []
        for n in frontier:
            neighbours = n.all_input_nodes if upward else list(n.users)
            for m in neighbours:
                if m in seen:
                    continue
                seen.add(m)
                if m.op == "call_function" and m.target in targets:
                    return m
                nxt.append(m)
        frontier = nxt
    return None


def count_candidate_sites(graph: fx.Graph) -> CandidateSites:
    """Cache writes and attention sites of a post-grad graph; see the module docstring."""
    from attnfuse.fusions.base import sdpa_ops

    sites = CandidateSites()
    copy_ = _aten("copy_")
    score_bmms: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == copy_ and node.args[0].op == "placeholder":
            write = _writes_into(node.args[1], node.args[0])
            if write is not None:
                sites.kv_writes.append((write.name, _module_of(write)))
        elif node.target in sdpa_ops():
            q_len = _query_len(node)
            bucket = sites.decode_attention if q_len == 1 else sites.prefill_attention
            bucket.append((node.name, _module_of(node)))
        elif node.target == _aten("amax"):
            first = _near(node, _SCORE_OPS, _SOFTMAX_HOPS, upward=True)
            if first is None or _near(node, _SCORE_OPS, _SOFTMAX_HOPS, upward=False) is None:
                continue
            if first in score_bmms:
                # Inductor's joint-graph passes may split one softmax into two amax
                # branches (a where over both): still one attention, keyed by its scores
                continue
            score_bmms.add(first)
            q_len = int(first.meta["val"].shape[-2]) if "val" in first.meta else None
            bucket = sites.decode_attention if q_len == 1 else sites.prefill_attention
            bucket.append((node.name, _module_of(node)))
    return sites


# ---------------------------------------------------------------------- compile + report
@dataclasses.dataclass
class CompiledRun:
    """One compile: per graph, the independently counted sites and the passes' report."""

    candidates: list[CandidateSites]
    report: Any  # attnfuse.passes.report.FusionReport
    outputs: Any


def compile_and_count(
    fn: Callable[..., Any], *args: Any, fusions: Iterable[str] | None = None,
    inductor: bool = False, **kwargs: Any,
) -> CompiledRun:
    """Compile ``fn`` with the attnfuse backend (eager by default), caches off, run it once
    on the inputs and count candidate sites in every graph before the passes ran."""
    from attnfuse.passes.backend import AttnfuseBackend
    from attnfuse.passes.testing import NO_CACHE_PATCHES

    candidates: list[CandidateSites] = []

    def observe(when: str, graph: fx.Graph) -> None:
        if when == "before":
            candidates.append(count_candidate_sites(graph))

    options: dict[str, Any] = dict(NO_CACHE_PATCHES)
    options["fusions"] = available_fusions() if fusions is None else list(fusions)
    backend = AttnfuseBackend(options, inductor=inductor, observers=[observe])
    torch._dynamo.reset()
    try:
        outputs = torch.compile(fn, backend=backend, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return CompiledRun(candidates, backend.report, outputs)


def layer_summary(report: Any) -> dict[str, dict[str, Any]]:
    """``{module: {"fired": Counter(fusion), "near_misses": [(fusion, reason)]}}``."""
    out: dict[str, dict[str, Any]] = {}

    def entry(module: str) -> dict[str, Any]:
        return out.setdefault(module or "?", {"fired": Counter(), "near_misses": []})

    for site in report.sites:
        entry(site.module)["fired"][site.fusion] += 1
    for miss in report.near_misses:
        entry(miss.module)["near_misses"].append((miss.fusion, miss.reason))
    return out


@dataclasses.dataclass(frozen=True)
class LayerExpectation:
    """What one graph's report should say about every attention layer.

    ``fired``: fusion -> rewrites per layer (fusions not listed: none).
    ``near_misses``: fusion -> a fragment some near-miss reason of that fusion contains.
    """

    fired: dict[str, int] = dataclasses.field(default_factory=dict)
    near_misses: dict[str, str] = dataclasses.field(default_factory=dict)


def layer_report_mismatches(
    report: Any, expected: list[LayerExpectation], modules: list[str], fusions: Iterable[str],
) -> list[str]:
    """Where ``report`` (one ``GraphReport`` per entry of ``expected``) differs from the
    expectation for each module in ``modules``; only ``fusions`` are compared (the others
    may not exist yet)."""
    from attnfuse.passes.report import FusionReport

    fusions = set(fusions)
    problems: list[str] = []
    if len(report.graphs) != len(expected):
        return [f"expected {len(expected)} graphs, got {len(report.graphs)}"]
    for graph, want in zip(report.graphs, expected):
        layers = layer_summary(FusionReport([graph]))
        for module in modules:
            entry = layers.get(module, {"fired": Counter(), "near_misses": []})
            got = {f: n for f, n in entry["fired"].items() if f in fusions and n}
            wanted = {f: n for f, n in want.fired.items() if f in fusions and n}
            if got != wanted:
                problems.append(f"graph {graph.graph} {module}: fired {got}, expected {wanted}")
            for fusion, fragment in want.near_misses.items():
                if fusion not in fusions:
                    continue
                reasons = [r for f, r in entry["near_misses"] if f == fusion]
                if not any(fragment in r for r in reasons):
                    problems.append(
                        f"graph {graph.graph} {module}: no {fusion} near miss with "
                        f"{fragment!r} (got {reasons})"
                    )
    return problems


def coverage_gaps(run: CompiledRun, fusion: str) -> list[str]:
    """Candidate sites of ``fusion``'s kind that its report neither rewrote nor near-missed.

    One entry per silent site. A site with a known module (attention layer) is covered by
    any record of the fusion in that module; sites without one by a count of the records
    no known site claims.
    """
    kind = COUNTED_FUSIONS[fusion]
    gaps: list[str] = []
    for candidates, graph in zip(run.candidates, run.report.graphs):
        wanted = getattr(candidates, kind)
        if not wanted or fusion not in graph.fusions:
            continue
        records = [(s.node, s.module) for s in graph.sites if s.fusion == fusion]
        records += [(m.node, m.module) for m in graph.near_misses if m.fusion == fusion]
        mentioned = {module for _, module in records}
        known = [(name, module) for name, module in wanted if module]
        gaps += [
            f"graph {graph.graph}: {name} ({module}) silently left alone"
            for name, module in known if module not in mentioned
        ]
        # sites whose module is unknown (nodes a joint-graph pass created carry no module
        # stack) are matched by count against records not claimed by a known site
        unknown = [name for name, module in wanted if not module]
        claimed = {module for _, module in known}
        spare = len({node for node, module in records if module not in claimed})
        gaps += [
            f"graph {graph.graph}: {name} (module unknown) silently left alone"
            for name in unknown[spare:]
        ]
    return gaps


# ---------------------------------------------------------------------- family walker
#: config attributes that size a model, under the names families use; the tiny value
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
TINY_SIZES: dict[tuple[str, ...], Any] = {
    ("num_hidden_layers", "n_layer", "num_layers", "n_layers"): 2,
    ("hidden_size", "n_embd", "d_model"): 256,
    _HEADS: 8,
    ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"): 2,
    ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"): 512,
    ("vocab_size",): 512,
    ("max_position_embeddings", "n_positions"): 512,
    ("num_local_experts", "num_experts", "n_routed_experts"): 4,
    ("num_experts_per_tok", "moe_topk", "top_k"): 2,
    ("moe_intermediate_size", "expert_intermediate_size"): 128,
    ("q_lora_rank", "kv_lora_rank"): 64,
    ("qk_rope_head_dim",): 16,
    ("qk_nope_head_dim", "v_head_dim"): 32,
    ("n_group", "topk_group"): 1,
}
#: the head size when the family sizes heads separately (32 = 256 hidden / 8 heads)
TINY_HEAD_DIM = 32
#: the rotary width of families that rotate part of the head by a fixed count (GPT-J)
TINY_ROTARY_DIM = 16
#: families whose config validates a field against the layer count
FAMILY_FIXES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
}
#: the families the CI subset walks: the GQA rotate-half core, qk-norm, partial rotary
#: with a fused qkv (Phi3), MHA partial rotary with split (GPT-NeoX), softcapped eager
#: attention with sliding layers (Gemma2)
CI_FAMILIES = ("llama", "qwen3", "mistral", "phi3", "gpt_neox", "gemma2")
#: per-family wall-clock limit of the full walk: a family that takes longer is recorded
#: as skipped rather than holding up the table
FAMILY_TIMEOUT_S = 60
PROMPT_LEN = 4
MAX_CACHE_LEN = 32
#: compiled vs eager decode logits (fp32 models) beyond which a family is marked failed:
#: a rewrite must never change what the model computes
LOGITS_ATOL = 1e-3


def causal_lm_families() -> list[str]:
    """Model types with a CausalLM class in the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_family_config(model_type: str, attn_implementation: str = "sdpa") -> Any:
    """The family's default config with every size it names shrunk (see ``TINY_SIZES``)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    if getattr(default, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder")
    if default.get_text_config(decoder=True) is not default:
        raise ValueError("composite (multimodal) config")
    keys = set(default.to_dict())
    overrides: dict[str, Any] = {}
    for names, value in TINY_SIZES.items():
        for name in names:
            if name in keys:
                overrides[name] = value
    if "head_dim" in keys and "qk_rope_head_dim" not in keys:
        overrides["head_dim"] = TINY_HEAD_DIM
    if "qk_rope_head_dim" in keys and "head_dim" in keys:
        overrides["head_dim"] = TINY_SIZES[("qk_rope_head_dim",)]
    if "kv_lora_rank" in keys and "num_key_value_heads" in keys:
        # MLA: after decompression every query head has its own K and V head
        overrides["num_key_value_heads"] = overrides.get("num_attention_heads", TINY_SIZES[_HEADS])
    if "rotary_dim" in keys:
        overrides["rotary_dim"] = TINY_ROTARY_DIM
    if "layer_types" in keys:
        overrides["layer_types"] = None  # rebuilt from num_hidden_layers
    overrides.update(FAMILY_FIXES.get(model_type, {}))
    # special token ids must fall inside the shrunk vocabulary
    for offset, name in enumerate(("pad_token_id", "bos_token_id", "eos_token_id")):
        if getattr(default, name, None) is not None:
            overrides[name] = offset
    config = AutoConfig.for_model(model_type, **overrides)
    config._attn_implementation = attn_implementation
    return config


@dataclasses.dataclass
class FamilyResult:
    family: str
    status: str  # "ok", "ran: <what is odd>", "skipped: <why>" or "failed: <why>"
    graphs: int = 0
    fired: dict[str, int] = dataclasses.field(default_factory=dict)
    near_misses: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    candidates: dict[str, int] = dataclasses.field(default_factory=dict)
    gaps: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_logit_diff: float | None = None
    seconds: float = 0.0
    note: str = ""


@contextlib.contextmanager
def _time_limit(seconds: int | None) -> Iterator[None]:
    if not seconds:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _snapshot(cache: Any) -> list[dict[str, Any]]:
    saved = []
    for layer in cache.layers:
        state = {}
        for k, v in vars(layer).items():
            if isinstance(v, torch.Tensor):
                state[k] = v.clone()
            elif isinstance(v, (int, bool)):
                state[k] = v
        saved.append(state)
    return saved


def _restore(cache: Any, saved: list[dict[str, Any]]) -> None:
    for layer, state in zip(cache.layers, saved):
        for k, v in state.items():
            current = getattr(layer, k)
            if isinstance(v, torch.Tensor):
                current.copy_(v)  # keep the address-marked buffer
            else:
                setattr(layer, k, v)


def decode_step_run(model: torch.nn.Module, config: Any, fusions: Iterable[str] | None = None) -> tuple[CompiledRun, float]:
    """Eager prefill, then one decode step eagerly and compiled from the same cache state.

    Returns the compiled run (candidates + report) and the largest logit difference
    between the eager and the compiled decode step.
    """
    from attnfuse.examples.hf_models import cache_arg, make_static_cache, prompt_ids

    cache = make_static_cache(model, max_cache_len=MAX_CACHE_LEN)
    ids = prompt_ids(config, prompt_len=PROMPT_LEN)
    positions = torch.arange(PROMPT_LEN).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, **cache_arg(cache), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        step = {
            "input_ids": token,
            "position_ids": torch.tensor([[PROMPT_LEN]]),
            **cache_arg(cache),
            "use_cache": True,
            "logits_to_keep": 1,
        }
        saved = _snapshot(cache)
        ref = model(**step).logits.float()
        _restore(cache, saved)
        run = compile_and_count(model, fusions=fusions, **step)
    diff = (run.outputs.logits.float() - ref).abs().max().item()
    return run, diff


def _build_tiny(family: str) -> tuple[Any, torch.nn.Module]:
    """SDPA attention where the family supports it, else its eager attention."""
    from attnfuse.examples.hf_models import build_from_config

    try:
        config = tiny_family_config(family, "sdpa")
        return config, build_from_config(config)
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc):
            raise
    config = tiny_family_config(family, "eager")
    return config, build_from_config(config)


def check_family(family: str, fusions: Iterable[str] | None = None, timeout_s: int | None = None) -> FamilyResult:
    """Build ``family`` tiny, compile one decode step, and summarize; never raises."""
    start = time.perf_counter()
    fusions = available_fusions() if fusions is None else list(fusions)
    try:
        with _time_limit(timeout_s):
            try:
                config, model = _build_tiny(family)
            except Exception as exc:
                return FamilyResult(family, f"skipped: does not build tiny ({_short(exc)})",
                                    seconds=time.perf_counter() - start)
            try:
                run, diff = decode_step_run(model, config, fusions)
            except Exception as exc:
                return FamilyResult(family, f"skipped: no StaticCache decode ({_short(exc)})",
                                    seconds=time.perf_counter() - start)
    except TimeoutError as exc:
        return FamilyResult(family, f"skipped: {exc}", seconds=time.perf_counter() - start)
    decode = CandidateSites()
    for graph_sites in run.candidates:  # graph breaks split one step into several graphs
        decode.kv_writes += graph_sites.kv_writes
        decode.decode_attention += graph_sites.decode_attention
    result = FamilyResult(
        family,
        "ok" if decode.kv_writes else "ran: no in-place cache write in the graph",
        graphs=len(run.report.graphs),
        fired=dict(run.report.counts),
        near_misses=sorted({(m.fusion, " ".join(m.reason.split())) for m in run.report.near_misses}),
        candidates={"kv_write": len(decode.kv_writes), "decode_attention": len(decode.decode_attention)},
        max_logit_diff=diff,
        seconds=time.perf_counter() - start,
    )
    errors = [e for g in run.report.graphs for e in g.errors]
    if errors:
        result.status = f"failed: {errors[0]}"
    elif not diff <= LOGITS_ATOL:  # also catches NaN
        baseline = _baseline_diff(family) if fusions else diff
        if baseline is not None and not baseline <= LOGITS_ATOL:
            # the compile itself changes the numbers (decompositions, reordered reductions)
            result.note = f"compiled without fusions differs from eager by {baseline:.1e} too"
        else:
            result.status = f"failed: compiled logits differ from eager by {diff:.2e}"
    if not run.report.graphs:
        result.status = "failed: no graph compiled"
    for name in COUNTED_FUSIONS:
        if name in fusions:
            result.gaps[name] = coverage_gaps(run, name)
    return result


def _baseline_diff(family: str) -> float | None:
    """The eager vs compiled logit difference with no fusion enabled (None if it fails)."""
    try:
        config, model = _build_tiny(family)
        return decode_step_run(model, config, [])[1]
    except Exception:
        return None


def _short(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:160]


def walk_families(families: Iterable[str] | None = None, timeout_s: int | None = FAMILY_TIMEOUT_S,
                  progress: Callable[[FamilyResult], None] | None = None) -> list[FamilyResult]:
    """``check_family`` for each family (default: every CausalLM family)."""
    results = []
    fusions = available_fusions()
    for family in families if families is not None else causal_lm_families():
        result = check_family(family, fusions, timeout_s)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def markdown_table(results: list[FamilyResult], fusions: list[str]) -> str:
    """One row per family: candidate sites, rewrites, silent gaps, near-miss reasons."""
    head = ["family", "status", "graphs", "kv writes", "decode attn"] + [f"{f}" for f in fusions] + [
        "silent", "max abs Δlogit", "near misses"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.status.startswith("skipped"):
            lines.append(f"| {r.family} | {r.status} |" + " |" * (len(head) - 2))
            continue
        silent = sum(len(g) for g in r.gaps.values())
        misses = "; ".join(f"{f}: {reason}" for f, reason in r.near_misses[:4])
        if len(r.near_misses) > 4:
            misses += f"; ... ({len(r.near_misses)} distinct)"
        status = f"{r.status} ({r.note})" if r.note else r.status
        row = [r.family, status, str(r.graphs), str(r.candidates.get("kv_write", 0)),
               str(r.candidates.get("decode_attention", 0))]
        row += [str(r.fired.get(f, 0)) for f in fusions]
        row += [str(silent), f"{r.max_logit_diff:.1e}" if r.max_logit_diff is not None else "-",
                misses.replace("|", "\\|")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_table(results: list[FamilyResult], fusions: list[str], path: str | None = None) -> str:
    """Write the markdown report to ``benchmarks/results/model_coverage.md``; returns the path."""
    import transformers

    if path is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.join(root, "benchmarks", "results", "model_coverage.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ok = [r for r in results if not r.status.startswith("skipped")]
    covered = [r for r in ok if not any(r.gaps.values())]
    fired_any = [r for r in ok if any(r.fired.get(f, 0) for f in fusions)]
    text = "\n".join([
        "# Fusion coverage over transformers CausalLM families",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; one decode step of a tiny "
        f"random-weight model (2 layers, hidden 256, fp32, StaticCache of {MAX_CACHE_LEN}, prompt "
        f"{PROMPT_LEN}) compiled with `attnfuse_eager`; fusions enabled: {', '.join(fusions) or 'none'}.",
        "",
        "Columns: `kv writes` / `decode attn` are candidate sites counted from the graph structure "
        "before the passes (one per cache buffer written; one per attention with one query token); "
        "the fusion columns are rewrites; `silent` counts candidate sites of `rope_kv_write` / "
        "`grouped_decode` that the report neither rewrote nor listed as a near miss; "
        "`max abs Δlogit` compares the compiled decode step with eager.",
        "",
        f"Families walked: {len(results)}; ran: {len(ok)}; with an in-place StaticCache write: "
        f"{sum(r.status == 'ok' for r in results)}; some fusion fired: {len(fired_any)}; "
        f"no silent site: {len(covered)}. `graphs` > 1 means graph breaks split the step.",
        "",
        markdown_table(results, fusions),
        "",
    ])
    with open(path, "w") as f:
        f.write(text)
    return path


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="model types (default: the CI subset)")
    parser.add_argument("--all", action="store_true", help="every CausalLM family")
    parser.add_argument("--out", default=None, help="markdown path")
    args = parser.parse_args()
    families = causal_lm_families() if args.all else (args.families or list(CI_FAMILIES))
    fusions = available_fusions()

    def progress(r: FamilyResult) -> None:
        print(f"{r.family:28s} {r.seconds:5.1f}s {r.status[:90]} fired={r.fired} "
              f"candidates={r.candidates} silent={sum(len(g) for g in r.gaps.values())}", flush=True)

    try:
        results = walk_families(families, progress=progress)
    except Exception:
        traceback.print_exc()
        raise
    print(write_table(results, fusions, args.out))


if __name__ == "__main__":
    _main()
