"""The built-in fusions, in the order the pass manager runs them.

Order matters: ``rope_kv_write`` runs first so that the decode attention that
``grouped_decode`` matches reads the cache written by the fused op; ``mla_short_prefill``
next; ``workspace_overlap`` last, because it schedules fills around the consumers the
earlier fusions may have created.

Each entry maps the public name to ``"module:Class"`` and is imported only when enabled.
"""

from __future__ import annotations

import importlib

from .base import Fusion, PatternFusion, PatternSpec, SiteRecorder

#: name -> "module:Class", in run order
BUILTIN_FUSIONS: dict[str, str] = {
    "rope_kv_write": "attnfuse.fusions.rope_kv_write:RopeKVWriteFusion",
    "grouped_decode": "attnfuse.fusions.grouped_decode:GroupedDecodeFusion",
    "mla_short_prefill": "attnfuse.fusions.mla_short_prefill:MLAShortPrefillFusion",
    "workspace_overlap": "attnfuse.fusions.workspace_overlap:WorkspaceOverlapFusion",
}


def fusion_names() -> list[str]:
    """The built-in fusion names, in run order."""
    return list(BUILTIN_FUSIONS)


def fusion_class(name: str) -> type[Fusion]:
    """The class of a built-in fusion; ``ValueError`` for an unknown name."""
    try:
        target = BUILTIN_FUSIONS[name]
    except KeyError:
        raise ValueError(
            f"fusions: unknown fusion {name!r}; expected one of {fusion_names()}"
        ) from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = [
    "BUILTIN_FUSIONS",
    "Fusion",
    "PatternFusion",
    "PatternSpec",
    "SiteRecorder",
    "fusion_class",
    "fusion_names",
]
