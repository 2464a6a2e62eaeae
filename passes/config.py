"""Options of the ``attnfuse`` backends, split from Inductor's own.

``torch.compile(m, backend="attnfuse", options={...})`` takes one dict. These keys are
ours; every other key is an Inductor config patch and passes through unchanged:

``fusions``
    The fusions to run: built-in names (``attnfuse.fusion_names()``), ``Fusion``
    instances or ``Fusion`` subclasses. Default: every built-in fusion. An unknown name
    raises ``ValueError`` (a typo must not silently disable a fusion).
``<fusion name>``
    A dict of that fusion's own options (thresholds and such), e.g.
    ``{"workspace_overlap": {"min_window_us": 5.0}}``.
``mode``
    An Inductor mode (``"reduce-overhead"``, ...). ``torch.compile`` refuses ``mode``
    and ``options`` together, so with options the mode goes in here.
``inline_kernels``
    Under the ``attnfuse`` (Inductor) backend, replace op calls with static shapes on
    CUDA by the Triton kernel launches they make, which Inductor then issues itself
    (``passes.inline_kernels``: less host time per decode step). Default ``True``;
    the ``attnfuse_eager`` backend never inlines.
``strict``
    Re-raise an exception from a fusion instead of restoring the graph and recording it
    (for tests of the fusions themselves). Default ``False``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..fusions import BUILTIN_FUSIONS, Fusion, fusion_class, fusion_names

OUR_KEYS = ("fusions", "strict", "mode", "inline_kernels")


@dataclass
class AttnfuseOptions:
    fusions: list[Fusion]
    strict: bool
    inductor: dict[str, Any]
    mode: str | None = None
    inline_kernels: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fusions)


def build_fusions(spec: Iterable[Any] | None, per_fusion: Mapping[str, Any] | None = None) -> list[Fusion]:
    """Instantiate the fusions named by ``spec`` (names, instances or classes), in order.

    Built-in names run in the registry's fixed order whatever order they are given in;
    user fusions (instances or classes) run after them, in the order given.
    """
    per_fusion = dict(per_fusion or {})
    if spec is None:
        spec = fusion_names()
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise ValueError(f"fusions: expected a list of fusion names, got {spec!r}")
    names: list[str] = []
    custom: list[Fusion] = []
    for item in spec:
        if isinstance(item, str):
            if item not in BUILTIN_FUSIONS:
                raise ValueError(
                    f"fusions: unknown fusion {item!r}; expected one of {fusion_names()}"
                )
            if item not in names:
                names.append(item)
        elif isinstance(item, Fusion):
            custom.append(item)
        elif isinstance(item, type) and issubclass(item, Fusion):
            custom.append(item(per_fusion.get(getattr(item, "name", ""), None)))
        else:
            raise ValueError(
                f"fusions: expected fusion names, Fusion instances or classes, got {item!r}"
            )
    ordered = [n for n in fusion_names() if n in names]
    fusions: list[Fusion] = []
    for n in ordered:
        opts = per_fusion.get(n)
        if opts is not None and not isinstance(opts, Mapping):
            raise ValueError(f"{n}: expected a dict of options, got {opts!r}")
        fusions.append(fusion_class(n)(opts))
    seen = {f.name for f in fusions}
    for f in custom:
        if f.name in seen:
            raise ValueError(f"fusions: two fusions are named {f.name!r}")
        seen.add(f.name)
        fusions.append(f)
    return fusions


def split_options(options: Mapping[str, Any] | None) -> AttnfuseOptions:
    """Separate our keys from Inductor's and build the fusions."""
    options = dict(options or {})
    spec = options.pop("fusions", None)
    strict = bool(options.pop("strict", False))
    mode = options.pop("mode", None)
    inline = options.pop("inline_kernels", True)
    if not isinstance(inline, bool):
        raise ValueError(f"inline_kernels: expected True or False, got {inline!r}")
    per_fusion = {k: options.pop(k) for k in list(options) if k in BUILTIN_FUSIONS}
    # user fusions may take options under their own name too
    if spec is not None and not isinstance(spec, (str, bytes)):
        for item in spec:
            name = getattr(item, "name", None)
            if isinstance(item, type) and isinstance(name, str) and name in options:
                per_fusion[name] = options.pop(name)
    return AttnfuseOptions(build_fusions(spec, per_fusion), strict, options, mode, inline)
