"""Following the channels through a graph: each node handed to its rule, in graph order.

Placeholders hold nothing followed; a ``get_attr`` holds its tensor (a parameter's dims are
followed where it is used); the output fixes every channel it returns. A node none of whose
inputs is followed is skipped (unless it is a layer that makes channels, such as a Linear on a
model input). A node no rule understands refuses the groups of its inputs, with the reason.
"""
from __future__ import annotations

from typing import cast

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from ..attrs import fetch_attr
from .groups import ChannelAnalysis
from .registry import ChannelRule, module_rule, op_rule
from .solver import solve
from .tracker import Refuse, Tracker, flat_blocks, op_name, tensor_nodes
from .values import Block, Many, broadcast_form

__all__ = ["find_channel_groups"]

_BUILTIN_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed", "higher_order"})


def find_channel_groups(gm: fx.GraphModule, inputs: list) -> ChannelAnalysis:
    """The channel groups of ``gm``, followed on ``inputs`` (its placeholders' values: ShapeProp runs the
    graph once on them to learn every value's shape; the caller keeps buffers and RNG as they were)."""
    ShapeProp(gm).propagate(*inputs)
    tracker = Tracker(gm)
    for node in gm.graph.nodes:
        follow_node(tracker, node)
    return solve(tracker)


def follow_node(t: Tracker, node: fx.Node) -> None:
    if node.op == "placeholder":
        return
    if node.op == "get_attr":
        found = fetch_attr(t.gm, str(node.target))
        if isinstance(found, torch.Tensor):
            t.values[node] = found
        return
    if node.op == "output":  # (a node of several outputs returned whole: each of them)
        returned = []
        for a in tensor_nodes(node.args):
            found = t.values.get(a)
            returned.append(found if isinstance(found, Many) else t.value(a))
        for block in flat_blocks(returned):
            t.fix(block.ids, "its channels are a model output")
        return
    module = t.module(node) if node.op == "call_module" else None
    rule = module_rule(module) if module is not None else op_rule(node)
    makes = module is not None and rule is not None and rule.makes_channels  # a layer on an input still makes them
    if not any(t.followed(a) for a in node.all_input_nodes) and not makes:
        return
    why: str | None = None
    try:
        if module is not None:
            _refuse_parametrized(t, node, module)
            handled = rule is not None and rule.follow_module(t, node, module)
        else:
            handled = rule is not None and rule.follow(t, node)
    except Refuse as e:
        handled, why = False, str(e)
    if not handled:
        what = type(module).__name__ if module is not None else op_name(node)
        t.refuse([t.value(a) for a in node.all_input_nodes],
                 why or f"'{node.name}' ({what}) is not an op whose channel coupling fx_sparsity follows"
                 f"{_how_to_describe(node, module, rule)}")


def _how_to_describe(node: fx.Node, module: nn.Module | None, rule: ChannelRule | None) -> str:
    """For a layer or custom op without a rule: how the user can teach it."""
    if rule is not None:
        return ""
    if module is not None:
        target = type(module).__name__
    elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in _BUILTIN_NAMESPACES:
        target = f"torch.ops.{node.target.namespace}.{node.target.overloadpacket.__name__}"
    else:
        return ""
    return (f"; describe it with fx_sparsity.register_channel_rule({target}, \"same\") (its output channels are "
            f"its input's) or \"fixed\" (never pruned)")


def _refuse_parametrized(t: Tracker, node: fx.Node, m: nn.Module) -> None:
    """A parametrized layer (weight_norm, spectral_norm) makes its weight anew at each call: refused, with how."""
    if not parametrize.is_parametrized(m):
        return
    parametrizations = cast(nn.ModuleDict, m.parametrizations)
    why = (f"'{node.target}' ({parametrize.type_before_parametrizations(m).__name__}) computes its "
           f"{', '.join(parametrizations)} from a parametrization; remove it "
           f"(torch.nn.utils.parametrize.remove_parametrizations) to prune these channels")
    plist = next(iter(parametrizations.values()))
    original = getattr(plist, "original", getattr(plist, "original0", None))
    shape = t.shape(node)
    at = len(shape) - 1 if shape is not None and isinstance(m, nn.Linear) else 1  # its output channels
    if isinstance(original, torch.Tensor) and shape is not None and len(shape) > at \
            and original.shape[0] == shape[at]:  # refused, with the reason
        t.values[node] = (Block((at,), broadcast_form(t.space(original, 0), at, len(shape))),)
        t.refuse(t.values[node], why)
    raise Refuse(why)
