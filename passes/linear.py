"""What a linear op looks like in a graph, for the passes that look for one."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["LINEAR_TARGETS", "is_linear", "linear_args", "set_linear_input"]

#: ``F.linear`` (what ``symbolic_trace`` and module inlining record) and ``aten.linear`` (torch.export).
LINEAR_TARGETS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def linear_args(node: fx.Node) -> tuple:
    """``(input, weight, bias)`` of a linear node, however they were passed (bias None if absent)."""
    # torch types root as a Module, but reads it only for call_module nodes; a linear is a call_function, and a
    # graph made without a GraphModule has no owning module (None).
    normalized = node.normalized_arguments(node.graph.owning_module,  # type: ignore[arg-type]
                                           normalize_to_only_use_kwargs=True)
    if normalized is not None:
        kwargs = normalized.kwargs
        return kwargs["input"], kwargs["weight"], kwargs.get("bias")
    args = list(node.args) + [None] * (3 - len(node.args))
    return tuple(node.kwargs.get(name, args[i]) for i, name in enumerate(("input", "weight", "bias")))


def set_linear_input(node: fx.Node, value: fx.Node) -> None:
    if node.args:
        node.update_arg(0, value)
    else:
        node.update_kwarg("input", value)
