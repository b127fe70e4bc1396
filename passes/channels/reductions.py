"""Reductions over channels, and ops that mix them along a dim (softmax, cumsum).

Sums are sinks (masked before, they add what the cut model adds); means and variances over every
channel of a block normalise them: their input is a sink and, where the group is masked, the masked
graph takes them over the kept channels only (``masked_norms``; a norm of the masked input already
is). Other reductions fix them. Over some of a block's dims only (a head's head_dim), the block is
joined along them instead, so whole heads can still go. A softmax along a channel dim joins it the
same way.
"""
from __future__ import annotations

from torch import fx, nn

from .elementwise import elementwise
from .registry import ChannelRule, channel_rule
from .tracker import Tracker, arg, dims, input_rank, module_or_node, op_name, tensor_nodes
from .values import Block, Many, blocks

__all__: list[str] = []

_SUM = frozenset({"sum"})
_MEAN = frozenset("mean var std var_mean std_mean norm linalg_vector_norm".split())
_OTHER = frozenset("amax amin max min logsumexp prod all any argmax argmin count_nonzero".split())


@channel_rule(*sorted(_SUM | _MEAN | _OTHER))
class Reduce(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        found = input_rank(t, node)
        if found is None:
            return False
        x, ndim = found
        if name in ("max", "min") and isinstance(arg(node, 1, "dim"), fx.Node):  # max(a, b): elementwise
            return elementwise(t, node, tensor_nodes(node.args))
        norm = name in ("norm", "linalg_vector_norm")
        variance = name in ("var", "std", "var_mean", "std_mean")
        dim = arg(node, 2 if norm else 1, "dim")
        if isinstance(dim, fx.Node):
            return False
        unbiased = arg(node, 2, "unbiased", True) if variance else True
        if isinstance(dim, bool):  # torch.var(x, unbiased)
            dim, unbiased = None, dim
        reduced = dims(dim, ndim)
        keepdim = node.kwargs.get("keepdim")
        if keepdim is None:
            position = 3 if norm or variance else 2
            keepdim = arg(node, position, "keepdim", False)
            keepdim = keepdim if isinstance(keepdim, bool) else False
        given = node.kwargs.get("correction")
        correction = float(given) if isinstance(given, (int, float)) else 1.0 if unbiased is not False else 0.0
        order = arg(node, 1, "p" if name == "norm" else "ord", 2) if norm else None
        out = []
        for blk in t.value(x):
            inside = [d for d in blk.dims if d in reduced]
            if inside:
                whole = set(blk.dims) <= set(reduced)
                if whole and name in _SUM:
                    t.sink(node, 0, x, blk)
                elif whole and norm:  # a norm of the masked input is the cut one's
                    what = module_or_node(node, name)
                    t.soft.append((blk.ids.reshape(-1), f"{what} normalises them together"))
                    t.sink(node, 0, x, blk)
                    if isinstance(order, (int, float)) and order < 0:
                        t.inexact.append((blk.ids.reshape(-1), f"{what} takes a norm of negative order over them"))
                elif whole and name in _MEAN:
                    t.normalise(node, x, blk, name, module_or_node(node, name),
                                dims=tuple(reduced), keepdim=bool(keepdim), correction=correction)
                elif whole:
                    t.fix(blk.ids, f"'{node.name}' ({name}) reduces over them")
                else:
                    for d in inside:
                        t.union(blk.ids, blk.ids.narrow(d, 0, 1))
            ids = blk.ids
            for d in inside:
                ids = ids.narrow(d, 0, 1)
            kept = [d for d in range(ndim) if keepdim or d not in reduced]
            ids = ids.reshape([ids.shape[d] for d in kept])
            held = tuple(kept.index(d) for d in blk.dims if d not in reduced)
            out.append(Block(held, ids) if held else None)
        value = blocks(out)
        t.values[node] = Many([value, value]) if t.shape(node) is None else value
        return True


def along_dims(t: Tracker, node: fx.Node, x: object, along: list[int], name: str) -> bool:
    """``x`` mixed along ``along`` (each output entry reads every input entry there): blocks are joined along
    those dims (fixed where it is their only one)."""
    for blk in t.value(x):
        for d in along:
            if d in blk.dims:
                t.join_along(blk, d, f"'{node.name}' ({name}) mixes them")
    t.values[node] = t.value(x)
    return True


@channel_rule("softmax", "log_softmax", "_softmax", "_log_softmax", "cumsum", "cumprod",
              modules=(nn.Softmax, nn.LogSoftmax))
class Along(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        x = node.args[0]
        return along_dims(t, node, x, dims(arg(node, 1, "dim"), len(t.shape(x) or ())), op_name(node))

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        x = node.args[0] if node.args else None
        return along_dims(t, node, x, dims(getattr(module, "dim", None), len(t.shape(x) or ())), "softmax")
