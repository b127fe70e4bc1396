"""Norms and other layers with a tensor per channel: batch/instance norm, PReLU, layer/RMS norm, group norm.

A tensor per channel (a batch norm's weight, bias and running statistics, PReLU's slopes) is cut
with the channels. LayerNorm and RMSNorm average over their trailing dims, GroupNorm over groups of
channels (all of them with one group, one each with as many groups as channels: then nothing is
averaged across channels): their groups are *normalised*, the norm's input is a sink, and where
the group is masked the masked graph normalises over the kept channels only
(``masked_norms.MaskNorms``), so the cut model computes what the masked one does. A GroupNorm of
several channels per group loses as many from each group. After a cut, a functional layer norm gets
its new ``normalized_shape``, a per-channel group norm its new number of groups.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .groups import Seen, SizeRewriter
from .registry import ChannelRule, channel_rule
from .tracker import Refuse, Tracker, arg, module_or_node, op_name, split_another_way
from .values import Block, Many, Value, broadcast_form, new_shape

__all__: list[str] = []

_BATCH_NORM = """batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
_native_batch_norm_legit_functional instance_norm""".split()
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
       nn.InstanceNorm3d)
_LAYER_NORM = ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
_GROUP_NORM = ("group_norm", "native_group_norm")


def per_channel(t: Tracker, node: fx.Node, x: object, tensors: list[torch.Tensor | None]) -> bool:
    """Batch norm, instance norm, PReLU: a tensor per channel (dim 1), the channels carried through."""
    shape = t.shape(x)
    if shape is None or len(shape) < 2:
        return False
    ndim = len(shape)
    value = list(t.value(x))
    extra = [Block((1,), broadcast_form(t.space(tensor, 0), 1, ndim)) for tensor in tensors
             if isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and tensor.shape[0] > 1]
    if extra and not any(1 in b.dims for b in value):
        for blk in extra:
            t.fix(blk.ids, f"'{node.name}' normalises channels that are not followed (a model input)")
    t.values[node] = t.join_blocks(value + extra)
    return True


@channel_rule(*_BATCH_NORM, modules=_BN)
class BatchNorm(ChannelRule):
    makes_channels = True

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        """aten's batch_norm variants and instance_norm take (input, weight, bias, running_mean, running_var),
        F.batch_norm (input, running_mean, running_var, weight, bias): each a tensor per channel."""
        given = (*node.args[1:5], *(node.kwargs.get(k) for k in ("weight", "bias", "running_mean", "running_var")))
        if not per_channel(t, node, node.args[0], [t.tensor(a) for a in given]):
            return False
        if t.shape(node) is None:  # native ops: (output, saved statistics...)
            t.values[node] = Many([t.values[node], (), (), (), ()])
        return True

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        assert isinstance(module, nn.modules.batchnorm._NormBase)
        stats = [module.running_mean, module.running_var] if getattr(module, "track_running_stats", False) else []
        return per_channel(t, node, node.args[0] if node.args else None, [module.weight, module.bias, *stats])

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, nn.modules.batchnorm._NormBase)
        source = module.weight if module.weight is not None else module.running_mean
        if source is not None:
            module.num_features = source.shape[0]


@channel_rule("prelu", modules=(nn.PReLU,))
class PReLU(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return per_channel(t, node, node.args[0], [t.tensor(node.args[1])])

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        assert isinstance(module, nn.PReLU)
        return per_channel(t, node, node.args[0] if node.args else None, [module.weight])

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, nn.PReLU)
        module.num_parameters = module.weight.numel()


@channel_rule(*_LAYER_NORM, modules=(nn.LayerNorm, nn.RMSNorm))
class LayerNorm(ChannelRule):
    """LayerNorm / RMSNorm over the last ``trailing`` dims: a tensor per channel there, and a mean."""

    makes_channels = True

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        name = op_name(node)
        shape = arg(node, 1, "normalized_shape")
        trailing = len(shape) if isinstance(shape, (list, tuple)) else 1
        layer = "layer" in name
        tensors = [t.tensor_arg(node, 2, "weight")] + ([t.tensor_arg(node, 3, "bias")] if layer else [])
        return self.normalize(t, node, node.args[0], trailing, tensors, "LayerNorm" if layer else "RMSNorm",
                              "layer_norm" if layer else "rms_norm")

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        assert isinstance(module, (nn.LayerNorm, nn.RMSNorm))
        tensors = [module.weight, getattr(module, "bias", None)]
        kind = "layer_norm" if isinstance(module, nn.LayerNorm) else "rms_norm"
        return self.normalize(t, node, node.args[0] if node.args else None, len(module.normalized_shape), tensors,
                              type(module).__name__, kind)

    def normalize(self, t: Tracker, node: fx.Node, x: object, trailing: int, tensors: list[torch.Tensor | None],
                  what: str, kind: str) -> bool:
        shape = t.shape(x)
        assert shape is not None
        ndim = len(shape)
        operands: list[Block] = list(t.value(x))
        followed = len(operands)
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                for d in range(tensor.dim()):
                    blk = t.tensor_block(tensor, d, ndim - tensor.dim() + d, ndim)
                    if blk is not None:
                        operands.append(blk)
        joined = t.join_blocks(operands)
        normalised = list(range(ndim - trailing, ndim))
        for blk in joined:
            if not set(blk.dims) & set(normalised):
                continue
            if followed == 0:
                t.fix(blk.ids, f"'{node.name}' normalises channels that are not followed (a model input)")
            elif set(blk.dims) <= set(normalised):
                t.normalise(node, x, blk, kind, module_or_node(node, what))
            else:
                for d in normalised:
                    if d in blk.dims:
                        t.union(blk.ids, blk.ids.narrow(d, 0, 1))
        out: Value | Many = joined if t.shape(node) is not None else Many([joined, (), ()])
        t.values[node] = out
        if node.op == "call_function":
            t.record(node, self, op_name(node), x, out)
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """The ``normalized_shape`` of a functional layer norm or RMS norm."""
        shape = node.args[1]
        found = seen.out_shape  # (a native op's: one per output)
        meta: object = found if isinstance(found, TensorMetadata) else found[0] if found else None
        if not isinstance(meta, TensorMetadata) or not isinstance(shape, (list, tuple)):
            return False
        old = tuple(meta.shape)
        value = seen.output[0] if isinstance(seen.output, Many) else seen.output
        new = new_shape(value, old, r.keep)
        trailing = new[len(new) - len(shape):]
        if list(trailing) == list(shape):
            return False
        node.update_arg(1, trailing)
        return True

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, (nn.LayerNorm, nn.RMSNorm))
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)


@channel_rule(*_GROUP_NORM, modules=(nn.GroupNorm,))
class GroupNorm(ChannelRule):
    """GroupNorm: a weight and bias per channel; the channels of a group normalised together (all of them with
    one group; none across channels with one per group)."""

    makes_channels = True

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        if op_name(node) == "native_group_norm":  # (input, weight, bias, N, C, HxW, group, eps)
            return self.group_norm(t, node, node.args[0], node.args[6], t.tensor(node.args[1]), t.tensor(node.args[2]))
        return self.group_norm(t, node, node.args[0], arg(node, 1, "num_groups"), t.tensor_arg(node, 2, "weight"),
                               t.tensor_arg(node, 3, "bias"))

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        assert isinstance(module, nn.GroupNorm)
        return self.group_norm(t, node, node.args[0] if node.args else None, module.num_groups, module.weight,
                               module.bias)

    def group_norm(self, t: Tracker, node: fx.Node, x: object, num_groups: object, w: torch.Tensor | None,
                   b: torch.Tensor | None) -> bool:
        shape = t.shape(x)
        if not isinstance(num_groups, int) or shape is None or not per_channel(t, node, x, [w, b]):
            return False
        value = t.values[node]
        assert isinstance(value, tuple)
        per_group = num_groups == shape[1]  # each channel normalised alone: cut as a batch norm is
        what = module_or_node(node, "GroupNorm")
        for blk in value:
            if 1 in blk.dims and not per_group:
                if blk.dims != (1,):
                    raise Refuse(f"'{node.name}' normalises groups of channels held with other dims")
                t.normalise(node, x, blk, "group_norm", what)
                if num_groups > 1:
                    t.balances.append((blk.ids.reshape(-1), num_groups, split_another_way(node.name)))
        if t.shape(node) is None:
            t.values[node] = Many([value, (), ()])
        if per_group and node.op == "call_function":
            t.record(node, self, op_name(node), x, value)
        return True

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """A functional group norm with a group per channel: as many groups as channels are left."""
        channels = new_shape(seen.inputs, seen.in_shape, r.keep)[1]
        if channels == seen.in_shape[1]:
            return False
        if seen.kind == "native_group_norm":
            node.update_arg(4, channels)
            node.update_arg(6, channels)
        else:
            node.update_arg(1, channels)
        return True

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, nn.GroupNorm)
        if module.weight is not None:
            if module.num_groups == module.num_channels:  # a group per channel
                module.num_groups = module.weight.shape[0]
            module.num_channels = module.weight.shape[0]
