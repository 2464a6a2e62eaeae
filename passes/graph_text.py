"""A stable, readable text form of an FX graph, for graph diffs and expecttests.

FX node names depend on trace history and placeholder names change across torch
versions, so the text renames every node: graph inputs become ``in0, in1, ...`` and every
other node ``<op>_<k>``, numbered by first appearance of that op. Values carry dtype and
shape (no strides, no devices). Nothing else from the node metadata is printed.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "b8",
}
for _name, _short in (("float8_e4m3fn", "f8e4m3"), ("float8_e5m2", "f8e5m2")):
    if hasattr(torch, _name):
        _DTYPE_SHORT[getattr(torch, _name)] = _short


def target_name(node: fx.Node) -> str:
    """``aten.index_put``, ``attnfuse.rope_write_kv``, ``auto_functionalized``, ``getitem``."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        overload = t._overloadname
        return f"{ns}.{name}" + ("" if overload == "default" else f".{overload}")
    if isinstance(t, torch._ops.HigherOrderOperator):
        return t.name()
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def _value_type(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dt = _DTYPE_SHORT.get(val.dtype, str(val.dtype).replace("torch.", ""))
        return f"{dt}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_value_type(v) for v in val) + ")"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return type(val).__name__
    return ""


def _fmt(arg: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(arg, fx.Node):
        return names.get(arg, arg.name)
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt(a, names) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v, names)}" for k, v in arg.items()) + "}"
    if isinstance(arg, torch.dtype):
        return _DTYPE_SHORT.get(arg, str(arg))
    if isinstance(arg, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return _op_str(arg)
    if isinstance(arg, float):
        return repr(arg)
    if isinstance(arg, torch.device):
        return "device"
    return repr(arg)


def _op_str(op: Any) -> str:
    if isinstance(op, torch._ops.OpOverload):
        name = op._schema.name.split("::")[-1]
        return f"{op.namespace}.{name}" + ("" if op._overloadname == "default" else f".{op._overloadname}")
    return op.name()


def graph_text(graph: fx.Graph | fx.GraphModule) -> str:
    """The normalized text of ``graph``."""
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    names: dict[fx.Node, str] = {}
    seen: Counter[str] = Counter()
    lines = []
    n_inputs = 0
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            names[node] = f"in{n_inputs}"
            n_inputs += 1
            lines.append(f"{names[node]}: {_value_type(val)}")
            continue
        if node.op == "output":
            lines.append(f"return {_fmt(node.args[0], names)}")
            continue
        if node.op == "get_attr":
            base = "attr"
        else:
            full = target_name(node)  # "aten.add.Tensor" -> "add"
            base = full.split(".")[1] if "." in full else full
        k = seen[base]
        seen[base] += 1
        names[node] = base if k == 0 else f"{base}_{k}"
        args = [_fmt(a, names) for a in node.args]
        args += [f"{k_}={_fmt(v, names)}" for k_, v in node.kwargs.items()]
        callee = target_name(node) if node.op != "get_attr" else f"get_attr {node.target!r}"
        typ = _value_type(val)
        lines.append(f"{names[node]}{': ' + typ if typ else ''} = {callee}({', '.join(args)})")
    return "\n".join(lines)
