"""The ``attnfuse`` and ``attnfuse_eager`` torch.compile backends.

Both are found by name through the ``torch_dynamo_backends`` entry point, so
``torch.compile(m, backend="attnfuse")`` works without importing attnfuse first.

``attnfuse``
    Inductor with the pass manager installed in ``post_grad_custom_pre_pass`` (composed
    with a pass already there). Takes ``mode`` like Inductor and ``options``: our keys
    (``passes.config``) plus any Inductor config patch.
``attnfuse_eager``
    aot_autograd with Inductor's decomposition table, Inductor's joint-graph passes and
    ``view_to_reshape`` (so the passes see the same IR as under Inductor), our passes,
    and no code generation: the rewritten graph runs eagerly. For debugging, and for
    machines where Inductor cannot compile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from .config import split_options
from .manager import GraphObserver, PassManager, current_graph_name
from .report import FusionReport, GraphReport, publish


class AttnfuseBackend:
    """A torch.compile backend object; ``report`` accumulates its graphs' reports.

    ``AttnfuseBackend(options, mode)`` is what ``backend="attnfuse"`` builds per compile;
    ``patch_model`` and ``explain`` keep one so they can hand back the report.
    """

    def __init__(
        self,
        options: Mapping[str, Any] | None = None,
        mode: str | None = None,
        *,
        inductor: bool = True,
        observers: Sequence[GraphObserver] = (),
        report: FusionReport | None = None,
    ) -> None:
        self.options = split_options(options)  # validates now: bad options fail fast
        if mode is not None and self.options.mode is not None and mode != self.options.mode:
            raise ValueError(f"mode: given as {mode!r} and as options['mode']={self.options.mode!r}")
        self.mode = mode if mode is not None else self.options.mode
        self.inductor = inductor
        self.observers = tuple(observers)
        self.report = report if report is not None else FusionReport()

    def _manager(self, chained: Any = None) -> PassManager:
        return PassManager(
            self.options.fusions,
            strict=self.options.strict,
            chained=chained,
            observers=self.observers,
            sinks=(self.report,),
            inline_kernels=self.inductor and self.options.inline_kernels,
        )

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
        if self.inductor:
            manager, compiled = self._compile_inductor(gm, example_inputs)
        else:
            manager, compiled = self._compile_eager(gm, example_inputs)
        if manager.calls == 0:
            # Inductor loaded this graph from its FX graph cache: the passes did not run.
            publish(GraphReport(current_graph_name(), manager.names, from_cache=True), (self.report,))
        return compiled

    def _compile_inductor(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[PassManager, Any]:
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches: dict[str, Any] = dict(list_mode_options(self.mode)) if self.mode else {}
        patches.update(self.options.inductor)
        chained = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
        if isinstance(chained, PassManager):
            chained = chained.chained  # never run our own passes twice
        manager = self._manager(chained)
        patches["post_grad_custom_pre_pass"] = manager
        return manager, compile_fx(gm, example_inputs, config_patches=patches)

    def _compile_eager(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[PassManager, Any]:
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import _recursive_joint_graph_passes
        from torch._inductor.decomposition import select_decomp_table
        from torch._inductor.fx_passes.post_grad import view_to_reshape

        manager = self._manager()

        def fw_compiler(graph_module: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
            from torch._guards import detect_fake_mode
            from torch._inductor.virtualized import V

            # Inductor's joint-graph passes (random-op replacement among them) read the
            # fake mode from V, which only Inductor's own compile sets
            fake_mode = detect_fake_mode(inputs) or torch._subclasses.FakeTensorMode()
            with inductor_config.patch(self.options.inductor), V.set_fake_mode(fake_mode):
                graph_module = _recursive_joint_graph_passes(graph_module)
            view_to_reshape(graph_module)
            manager(graph_module.graph)
            graph_module.recompile()
            return make_boxed_func(graph_module.forward)

        compiled = aot_module_simplified(
            gm,
            list(example_inputs),
            fw_compiler=fw_compiler,
            decompositions=select_decomp_table(),
            keep_inference_input_mutations=True,
        )
        return manager, compiled


def attnfuse_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                     options: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """``torch.compile(m, backend="attnfuse", mode=..., options=...)``."""
    return AttnfuseBackend(options, mode)(gm, example_inputs)


def attnfuse_eager_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                           options: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """``torch.compile(m, backend="attnfuse_eager", options=...)``: our passes, no codegen."""
    return AttnfuseBackend(options, mode, inductor=False)(gm, example_inputs)


def fusion_pass(name: str, options: Mapping[str, Any] | None = None) -> PassManager:
    """One fusion as an ordinary ``CustomGraphPass`` for engines that own Inductor's pass slots.

    >>> inductor_config.post_grad_custom_pre_pass = attnfuse.fusion_pass("rope_kv_write")
    """
    opts = split_options({"fusions": [name], **({name: dict(options)} if options else {})})
    return PassManager(opts.fusions, inline_kernels=True)

