"""Shape ops that take channels apart or put them together: cat/stack, slices, getitem, gather, split.

Along a dim holding channels, ``cat`` puts its operands' ids end to end; a slice, ``narrow``,
``select`` or ``split`` takes a part of them; a constant index (a buffer) gathers them. After a cut
their bounds are rewritten on the kept channels, and ``chunk``/``split`` become
``split_with_sizes`` with the new sizes::

    q, k, v = qkv.split(64, dim=-1)                   # before
    q, k, v = qkv.split([32, 32, 32], dim=-1)         # half of each gone
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import fx

from .groups import FIXED, Seen, SizeRewriter
from .registry import ChannelRule, channel_rule
from .tracker import Refuse, Tracker, arg, input_rank, op_name, with_size
from .values import Block, Many, Value, blocks, take, value_kept_along

__all__: list[str] = []


@channel_rule("cat", "concat", "concatenate", "stack")
class Cat(ChannelRule):
    """Along a dim holding channels the operands' ids go end to end (a value not followed there gives fixed
    ones); along other dims the operands hold the same channels."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        stack = op_name(node) == "stack"
        tensors = arg(node, 0, "tensors")
        out_shape = t.shape(node)
        if not isinstance(tensors, (list, tuple)) or out_shape is None:
            return False
        ndim = len(out_shape)
        dim = int(arg(node, 1, "dim", 0)) % ndim
        parts: list[tuple[tuple[int, ...], Value]] = []
        for x in tensors:
            shape = t.shape(x)
            if shape is None:
                return False
            value = t.value(x)
            if stack:
                shape = shape[:dim] + (1,) + shape[dim:]
                value = tuple(Block(tuple(d + (d >= dim) for d in b.dims), b.ids.unsqueeze(dim)) for b in value)
            parts.append((shape, value))
        along = [[b for b in v if dim in b.dims] for _, v in parts]
        rest = [b for _, v in parts for b in v if dim not in b.dims]  # along other dims: the same channels
        cat_block = None
        if any(along):
            dims_sets = {b.dims for a in along for b in a}
            if len(dims_sets) != 1 or any(len(a) > 1 for a in along):
                raise Refuse(f"'{node.name}' concatenates values whose channels lie differently")
            (held,) = dims_sets
            if any(set(b.dims) & set(held) for b in rest):
                raise Refuse(f"'{node.name}' concatenates values whose channels lie differently")
            common = torch.broadcast_shapes(*[with_size(tuple(a[0].ids.shape), dim, 1) for a in along if a])
            pieces = []
            for (shape, _), a in zip(parts, along):
                size = with_size(tuple(common), dim, a[0].ids.shape[dim] if a else shape[dim])
                pieces.append(a[0].ids.expand(size) if a else torch.full(size, FIXED, dtype=torch.long))
            cat_block = Block(held, torch.cat(pieces, dim))
        rest_parts = [(shape, [b for b in value if dim not in b.dims]) for shape, value in parts]
        joined = t.combine(rest_parts, f"'{node.name}' concatenates them with values whose channels are not followed")
        t.values[node] = blocks([*joined, cat_block])
        return True


def index_value(node: fx.Node, t: Tracker, value: Value, indices: list[tuple[int, Any]], ndim: int) -> Value:
    """``value`` indexed at ``(dim, int | slice)`` pairs; int-indexed dims are dropped."""
    dropped = [d for d, i in indices if isinstance(i, int)]
    kept = [d for d in range(ndim) if d not in dropped]
    out = []
    for blk in value:
        ids = blk.ids
        for d, index in indices:
            if d in blk.dims:
                if isinstance(index, slice) and index.step not in (None, 1):
                    raise Refuse(f"'{node.name}' takes every {index.step}th channel")
                ids = take(ids, d, index)
        remaining = [d for d in blk.dims if d not in dropped]
        if set(dropped) & set(blk.dims) and not [d for d in remaining if ids.shape[d] > 1]:
            t.fix(ids, f"'{node.name}' takes out single channels")
        held = tuple(kept.index(d) for d in remaining)
        ids = ids.reshape([ids.shape[d] for d in kept])
        out.append(Block(held, ids) if held else None)
    return blocks(out)


def _before(kept: torch.Tensor) -> torch.Tensor:
    """Per index along a dim (and one past the end): how many kept entries come before it."""
    return torch.cat([torch.zeros(1, dtype=torch.long), kept.long().cumsum(0)])


@channel_rule("slice", "narrow", "select")
class Slice(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        found = input_rank(t, node)
        if found is None:
            return False
        x, ndim = found
        dim = int(arg(node, 1, "dim", 0)) % ndim
        index: int | slice
        if name == "select":
            index = int(arg(node, 2, "index"))
        elif name == "narrow":
            start = int(arg(node, 2, "start"))
            index = slice(start, start + int(arg(node, 3, "length")))
        else:
            start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
            if any(isinstance(v, fx.Node) for v in (start, end, step)):
                if any(dim in b.dims for b in t.value(x)):
                    raise Refuse(f"'{node.name}' slices the channels at a size known only when it runs")
                t.values[node] = t.value(x)
                return True
            index = slice(start, end, step)
        t.values[node] = value = index_value(node, t, t.value(x), [(dim, index)], ndim)
        t.record(node, self, name, x, value)
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """The bounds of a slice, ``narrow`` or ``select`` along a cut dim, on the kept entries."""
        ndim = len(seen.in_shape)
        dim = int(arg(node, 1, "dim", 0)) % ndim
        kept = value_kept_along(seen.inputs, dim, r.keep)
        if kept is None or bool(kept.all()):
            return False
        before = _before(kept)
        size = seen.in_shape[dim]
        args: list[Any] = list(node.args)
        if seen.kind == "select":
            args[2] = int(before[int(args[2]) % size])
        elif seen.kind == "narrow":
            start, length = int(args[2]), int(args[3])
            args[2], args[3] = int(before[start]), int(before[start + length] - before[start])
        else:
            first, last = args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else None
            if isinstance(first, int):
                args[2] = int(before[min(max(first + (size if first < 0 else 0), 0), size)])
            if isinstance(last, int) and last < size:
                args[3] = int(before[min(max(last + (size if last < 0 else 0), 0), size)])
        node.args = tuple(args)
        return True


def gather(t: Tracker, node: fx.Node, source: object, dim: int, index: object) -> bool:
    """``source[..., index, ...]`` with one index tensor at ``dim``: channels there are taken by the index
    when it is a constant of the graph (a buffer), else refused; the index's dims replace ``dim``."""
    shape, after = t.shape(source), t.shape(node)
    if shape is None or after is None:
        return False
    extra = len(after) - len(shape) + 1  # dims the index brings
    constant = t.constant(index)  # a buffer, or computed from buffers (Swin's index.view(-1) under export)
    out = []
    for blk in t.value(source):
        ids = blk.ids
        if dim in blk.dims:
            if constant is None or constant.dtype == torch.bool:
                raise Refuse(f"'{node.name}' picks channels with an index computed at run time")
            moved = ids.movedim(dim, 0)
            gathered = moved[constant.long().cpu()]  # (index dims..., rest)
            ids = gathered.movedim(tuple(range(extra)), tuple(range(dim, dim + extra)))
        else:
            ids = ids.reshape(ids.shape[:dim] + (1,) * extra + ids.shape[dim + 1:])
        held = [d for d in blk.dims if d < dim] + [d + extra - 1 for d in blk.dims if d > dim]
        if dim in blk.dims:
            held += [dim + e for e in range(extra)]
        out.append(Block(tuple(sorted(held)), ids))
    t.values[node] = blocks(out)
    return True


@channel_rule("index")
class Index(ChannelRule):
    """``aten.index(x, [None, idx])``: one index tensor is a gather; other advanced indexing only of values
    without channels."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        if not isinstance(node.target, torch._ops.OpOverload):
            return False
        indices = list(cast("Sequence[object]", node.args[1]))
        given = [k for k, i in enumerate(indices) if i is not None]
        if len(given) == 1:
            return gather(t, node, node.args[0], given[0], indices[given[0]])
        return not t.value(node.args[0])


@channel_rule(targets=(operator.getitem,))
class GetItem(ChannelRule):
    """An item of several outputs (a split's part, a native op's result), or ``x[...]`` of a tensor."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        source, index = node.args[0], node.args[1]
        found = t.values.get(source) if isinstance(source, fx.Node) else None
        if isinstance(found, Many):
            t.values[node] = found[index] if isinstance(index, int) and -len(found) <= index < len(found) else ()
            return True
        shape = t.shape(source)
        if shape is None:
            return True  # an int of a size, an item of a tuple that is not followed
        items = index if isinstance(index, tuple) else (index,)
        tensors = [k for k, i in enumerate(items) if isinstance(i, (fx.Node, torch.Tensor, list))]
        if tensors:
            plain = all(i == slice(None) for k, i in enumerate(items) if k not in tensors)
            if len(tensors) == 1 and plain and isinstance(items[tensors[0]], fx.Node):
                return gather(t, node, source, tensors[0], items[tensors[0]])
            return not t.value(source)  # other advanced indexing: only of values without channels
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        pairs, new_dims, d, o = [], [], 0, 0
        for i in items:
            if i is Ellipsis:
                d, o = d + len(shape) - explicit, o + len(shape) - explicit
            elif i is None:
                new_dims.append(o)
                o += 1
            else:
                pairs.append((d, i))
                d, o = d + 1, o + (0 if isinstance(i, int) else 1)
        value = index_value(node, t, t.value(source), pairs, len(shape))
        after = t.shape(node)
        if after is None:
            return False
        where = [p for p in range(len(after)) if p not in new_dims]
        out = []
        for blk in value:
            sizes = [blk.ids.shape[where.index(p)] if p in where else 1 for p in range(len(after))]
            out.append(Block(tuple(where[e] for e in blk.dims), blk.ids.reshape(sizes)))
        t.values[node] = taken = tuple(out)
        t.record(node, self, "getitem", source, taken)
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """Ints and slices of ``x[...]`` along cut dims, on the kept entries."""
        index = node.args[1]
        items = index if isinstance(index, tuple) else (index,)
        shape = seen.in_shape
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        d, new_items, changed = 0, [], False
        for item in items:
            if item is Ellipsis:
                d += len(shape) - explicit
            elif item is not None:
                kept = value_kept_along(seen.inputs, d, r.keep)
                if kept is not None and not bool(kept.all()):
                    before = _before(kept)
                    if isinstance(item, int):
                        item = int(before[item % shape[d]])
                    elif isinstance(item, slice):
                        start, stop, _ = slice(item.start, item.stop, item.step).indices(shape[d])
                        item = slice(int(before[start]), int(before[stop]) if item.stop is not None else None,
                                     item.step)
                    changed = True
                d += 1
            new_items.append(item)
        if changed:
            node.update_arg(1, tuple(new_items) if isinstance(index, tuple) else new_items[0])
        return changed


@channel_rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split", "unsafe_chunk")
class Split(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        x = node.args[0]
        shape = t.shape(x)
        metas = node.meta.get("tensor_meta")
        if shape is None or not isinstance(metas, (list, tuple)):
            return False
        ndim = len(shape)
        dim = int(arg(node, 2, "dim", 0) if name != "unbind" else arg(node, 1, "dim", 0)) % ndim
        value = t.value(x)
        outs, start = [], 0
        for meta in metas:
            size = 1 if name == "unbind" else int(meta.shape[dim])
            index: Any = start if name == "unbind" else slice(start, start + size)
            outs.append(index_value(node, t, value, [(dim, index)], ndim))
            start += size
        t.values[node] = parts = Many(outs)
        t.record(node, self, name, x, parts)
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """A split along a cut dim becomes ``split_with_sizes`` with the kept sizes."""
        if seen.kind == "unbind" or not isinstance(seen.out_shape, (list, tuple)):
            return False
        ndim = len(seen.in_shape)
        dim = int(arg(node, 2, "dim", 0)) % ndim
        kept = value_kept_along(seen.inputs, dim, r.keep)
        if kept is None or bool(kept.all()):
            return False
        sizes, start = [], 0
        for meta in seen.out_shape:
            size = int(meta.shape[dim])
            sizes.append(int(kept[start:start + size].sum()))
            start += size
        x = node.args[0]
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (x, sizes, dim), {}
        elif node.op == "call_method":
            node.target = "split"
            node.args, node.kwargs = (x, sizes), {"dim": dim}
        else:
            node.target = torch.split
            node.args, node.kwargs = (x, sizes), {"dim": dim}
        return True
