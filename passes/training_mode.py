"""Switch an exported graph between training and inference behaviour.

``torch.export`` records dropout, batch norm and recurrent layers with the mode the model was in as a
constant argument, and its GraphModule refuses ``.train()``/``.eval()``. This pass
rewrites those constants. Before (exported in eval mode), ``SetTrainingMode(True)``::

    %batch_norm : call_function[target=aten.batch_norm.default](args = (%x, %w, %b, %m, %v, False, 0.1, 1e-05, False))
    %dropout : call_function[target=aten.dropout.default](args = (%batch_norm, 0.5, False))

After::

    %add_ : call_function[target=aten.add_.Tensor](args = (%bn_num_batches_tracked, 1))
    %batch_norm : call_function[target=aten.batch_norm.default](args = (%x, %w, %b, %m, %v, True, 0.1, 1e-05, False))
    %dropout : call_function[target=aten.dropout.default](args = (%batch_norm, 0.5, True))

In training mode batch norm updates its running statistics in place (as the module does)
and counts batches in ``num_batches_tracked``; in eval mode the counter adds 0.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .attrs import fetch_attr_or_none

__all__ = ["SetTrainingMode"]

_aten = torch.ops.aten
# op -> index of its training flag
_MODE_ARG = {_aten.dropout.default: 2, _aten.batch_norm.default: 5, _aten.lstm.input: 6, _aten.gru.input: 6,
             _aten.rnn_tanh.input: 6, _aten.rnn_relu.input: 6}  # recurrent layers: dropout between layers


class SetTrainingMode(PassBase):
    """Set the training flag of every dropout and batch norm of an exported graph to ``training``."""

    def __init__(self, training: bool):
        super().__init__()
        self.training = bool(training)

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        counters = {n.args[0]: n for n in gm.graph.nodes
                    if n.op == "call_function" and n.target is _aten.add_.Tensor and isinstance(n.args[0], fx.Node)
                    and n.args[0].op == "get_attr" and str(n.args[0].target).endswith("num_batches_tracked")}
        counter_of = {str(get_attr.target): add for get_attr, add in counters.items()}
        for node in list(gm.graph.nodes):
            index = _MODE_ARG.get(node.target) if node.op == "call_function" else None
            if index is None or len(node.args) <= index:
                continue
            if node.args[index] is not self.training:
                node.update_arg(index, self.training)
                modified = True
            if node.target is _aten.batch_norm.default:
                modified |= self._count_batches(gm, node, counter_of)
        return PassResult(gm, modified)

    def _count_batches(self, gm: fx.GraphModule, batch_norm: fx.Node, counter_of: dict[str, fx.Node]) -> bool:
        running_mean = batch_norm.args[3]
        if not (isinstance(running_mean, fx.Node) and running_mean.op == "get_attr"):
            return False
        target = str(running_mean.target).rpartition(".")[0]
        target = f"{target}.num_batches_tracked" if target else "num_batches_tracked"
        if fetch_attr_or_none(gm, target) is None:
            return False
        step = 1 if self.training else 0
        add = counter_of.get(target)
        if add is None:
            if not self.training:
                return False
            with gm.graph.inserting_before(batch_norm):
                add = gm.graph.call_function(_aten.add_.Tensor, (gm.graph.get_attr(target), step))
            counter_of[target] = add
            return True
        if add.args[1] != step:
            add.update_arg(1, step)
            return True
        return False
