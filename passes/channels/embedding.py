"""Embeddings and recurrent layers: tables and hidden units as channels.

An embedding gives its output the table's columns (a producer). An LSTM, GRU or RNN written as one
call (``passes.recurrent``) has its hidden units as classes: all gates of a unit go together.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..recurrent import GATES, recurrent
from .registry import ChannelRule, channel_rule
from .tracker import Refuse, Tracker, arg, flat_blocks, tensor_nodes
from .values import Block, Many, Value, broadcast_form

__all__: list[str] = []


def embedding(t: Tracker, node: fx.Node, w: torch.Tensor | None, indices: object) -> bool:
    if w is None or t.value(indices):
        return False
    ndim = len(t.shape(node) or ())
    t.values[node] = (Block((ndim - 1,), broadcast_form(t.space(w, 1), ndim - 1, ndim)),)
    t.producers.append((t.fqn(w), 1))
    return True


@channel_rule("embedding", modules=(nn.Embedding,))
class Embedding(ChannelRule):
    makes_channels = True

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        aten = isinstance(node.target, torch._ops.OpOverload)
        table, lookup = (node.args[0], node.args[1]) if aten else (arg(node, 1, "weight"), node.args[0])
        return embedding(t, node, t.tensor(table), lookup)

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        assert isinstance(module, nn.Embedding)
        return embedding(t, node, module.weight, node.args[0] if node.args else None)

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Embedding)
        module.num_embeddings, module.embedding_dim = module.weight.shape


@channel_rule(targets=(recurrent,), modules=(nn.RNNBase,))
class Recurrent(ChannelRule):
    """An LSTM, GRU or RNN written as one call (``passes.recurrent``). Each layer's (and direction's) hidden
    units are classes: a unit is a row of every gate block of ``weight_ih``, ``weight_hh`` and the biases, and
    a column of ``weight_hh`` and of the next layer's ``weight_ih``. Those columns are sinks (masked, a removed
    unit acts on no kept one), as are the input's channels; the output carries the last layer's units (both
    directions, end to end). A layer left a ``call_module`` is not followed (only its attributes are updated)."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        mode, x, hx, has_biases, num_layers, _dropout, _training, bidirectional, _batch_first = node.args[:9]
        if not isinstance(mode, str) or not isinstance(num_layers, int):
            return False
        weight_nodes = node.args[9:]
        directions, per_direction = (2 if bidirectional else 1), (4 if has_biases else 2)
        if len(weight_nodes) != num_layers * directions * per_direction:
            raise Refuse(f"'{node.name}' is a {mode} with projections, whose units fx_sparsity does not follow")
        found = [t.tensor(w) for w in weight_nodes]
        weights = [w for w in found if w is not None]
        shape = t.shape(x)
        if shape is None or len(weights) != len(found):
            return False
        ndim = len(shape)
        inputs = t.space(weights[0], 1)
        for d in range(1, directions):  # every direction of the first layer reads the same input channels
            t.union(t.space(weights[d * per_direction], 1), inputs)
        for blk in t.value(x):
            if blk.dims != (ndim - 1,):
                raise Refuse(f"'{node.name}' runs over dims that hold channels")
            t.union(blk.ids.reshape(-1), inputs)
            t.sink(node, 1, x, blk)
        hiddens: list[torch.Tensor] = []  # in h_n's row order: layer by layer, forward then reverse
        below: torch.Tensor | None = None  # the previous layer's output channels
        for _layer in range(num_layers):
            outs = []
            for _direction in range(directions):
                first = len(hiddens) * per_direction
                w_ih, w_hh, *biases = weights[first:first + per_direction]
                rows = t.space(w_ih, 0).reshape(GATES[mode], -1)  # gate × unit
                t.union(rows, rows[:1])
                for tensor in (w_hh, *biases):
                    t.union(t.space(tensor, 0).reshape(GATES[mode], -1), rows[:1])
                hidden = rows[0]
                t.union(t.space(w_hh, 1), hidden)
                t.sink(node, 9 + first + 1, weight_nodes[first + 1], Block((1,), broadcast_form(hidden, 1, 2)),
                       weight=True)
                if below is not None:
                    t.union(t.space(w_ih, 1), below)
                    t.sink(node, 9 + first, weight_nodes[first], Block((1,), broadcast_form(below, 1, 2)),
                           weight=True)
                t.producers += [(t.fqn(w_ih), 0), (t.fqn(w_hh), 0)]
                hiddens.append(hidden)
                outs.append(hidden)
            below = torch.cat(outs)
        assert below is not None
        # all layers and directions share hidden_size: one group, an equal count from each
        state_used = any(not (u.target is operator.getitem and (u.args[1] == 0 or not u.users)) for u in node.users)
        count = len(hiddens)
        if count > 1:
            first_producer = t.producers[-2 * count]
            t.links += [(first_producer, key) for key in t.producers[-2 * count + 1:]]
            if not state_used:  # (a final state used whole keeps the same units in every layer instead)
                t.balances.append((torch.cat(hiddens), count,
                                   f"the {count} layers{' and directions' if bidirectional else ''} of "
                                   f"'{node.name}' ({mode}) share one hidden size, and not every one's units can go"))
        if hx is not None:
            for hidden in hiddens:
                t.fix(hidden, f"'{node.name}' ({mode}) is given its initial state")
            for blk in flat_blocks([t.value(a) for a in tensor_nodes(hx)]):
                t.fix(blk.ids, f"'{node.name}' ({mode}) is given its initial state")
        out = (Block((ndim - 1,), broadcast_form(below, ndim - 1, ndim)),)
        state: Value = ()
        if state_used:  # a final state holds each layer's (and direction's) units in its own row
            state_ids = torch.stack(hiddens).reshape(count, *([1] * (ndim - 2)), -1)
            state = (Block((0, ndim - 1) if count > 1 else (ndim - 1,), state_ids),)
        t.values[node] = Many([out, Many([state, state]) if mode == "LSTM" else state])
        return True

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, nn.RNNBase)
        weight_hh, weight_ih = module.get_parameter("weight_hh_l0"), module.get_parameter("weight_ih_l0")
        module.hidden_size, module.input_size = int(weight_hh.shape[1]), int(weight_ih.shape[1])
        module._init_flat_weights()  # the tensors were replaced under it
