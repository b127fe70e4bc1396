"""Insert torch.ao observers on the values around chosen nodes, and take them out again.

Before (``observe_linears(gm, ["linear"], HistogramObserver)``)::

    %linear : call_function[target=torch.nn.functional.linear](args = (%x, %mul, %fc_bias))
    %relu : call_function[target=torch.relu](args = (%linear,))
    %out : call_function[target=torch.tanh](args = (%relu,))

After::

    %activation_post_process_0 : call_module[target=activation_post_process_0](args = (%x,))
    %linear : call_function[target=torch.nn.functional.linear](args = (%activation_post_process_0, %mul, %fc_bias))
    %relu : call_function[target=torch.relu](args = (%linear,))
    %activation_post_process_1 : call_module[target=activation_post_process_1](args = (%relu,))
    %out : call_function[target=torch.tanh](args = (%activation_post_process_1,))

An observer returns its input, so the observed module computes what it did before.
The output of a node is observed after the ops that keep a quantized tensor meaningful
(:func:`quant_transparent`: relu, identity dropouts) when they are its only user, as
torch.ao observes a fused Linear+ReLU after the ReLU. A value is observed once: the
output observer of one linear is the input observer of the next.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["ObservedNode", "InsertObservers", "observe_linears", "remove_observers", "quant_transparent",
           "is_relu", "OBSERVER_PREFIX"]

OBSERVER_PREFIX = "activation_post_process_"

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    return False


def _is_identity_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
        p, train = (list(node.args[1:]) + [node.kwargs.get("p"), node.kwargs.get("train")])[:2]
        return p == 0 or train is False
    if node.op == "call_function" and node.target is F.dropout:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return p == 0 or training is False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return (isinstance(module, nn.Dropout) and module.p == 0) or isinstance(module, nn.Identity)
    return False


def quant_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops a quantized tensor passes through with its qparams still right: relu, identity dropouts.

    A relu keeps values in ``[0, max]``, so a tensor quantized with qparams observed after
    the relu (zero point at the bottom of the range) already is the relu's output.
    """
    return is_relu(gm, node) or _is_identity_dropout(gm, node)


def output_value(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The value to observe for ``node``'s output: past single-user quantization-transparent ops."""
    while len(node.users) == 1:
        (user,) = node.users
        if not quant_transparent(gm, user) or user.args[0] is not node:
            break
        node = user
    return node


@dataclass
class ObservedNode:
    """Where the input and output of one node are observed (observer fqns in the graph module)."""

    input: str
    output: str
    output_node: str  # name of the node whose value the output observer sees


class InsertObservers(PassBase):
    """Observe the first argument and the output of each node named in ``targets``.

    ``make_observer()`` returns a fresh torch.ao observer (e.g. ``qconfig.activation``).
    After the pass, ``self.observed[node_name]`` says which observers serve that node.
    """

    def __init__(self, targets: list[str], make_observer: Callable[[], nn.Module], prefix: str = OBSERVER_PREFIX):
        super().__init__()
        self.targets = list(targets)
        self.make_observer = make_observer
        self.prefix = prefix
        self.observed: dict[str, ObservedNode] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.observed = {}
        observers: dict[fx.Node, fx.Node] = {}  # value -> its observer node
        names = set(self.targets)
        counter = [0]

        def observe(value: fx.Node) -> str:
            if value in observers.values():
                return value.target
            if value not in observers:
                while hasattr(gm, f"{self.prefix}{counter[0]}"):
                    counter[0] += 1
                fqn = f"{self.prefix}{counter[0]}"
                gm.add_submodule(fqn, self.make_observer())
                with gm.graph.inserting_after(value):
                    obs = gm.graph.call_module(fqn, (value,))
                value.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
                observers[value] = obs
            return observers[value].target

        for node in list(gm.graph.nodes):
            if node.name not in names:
                continue
            if not node.args or not isinstance(node.args[0], fx.Node):
                raise ValueError(f"node '{node.name}' has no tensor input to observe")
            input_fqn = observe(node.args[0])
            out = output_value(gm, node)
            self.observed[node.name] = ObservedNode(input_fqn, observe(out), out.name)
        missing = names - set(self.observed)
        if missing:
            raise ValueError(f"nodes {sorted(missing)} are not in the graph")
        gm.recompile()
        return PassResult(gm, bool(self.observed))


def observe_linears(gm: fx.GraphModule, targets: list[str],
                    make_observer: Callable[[], nn.Module]) -> dict[str, ObservedNode]:
    """Functional form of :class:`InsertObservers`; modifies ``gm`` in place."""
    inserting = InsertObservers(targets, make_observer)
    inserting(gm)
    return inserting.observed


def remove_observers(gm: fx.GraphModule, fqns) -> None:
    """Take the observer call_module nodes (and submodules) named in ``fqns`` out again."""
    fqns = set(fqns)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in fqns:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for fqn in fqns:
        gm.delete_submodule(fqn)
    gm.recompile()
