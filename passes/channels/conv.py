"""Convolutions, pooling and resizing, pixel shuffles.

A convolution joins its input's channels with the weight's input dim and produces the weight's
output dim; a depthwise one (times a multiplier) carries each channel through; a grouped one
asks for equal numbers from each conv-group (``balances``), input and output. Pooling and
resizing act on spatial dims only. After a cut, a depthwise convolution written as a function
gets its new channel count as ``groups``.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .groups import GroupedConv, Seen, SizeRewriter
from .registry import ChannelRule, channel_rule
from .tracker import Refuse, Tracker, arg, op_name, split_another_way
from .values import Block, Many, broadcast_form, new_shape

__all__: list[str] = []

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SPATIAL = """max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d
avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d
upsample_bicubic2d upsample_linear1d interpolate _upsample_nearest_exact2d _upsample_bilinear2d_aa""".split()
_MODULE_SPATIAL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                   nn.UpsamplingBilinear2d)


@channel_rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d", modules=_CONV_MODULES)
class Conv(ChannelRule):
    makes_channels = True

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        w = t.tensor(node.args[1])
        if w is None:
            return False
        b = t.tensor_arg(node, 2, "bias")
        if name in ("convolution", "_convolution"):
            transposed, groups = bool(node.args[6]), int(arg(node, 8, "groups"))
        elif name.startswith("conv_transpose"):
            transposed, groups = True, int(arg(node, 6, "groups", 1))
        else:
            transposed, groups = False, int(arg(node, 6, "groups", 1))
        return self.conv(t, node, node.args[0], w, b, groups, transposed)

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        assert isinstance(module, nn.modules.conv._ConvNd)
        x = node.args[0] if node.args else None
        return self.conv(t, node, x, module.weight, module.bias, module.groups, module.transposed)

    def conv(self, t: Tracker, node: fx.Node, x: object, w: torch.Tensor, b: torch.Tensor | None, groups: int,
             transposed: bool) -> bool:
        shape = t.shape(x)
        assert shape is not None
        ndim = len(shape)
        channels = [blk for blk in t.value(x) if 1 in blk.dims]
        other = [blk for blk in t.value(x) if set(blk.dims) - {1}]
        if other:
            raise Refuse(f"'{node.name}' convolves over dims that hold channels")
        xb = channels[0] if channels else None
        fqn = t.fqn(w)
        if transposed:
            if groups != 1:
                raise Refuse(f"grouped transposed convolution '{node.name}'")
            if xb is not None:
                t.union(xb.ids.reshape(-1), t.space(w, 0))
                t.sink(node, 0, x, xb)
            out_ids = t.space(w, 1)
            t.producers.append((fqn, 1))
        else:
            out_ids = t.space(w, 0)
            per_group = w.shape[1]
            if groups == 1:
                if xb is not None:
                    t.union(xb.ids.reshape(-1), t.space(w, 1))
                    t.sink(node, 0, x, xb)
                t.producers.append((fqn, 0))
            elif per_group == 1:  # depthwise (times a multiplier): each output follows its one input channel
                if xb is not None:
                    t.union(xb.ids.reshape(groups, 1), out_ids.reshape(groups, -1))
                else:
                    t.fix(out_ids, f"'{node.name}' is a depthwise convolution of channels that are not followed")
            else:
                if xb is not None:
                    t.balances.append((xb.ids.reshape(-1), groups, split_another_way(node.name)))
                    t.grouped.append(GroupedConv(fqn, groups, xb.ids.reshape(-1)))
                    t.sink(node, 0, x, xb)
                t.balances.append((out_ids, groups, split_another_way(node.name)))
                t.producers.append((fqn, 0))
        if b is not None:
            t.union(t.space(b, 0), out_ids)
        t.values[node] = value = (Block((1,), broadcast_form(out_ids, 1, ndim)),)
        if node.op == "call_function" and groups > 1 and w.shape[1] == 1 and not transposed:
            t.record(node, self, "depthwise", node.args[0], value)
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """A depthwise conv as a function: its groups argument is its channel count."""
        if seen.kind != "depthwise" or isinstance(seen.output, Many) or not isinstance(seen.out_shape, TensorMetadata):
            return False
        old = tuple(seen.out_shape.shape)
        before, after = old[1], new_shape(seen.output, old, r.keep)[1]
        position = 8 if len(node.args) > 8 else 6
        groups = int(arg(node, position, "groups"))
        if after == before:
            return False
        node.update_arg(position, after // (before // groups))
        return True

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, nn.modules.conv._ConvNd)
        m = module
        if m.groups > 1 and m.weight.shape[1] * m.groups == m.in_channels and not m.transposed \
                and m.in_channels == m.groups:  # depthwise (times a multiplier): one conv-group per input
            m.groups = m.weight.shape[0] // (m.out_channels // m.groups)
        if m.transposed:
            m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        else:
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


def _spatial(t: Tracker, node: fx.Node, x: object) -> bool:
    value = t.value(x)
    if any(d >= 2 for b in value for d in b.dims):
        raise Refuse(f"'{node.name}' pools or resizes dims that hold channels")
    t.values[node] = value
    if t.shape(node) is None:
        t.values[node] = Many([value, ()])
    return True


@channel_rule(*_SPATIAL, modules=_MODULE_SPATIAL)
class Spatial(ChannelRule):
    """Pooling and resizing over the spatial dims (2 and on): channels carried through."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return _spatial(t, node, node.args[0])

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        return _spatial(t, node, node.args[0] if node.args else None)


@channel_rule("pixel_shuffle", "pixel_unshuffle", modules=(nn.PixelShuffle, nn.PixelUnshuffle))
class PixelShuffle(ChannelRule):
    """``pixel_shuffle``: input channels ``c·r² .. c·r² + r² - 1`` become the sub-pixels of output channel
    ``c``, so they go together (one class); ``pixel_unshuffle``: each channel becomes ``r²``."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        unshuffle = op_name(node) == "pixel_unshuffle"
        factor = arg(node, 1, "downscale_factor" if unshuffle else "upscale_factor")
        return self.shuffle(t, node, node.args[0], int(factor), unshuffle)

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        x = node.args[0] if node.args else None
        if isinstance(module, nn.PixelUnshuffle):
            return self.shuffle(t, node, x, module.downscale_factor, True)
        assert isinstance(module, nn.PixelShuffle)
        return self.shuffle(t, node, x, module.upscale_factor, False)

    def shuffle(self, t: Tracker, node: fx.Node, x: object, factor: int, unshuffle: bool) -> bool:
        value = t.value(x)
        if any(d != 1 for b in value for d in b.dims):
            raise Refuse(f"'{node.name}' moves dims that hold channels into the channel dim")
        out = []
        for blk in value:
            ids = blk.ids.reshape(-1)
            if unshuffle:
                ids = ids.repeat_interleave(factor * factor)
            else:
                ids = ids.reshape(-1, factor * factor)
                t.union(ids, ids[:, :1])
                ids = ids[:, 0]
            out.append(Block((1,), broadcast_form(ids, 1, blk.ids.dim())))
        t.values[node] = tuple(out)
        return True
