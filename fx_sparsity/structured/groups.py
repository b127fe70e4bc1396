"""Channel dependency groups of a traced CNN: which channels must be removed together.

A *channel space* is the channel dim of a value in the graph (dim 1 of NCHW, the last dim of a
Linear's output); a value's channels are one or more spaces side by side (*segments*: ``cat``
along channels puts its inputs' segments end to end). A Conv2d (not grouped) or Linear starts a
new space for its output and *consumes* its input's segments; BatchNorm, activations, pooling,
dropout and depthwise convolutions carry the segments through; ``add`` makes its operands'
spaces one (a residual block's producers share their channels); ``flatten`` after pooling
carries them into a Linear (each channel is ``h·w`` features when the map is not 1×1). A
*group* is a set of joined spaces: its producers' output channels, and the matching channels
(at each segment's offset) of its norm layers, depthwise convolutions and consumers' inputs
are removed together. A group is prunable when every op touching it is one of these and
none of its values is a graph output; otherwise it is left out, with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["ChannelGroup", "find_channel_groups"]

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Dropout, nn.Identity,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, torch.sigmoid, F.dropout,
                   F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d)
_ADD = (operator.add, torch.add, operator.iadd)


@dataclass
class ChannelGroup:
    """Channels removed together; ``size`` of them. Positions are ``(fqn, offset)``: the group's channels
    start at ``offset`` in that module's channels (more than 0 after a ``cat``)."""

    size: int
    producers: list[str] = field(default_factory=list)  # Conv2d/Linear fqns whose output channels these are
    norms: list[tuple[str, int]] = field(default_factory=list)  # BatchNorm fqns over them
    depthwise: list[tuple[str, int]] = field(default_factory=list)  # depthwise convs carrying them
    consumers: list[tuple[str, int, int]] = field(default_factory=list)  # (fqn, offset, features per channel)
    grouped: list[str] = field(default_factory=list)  # grouped convs (in == out channels) carrying them
    balance: int = 1  # channels go in equal numbers from each of `balance` contiguous blocks (grouped convs)
    head_dim: int = 1  # channels go in whole runs of `head_dim` (attention heads)
    head_splits: list[str] = field(default_factory=list)  # view/reshape nodes splitting (.., H * D) into (.., H, D)
    head_merges: list[str] = field(default_factory=list)  # view/reshape nodes merging the heads back
    problem: str | None = None  # why the group cannot be pruned, if it cannot


Segments = list[tuple[int, int]]  # (space key, size), in channel order


class _Spaces:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.groups: dict[int, ChannelGroup] = {}

    def new(self, size: int) -> int:
        key = len(self.parent)
        self.parent[key] = key
        self.groups[key] = ChannelGroup(size)
        return key

    def find(self, key: int) -> int:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.groups.pop(b), self.groups[a]
        if ga.size != gb.size:
            gb.problem = gb.problem or f"joins {gb.size} and {ga.size} channels"
        for name in ("producers", "norms", "consumers", "depthwise", "grouped", "head_splits", "head_merges"):
            getattr(gb, name).extend(getattr(ga, name))
        if 1 not in (ga.head_dim, gb.head_dim) and ga.head_dim != gb.head_dim:
            gb.problem = gb.problem or f"joins heads of {gb.head_dim} and {ga.head_dim} channels"
        gb.head_dim = max(ga.head_dim, gb.head_dim)
        if ga.balance != gb.balance and 1 not in (ga.balance, gb.balance):
            gb.problem = gb.problem or f"joins channels split into {gb.balance} and {ga.balance} groups"
        gb.balance = max(ga.balance, gb.balance)
        gb.problem = gb.problem or ga.problem
        self.parent[b] = a
        return a

    def group(self, key: int) -> ChannelGroup:
        return self.groups[self.find(key)]

    def refuse(self, segments: Segments, why: str) -> None:
        for key, _ in segments:
            group = self.group(key)
            group.problem = group.problem or why


def _with_offsets(segments: Segments) -> list[tuple[int, int, int]]:
    out, offset = [], 0
    for key, size in segments:
        out.append((key, offset, size))
        offset += size
    return out


def find_channel_groups(gm: fx.GraphModule, example_inputs: tuple) -> list[ChannelGroup]:
    """The channel groups of ``gm`` (a ``symbolic_trace`` with standard layers as ``call_module``)."""
    ShapeProp(gm).propagate(*example_inputs)
    spaces = _Spaces()
    segments_of: dict[fx.Node, Segments] = {}
    headed: dict[fx.Node, int] = {}  # values split into attention heads -> their space key
    features_per_channel: dict[fx.Node, int] = {}  # a flattened map: each channel is h*w features

    def shape(node) -> tuple:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def refuse_inputs(node: fx.Node, why: str) -> None:
        for arg in node.all_input_nodes:
            if arg in segments_of:
                spaces.refuse(segments_of[arg], why)

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            refuse_inputs(node, "its channels are a model output")
            continue
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        incoming = segments_of.get(source) if source is not None else None
        fqn = str(node.target)
        if _follow_heads(node, source, incoming, headed, segments_of, spaces, shape):
            continue
        if isinstance(module, nn.Conv2d):
            if incoming is not None and module.groups == module.in_channels == module.out_channels:
                for key, offset, _ in _with_offsets(incoming):
                    spaces.group(key).depthwise.append((fqn, offset))
                segments_of[node] = incoming
                continue
            if (module.groups != 1 and incoming is not None and len(incoming) == 1
                    and module.in_channels == module.out_channels):
                # ResNeXt's grouped 3x3: output channel c of conv-group k reads that group's inputs; the same
                # channels go from input and output, in equal numbers from every conv-group
                key = incoming[0][0]
                group = spaces.group(key)
                if group.balance not in (1, module.groups):
                    group.problem = group.problem or f"grouped convolution '{fqn}' splits channels another way"
                group.balance = module.groups
                group.grouped.append(fqn)
                group.consumers.append((fqn, 0, 1))
                segments_of[node] = incoming
                continue
            if module.groups != 1:
                refuse_inputs(node, f"grouped convolution '{fqn}' (groups={module.groups}) with in_channels != "
                                    f"out_channels")
            elif incoming is not None:
                for key, offset, _ in _with_offsets(incoming):
                    spaces.group(key).consumers.append((fqn, offset, 1))
            out = spaces.new(module.out_channels)
            spaces.group(out).producers.append(fqn)
            segments_of[node] = [(out, module.out_channels)]
        elif isinstance(module, nn.Linear):
            if incoming is not None:
                per_channel = features_per_channel.get(source, 1)
                for key, offset, _ in _with_offsets(incoming):
                    spaces.group(key).consumers.append((fqn, offset, per_channel))
            out = spaces.new(module.out_features)
            spaces.group(out).producers.append(fqn)
            segments_of[node] = [(out, module.out_features)]
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)) and incoming is not None:
            for key, offset, _ in _with_offsets(incoming):
                spaces.group(key).norms.append((fqn, offset))
            segments_of[node] = incoming
        elif (isinstance(module, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCTIONS)
              or (node.op == "call_method" and node.target in ("relu", "relu_"))) and incoming is not None:
            segments_of[node] = incoming
        elif node.op == "call_function" and node.target in _ADD and incoming is not None:
            others = [a for a in node.args[1:] if isinstance(a, fx.Node)]
            joined = list(incoming)
            for other in others:
                theirs = segments_of.get(other)
                if theirs is None and other.op == "placeholder":
                    spaces.refuse(joined, "its channels are added to a model input")
                    continue
                if theirs is None or [s for _, s in theirs] != [s for _, s in joined]:
                    spaces.refuse(joined + (theirs or []), f"'{node.name}' adds values whose channels do not line up")
                    continue
                joined = [(spaces.union(a, b), size) for (a, size), (b, _) in zip(joined, theirs)]
            segments_of[node] = joined
        elif node.op == "call_function" and node.target is torch.cat:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            parts = [segments_of.get(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [None]
            if dim not in (1, -3) or len(shape(node)) != 4 or any(p is None for p in parts):
                refuse_inputs(node, f"'{node.name}' concatenates along a dim other than channels, or values "
                                    f"whose channels are not followed")
                continue
            segments_of[node] = [segment for part in parts for segment in part]  # type: ignore[union-attr]
        elif ((node.op == "call_function" and node.target is torch.flatten) or isinstance(module, nn.Flatten)
              or (node.op == "call_method" and node.target in ("flatten", "view", "reshape"))) \
                and incoming is not None and len(shape(source)) == 4:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if isinstance(module, nn.Flatten):
                start = module.start_dim if module.end_dim == -1 else None
            elif node.op == "call_method" and node.target != "flatten":
                start = 1 if len(shape(node)) == 2 and shape(node)[0] == shape(source)[0] else None
            if start != 1:
                refuse_inputs(node, f"'{node.name}' reshapes the channels")
                continue
            _, _, h, w = shape(source)
            segments_of[node] = incoming
            features_per_channel[node] = h * w
        elif any(arg in segments_of for arg in node.all_input_nodes):
            refuse_inputs(node, f"'{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}) is not an "
                                f"op whose channel coupling fx_sparsity follows")
    for node, key in headed.items():  # a head-split value reaching an op not followed
        if any(user not in headed and user not in segments_of for user in node.users):
            spaces.refuse([(key, 0)], f"the heads of '{node.name}' reach an op fx_sparsity does not follow")
    return [group for group in spaces.groups.values() if group.producers or group.problem]


_HEAD_METHODS = ("transpose", "permute", "contiguous", "softmax", "float", "type_as")
_HEAD_FUNCTIONS = (torch.transpose, torch.permute, F.softmax, torch.softmax, F.dropout, operator.mul, operator.truediv,
                   torch.mul, torch.div)
_MATMUL = (operator.matmul, torch.matmul, torch.bmm)


def _follow_heads(node: fx.Node, source, incoming, headed: dict, segments_of: dict, spaces: _Spaces, shape) -> bool:
    """Attention heads: a Linear's output split (view/reshape) into (H, D), moved about, multiplied with
    another head-split value (q·kᵀ, attention·v: the same heads go from both), merged back and read by
    the output projection. Returns True when ``node`` was one of these."""
    is_reshape = node.op == "call_method" and node.target in ("view", "reshape")
    if is_reshape and incoming is not None and len(incoming) == 1 and source not in headed:
        before, after = shape(source), shape(node)
        if (len(after) == len(before) + 1 and after[:-2] == before[:-1] and len(after) >= 3
                and after[-2] * after[-1] == before[-1] and after[-2] > 1 and after[-1] > 1):
            key = incoming[0][0]
            group = spaces.group(key)
            if group.head_dim not in (1, after[-1]):
                group.problem = group.problem or "splits channels into heads of another size"
            group.head_dim = after[-1]
            group.head_splits.append(node.name)
            headed[node] = key
            return True
        return False
    inputs = [a for a in node.all_input_nodes if a in headed]
    if not inputs:
        return False
    if is_reshape and source in headed:  # merge: (.., H, D) back into one channel dim
        key = headed[source]
        group = spaces.group(key)
        size = group.size
        if shape(node) and shape(node)[-1] == size:
            group.head_merges.append(node.name)
            segments_of[node] = [(key, size)]
            return True
        spaces.refuse([(key, size)], f"'{node.name}' reshapes attention heads another way")
        return True
    if node.op == "call_function" and node.target in _MATMUL and len(inputs) == 2:
        headed[node] = spaces.union(headed[inputs[0]], headed[inputs[1]])
        return True
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention and len(inputs) == 3:
        key = spaces.union(spaces.union(headed[inputs[0]], headed[inputs[1]]), headed[inputs[2]])
        headed[node] = key
        return True
    if ((node.op == "call_method" and node.target in _HEAD_METHODS)
            or (node.op == "call_function" and node.target in _HEAD_FUNCTIONS)) and len(inputs) == 1 \
            and not any(isinstance(a, fx.Node) and a not in headed for a in node.all_input_nodes):
        headed[node] = headed[inputs[0]]
        return True
    for value in inputs:
        spaces.refuse([(headed[value], 0)], f"'{node.name}' uses attention heads in a way fx_sparsity does not follow")
    return True
