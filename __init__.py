"""attnfuse: torch.compile passes that rewrite wasteful attention patterns into fast ops.

Three ways to use it::

    model = attnfuse.patch_model(model)                    # one line
    fast = torch.compile(model, backend="attnfuse")        # the backend, found by entry point
    def test_fuses(graph_diff): ...                        # pytest fixture (auto-registered)

plus ``attnfuse.explain(model, *inputs)``: every candidate site, rewritten or not, and why.
"""

import importlib
from typing import Any

# Public names and the submodule each lives in. Imported on first use (PEP 562), so
# that ``import attnfuse.passes.pytest_plugin`` (loaded by pytest at start-up) does not
# import torch: a test suite may need to set TRITON_INTERPRET before torch imports
# triton.
_EXPORTS = {
    "Fusion": ".fusions", "PatternFusion": ".fusions", "PatternSpec": ".fusions",
    "fusion_names": ".fusions",
    "AttnfuseBackend": ".passes.backend", "attnfuse_backend": ".passes.backend",
    "attnfuse_eager_backend": ".passes.backend", "fusion_pass": ".passes.backend",
    "PassManager": ".passes.manager",
    "explain": ".passes.patch", "is_patched": ".passes.patch", "patch_model": ".passes.patch",
    "report_of": ".passes.patch", "unpatch_model": ".passes.patch",
    "FusionReport": ".passes.report", "GraphReport": ".passes.report", "NearMiss": ".passes.report",
    "Site": ".passes.report", "collect_reports": ".passes.report",
}


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'attnfuse' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


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
