"""Let Inductor launch the ops' Triton kernels itself (host time per decode step).

A call of an ``attnfuse::`` op from compiled code goes through the dispatcher, the op's
Python body (validation, settings, buffer allocation) and its launcher: 130-160 us of
host time per call on H100 hosts against 20-40 us for one Inductor kernel launch
(``benchmarks/results/host_overhead.md``). Without CUDA graphs that host time is the
decode step time at small batch. After the fusions ran, this step replaces each op call
whose inputs are static-shaped CUDA tensors by what the call would do at run time:

* the buffers it would allocate become ``empty`` nodes (Inductor plans them);
* each kernel launch becomes a ``triton_kernel_wrapper_functional`` node, the form
  ``torch.library.wrap_triton`` produces: the kernel, its grid and its scalar arguments
  fixed now, its tensor arguments graph values, ``tensors_to_clone`` the tensors it
  writes. Inductor's reinplacing turns the writes into writes of the buffers themselves
  (no clone: they are fresh ``empty`` nodes) and its code generation launches the kernel
  from the compiled module, like its own kernels.

The launches come from the same planning function the op runs
(``kernels.grouped_decode.plan_grouped_decode``), applied to the nodes' fake tensors, so
settings, grid and strides are the op's own. A call is left as it is (and still correct)
when a shape or stride is symbolic (the settings depend on sizes), a tensor is not on
CUDA, an input needs a copy the op would make (last dim not contiguous), or its results
are used other than by indexing. The report and the graph observers see the op calls
(this runs after them). ``options={"inline_kernels": False}`` turns it off.
"""

from __future__ import annotations

import copy as copy_module
import functools
import logging
import operator
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..fusions.base import fake_value

log = logging.getLogger("attnfuse")

#: (kernel, num_warps, num_stages) -> the single-config autotuner Inductor gets
_WRAPPED: dict[tuple[Any, int, int], Any] = {}


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*t.shape, *t.stride()))


def _bind(node: fx.Node) -> dict[str, Any]:
    """The op call's arguments by schema name (defaults filled)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = getattr(arg, "default_value", None)
    return out


def _wrapped(fn: Any, num_warps: int, num_stages: int) -> Any:
    """``fn`` as a one-config autotuner: how Inductor takes a user kernel's warps and stages."""
    import triton

    key = (fn, num_warps, num_stages)
    if key not in _WRAPPED:
        _WRAPPED[key] = triton.autotune(
            configs=[triton.Config({}, num_warps=num_warps, num_stages=num_stages)], key=[])(fn)
        _AUTOTUNERS[id(_WRAPPED[key])] = fn
        _OURS.add(id(fn))
    _install_ttir_memo()
    _install_early_compile()
    _install_direct_decomposition()
    return _WRAPPED[key]


# ------------------------------------------------------------------ compile time
# Inductor finds what a user kernel reads and writes by generating its TTIR (Triton's
# front end) and walking it, once per launch node: 12 times for the 3 kernels of 4
# identical layers, about 1 s of a cold compile on an H100 host
# (benchmarks/results/compile_time.md, ``analysis_s``). Both depend only on the kernel and
# its arguments' dtypes, integer values and constexprs, and the analysis names formal
# arguments, not graph buffers. So for our kernels each is made once per such key and
# reused: the TTIR (``generate_ttir``) and the analysis result (``identify_accessed_tensors``,
# ``identify_mutated_tensors`` in older torch), the latter copied for each caller.
# ``ATTNFUSE_TTIR_MEMO=0`` turns both memos off.
#: ids of our JIT functions, and our one-config autotuners -> their JIT function (Inductor
#: analyses the autotuner when it functionalizes and reinplaces, its ``fn`` when it lowers;
#: with one config without kwargs both give the same result, so both share one entry)
_OURS: set[int] = set()
_AUTOTUNERS: dict[int, Any] = {}
_TTIR: dict[tuple, Any] = {}
_ACCESSES: dict[tuple, Any] = {}
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")


def _ours(kernel: Any) -> Any:
    """Our JIT function behind ``kernel`` (itself, or the one our autotuner wraps); None
    for any other kernel."""
    base = _AUTOTUNERS.get(id(kernel), kernel)
    return base if id(base) in _OURS else None


def _patch_once(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``make(original)`` unless it is missing or already ours."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_attnfuse_patch", False):
        return
    patched = make(original)
    patched._attnfuse_patch = True
    setattr(owner, name, patched)


def _ttir_arg_key(v: Any) -> Any:
    dtype = getattr(v, "dtype", None)
    if dtype is None and hasattr(v, "get_dtype"):  # Inductor's TensorBox
        dtype = v.get_dtype()
    if dtype is not None:
        return ("tensor", dtype)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return (type(v), v)
    raise TypeError  # symbolic or unknown: no memo


def _memo_key(kernel: Any, kwargs: dict[str, Any], tma_descriptor_metadata: Any, rest: tuple,
              extra: dict) -> tuple | None:
    """The key our kernel's TTIR and analysis depend on; ``None``: do not memoize."""
    base = _ours(kernel)
    if (base is None or tma_descriptor_metadata or rest or extra
            or os.environ.get("ATTNFUSE_TTIR_MEMO", "1") == "0"):
        return None
    try:
        return (id(base), tuple(sorted((n, _ttir_arg_key(v)) for n, v in kwargs.items())))
    except TypeError:
        return None


def _memoized(original: Callable, table_name: str, copy: bool) -> Callable:
    @functools.wraps(original)
    def wrapper(kernel, kwargs, tma_descriptor_metadata, *rest, **extra):
        key = _memo_key(kernel, kwargs, tma_descriptor_metadata, rest, extra)
        if key is None:
            return original(kernel, kwargs, tma_descriptor_metadata, *rest, **extra)
        table = globals()[table_name]
        if key not in table:
            table[key] = original(kernel, kwargs, tma_descriptor_metadata)
        return copy_module.deepcopy(table[key]) if copy else table[key]

    return wrapper


def _install_ttir_memo() -> None:
    try:
        import torch._higher_order_ops.triton_kernel_wrap as tkw
    except ImportError:  # pragma: no cover
        return
    for name, table_name, copy in (("generate_ttir", "_TTIR", False),
                                   *((n, "_ACCESSES", True) for n in _ANALYSES)):
        _patch_once(tkw, name, functools.partial(_memoized, table_name=table_name, copy=copy))


# Inductor starts compiling each of its own kernels in its worker pool as soon as code
# generation has written the kernel (when the pool is up), so compilation overlaps the
# rest of code generation. A user kernel is only written into the module's source and
# compiled when the module is loaded, after code generation: on a cold cache the module
# then waits for our slowest kernel (about 1 s for the decode kernel on H100 hosts) with
# nothing left to overlap (``async_compile.wait`` +0.5-0.7 s against Inductor alone,
# benchmarks/results/compile_time.md). For our kernels the same early start is made
# here: the ``async_compile.triton(name, source)`` call Inductor writes for the kernel
# is submitted to the pool as it is written, and the module's own call, made with the
# same source when it loads, finds that compilation in Inductor's in-memory cache
# (``CompiledTritonKernels``). ``ATTNFUSE_EARLY_COMPILE=0`` turns this off.
def early_compile_call(code: str) -> tuple[str, str, str] | None:
    """``(kernel_name, source, device_str)`` of the ``async_compile.triton(...)`` call
    ``code`` holds, read as literals (never executed); None if it is anything else."""
    import ast

    try:
        call = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr == "triton" and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "async_compile" and len(call.args) == 2):
        return None
    try:
        name, source = (ast.literal_eval(a) for a in call.args)
        extra = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError:
        return None
    if set(extra) - {"device_str"} or not isinstance(name, str) or not isinstance(source, str):
        return None
    return name, source, extra.get("device_str", "cuda")


def _compile_early(code: str) -> None:
    from torch._inductor.async_compile import AsyncCompile

    call = early_compile_call(code)
    if call is not None and AsyncCompile.use_process_pool():
        name, source, device = call
        AsyncCompile().triton(name, source, device_str=device)


def _install_early_compile() -> None:
    try:
        from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    except ImportError:  # pragma: no cover
        return

    def make(original):
        @functools.wraps(original)
        def define_user_defined_triton_kernel(self, kernel, *args, **kwargs):
            if (_ours(kernel) is None or "define_kernel" in vars(self)
                    or os.environ.get("ATTNFUSE_EARLY_COMPILE", "1") == "0"):
                return original(self, kernel, *args, **kwargs)

            def define_kernel(name, kernel_code, *a, **k):
                try:
                    _compile_early(kernel_code)
                except Exception:  # noqa: BLE001 - an early start is only an optimization
                    pass  # the module compiles the kernel when it loads, as without this
                return type(self).define_kernel(self, name, kernel_code, *a, **k)

            self.define_kernel = define_kernel  # for this call only
            try:
                return original(self, kernel, *args, **kwargs)
            finally:
                del self.define_kernel

        return define_user_defined_triton_kernel

    _patch_once(PythonWrapperCodegen, "define_user_defined_triton_kernel", make)


# After reinplacing, Inductor decomposes each ``triton_kernel_wrapper_functional`` node
# into clones of the tensors it still has to clone and a ``triton_kernel_wrapper_mutation``
# node, tracing that decomposition with make_fx once per node: about 8 ms per launch on a
# 2-core CPU, 0.16 s of a cold compile for the 12 launches of 4 decode layers on an H100
# host. Our launches write fresh buffers and cache inputs, which reinplacing leaves with
# nothing to clone: their decomposition is the mutation node with the same arguments,
# made here directly with the metadata the traced one gets (``val``, ``stack_trace``,
# ``eager_input_vals``). Any other node (a tensor to clone, a user left, another kernel)
# is left to Inductor's decomposition, which runs next. ``ATTNFUSE_DIRECT_DECOMPOSE=0``
# turns this off.
def decompose_our_launches(graph: fx.Graph) -> int:
    """Replace each of our reinplaced functional launches by its mutation node; returns
    how many."""
    import torch.utils._pytree as pytree
    from torch._higher_order_ops.triton_kernel_wrap import (
        kernel_side_table,
        triton_kernel_wrapper_functional,
        triton_kernel_wrapper_mutation,
    )

    done = 0
    for node in graph.find_nodes(op="call_function", target=triton_kernel_wrapper_functional):
        kw = node.kwargs
        kernel = kernel_side_table.get_kernel(kw["kernel_idx"])
        if kw["tensors_to_clone"] or node.users or _ours(kernel) is None:
            continue
        mutation_kwargs = {k: v for k, v in kw.items() if k != "tensors_to_clone"}
        with graph.inserting_before(node):
            mutation = graph.call_function(triton_kernel_wrapper_mutation, (), mutation_kwargs)
        mutation.meta["val"] = node.meta.get("val")
        mutation.meta["stack_trace"] = node.meta.get("stack_trace")
        mutation.meta["eager_input_vals"] = ((), pytree.tree_map(
            lambda x: x.meta.get("val") if isinstance(x, fx.Node) else None, mutation_kwargs))
        graph.erase_node(node)
        done += 1
    return done


def _install_direct_decomposition() -> None:
    try:
        import torch._inductor.fx_passes.post_grad as post_grad
    except ImportError:  # pragma: no cover
        return

    def make(original):
        @functools.wraps(original)
        def decompose(graph):
            if os.environ.get("ATTNFUSE_DIRECT_DECOMPOSE", "1") != "0":
                decompose_our_launches(graph)
            return original(graph)

        return decompose

    _patch_once(post_grad, "decompose_triton_kernel_wrapper_functional", make)


def forget_compiled_analyses() -> None:
    """Empty both memos (benchmarks: a cold start)."""
    _TTIR.clear()
    _ACCESSES.clear()


class _Emitter:
    """Puts planned launches into ``graph`` before ``anchor``."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode: Any) -> None:
        self.graph, self.anchor, self.fake_mode = graph, anchor, fake_mode
        #: id(fake tensor) -> the node holding its current value
        self.node_of: dict[int, fx.Node] = {}
        self._keep: list[torch.Tensor] = []  # ids stay unique while the fakes live

    def bind(self, fake: torch.Tensor, node: fx.Node) -> None:
        self._keep.append(fake)
        self.node_of[id(fake)] = node

    def _call(self, target: Any, args: tuple, kwargs: dict, val: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = val
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        return node

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with self.fake_mode:
            fake = torch.empty(shape, dtype=dtype, device=device)
        self.bind(fake, self._call(torch.ops.aten.empty.memory_format, (list(shape),),
                                   {"dtype": dtype, "device": device}, fake))
        return fake

    def view_dtype(self, fake_in: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        fake = fake_in.view(dtype)
        self.bind(fake, self._call(torch.ops.aten.view.dtype, (self.node_of[id(fake_in)], dtype), {}, fake))
        return fake

    def launch(self, launch: Any) -> None:
        from torch._higher_order_ops.triton_kernel_wrap import (
            kernel_side_table,
            triton_kernel_wrapper_functional,
        )

        fn = launch.launcher.fn
        names = list(fn.arg_names)
        tensors: dict[str, fx.Node] = {}
        constants: dict[str, Any] = dict(launch.constexprs)
        for name, arg in zip(names, launch.args):
            if isinstance(arg, torch.Tensor):
                tensors[name] = self.node_of[id(arg)]
            else:
                constants[name] = arg
        written = [names[i] for i in launch.writes]
        with self.fake_mode:
            val = {n: torch.empty_strided(launch.args[i].shape, launch.args[i].stride(),
                                          dtype=launch.args[i].dtype, device=launch.args[i].device)
                   for n, i in zip(written, launch.writes)}
        hop = self._call(
            triton_kernel_wrapper_functional, (),
            {"kernel_idx": kernel_side_table.add_kernel(_wrapped(fn, launch.num_warps, launch.num_stages)),
             "constant_args_idx": kernel_side_table.add_constant_args(constants),
             # Inductor's launchers take three grid dims
             "grid": [(*launch.grid, *(1,) * (3 - len(launch.grid)))],
             "tma_descriptor_metadata": {}, "kwargs": tensors,
             "tensors_to_clone": written},
            val)
        for name, i in zip(written, launch.writes):
            # later launches read what this one wrote
            self.node_of[id(launch.args[i])] = self._call(operator.getitem, (hop, name), {}, val[name])


def _refusal(node: fx.Node, fakes: dict[str, Any], devices: tuple[str, ...],
             feature_inputs: tuple[str, ...]) -> str | None:
    """Why a call cannot be inlined (``None``: it can). ``feature_inputs`` must have a
    contiguous last dim, as the op would otherwise copy them first."""
    tensors = [v for v in fakes.values() if isinstance(v, torch.Tensor)]
    if any(t.device.type not in devices for t in tensors):
        return "not on CUDA"
    if not all(_static(t) for t in tensors):
        return "symbolic shape or stride"
    if any(isinstance(fakes.get(k), torch.Tensor) and fakes[k].stride(-1) != 1 for k in feature_inputs):
        return "an input with a strided last dim (the op copies it)"
    if not all(u.target is operator.getitem for u in node.users):
        return "a result used other than by indexing"
    return None


def _replace_results(graph: fx.Graph, node: fx.Node, results: list[fx.Node]) -> None:
    """Point each ``node[i]`` at ``results[i]`` and drop the call."""
    for user in list(node.users):
        user.replace_all_uses_with(results[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)


def _inline_grouped_decode(graph: fx.Graph, node: fx.Node, fake_mode: Any,
                           devices: tuple[str, ...]) -> str | None:
    """Replace one ``attnfuse::grouped_decode`` call; returns why not, or ``None``."""
    from ..custom_ops.kernels.grouped_decode import plan_grouped_decode

    a = _bind(node)
    fakes = {k: fake_value(v) for k, v in a.items()}
    tensors = {k: v for k, v in fakes.items() if isinstance(v, torch.Tensor)}
    why = _refusal(node, fakes, devices, ("q", "k_cache", "v_cache"))
    if why is not None:
        return why
    scalars = ("scale", "softcap", "window", "v_head_dim")
    if not all(isinstance(a[k], (int, float)) for k in scalars):
        return "a symbolic scalar argument"
    from ..custom_ops.kernels.grouped_decode import call_settings

    kernel = call_settings(fakes["q"], fakes["k_cache"], fakes["v_cache"], fakes["block_table"],
                           fakes["mask"], float(a["softcap"]), int(a["window"]), fakes["k_scale"],
                           fakes["v_scale"], a["v_head_dim"]).kernel
    if kernel != "triton":
        what = {"sm90": "MLA", "sm90_gqa": "GQA"}[kernel]
        return f"the SM90 {what} kernel is a Gluon kernel (Inductor launches Triton kernels)"
    emit = _Emitter(graph, node, fake_mode)
    for k, t in tensors.items():
        emit.bind(t, a[k])
    mask = fakes["mask"]
    mask_is_bool = mask is not None and mask.dtype == torch.bool
    if mask_is_bool:
        mask = emit.view_dtype(mask, torch.uint8)
    device = fakes["q"].device
    v_head_dim = a["v_head_dim"] if fakes["v_cache"] is None else fakes["v_cache"].shape[-1]
    out, lse, _, launches = plan_grouped_decode(
        fakes["q"], fakes["k_cache"], fakes["v_cache"], block_table=fakes["block_table"],
        seq_lens=fakes["seq_lens"], mask=mask, mask_is_bool=mask_is_bool, scale=float(a["scale"]),
        softcap=float(a["softcap"]), window=int(a["window"]), k_scale=fakes["k_scale"],
        v_scale=fakes["v_scale"], v_head_dim=v_head_dim,
        empty=lambda shape, dtype: emit.empty(shape, dtype, device))
    for launch in launches:
        emit.launch(launch)
    _replace_results(graph, node, [emit.node_of[id(out)], emit.node_of[id(lse)]])
    return None


def _inline_rope_write_kv(graph: fx.Graph, node: fx.Node, fake_mode: Any,
                          devices: tuple[str, ...]) -> str | None:
    """Replace one ``auto_functionalized(attnfuse::rope_write_kv)``: its results are
    ``(q_out, k_out, new k_cache, new v_cache)``, here the launch's outputs."""
    from ..custom_ops.rope_write_kv import plan_kernel

    a = dict(node.kwargs)
    fakes = {k: fake_value(v) for k, v in a.items()}
    tensors = {k: v for k, v in fakes.items() if isinstance(v, torch.Tensor)}
    why = _refusal(node, fakes, devices, ("q", "k", "v", "cos", "sin", "k_cache", "v_cache"))
    if why is not None:
        return why
    if not isinstance(a["rotary_dim"], int):
        return "a symbolic scalar argument"
    emit = _Emitter(graph, node, fake_mode)
    for k, t in tensors.items():
        emit.bind(t, a[k])
    device = fakes["q"].device
    q_out, k_out, launch = plan_kernel(
        fakes["q"], fakes["k"], fakes["v"], fakes["cos"], fakes["sin"], fakes["positions"],
        fakes["k_cache"], fakes["v_cache"], fakes["cache_index"], a["cache_layout"],
        a["rotary_dim"], a["style"], fakes["k_scale"], fakes["v_scale"], a["return_k"],
        empty=lambda shape, dtype: emit.empty(shape, dtype, device))
    if launch is not None:
        emit.launch(launch)
    if k_out is None:
        k_out = emit.empty((0,), fakes["k"].dtype, device)
    _replace_results(graph, node, [emit.node_of[id(t)] for t in (q_out, k_out, fakes["k_cache"], fakes["v_cache"])])
    return None


def _inliner(node: fx.Node) -> Callable[..., str | None] | None:
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    from ..custom_ops import grouped_decode as _gd  # noqa: F401  (registers the ops)
    from ..custom_ops import rope_write_kv as _rw  # noqa: F401

    if node.op != "call_function":
        return None
    if node.target is torch.ops.attnfuse.grouped_decode.default:
        return _inline_grouped_decode
    if (node.target is auto_functionalized and node.args
            and node.args[0] is torch.ops.attnfuse.rope_write_kv.default):
        return _inline_rope_write_kv
    return None


def inline_kernels(graph: fx.Graph, *, devices: tuple[str, ...] = ("cuda",),
                   strict: bool = True) -> dict[str, int]:
    """Inline every eligible op call of ``graph``; returns ``{"inlined": n, <reason>: n}``.

    ``devices``: where calls are inlined. Inductor launches user kernels on CUDA only;
    tests add ``"cpu"`` to run the inlined graph eagerly under Triton's interpreter.
    ``strict=False``: a call whose inlining raises keeps its op call (the nodes made for
    it are erased; a whole-graph copy to restore would cost more than the step) and is
    counted under ``"raised <error type>"``.
    """
    from torch._guards import detect_fake_mode

    calls = [(n, f) for n in graph.nodes if (f := _inliner(n)) is not None]
    counts: dict[str, int] = {}
    if not calls:
        return counts
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    if fake_mode is None:
        return {"no fake tensors on the graph": len(calls)}
    for node, inline in calls:
        before = node.prev
        try:
            why = inline(graph, node, fake_mode, devices)
        except Exception as exc:
            if strict or not _erase_between(graph, before, node):
                raise
            why = f"raised {type(exc).__name__}"
            log.warning("attnfuse: inlining %s raised %s: %s; op call kept", node.name,
                        type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        key = "inlined" if why is None else why
        counts[key] = counts.get(key, 0) + 1
    return counts


def _erase_between(graph: fx.Graph, first_prev: fx.Node, node: fx.Node) -> bool:
    """Erase the nodes an inlining put between ``first_prev`` and the call ``node``;
    ``False`` (nothing erased) when one of them is already used outside them: the call was
    partly rewired and cannot be put back."""
    made = []
    cur = first_prev.next
    while cur is not node:
        made.append(cur)
        cur = cur.next
    inside = set(made)
    if any(user not in inside for n in made for user in n.users):
        return False
    for n in reversed(made):
        graph.erase_node(n)
    return True
