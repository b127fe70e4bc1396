"""Shape ops that move channels without taking any apart: views, expands, transposes, tiles, rolls, pads.

A view or reshape regroups the dims it merges or splits (``values.reshape``; two channel dims
merged into one cannot be followed and are fixed); a permute permutes the ids. After a cut the
literal sizes of ``view``/``reshape``/``expand``/``unflatten`` are rewritten (``-1`` and sizes
computed at run time adapt by themselves)::

    view = linear.view(b, t, 4, 8)      # 4 heads of 8
    view = linear.view(b, t, 2, 8)      # after half the heads went
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import cast

from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .cut import CutError
from .groups import Seen, SizeRewriter
from .registry import ChannelRule, channel_rule
from .tracker import Refuse, Tracker, align_shape, arg, dims, op_name
from .values import Block, align, blocks, new_shape, permute, reshape

__all__: list[str] = []

_META = """size dim numel sym_size sym_numel sym_stride stride getattr _assert_tensor_metadata _assert_async
is_contiguous element_size new_zeros new_ones new_empty new_full _guards_fn""".split()


def transpose_last(t: Tracker, node: fx.Node, x: object) -> bool:
    """``x`` with its last two dims swapped (``.T`` of a matrix, ``.mT``)."""
    ndim = len(t.shape(x) or ())
    order = list(range(ndim))
    order[-2:] = order[-1], order[-2]
    t.values[node] = permute(t.value(x), order)
    return True


def reshape_value(t: Tracker, rule: ChannelRule, node: fx.Node, x: object) -> bool:
    before, after = t.shape(x), t.shape(node)
    if before is None or after is None:
        return False
    out, lost = reshape(t.value(x), before, after)
    for blk in lost:
        t.fix(blk.ids, f"'{node.name}' merges two dims that hold channels")
    t.values[node] = out
    t.record(node, rule, op_name(node) if node.op != "call_module" else "module", x, out)
    return True


@channel_rule("view", "reshape", "_unsafe_view", "view_as", "reshape_as", "flatten", "unflatten", "squeeze",
              "unsqueeze", modules=(nn.Flatten, nn.Unflatten))
class Reshape(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return reshape_value(t, self, node, node.args[0])

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        return reshape_value(t, self, node, node.args[0] if node.args else None)

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        return seen.kind in ("view", "reshape", "_unsafe_view", "unflatten") and rewrite_sizes(r, node, seen)


@channel_rule("expand", "expand_as", "broadcast_to")
class Expand(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        after = t.shape(node)
        if after is None:
            return False
        value = tuple(align(b, len(after)) for b in t.value(node.args[0]))
        t.values[node] = value
        t.record(node, self, op_name(node), node.args[0], value)
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        return seen.kind in ("expand", "broadcast_to") and rewrite_sizes(r, node, seen)


def rewrite_sizes(r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
    """The literal sizes of a view, reshape, expand or unflatten, for the cut. A size computed at run time along a
    dim that holds channels (``c // self.heads`` from a width that was cut) becomes the literal it must be."""
    if not isinstance(seen.out_shape, TensorMetadata):
        return False
    old = tuple(seen.out_shape.shape)
    new = new_shape(seen.output, old, r.keep)
    held = {d for blk in seen.output for d in blk.dims} if isinstance(seen.output, tuple) else set()

    def size(given: fx.node.Argument, d: int) -> fx.node.Argument:
        if old[d] != new[d]:
            return r.size(node, given, old[d], new[d])
        if d in held and isinstance(given, fx.Node) and not _scaled(given):
            return new[d]
        return given

    if seen.kind == "unflatten":
        dim = int(arg(node, 1, "dim")) % len(seen.in_shape)
        before: list[fx.node.Argument] = list(arg(node, 2, "sizes"))
        sizes = [size(s, dim + i) for i, s in enumerate(before)]
        if sizes == before:
            return False
        node.update_arg(2, sizes)
        return True
    listed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    given = list(cast("Sequence[fx.node.Argument]", node.args[1] if listed else node.args[1:]))
    if len(given) != len(old):
        if new == list(old):
            return False
        raise CutError(f"'{node.name}' has {len(given)} sizes for a {len(old)}-dim result")
    sizes = [size(s, d) for d, s in enumerate(given)]
    if all(a is b for a, b in zip(sizes, given)):
        return False
    node.args = (node.args[0], sizes) if listed else (node.args[0], *sizes)
    return True


def _scaled(size: fx.Node) -> bool:
    """``n * <int>`` (torch.export's batch times heads): ``RewriteSizes.size`` keeps it dynamic."""
    return size.op == "call_function" and size.target is operator.mul and any(
        isinstance(a, int) and not isinstance(a, bool) for a in size.args)


@channel_rule("permute", "transpose", "swapaxes", "swapdims", "t", "movedim")
class Permute(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        x = node.args[0]
        ndim = len(t.shape(x) or ())
        order = list(range(ndim))
        if name == "permute":
            given = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            order = [int(d) % ndim for d in cast("Sequence[int]", given)]
        elif name == "t":
            order = order[::-1]
        elif name == "movedim":
            src, dst = dims(node.args[1], ndim), dims(node.args[2], ndim)
            rest = iter([d for d in order if d not in src])
            placed: list[int | None] = [None] * ndim
            for s, d in zip(src, dst):
                placed[d] = s
            order = [o if o is not None else next(rest) for o in placed]
        else:
            a, b = int(arg(node, 1, "dim0")) % ndim, int(arg(node, 2, "dim1")) % ndim
            order[a], order[b] = order[b], order[a]
        t.values[node] = permute(t.value(x), order)
        return True


@channel_rule("numpy_T")
class NumpyT(ChannelRule):
    """torch.export's ``weight.T`` of a matrix."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return len(t.shape(node.args[0]) or ()) == 2 and transpose_last(t, node, node.args[0])


@channel_rule(*_META)
class Meta(ChannelRule):
    """Sizes, strides, asserts, ``new_*`` tensors: no channels move (``getattr`` of ``.T``/``.mT`` transposes).
    A size read along a dim that holds channels (``b, n, c = x.shape``) is recorded: after a cut it keeps the value
    the masked model reads (so ``(c // heads) ** -0.5`` stays the scale it was), and the sizes of views and
    reshapes are rewritten on their own (``rewrite_sizes``)."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        if name == "getattr" and node.args[1] in ("T", "mT"):
            return transpose_last(t, node, node.args[0])
        x = node.args[0] if node.args else None
        if (name == "size" or (name == "getattr" and node.args[1] == "shape")) and t.value(x):
            t.record(node, self, name, x, ())
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """Each size read along a dim that holds channels becomes the literal the masked model reads."""
        held = {d for blk in seen.inputs for d in blk.dims}
        ndim = len(seen.in_shape)
        if seen.kind == "size" and len(node.args) + len(node.kwargs) > 1:
            dim = arg(node, 1, "dim")
            reads = [(node, dim % ndim)] if isinstance(dim, int) else []
        else:  # the whole shape, then items of it
            reads = [(user, user.args[1] % ndim) for user in node.users
                     if user.target is operator.getitem and isinstance(user.args[1], int)]
        changed = False
        for read, d in reads:
            if d not in held:
                continue
            literal = int(seen.in_shape[d])
            for user in list(read.users):
                user.args, user.kwargs = fx.node.map_aggregate(
                    (user.args, user.kwargs), lambda a: literal if a is read else a)  # type: ignore[assignment]
            changed = True
        return changed


@channel_rule("repeat", "repeat_interleave", "flip")
class Tile(ChannelRule):
    """``repeat`` along dims without channels; ``repeat_interleave`` (kv heads for query heads); ``flip``."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        x, out_shape = node.args[0], t.shape(node)
        value = t.value(x)
        if out_shape is None:
            return False
        ndim = len(out_shape)
        if name == "repeat":
            reps = cast("Sequence[object]", node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (
                list, tuple)) else node.args[1:])
            if not all(isinstance(r, int) for r in reps):  # a count read at run time (DETR's batch size)
                in_shape = t.shape(x)
                if in_shape is None:
                    return False
                reps = [o // i if i else 1 for o, i in zip(out_shape, align_shape(in_shape, ndim))]
            counts = [int(cast(int, r)) for r in reps]
            out = []
            for blk in value:
                blk = align(blk, ndim)
                out.append(Block(blk.dims, blk.ids.repeat([r if d in blk.dims else 1 for d, r in enumerate(counts)])))
            t.values[node] = tiled = blocks(out)
            if any(r > 1 and d in b.dims for b in tiled for d, r in enumerate(counts)):
                raise Refuse(f"'{node.name}' tiles the channels")
            return True
        along = dims(arg(node, 2 if name == "repeat_interleave" else 1, "dim" if name == "repeat_interleave"
                         else "dims"), ndim)
        if name == "flip":
            t.values[node] = tuple(Block(b.dims, b.ids.flip([d for d in along if d in b.dims]) if set(along) & set(
                b.dims) else b.ids) for b in value)
            return True
        repeats = arg(node, 1, "repeats")
        if not isinstance(repeats, int) or arg(node, 2, "dim") is None:
            return False
        d = along[0]
        t.values[node] = out_value = blocks(Block(b.dims, b.ids.repeat_interleave(repeats, d)) if d in b.dims else b
                                            for b in value)
        t.record(node, self, "repeat_interleave", x, out_value)
        return True


@channel_rule("roll")
class Roll(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        x = node.args[0]
        ndim = len(t.shape(x) or ())
        given = arg(node, 2, "dims")
        rolled = dims(given, ndim) if given is not None and given != [] else list(range(ndim))
        if any(d in b.dims for b in t.value(x) for d in rolled):
            raise Refuse(f"'{node.name}' rolls the channels")
        t.values[node] = t.value(x)
        return True


@channel_rule("pad", "constant_pad_nd")
class Pad(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        x, pads = node.args[0], arg(node, 1, "pad")
        ndim = len(t.shape(x) or ())
        padded = [ndim - 1 - i // 2 for i, p in enumerate(pads or []) if p]
        if any(d in b.dims for b in t.value(x) for d in padded):
            raise Refuse(f"'{node.name}' pads a dim that holds channels")
        t.values[node] = t.value(x)
        return True
