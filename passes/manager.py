"""The pass manager: one ``CustomGraphPass`` that runs the enabled fusions in order.

Installed as Inductor's ``post_grad_custom_pre_pass`` (the graph is functional there,
after Inductor's decompositions, ``view_to_reshape`` and the joint-graph passes that turn
many hand-written attentions into SDPA), it

1. normalizes the graph (``remove_noop_ops``: the pre pass runs before Inductor's own noop
   removal, and patterns are traced without noops);
2. runs each enabled fusion; a fusion that raises has the graph restored to what it was
   before it ran, and the error is recorded (``strict`` re-raises instead);
3. cleans up: stable topological sort (replacements are not guaranteed to be inserted in
   order) and dead-code elimination;
4. runs a pass that was already installed in the slot (the user's or an engine's), so
   installing attnfuse composes instead of overwriting;
5. with ``inline_kernels`` (the ``attnfuse`` backend), puts op calls into the graph as
   kernel launches Inductor issues (``passes.inline_kernels``), after the observers saw
   the op calls;
6. publishes the graph's report.

``uuid()`` hashes the source files of this package that decide what the passes emit, the
enabled fusions and their options, the chained pass's uuid, and the torch, triton and
flashinfer versions. It is never ``None`` (that would silently disable the FX graph
cache) unless a chained pass has no uuid, in which case caching would be unsound.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..fusions import Fusion
from .report import FusionReport, GraphReport, Recorder, publish

log = logging.getLogger("attnfuse")

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: directories whose Python sources decide what the passes emit (hashed into uuid())
_HASHED_DIRS = ("fusions", "passes", "custom_ops", os.path.join("custom_ops", "kernels"))

GraphObserver = Callable[[str, fx.Graph], None]


@functools.lru_cache(maxsize=1)
def _library_versions() -> str:
    import triton

    try:
        from importlib.metadata import version

        fi = version("flashinfer-python")
    except Exception:  # optional dependency absent
        fi = "absent"
    return f"torch={torch.__version__};triton={triton.__version__};flashinfer={fi}"


def package_source_files() -> tuple[str, ...]:
    """Every Python source of the pass, fusion and op packages, sorted."""
    files = []
    for d in _HASHED_DIRS:
        full = os.path.join(_PACKAGE_ROOT, d)
        if os.path.isdir(full):
            files += [os.path.join(full, f) for f in os.listdir(full) if f.endswith(".py")]
    return tuple(sorted(files))


def _graph_snapshot(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    out = copy.graph_copy(graph, {})
    copy.output(out)
    return copy


def _restore(graph: fx.Graph, snapshot: fx.Graph) -> None:
    nodes = list(graph.nodes)
    for node in nodes:
        node.args, node.kwargs = (), {}  # drop every use so each node can be erased
    for node in reversed(nodes):
        graph.erase_node(node)
    graph.output(graph.graph_copy(snapshot, {}))


class PassManager(CustomGraphPass):
    """Runs ``fusions`` on a post-grad graph; see the module docstring."""

    def __init__(
        self,
        fusions: Sequence[Fusion],
        *,
        strict: bool = False,
        chained: Any = None,
        observers: Sequence[GraphObserver] = (),
        sinks: Sequence[FusionReport] = (),
        inline_kernels: bool = False,
    ) -> None:
        self.fusions = list(fusions)
        self.inline_kernels = inline_kernels
        self.strict = strict
        self.chained = chained
        self.observers = tuple(observers)
        self.sinks = tuple(sinks)
        #: how many graphs this instance has processed (0 after a compile = cache hit)
        self.calls = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fusions)

    # ------------------------------------------------------------------ running
    def __call__(self, graph: fx.Graph) -> None:
        self.calls += 1
        report = GraphReport(graph=current_graph_name(), fusions=self.names)
        self._observe("before", graph)
        start = time.perf_counter()
        if self.fusions:
            from torch._inductor.fx_passes.post_grad import remove_noop_ops

            remove_noop_ops(graph)
        self._run_fusions(graph, report)
        if self.fusions:
            self._cleanup(graph)
        if self.chained is not None:
            self.chained(graph)
        self._observe("after", graph)
        if self.inline_kernels:
            self._inline(graph, report)
        log.debug("attnfuse graph %s: passes took %.1f ms", report.graph, 1e3 * (time.perf_counter() - start))
        publish(report, self.sinks)

    def _run_fusions(self, graph: fx.Graph, report: GraphReport) -> None:
        """Apply the fusions in order. One that raises is dropped: the graph is put back as
        it was before the first fusion (a copy: ~20 ms per 4 decode layers, so one per
        graph, not one per fusion) and the others run again without it."""
        snapshot = None if self.strict or not self.fusions else _graph_snapshot(graph)
        sites, misses = len(report.sites), len(report.near_misses)
        failed: set[str] = set()
        while True:
            for fusion in self.fusions:
                if fusion.name in failed:
                    continue
                try:
                    fusion.apply(graph, Recorder(report, fusion.name))
                    graph.lint()
                except Exception as exc:
                    if self.strict:
                        raise
                    msg = f"{fusion.name} raised {type(exc).__name__}: {exc}; graph left as it was"
                    report.errors.append(msg)
                    log.warning("attnfuse: %s", msg, exc_info=log.isEnabledFor(logging.DEBUG))
                    failed.add(fusion.name)
                    break
            else:
                return
            # start over from the copy; what was recorded since is recorded again
            assert snapshot is not None
            _restore(graph, snapshot)
            del report.sites[sites:], report.near_misses[misses:]

    def _inline(self, graph: fx.Graph, report: GraphReport) -> None:
        from .inline_kernels import inline_kernels

        # a call whose inlining raises keeps its op call (same result, slower to issue)
        # and is counted under "raised ..."; strict mode raises
        report.inlined = inline_kernels(graph, strict=self.strict)
        graph.lint()
        for why, n in report.inlined.items():
            if why.startswith("raised"):
                report.errors.append(f"inline_kernels {why} on {n} call(s); op calls kept (see the log)")

    @staticmethod
    def _cleanup(graph: fx.Graph) -> None:
        from torch._inductor.fx_passes.post_grad import stable_topological_sort

        stable_topological_sort(graph)
        graph.eliminate_dead_code()
        graph.lint()

    def _observe(self, when: str, graph: fx.Graph) -> None:
        for obs in self.observers:
            obs(when, graph)

    # ------------------------------------------------------------------ caching
    def uuid(self) -> Any:
        chained_uuid = ""
        if self.chained is not None:
            chained_uuid = self.chained.uuid() if hasattr(self.chained, "uuid") else None
            if chained_uuid is None:
                return None  # we cannot vouch for a pass we cannot hash
        files = set(package_source_files())
        for f in self.fusions:
            files.update(f.source_files())
        key = ";".join(
            [
                _library_versions(),
                ",".join(self.names),
                "|".join(f"{f.name}:{f.cache_key()}" for f in self.fusions),
                f"strict={self.strict}",
                f"inline_kernels={self.inline_kernels}",
                f"chained={chained_uuid!r}",
            ]
        )
        return hashlib.sha256(get_hash_for_files(tuple(sorted(files)), key)).hexdigest()


def current_graph_name() -> str:
    """Dynamo's compile id of the graph being compiled (``"0/0"``), or ``"?"``."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:
        cid = None
    return str(cid) if cid is not None else "?"
