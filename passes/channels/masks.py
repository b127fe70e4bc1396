"""Channel masks in the graph: multiply each sink's input by the masks of the groups it holds.

Before (a consumer of a pruned group)::

    conv2 = self.conv2(relu_1)

After::

    mask = self.conv1.out_channel_mask            # one entry per class of conv1's group
    view = mask.view(1, 16, 1, 1).type_as(relu_1)  # (a gather when classes and channels differ)
    mul = torch.mul(relu_1, view)
    conv2 = self.conv2(mul)

A sink reading channels of several groups, or of heads (several channels per class), reads
``torch.cat([masks..., ones(1)])[index]`` with ``index`` a non-persistent buffer of the graph
module: the class of every entry, or the trailing one for entries no mask covers.
"""
from __future__ import annotations

import operator
from typing import Any, cast

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..attrs import fetch_attr, unique_attr_name
from .groups import ChannelAnalysis, Sink

__all__ = ["InsertChannelMasks", "RemoveChannelMasks", "CHANNEL_MASK_META", "CHANNEL_GROUPS_META", "MASKED_NORM_META",
           "mark_part", "node_refs"]

CHANNEL_MASK_META = "channel_mask"  # on each masking mul: the mask fqns it reads
CHANNEL_GROUPS_META = "channel_groups"  # and the group each mask is for (printing reads it)
MASKED_NORM_META = "masked_norm"  # on a norm ``masked_norms`` rewrote: what it was, and a note for the printed graph
_PART_META = "channel_mask_part"  # on the nodes that build a mask


class InsertChannelMasks(PassBase):
    """``masks``: group index -> fqn of its mask buffer (one entry per class of the group)."""

    def __init__(self, analysis: ChannelAnalysis, masks: dict[int, str]):
        super().__init__()
        self.analysis, self.masks = analysis, masks

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {node.name: node for node in gm.graph.nodes}
        made: dict[tuple, fx.Node] = {}
        changed = False
        for sink in self.analysis.sinks:
            groups = self.analysis.group_of[sink.ids]
            involved = [g for g in groups.unique().tolist() if g in self.masks]
            if not involved:
                continue
            source, node = nodes[sink.source], nodes[sink.node]
            key = (sink.source, tuple(sink.ids.shape), tuple(sink.ids.reshape(-1).tolist()))
            masked = made.get(key)
            if masked is None:
                with gm.graph.inserting_before(node):
                    mask = self._mask(gm, sink, involved, groups)
                    mask = _part(gm.graph.call_method("type_as", (mask, source)))
                    masked = gm.graph.call_function(torch.mul, (source, mask))
                masked.meta[CHANNEL_MASK_META] = [self.masks[g] for g in involved]
                masked.meta[CHANNEL_GROUPS_META] = {self.masks[g]: self.analysis.groups[g] for g in involved}
                made[key] = masked
            if isinstance(sink.arg, int):
                node.update_arg(sink.arg, masked)
            else:
                node.update_kwarg(sink.arg, masked)
            changed = True
        return PassResult(gm, changed)

    def _mask(self, gm: fx.GraphModule, sink: Sink, involved: list[int], groups: torch.Tensor) -> fx.Node:
        classes = self.analysis.class_of[sink.ids]
        shape = tuple(sink.ids.shape)
        graph = gm.graph
        if len(involved) == 1 and bool((groups == involved[0]).all()):
            flat = classes.reshape(-1)
            size = self.analysis.groups[involved[0]].num_classes
            if flat.numel() == size and torch.equal(flat, torch.arange(size)):
                mask = _part(graph.get_attr(self.masks[involved[0]]))
                return _part(graph.call_method("view", (mask, shape)))
        offsets, parts, total = {}, [], 0
        for g in involved:
            offsets[g] = total
            total += self.analysis.groups[g].num_classes
            parts.append(_part(graph.get_attr(self.masks[g])))
        device = fetch_attr(gm, self.masks[involved[0]]).device  # the index lives with the masks
        index = torch.full(shape, total, dtype=torch.long)
        for g in involved:
            mine = groups == g
            index[mine] = classes[mine] + offsets[g]
        name = unique_attr_name(gm, "_channel_mask_index")
        gm.register_buffer(name, index.to(device), persistent=False)
        parts.append(_part(graph.call_method("new_ones", (parts[0], (1,)))))
        table = _part(graph.call_function(torch.cat, (parts,)))
        return _part(graph.call_function(operator.getitem, (table, _part(graph.get_attr(name)))))


def _part(node: fx.Node) -> fx.Node:
    node.meta[_PART_META] = True
    return node


mark_part = _part  # a node that only serves the masks: erased with them once unused


class _Ref:
    """A node named in a rewritten node's record of what it was (a copied graph shares its nodes' meta)."""

    def __init__(self, name: str):
        self.name = name


def node_refs(a: Any) -> Any:
    """``a`` (a node's arguments) with each node replaced by its name, to keep in ``node.meta``."""
    return fx.node.map_aggregate(a, lambda v: cast(Any, _Ref(v.name)) if isinstance(v, fx.Node) else v)


def _unmask_norms(gm: fx.GraphModule) -> bool:
    """Put back each node ``masked_norms.MaskNorms`` rewrote (op, target and arguments as they were)."""
    nodes = {node.name: node for node in gm.graph.nodes}
    changed = False
    for node in gm.graph.nodes:
        was = node.meta.pop(MASKED_NORM_META, None)
        if was is None:
            continue
        back = fx.node.map_aggregate((was["args"], was["kwargs"]),
                                     lambda v: nodes[v.name] if isinstance(v, _Ref) else v)
        node.op, node.target = was["op"], was["target"]
        node.args, node.kwargs = back[0], back[1]
        changed = True
    return changed


class RemoveChannelMasks(PassBase):
    """Undo :class:`InsertChannelMasks` (and ``masked_norms.MaskNorms``): each masked norm back to what it was,
    each masking mul replaced by its input, the mask nodes and index buffers gone."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = _unmask_norms(gm)
        for node in list(gm.graph.nodes):
            if node.meta.get(CHANNEL_MASK_META):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                changed = True
        for node in reversed(list(gm.graph.nodes)):
            if node.meta.get(_PART_META) and not node.users:
                gm.graph.erase_node(node)
        for name in [n for n, _ in gm.named_buffers(recurse=False) if n.startswith("_channel_mask_index")]:
            delattr(gm, name)
        return PassResult(gm, changed)
