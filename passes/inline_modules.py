"""Inline ``call_module`` nodes of standard layers into their functional form.

Before::

    %fc : call_module[target=fc](args = (%x,))

After::

    %fc_weight : get_attr[target=fc.weight]
    %fc_bias : get_attr[target=fc.bias]
    %fc : call_function[target=torch.nn.functional.linear](args = (%x, %fc_weight, %fc_bias))

Once a layer's parameters are ``get_attr`` nodes, a mask can be put in front of them;
graphs from ``torch.export`` already look like this, so the mask pass serves both tracers.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["InlineModules", "inline_modules", "is_inlinable", "INLINABLE_MODULES"]


def _get_attr(graph: fx.Graph, module_fqn: str, name: str, module: nn.Module) -> fx.Node | None:
    if getattr(module, name) is None:
        return None
    return graph.get_attr(f"{module_fqn}.{name}")


def _linear(graph, fqn, m: nn.Linear, args, kwargs):
    x = args[0] if args else kwargs["input"]
    return graph.call_function(F.linear, (x, _get_attr(graph, fqn, "weight", m), _get_attr(graph, fqn, "bias", m)))


def _bilinear(graph, fqn, m: nn.Bilinear, args, kwargs):
    x1, x2 = args
    return graph.call_function(F.bilinear, (x1, x2, _get_attr(graph, fqn, "weight", m), _get_attr(graph, fqn, "bias", m)))


_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _conv(graph, fqn, m: nn.modules.conv._ConvNd, args, kwargs):
    x = args[0] if args else kwargs["input"]
    padding = m.padding
    if m.padding_mode != "zeros":
        # Non-zero padding modes pad explicitly, then convolve without padding (as _conv_forward does).
        x = graph.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
        padding = 0
    weight, bias = _get_attr(graph, fqn, "weight", m), _get_attr(graph, fqn, "bias", m)
    return graph.call_function(_CONV_FN[type(m)], (x, weight, bias, m.stride, padding, m.dilation, m.groups))


def _embedding(graph, fqn, m: nn.Embedding, args, kwargs):
    x = args[0] if args else kwargs["input"]
    call_args = (x, _get_attr(graph, fqn, "weight", m), m.padding_idx, m.max_norm, m.norm_type,
                 m.scale_grad_by_freq, m.sparse)
    return graph.call_function(F.embedding, call_args)


def _layer_norm(graph, fqn, m: nn.LayerNorm, args, kwargs):
    x = args[0] if args else kwargs["input"]
    weight, bias = _get_attr(graph, fqn, "weight", m), _get_attr(graph, fqn, "bias", m)
    return graph.call_function(F.layer_norm, (x, m.normalized_shape, weight, bias, m.eps))


#: Layer types (exact types) this pass can rewrite, and how.
INLINABLE_MODULES: dict[type[nn.Module], Callable] = {
    nn.Linear: _linear,
    nn.Bilinear: _bilinear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
}


def _inlinable(module: nn.Module) -> Callable | None:
    # NonDynamicallyQuantizableLinear (MultiheadAttention.out_proj) is a Linear in all but name.
    for cls in type(module).__mro__:
        if cls in INLINABLE_MODULES:
            if cls is not type(module) and type(module).forward is not cls.forward:
                return None  # a subclass with its own forward is not the standard layer
            return INLINABLE_MODULES[cls]
    return None


class InlineModules(PassBase):
    """Rewrite each ``call_module`` for which ``should_inline(fqn, module)`` holds."""

    def __init__(self, should_inline: Callable[[str, nn.Module], bool]):
        super().__init__()
        self.should_inline = should_inline

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            rewrite = _inlinable(module)
            if rewrite is None or not self.should_inline(node.target, module):
                continue
            with gm.graph.inserting_before(node):
                new = rewrite(gm.graph, node.target, module, node.args, node.kwargs)
            new.meta.update(node.meta)
            new.meta["inlined_from"] = (node.target, type(module).__name__)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            modified = True
        if modified:
            gm.recompile()
        return PassResult(gm, modified)


def inline_modules(gm: fx.GraphModule, should_inline: Callable[[str, nn.Module], bool]) -> fx.GraphModule:
    """Functional form of :class:`InlineModules`; modifies ``gm`` in place and returns it."""
    return InlineModules(should_inline)(gm).graph_module


def is_inlinable(module: nn.Module) -> bool:
    return _inlinable(module) is not None

