"""Inline ``call_module`` nodes into the graph their module's own forward traces to.

Before::

    %fc : call_module[target=fc](args = (%x,))

After (``nn.Linear.forward`` traced by ``torch.fx.Tracer``, its nodes spliced in place)::

    %fc_weight : get_attr[target=fc.weight]
    %fc_bias : get_attr[target=fc.bias]
    %linear : call_function[target=torch._C._nn.linear](args = (%x, %fc_weight, %fc_bias))

Once a layer's parameters are ``get_attr`` nodes, a mask can be put in front of them;
graphs from ``torch.export`` already look like this, so the mask pass serves both tracers.
Any layer whose forward ``torch.fx`` can trace is inlined this way (Linear, Conv with
every padding mode, Embedding, LayerNorm, Hugging Face ``Conv1D``, custom layers); its
own children stay ``call_module`` nodes, as ``symbolic_trace`` leaves them.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import fx, nn
from torch.fx.node import Argument
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .attrs import get_submodule
from .errors import FxSparsityError
from .manager import run_passes
from .recurrent import recurrent_graph

__all__ = ["InlineModules", "inline_modules", "splice_module", "InlineError"]


class InlineError(FxSparsityError, RuntimeError):
    """A module's forward could not be traced into its caller's graph."""


def _traced_forward(module: nn.Module) -> fx.Graph:
    try:
        if isinstance(module, nn.RNNBase):
            return recurrent_graph(module)
        return fx.Tracer().trace(module)
    except Exception as e:  # tracing fails in many ways; all mean "cannot see inside"
        raise InlineError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _bind_placeholders(graph: fx.Graph, module: nn.Module, node: fx.Node) -> dict[fx.Node, Argument]:
    """Map the traced forward's placeholders to the call's arguments (defaults where not given)."""
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    except TypeError as e:
        raise InlineError(f"its call does not match {type(module).__name__}.forward: {e}") from e
    env: dict[fx.Node, Argument] = {}
    for placeholder in graph.nodes:
        if placeholder.op != "placeholder":
            continue
        name = placeholder.target.lstrip("*")
        if name in bound.arguments:
            env[placeholder] = bound.arguments[name]
        elif placeholder.args:
            env[placeholder] = placeholder.args[0]  # the forward's default
        else:
            raise InlineError(f"no value for argument '{name}' of {type(module).__name__}.forward")
    return env


def splice_module(gm: fx.GraphModule, node: fx.Node, traced: fx.Graph | None = None) -> fx.Node:
    """Replace the ``call_module`` ``node`` by the nodes of its module's traced forward; returns the result node.

    New nodes are named from their targets (``fc_weight``, ``linear``) as
    ``Graph.get_attr``/``call_function`` name them; attribute targets get the module's fqn.
    Raises :class:`InlineError` (graph unchanged) when the forward cannot be traced or bound.
    """
    module = get_submodule(gm, node)
    traced = traced if traced is not None else _traced_forward(module)
    env = _bind_placeholders(traced, module, node)
    output = next(n for n in traced.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise InlineError(f"{type(module).__name__}.forward returns {type(output.args[0]).__name__}, not one value")
    with gm.graph.inserting_before(node):
        for inner in traced.nodes:
            if inner.op in ("placeholder", "output"):
                continue
            target = f"{node.target}.{inner.target}" if inner.op in ("get_attr", "call_module") else inner.target
            args, kwargs = fx.map_arg((inner.args, inner.kwargs), env.__getitem__)
            new = gm.graph.create_node(inner.op, target, args, kwargs, type_expr=inner.type)
            new.meta.update(node.meta)
            new.meta["inlined_from"] = (node.target, type(module).__name__)
            env[inner] = new
    result = env[output.args[0]]
    assert isinstance(result, fx.Node)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return result


class InlineModules(PassBase):
    """Splice in the traced forward of each ``call_module`` for which ``should_inline(fqn, module)`` holds.

    A module whose forward ``torch.fx`` cannot trace stays a ``call_module``; after the
    pass ``self.not_inlined`` maps its fqn to the reason.
    """

    def __init__(self, should_inline: Callable[[str, nn.Module], bool]):
        super().__init__()
        self.should_inline = should_inline
        self.not_inlined: dict[str, str] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.not_inlined.clear()
        traced: dict[int, fx.Graph] = {}  # one trace per module, however often it is called
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if not self.should_inline(node.target, module):
                continue
            try:
                if id(module) not in traced:
                    traced[id(module)] = _traced_forward(module)
                splice_module(gm, node, traced[id(module)])
                modified = True
            except InlineError as e:
                self.not_inlined[node.target] = str(e)
        return PassResult(gm, modified)


def inline_modules(gm: fx.GraphModule, should_inline: Callable[[str, nn.Module], bool]) -> fx.GraphModule:
    """Functional form of :class:`InlineModules`; modifies ``gm`` in place and returns it."""
    return run_passes(gm, InlineModules(should_inline))
