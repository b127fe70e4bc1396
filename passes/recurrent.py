"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` as one graph call that takes the layers' weights as arguments.

``torch.fx`` cannot trace these modules' forward (it branches on the input's rank and type), so
``symbolic_trace`` leaves them ``call_module`` leaves and no mask can reach their weights. The
graph :func:`recurrent_graph` writes for one of them::

    %input : placeholder[target=input]
    %hx : placeholder[target=hx](default=None)
    %weight_ih_l0 : get_attr[target=weight_ih_l0]
    %weight_hh_l0 : get_attr[target=weight_hh_l0]
    ...
    %recurrent : call_function[target=recurrent](args = ("LSTM", %input, %hx, True, 1, 0.0, False, False,
                                                         True, %weight_ih_l0, %weight_hh_l0, ...))

is spliced into the model's graph (``passes.inline_modules``), where the weights can be masked
and their channels followed (``passes.channels``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .errors import FxSparsityError

__all__ = ["recurrent", "recurrent_graph", "GATES", "RecurrentError"]

#: Gate blocks stacked in each ``weight_ih``/``weight_hh``/bias, per mode.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_RUN: dict[str, Callable[..., Any]] = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
                                       "RNN_RELU": torch._VF.rnn_relu}


class RecurrentError(FxSparsityError, ValueError):
    """A recurrent layer that cannot be written as one call with a fixed configuration."""


def recurrent(mode: str, input: torch.Tensor, hx: Any, has_biases: bool, num_layers: int, dropout: float,
              training: bool, bidirectional: bool, batch_first: bool, *weights: torch.Tensor) -> Any:
    """What ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``'s forward returns on a tensor input, with the weights given
    (in the module's ``_flat_weights`` order); sizes are read from the weights."""
    if isinstance(input, fx.Proxy):  # traced again (a GraphModule unpickled, copied or retraced): stay one call
        return input.tracer.create_proxy("call_function", recurrent, (mode, input, hx, has_biases, num_layers, dropout,
                                                                      training, bidirectional, batch_first, *weights),
                                         {})
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{mode}: input must be a tensor here (a PackedSequence needs the layer as a module: "
                        f"prepare with scope=\"layers\" and leave the layer's weights out of the config)")
    if input.dim() not in (2, 3):
        raise ValueError(f"{mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
    batched = input.dim() == 3
    batch_dim = 0 if batch_first else 1
    if not batched:
        input = input.unsqueeze(batch_dim)
    directions = 2 if bidirectional else 1
    hidden = weights[0].shape[0] // GATES[mode]
    state = weights[1].shape[1]  # the hidden state's width (an LSTM's projection size when it has one)
    if hx is None:
        zeros = (num_layers * directions, input.shape[batch_dim])
        h0 = input.new_zeros(*zeros, state)
        hx = (h0, input.new_zeros(*zeros, hidden)) if mode == "LSTM" else h0
    elif not batched:
        hx = tuple(h.unsqueeze(1) for h in hx) if mode == "LSTM" else hx.unsqueeze(1)
    if dropout == 0:  # the flag then only tells cuDNN whether a backward will come
        training = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    run = _RUN[mode]
    if mode == "LSTM":
        output, h, c = run(input, hx, list(weights), has_biases, num_layers, dropout, training, bidirectional,
                           batch_first)
        if not batched:
            output, h, c = output.squeeze(batch_dim), h.squeeze(1), c.squeeze(1)
        return output, (h, c)
    output, h = run(input, hx, list(weights), has_biases, num_layers, dropout, training, bidirectional, batch_first)
    if not batched:
        output, h = output.squeeze(batch_dim), h.squeeze(1)
    return output, h


def recurrent_graph(module: nn.RNNBase) -> fx.Graph:
    """The graph of ``module``'s forward as one :func:`recurrent` call on its weights (see the module docstring)."""
    if module.dropout > 0 and module.num_layers > 1:
        raise RecurrentError(f"{type(module).__name__} with dropout={module.dropout} between its layers: written as "
                             f"one call, its train/eval mode would be fixed when traced")
    graph = fx.Graph()
    input = graph.placeholder("input")
    hx = graph.placeholder("hx", default_value=None)
    weights = [graph.get_attr(name) for name in module._flat_weights_names]
    result = graph.call_function(recurrent, (module.mode, input, hx, module.bias, module.num_layers,
                                             float(module.dropout), False, module.bidirectional, module.batch_first,
                                             *weights))
    graph.output(result)
    return graph
