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

import sys

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
                tensor = fetch_attr(gm, use.tensor.target)
                with torch.no_grad():
                    # In place: optimizers, tied aliases and compiled graphs keep the same tensor.
                    tensor.mul_(_like(mask, tensor))
                self.folded.append(use.tensor_fqn)
            use.mul.replace_all_uses_with(use.tensor)
            gm.graph.erase_node(use.mul)
            if not use.mask.users:
                gm.graph.erase_node(use.mask)
        for mask_fqn in masks:
            module_fqn, _, name = mask_fqn.rpartition(".")
            delattr(gm.get_submodule(module_fqn), name)
        _recompile(gm)
        return PassResult(gm, bool(masks))


def _recompile(gm: fx.GraphModule) -> None:
    gm.recompile()
    # recompile() gives type(gm) its own call wrapper when it has none; on the subclass FSDP2's
    # fully_shard swaps in, that wrapper would call itself forever: keep the GraphModule class's.
    cls = type(gm)
    if "_wrapped_call" in vars(cls) and any("_wrapped_call" in vars(base) for base in cls.__mro__[1:]):
        del cls._wrapped_call


def _like(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """The mask laid out like ``tensor``: FSDP2 (``fully_shard``) keeps parameters as DTensor
    shards while masks stay whole buffers, so each rank multiplies its shard by its slice."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor anywhere
    if dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor) and not isinstance(
            mask, dtensor_module.DTensor):
        return dtensor_module.distribute_tensor(mask, tensor.device_mesh, tensor.placements, src_data_rank=None)
    return mask


def fold_masks(gm: fx.GraphModule) -> list[str]:
    """Fold every mask of ``gm`` in place; returns the fqns of the tensors folded."""
    folding = FoldMasks()
    folding(gm)
    return folding.folded
