"""What the passes did: per graph, the sites rewritten and the near misses, with why.

Silent non-matching is the first complaint about pattern passes, so every compiled graph
gets a ``GraphReport`` and every candidate a fusion looked at and left alone is recorded
with its reason. Reports reach the user four ways:

* ``attnfuse.explain(model, *inputs)`` returns the merged ``FusionReport``;
* ``with attnfuse.collect_reports() as report: ...`` gathers the graphs compiled inside;
* a patched model keeps its own (``attnfuse.report_of(model)``);
* ``torch._dynamo.utils.counters["attnfuse"][<fusion>]`` and the ``attnfuse`` logger
  (INFO: one line per graph; DEBUG: every near miss).

A graph that Inductor loads from its FX graph cache never runs the passes; its report
says ``from cache`` instead of pretending nothing was rewritten.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.fx as fx

log = logging.getLogger("attnfuse")

#: characters kept of a reason in the one-line table rendering
REASON_WIDTH = 90


@dataclass(frozen=True)
class Site:
    """One rewritten site."""

    fusion: str
    node: str
    location: str
    module: str
    detail: str = ""


@dataclass(frozen=True)
class NearMiss:
    """One candidate a fusion looked at and left alone."""

    fusion: str
    node: str
    location: str
    module: str
    reason: str


def node_location(node: fx.Node) -> tuple[str, str]:
    """``(file:line, module path)`` of the user code a node came from, from its metadata."""
    location = ""
    trace = node.meta.get("stack_trace") or ""
    for line in reversed(trace.strip().splitlines()):
        line = line.strip()
        if line.startswith('File "'):
            # 'File "/path/x.py", line 12, in forward'
            try:
                path = line.split('"')[1]
                lineno = line.split(", line ")[1].split(",")[0]
            except IndexError:
                continue
            location = f"{os.path.basename(path)}:{lineno}"
            break
    module = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        module = _clean_module_path(str(path))
    return location, module


#: the Dynamo source of the compiled root: ``L['self']``, ``L['args'][0]`` (a decorated
#: ``forward`` whose wrapper takes ``*args``), ``L['fn']``, ``G['model']``, ...
_ROOT_SOURCE = re.compile(r"^[LG]\[[^\]]*\](?:\[[^\]]*\])*")
_MODULES_ITEM = re.compile(r"\._modules\['([^']*)'\]")


def _clean_module_path(path: str) -> str:
    """``L['self'].model.layers[0].self_attn`` -> ``model.layers[0].self_attn``: the path
    from the compiled root, however Dynamo spells the root's source."""
    path = _MODULES_ITEM.sub(r".\1", _ROOT_SOURCE.sub("", path, count=1))
    return path.removeprefix(".")


@dataclass
class GraphReport:
    """What the passes did to one compiled graph."""

    graph: str
    fusions: tuple[str, ...]
    sites: list[Site] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    from_cache: bool = False
    errors: list[str] = field(default_factory=list)
    #: op calls put into the graph as kernel launches (``"inlined"``) or left as calls,
    #: by reason (``passes.inline_kernels``)
    inlined: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(s.fusion for s in self.sites)
        return {name: c.get(name, 0) for name in self.fusions}


class FusionReport:
    """The merged report of one or more compiled graphs.

    ``counts`` maps fusion name to rewrites (summed over graphs that ran the passes);
    ``near_misses`` and ``sites`` list every record; ``graphs`` keeps the per-graph
    reports; ``from_cache`` counts graphs whose compiled code came from the FX cache
    (their passes did not run, so their rewrites are not in ``counts``).
    """

    def __init__(self, graphs: list[GraphReport] | None = None) -> None:
        self.graphs: list[GraphReport] = list(graphs or [])

    def add(self, graph: GraphReport) -> None:
        self.graphs.append(graph)

    def extend(self, other: FusionReport) -> None:
        self.graphs.extend(other.graphs)

    @property
    def counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        names: list[str] = []
        for g in self.graphs:
            for name, n in g.counts.items():
                if name not in names:
                    names.append(name)
                total[name] += n
        return {name: total[name] for name in names}

    @property
    def sites(self) -> list[Site]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for g in self.graphs for m in g.near_misses]

    @property
    def from_cache(self) -> int:
        return sum(g.from_cache for g in self.graphs)

    def __len__(self) -> int:
        return len(self.graphs)

    def __repr__(self) -> str:
        return f"FusionReport(graphs={len(self.graphs)}, counts={self.counts}, near_misses={len(self.near_misses)})"

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """A readable table: per graph, each fusion's rewrites, where, and the near misses."""
        if not self.graphs:
            return "attnfuse: no graph was compiled"
        lines: list[str] = []
        for g in self.graphs:
            if g.from_cache:
                lines.append(f"graph {g.graph}: from cache (passes did not run; rewrites as when it was first compiled)")
                continue
            counts = ", ".join(f"{k}={v}" for k, v in g.counts.items()) or "no fusion enabled"
            lines.append(f"graph {g.graph}: {counts}")
            rows = [("fusion", "result", "where", "node / reason")]
            for s in g.sites:
                rows.append((s.fusion, "rewritten", _where(s.module, s.location), s.node + (f" ({s.detail})" if s.detail else "")))
            for m in g.near_misses:
                rows.append((m.fusion, "near miss", _where(m.module, m.location), _clip(m.reason)))
            for e in g.errors:
                rows.append(("-", "error", "", _clip(e)))
            if len(rows) > 1:
                widths = [max(len(r[i]) for r in rows) for i in range(3)]
                for r in rows:
                    lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
        return "\n".join(lines)


def _where(module: str, location: str) -> str:
    if module and location:
        return f"{module} ({location})"
    return module or location or "?"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 3] + "..."


class Recorder:
    """Implements ``fusions.base.SiteRecorder`` for one fusion on one graph."""

    def __init__(self, report: GraphReport, fusion: str) -> None:
        self._report = report
        self._fusion = fusion
        self._missed: set[tuple[str, str]] = set()

    def rewritten(self, node: fx.Node, detail: str = "") -> None:
        location, module = node_location(node)
        self._report.sites.append(Site(self._fusion, node.name, location, module, detail))

    def near_miss(self, node: fx.Node, reason: str) -> None:
        key = (node.name, reason)
        if key in self._missed:  # the matcher may look at a candidate more than once
            return
        self._missed.add(key)
        location, module = node_location(node)
        self._report.near_misses.append(NearMiss(self._fusion, node.name, location, module, reason))
        log.debug("%s: near miss at %s (%s): %s", self._fusion, node.name, _where(module, location), reason)


# ------------------------------------------------------------------ collection
_collectors: contextvars.ContextVar[tuple[FusionReport, ...]] = contextvars.ContextVar(
    "attnfuse_collectors", default=()
)


@contextlib.contextmanager
def collect_reports() -> Iterator[FusionReport]:
    """Gather the reports of every graph compiled inside the block.

    >>> with attnfuse.collect_reports() as report:
    ...     fast(x)
    >>> report.counts
    """
    report = FusionReport()
    token = _collectors.set(_collectors.get() + (report,))
    try:
        yield report
    finally:
        _collectors.reset(token)


def publish(graph: GraphReport, sinks: tuple[FusionReport, ...] = ()) -> None:
    """Hand a finished graph report to the active collectors, sinks, counters and log."""
    from torch._dynamo.utils import counters

    for sink in _collectors.get() + tuple(sinks):
        sink.add(graph)
    if graph.from_cache:
        log.info("attnfuse graph %s: from cache", graph.graph)
        return
    for name, n in graph.counts.items():
        counters["attnfuse"][name] += n
    log.info(
        "attnfuse graph %s: %s; %d near misses",
        graph.graph,
        ", ".join(f"{k}={v}" for k, v in graph.counts.items()) or "no fusion enabled",
        len(graph.near_misses),
    )
