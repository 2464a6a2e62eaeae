"""A toy fusion used to test the framework itself: ``x * sigmoid(x)`` -> ``attnfuse_testing::silu``.

It follows the same contract as the real fusions (a custom op with a fake impl, a graph
walker that records rewrites and near misses) so the tests exercise everything the real
ones rely on, without depending on any of them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from attnfuse.fusions import Fusion, PatternFusion, PatternSpec

aten = torch.ops.aten


@torch.library.custom_op("attnfuse_testing::silu", mutates_args=())
def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


@silu.register_fake
def _silu_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class SiluFusion(Fusion):
    """Rewrites ``mul(x, sigmoid(x))``; ``mul(y, sigmoid(x))`` is a near miss."""

    name = "silu_test"
    origin = "test fixture"

    def apply(self, graph: fx.Graph, sites) -> None:
        if self.options.get("raise_inside"):
            # rewrite something first so the test can see the restore undo it
            for n in list(graph.nodes):
                if n.target == aten.sigmoid.default:
                    n.target = aten.tanh.default
            raise RuntimeError("planted failure")
        for n in list(graph.nodes):
            if n.op != "call_function" or n.target != aten.mul.Tensor or len(n.args) != 2:
                continue
            a, b = n.args
            if not (isinstance(b, fx.Node) and b.target == aten.sigmoid.default):
                continue
            if b.args[0] is not a:
                sites.near_miss(n, "sigmoid of another tensor")
                continue
            with graph.inserting_before(n):
                new = graph.call_function(torch.ops.attnfuse_testing.silu.default, (a,))
            new.meta.update(n.meta)
            n.replace_all_uses_with(new)
            sites.rewritten(n)


class SiluModel(torch.nn.Module):
    """Two SiLU sites (one per layer) and one look-alike that must stay."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(dim, dim)
        self.l2 = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        h = h * torch.sigmoid(h)
        g = self.l2(h)
        return g * torch.sigmoid(g) + x * torch.sigmoid(g)


class SiluPatternFusion(PatternFusion):
    """The same rewrite through ``register_replacement``; refuses float64 with a reason."""

    name = "silu_pattern_test"
    origin = "test fixture"
    emitted_targets = (torch.ops.attnfuse_testing.silu.default,)

    def patterns(self):
        def search(x):
            return x * torch.sigmoid(x)

        def replace(x):
            return torch.ops.attnfuse_testing.silu(x)

        def check(match):
            x = match.kwargs["x"].meta["val"]
            return "float64 is not supported" if x.dtype == torch.float64 else None

        yield PatternSpec("silu", search, replace, [torch.empty(4, 8)], check=check)
