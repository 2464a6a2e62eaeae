"""attnfuse: torch.compile passes that rewrite wasteful attention patterns into fast ops.

Three ways to use it::

    model = attnfuse.patch_model(model)                    # one line
    fast = torch.compile(model, backend="attnfuse")        # the backend, found by entry point
    def test_fuses(graph_diff): ...                        # pytest fixture (auto-registered)

plus ``attnfuse.explain(model, *inputs)``: every candidate site, rewritten or not, and why.
"""

from .fusions import Fusion, PatternFusion, PatternSpec, fusion_names
from .passes.backend import AttnfuseBackend, attnfuse_backend, attnfuse_eager_backend, fusion_pass
from .passes.manager import PassManager
from .passes.patch import explain, is_patched, patch_model, report_of, unpatch_model
from .passes.report import FusionReport, GraphReport, NearMiss, Site, collect_reports

__version__ = "0.1.0"

__all__ = [
    "AttnfuseBackend",
    "Fusion",
    "FusionReport",
    "GraphReport",
    "NearMiss",
    "PassManager",
    "PatternFusion",
    "PatternSpec",
    "Site",
    "attnfuse_backend",
    "attnfuse_eager_backend",
    "collect_reports",
    "explain",
    "fusion_names",
    "fusion_pass",
    "is_patched",
    "patch_model",
    "report_of",
    "unpatch_model",
]
