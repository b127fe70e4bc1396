"""The graph half of preparing: put each masked tensor's mask in front of all its uses.

Before (``symbolic_trace`` of a model, ``fc.weight`` to be masked)::

    %fc : call_module[target=fc](args = (%x,))

After ``prepare_masks(gm, [MaskSpec("fc.weight", ones)], model)``::

    %fc_weight : get_attr[target=fc.weight]
    %fc_weight_mask : get_attr[target=fc.weight_mask]
    %mul : call_function[target=torch.mul](args = (%fc_weight, %fc_weight_mask))
    %fc_bias : get_attr[target=fc.bias]
    %linear : call_function[target=torch._C._nn.linear](args = (%x, %mul, %fc_bias))

Three steps, each its own pass or helper: make sure the graph module holds every masked
tensor under its configured name, inline the modules that own one
(:class:`InlineModules`), insert the masks (:class:`InsertMasks`). Knows tensors and
graphs, nothing of sparsifiers.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from .attrs import fetch_attr, fetch_attr_or_none
from .inline_modules import InlineModules
from .insert_masks import InsertMasks, MaskSpec
from .manager import run_passes

__all__ = ["prepare_masks", "place_tensor", "owns_one_of"]


def place_tensor(gm: fx.GraphModule, tensor_fqn: str, tensor: torch.Tensor) -> None:
    """Make sure ``gm`` holds ``tensor`` under ``tensor_fqn``.

    GraphModules only copy the attributes their graph uses, and torch.export keeps one
    name per tied tensor; an alias keeps masks and state dicts under the user's names.
    """
    if fetch_attr_or_none(gm, tensor_fqn) is not None:
        return
    owner: nn.Module = gm
    module_fqn, _, name = tensor_fqn.rpartition(".")
    for part in module_fqn.split(".") if module_fqn else []:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(name, tensor)
    else:
        owner.register_buffer(name, tensor)


def owns_one_of(tensors: list[torch.Tensor]) -> Callable[[str, nn.Module], bool]:
    """``pred(fqn, module)``: does ``module`` itself hold one of ``tensors``? (what to inline)"""
    ids = {id(t) for t in tensors}

    def owns(fqn: str, module: nn.Module) -> bool:
        return any(id(t) in ids for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))

    return owns


def prepare_masks(gm: fx.GraphModule, specs: list[MaskSpec], source: nn.Module) -> fx.GraphModule:
    """Mask every use of each ``spec.tensor_fqn`` of ``gm`` (tensors looked up in ``source``); in place.

    Traced by ``fx_sparsity.tracing.trace`` with ``see_inside=owns_one_of(...)``, the owners
    are inlined already and :class:`InlineModules` finds nothing to do; it serves graphs
    made elsewhere (a GraphModule passed in, a layer that did not trace with the model).
    """
    for spec in specs:
        place_tensor(gm, spec.tensor_fqn, fetch_attr(source, spec.tensor_fqn))
    owners = owns_one_of([fetch_attr(gm, spec.tensor_fqn) for spec in specs])
    to_inline = any(n.op == "call_module" and owners(str(n.target), gm.get_submodule(str(n.target)))
                    for n in gm.graph.nodes)
    inline = InlineModules(owners)
    return run_passes(gm, *([inline] if to_inline else []), InsertMasks(specs, inline.not_inlined))
