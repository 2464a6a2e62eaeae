"""Graph diffs: pin which rewrites happen in your own model.

``graph_diff(fn_or_module, *args, **kwargs)`` compiles with Inductor's caches disabled (so
the passes really run), captures the post-grad graph just before and just after
attnfuse's passes, runs the compiled function once and returns a ``GraphDiff``::

    def test_my_model_fuses(graph_diff):          # the pytest fixture (auto-registered)
        d = graph_diff(model, ids, fusions=["rope_kv_write"])
        d.assert_fired(rope_kv_write=2)
        d.assertExpectedInline(d.summary(), '''...''')   # EXPECTTEST_ACCEPT=1 rewrites it

The same function is importable as ``attnfuse.passes.testing.graph_diff`` outside pytest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import AttnfuseBackend
from .graph_text import graph_text
from .report import FusionReport

#: Inductor settings that keep every cache out of the way, so the passes always run
NO_CACHE_PATCHES = {
    "fx_graph_cache": False,
    "fx_graph_remote_cache": False,
    "autotune_local_cache": False,
    "autotune_remote_cache": False,
}


@dataclass
class GraphDiff:
    """The before/after graphs of one compile, the report and the run's outputs."""

    befores: list[str]
    afters: list[str]
    report: FusionReport
    outputs: Any = None
    codes: list[str] = field(default_factory=list)

    @staticmethod
    def _join(texts: list[str]) -> str:
        if len(texts) == 1:
            return texts[0]
        return "\n".join(f"# graph {i}\n{t}" for i, t in enumerate(texts))

    @property
    def before(self) -> str:
        """Normalized post-grad graph(s) before our passes."""
        return self._join(self.befores)

    @property
    def after(self) -> str:
        """Normalized post-grad graph(s) after our passes."""
        return self._join(self.afters)

    @property
    def diff(self) -> str:
        """Unified diff of ``before`` and ``after`` (no file header lines)."""
        lines = difflib.unified_diff(self.before.splitlines(), self.after.splitlines(), lineterm="", n=1)
        return "\n".join(l for l in lines if not l.startswith(("---", "+++")))

    @property
    def code(self) -> str:
        """Inductor's generated code (Inductor backend only)."""
        return "\n".join(self.codes)

    @property
    def counts(self) -> dict[str, int]:
        return self.report.counts

    def assert_fired(self, **expected: int) -> None:
        """Each named fusion rewrote exactly that many sites."""
        got = {name: self.counts.get(name, 0) for name in expected}
        if got != expected:
            raise AssertionError(
                f"rewrites: expected {expected}, got {got}\n{self.report.table()}"
            )

    def assert_not_fired(self, *names: str) -> None:
        """None of the named fusions rewrote anything."""
        fired = {n: self.counts.get(n, 0) for n in names if self.counts.get(n, 0)}
        if fired:
            raise AssertionError(f"expected no rewrites, got {fired}\n{self.report.table()}")

    def summary(self) -> str:
        """Rewrite counts, then the ops that vanished and appeared: short enough to pin."""
        before_ops = _op_histogram(self.before)
        after_ops = _op_histogram(self.after)
        lines = [f"{k}: {v}" for k, v in self.counts.items()]
        gone = {op: before_ops[op] - after_ops.get(op, 0) for op in before_ops if before_ops[op] > after_ops.get(op, 0)}
        new = {op: after_ops[op] - before_ops.get(op, 0) for op in after_ops if after_ops[op] > before_ops.get(op, 0)}
        lines += [f"- {op} x{n}" for op, n in sorted(gone.items())]
        lines += [f"+ {op} x{n}" for op, n in sorted(new.items())]
        return "\n".join(lines)

    def assertExpectedInline(self, actual: str, expect: str, skip: int = 0) -> None:  # noqa: N802
        """expecttest's inline assertion; ``EXPECTTEST_ACCEPT=1`` rewrites ``expect``."""
        from expecttest import assert_expected_inline

        assert_expected_inline(actual, expect, skip=skip + 1)


def _op_histogram(text: str) -> dict[str, int]:
    hist: dict[str, int] = {}
    for line in text.splitlines():
        if " = " not in line:
            continue
        rhs = line.split(" = ", 1)[1]
        callee = rhs.split("(", 1)[0]
        if callee.startswith("auto_functionalized") and "(" in rhs:
            # count the wrapped op, which is what changed
            inner = rhs.split("(", 1)[1].split(",", 1)[0]
            callee = f"{callee}({inner})"
        hist[callee] = hist.get(callee, 0) + 1
    return hist


def graph_diff(
    fn: Callable[..., Any],
    *args: Any,
    fusions: Iterable[Any] | None = None,
    backend: str = "inductor",
    options: Mapping[str, Any] | None = None,
    dynamic: bool | None = False,
    fullgraph: bool = False,
    **kwargs: Any,
) -> GraphDiff:
    """Compile ``fn`` (a function or module) with attnfuse and capture the graph diff.

    ``backend``: ``"inductor"`` (the ``attnfuse`` backend; ``code`` holds the generated
    code) or ``"eager"`` (``attnfuse_eager``: same passes, no codegen, faster on CPU).
    ``fusions``: as in ``options={"fusions": ...}``; default every built-in fusion.
    Positional and remaining keyword arguments are passed to ``fn``.
    """
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend: expected 'inductor' or 'eager', got {backend!r}")
    befores: list[str] = []
    afters: list[str] = []

    def observe(when: str, graph: torch.fx.Graph) -> None:
        (befores if when == "before" else afters).append(graph_text(graph))

    opts = dict(options or {})
    if fusions is not None:
        opts["fusions"] = list(fusions)
    opts.update(NO_CACHE_PATCHES)
    be = AttnfuseBackend(opts, inductor=backend == "inductor", observers=[observe])
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, backend=be, dynamic=dynamic, fullgraph=fullgraph)
        codes: list[str] = []
        if backend == "inductor":
            from torch._inductor.utils import run_and_get_code

            outputs, codes = run_and_get_code(compiled, *args, **kwargs)
        else:
            outputs = compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return GraphDiff(befores, afters, be.report, outputs, list(codes))
