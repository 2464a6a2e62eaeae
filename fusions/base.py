"""The contract every fusion implements.

A fusion is one rewrite family: it finds sites in a post-grad ATen graph (functional,
after Inductor's decompositions and ``view_to_reshape``) and replaces each with a call to
an ``attnfuse::`` custom op. The pass manager (``attnfuse.passes.manager``) runs the
enabled fusions in a fixed order; a fusion never runs itself.

What a fusion declares
----------------------
``name``
    The public name (``rope_kv_write``, ...): the key in reports, in
    ``torch._dynamo.utils.counters["attnfuse"]`` and in ``options={"fusions": [...]}``.
``origin``
    One line naming the prior art the rewrite follows.
``source_modules``
    Modules besides the fusion's own whose source changes what the fusion emits (its
    custom ops, kernels, shared helpers). Their files go into the pass manager's
    ``uuid()``, so editing one of them invalidates Inductor's FX graph cache.
``apply(graph, sites)``
    Finds and rewrites sites in place. Every rewrite is recorded with
    ``sites.rewritten(node)``, every candidate left alone with
    ``sites.near_miss(node, reason)``. It must not raise on an unfamiliar graph: when in
    doubt it leaves the graph alone and records why. (The manager still guards against a
    raise: it restores the graph and records the error as a near miss.)

How a fusion finds sites is its own business. Two shapes are common, and this module
provides a base for the first:

* ``PatternFusion``: fixed-shape forms, written as ``register_replacement`` search and
  replacement functions traced with ``fwd_only`` + ``view_to_reshape`` (see
  ``trace_fn``); the ``extra_check`` returns ``None`` to accept or a reason string to
  refuse, and refusals become near misses.
* a plain FX walker (subclass ``Fusion`` directly) where the structure is open-ended
  (GQA ``n_rep``, SDPA backend variants, scatter chains).

This module imports nothing from ``attnfuse.passes``: data flows passes -> fusions ->
custom_ops.
"""

from __future__ import annotations

import abc
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.fx as fx


class SiteRecorder(Protocol):
    """What a fusion tells the report while it runs (implemented in ``passes.report``)."""

    def rewritten(self, node: fx.Node, detail: str = "") -> None:
        """Record one rewritten site; ``node`` is a node of the original site (its
        metadata gives the source location) or the replacement node."""

    def near_miss(self, node: fx.Node, reason: str) -> None:
        """Record a candidate site that was left alone, and why."""


class Fusion(abc.ABC):
    """One rewrite family. Subclasses set ``name`` and ``origin`` and implement ``apply``."""

    name: ClassVar[str]
    origin: ClassVar[str] = ""
    #: Modules (dotted names) whose source changes what this fusion emits.
    source_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    @abc.abstractmethod
    def apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
        """Rewrite the sites of this fusion in ``graph`` (in place)."""

    # ------------------------------------------------------------------ hashing
    def source_files(self) -> list[str]:
        """Files whose content the FX-cache key must cover for this fusion."""
        files = [inspect.getfile(type(self))]
        for mod in self.source_modules:
            files.append(inspect.getfile(importlib.import_module(mod)))
        return files

    def cache_key(self) -> str:
        """Everything besides source files that changes the rewrite (options)."""
        return repr(sorted(self.options.items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------- helpers
def fake_value(node: Any) -> Any:
    """The FakeTensor (or SymInt, or tuple) recorded on an FX node, or None."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return None


def trace_fn(*args: Any, **kwargs: Any) -> fx.GraphModule:
    """``fwd_only`` followed by ``view_to_reshape``.

    Inductor runs ``view_to_reshape`` before the post-grad passes, so patterns traced with
    plain ``fwd_only`` (which keeps ``aten.view``) would never match.
    """
    from torch._inductor.fx_passes.post_grad import view_to_reshape
    from torch._inductor.pattern_matcher import fwd_only

    gm = fwd_only(*args, **kwargs)
    view_to_reshape(gm)
    return gm


@dataclass
class PatternSpec:
    """One ``register_replacement`` row of a ``PatternFusion``'s table.

    ``check`` reads the match (fake tensors in ``match.kwargs[name].meta["val"]``) and
    returns ``None`` to accept or a short reason to refuse.
    """

    name: str
    search_fn: Callable[..., Any]
    replace_fn: Callable[..., Any]
    example_inputs: list[Any]
    check: Callable[[Any], str | None] | None = None
    scalar_workaround: dict[str, float | int] | None = None
    exclusive_arg_names: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class PatternFusion(Fusion):
    """A fusion built from a table of ``register_replacement`` patterns.

    Subclasses implement ``patterns()`` (yielding ``PatternSpec`` rows) and
    ``emitted_targets`` (the ops the replacements call, used to count rewrites). The
    table is traced once per fusion instance, lazily, under fake mode.
    """

    #: ops whose new appearance in the graph marks a rewrite (custom ops, or their
    #: ``auto_functionalized`` wrapper's first argument)
    emitted_targets: ClassVar[tuple[Any, ...]] = ()

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._pm_pass: Any = None
        self._sites: SiteRecorder | None = None

    @abc.abstractmethod
    def patterns(self) -> Iterable[PatternSpec]:
        """The rows to register."""

    def _extra_check(self, spec: PatternSpec) -> Callable[[Any], bool]:
        def check(match: Any) -> bool:
            if spec.check is None:
                return True
            try:
                reason = spec.check(match)
            except Exception as exc:  # a check never raises out of the matcher
                reason = f"check {spec.name} raised {type(exc).__name__}: {exc}"
            if reason is not None and self._sites is not None:
                self._sites.near_miss(match.output_node(), f"{spec.name}: {reason}")
            return reason is None

        return check

    def _build(self) -> Any:
        from torch._inductor.pattern_matcher import PatternMatcherPass, register_replacement
        from torch._subclasses.fake_tensor import FakeTensorMode

        pm_pass = PatternMatcherPass(pass_name=f"attnfuse_{self.name}")
        with FakeTensorMode():
            for spec in self.patterns():
                register_replacement(
                    spec.search_fn,
                    spec.replace_fn,
                    spec.example_inputs,
                    trace_fn,
                    pm_pass,
                    extra_check=self._extra_check(spec),
                    scalar_workaround=spec.scalar_workaround,
                    exclusive_arg_names=spec.exclusive_arg_names,
                    skip_duplicates=True,
                    pattern_name=f"attnfuse_{self.name}_{spec.name}",
                )
        return pm_pass

    def apply(self, graph: fx.Graph, sites: SiteRecorder) -> None:
        if self._pm_pass is None:
            self._pm_pass = self._build()
        before = {n for n in graph.nodes if is_emitted(n, self.emitted_targets)}
        self._sites = sites
        try:
            self._pm_pass.apply(graph)
        finally:
            self._sites = None
        for node in graph.nodes:
            if node not in before and is_emitted(node, self.emitted_targets):
                sites.rewritten(node)


def is_emitted(node: fx.Node, targets: tuple[Any, ...]) -> bool:
    """Whether ``node`` calls one of ``targets`` directly or through ``auto_functionalized``."""
    if node.op != "call_function":
        return False
    if node.target in targets:
        return True
    from torch._higher_order_ops.auto_functionalize import (
        auto_functionalized,
        auto_functionalized_v2,
    )

    if node.target in (auto_functionalized, auto_functionalized_v2) and node.args:
        return node.args[0] in targets
    return False


@functools.lru_cache(maxsize=None)
def _sdpa_backend_ops() -> frozenset[Any]:
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
        "scaled_dot_product_attention",
    )
    ops = []
    for n in names:
        packet = getattr(aten, n, None)
        if packet is not None:
            ops.append(packet.default)
    return frozenset(ops)


def sdpa_ops() -> frozenset[Any]:
    """Every ATen SDPA op (backend variants) a post-grad graph may hold."""
    return _sdpa_backend_ops()
