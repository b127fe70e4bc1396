"""Elementwise ops: a unary op carries its input's channels; operands broadcast together hold the same ones.

A residual ``add``, a SwiGLU gate's ``mul``, ``where``, a scale: their operands' blocks are joined
(``Tracker.combine``). Where an operand that is not followed (a model input, a constant) has
entries along a channel dim, those channels cannot be cut: they are fixed, or joined along that
dim when other dims of the block are free.
"""
from __future__ import annotations

from torch import fx, nn

from .registry import ChannelRule, channel_rule
from .tracker import Tracker, align_shape, tensor_nodes
from .values import align

__all__: list[str] = []

_UNARY = """relu relu6 hardtanh silu gelu sigmoid tanh hardswish hardsigmoid mish elu selu celu leaky_relu
softplus neg abs exp log log1p sqrt rsqrt square sin cos erf clamp clip clamp_min clamp_max dropout alpha_dropout
feature_alpha_dropout dropout1d dropout2d dropout3d feature_dropout contiguous clone detach alias float half bfloat16
double to type _to_copy lift_fresh_copy nan_to_num sign reciprocal floor ceil round trunc logit identity type_as
requires_grad zeros_like ones_like empty_like full_like rand_like randn_like""".split()
_BINARY = """add sub rsub mul div truediv true_divide floordiv floor_divide maximum minimum pow where
masked_fill iadd isub imul itruediv __and__ __or__ and_ or_ eq ne lt le gt ge logical_and logical_or addcmul
addcdiv lerp fmod remainder hypot atan2 copysign xlogy __mul__ __add__ __sub__ __truediv__""".split()
_MODULE_UNARY = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
                 nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def same(t: Tracker, node: fx.Node, x: object) -> bool:
    """``node``'s output holds ``x``'s channels where ``x`` holds them."""
    t.values[node] = t.value(x)
    return True


def elementwise(t: Tracker, node: fx.Node, operands: list[fx.Node]) -> bool:
    """Operands broadcast together hold the same channels: their blocks are joined (``Tracker.combine``)."""
    out_shape = t.shape(node)
    if out_shape is None:
        return False
    ndim = len(out_shape)
    aligned = [(align_shape(t.shape(a) or (), ndim), [align(b, ndim) for b in t.value(a)]) for a in operands]
    t.values[node] = t.combine(aligned, f"'{node.name}' combines them with values whose channels are not "
                                        f"followed (a model input or a constant)")
    return True


@channel_rule(*_UNARY, modules=_MODULE_UNARY)
class Unary(ChannelRule):
    """Activations, dropout, casts, copies: the channels of the first input, unchanged."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return same(t, node, node.args[0])

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        return same(t, node, node.args[0] if node.args else None)


@channel_rule(*_BINARY)
class Binary(ChannelRule):
    """Arithmetic, comparisons, ``where``, ``masked_fill``, ``lerp``: every tensor operand joined."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return elementwise(t, node, tensor_nodes((node.args, node.kwargs)))
