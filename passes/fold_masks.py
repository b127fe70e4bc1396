"""Fold masks into the tensors they guard and drop the mask nodes (``squash_mask``).

Before::

    %fc_weight : get_attr[target=fc.weight]
    %fc_weight_mask : get_attr[target=fc.weight_mask]
    %mul : call_function[target=torch.mul](args = (%fc_weight, %fc_weight_mask))
    %linear : call_function[target=torch.nn.functional.linear](args = (%x, %mul, %fc_bias))

After (``fc.weight`` now holds weight * mask, in place; the ``weight_mask`` buffer is gone)::

    %fc_weight : get_attr[target=fc.weight]
    %linear : call_function[target=torch.nn.functional.linear](args = (%x, %fc_weight, %fc_bias))
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .insert_masks import fetch_attr, find_masked_uses

__all__ = ["FoldMasks", "fold_masks"]


class FoldMasks(PassBase):
    """Multiply each masked tensor by its mask in place, then remove mask nodes and buffers.

    ``self.folded`` lists the tensor fqns that were folded (each once, tied uses included).
    """

    def __init__(self):
        super().__init__()
        self.folded: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.folded = []
        masks: dict[str, torch.Tensor] = {}
        for use in find_masked_uses(gm):
            if use.mask_fqn not in masks:
                masks[use.mask_fqn] = mask = fetch_attr(gm, use.mask_fqn)
                with torch.no_grad():
                    # In place: optimizers, tied aliases and compiled graphs keep the same tensor.
                    fetch_attr(gm, use.tensor.target).mul_(mask)
                self.folded.append(use.tensor_fqn)
            use.mul.replace_all_uses_with(use.tensor)
            gm.graph.erase_node(use.mul)
            if not use.mask.users:
                gm.graph.erase_node(use.mask)
        for mask_fqn in masks:
            module_fqn, _, name = mask_fqn.rpartition(".")
            delattr(gm.get_submodule(module_fqn), name)
        gm.recompile()
        return PassResult(gm, bool(masks))


def fold_masks(gm: fx.GraphModule) -> list[str]:
    """Fold every mask of ``gm`` in place; returns the fqns of the tensors folded."""
    folding = FoldMasks()
    folding(gm)
    return folding.folded
