"""``patch_model`` / ``unpatch_model`` and ``explain``.

``patch_model(model)`` replaces the model instance's ``forward`` with a compiled one
whose backend keeps a ``FusionReport`` (``report_of(model)``). HF users keep calling
``model.generate(...)``: generate calls the module, the module calls ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .backend import AttnfuseBackend
from .report import FusionReport
from .testing import NO_CACHE_PATCHES

_BACKENDS = {"attnfuse": True, "attnfuse_eager": False}
_STATE_ATTR = "_attnfuse_patch"
_MISSING = object()


@dataclass
class _PatchState:
    original_forward: Any  # the instance attribute that was there, or _MISSING
    backend: AttnfuseBackend
    key: tuple[Any, ...]


def _backend_kind(backend: str) -> bool:
    try:
        return _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"backend: expected one of {sorted(_BACKENDS)}, got {backend!r}") from None


def _key(fusions: Any, backend: str, compile_kwargs: dict[str, Any]) -> tuple[Any, ...]:
    fusions_key = None if fusions is None else tuple(
        f if isinstance(f, str) else id(f) for f in fusions
    )
    return (fusions_key, backend, repr(sorted(compile_kwargs.items(), key=lambda kv: kv[0])))


def patch_model(model: torch.nn.Module, *, fusions: Iterable[Any] | None = None,
                backend: str = "attnfuse", **compile_kwargs: Any) -> torch.nn.Module:
    """Compile ``model.forward`` with attnfuse's passes; returns ``model`` itself.

    Parameters
    ----------
    model
        An ``nn.Module``; its instance ``forward`` is replaced.
    fusions
        Fusion names (default: all built-in fusions), as in ``options={"fusions": ...}``.
    backend
        ``"attnfuse"`` (Inductor) or ``"attnfuse_eager"`` (passes only, no codegen).
    compile_kwargs
        Passed to ``torch.compile`` (``dynamic``, ``fullgraph``, ...); ``mode`` and
        ``options`` (Inductor config patches and per-fusion options) go to the backend.

    Patching again with the same arguments does nothing; with other arguments it replaces
    the earlier patch. ``unpatch_model`` restores the original ``forward``.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    inductor = _backend_kind(backend)
    key = _key(fusions, backend, compile_kwargs)
    state: _PatchState | None = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        if state.key == key:
            return model
        unpatch_model(model)
    compile_kwargs = dict(compile_kwargs)
    options = dict(compile_kwargs.pop("options", None) or {})
    mode = compile_kwargs.pop("mode", None)
    if fusions is not None:
        options["fusions"] = list(fusions)
    be = AttnfuseBackend(options, mode, inductor=inductor)
    original = model.__dict__.get("forward", _MISSING)
    model.forward = torch.compile(model.forward, backend=be, **compile_kwargs)
    model.__dict__[_STATE_ATTR] = _PatchState(original, be, key)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``patch_model``; a model that is not patched is returned unchanged."""
    state: _PatchState | None = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    if state.original_forward is _MISSING:
        del model.__dict__["forward"]
    else:
        model.__dict__["forward"] = state.original_forward
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return _STATE_ATTR in model.__dict__


def report_of(model: torch.nn.Module) -> FusionReport:
    """The merged report of every graph compiled for a patched model so far."""
    state: _PatchState | None = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("model: not patched by attnfuse.patch_model")
    return state.backend.report


def explain(model_or_fn: Callable[..., Any], *args: Any, fusions: Iterable[Any] | None = None,
            backend: str = "attnfuse", options: dict[str, Any] | None = None,
            **kwargs: Any) -> FusionReport:
    """Compile ``model_or_fn`` with attnfuse, run it once on the inputs, return the report.

    Every candidate site is listed: rewritten, or a near miss with the reason. Inductor's
    FX graph cache is bypassed so the passes always run. A patched model is explained
    through its original forward. Positional and keyword arguments go to the call.

    >>> print(attnfuse.explain(model, input_ids))
    """
    inductor = _backend_kind(backend)
    fn: Callable[..., Any] = model_or_fn
    if isinstance(model_or_fn, torch.nn.Module):
        state: _PatchState | None = model_or_fn.__dict__.get(_STATE_ATTR)
        if state is not None:
            original = state.original_forward
            fn = type(model_or_fn).forward.__get__(model_or_fn) if original is _MISSING else original
    opts = dict(options or {})
    if fusions is not None:
        opts["fusions"] = list(fusions)
    if inductor:
        opts.update(NO_CACHE_PATCHES)
    be = AttnfuseBackend(opts, inductor=inductor)
    torch.compile(fn, backend=be)(*args, **kwargs)
    return be.report
