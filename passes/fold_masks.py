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

from .attrs import fetch_attr, mask_or_none
from .insert_masks import find_masked_uses, mask_fqn_for
from .manager import run_passes

__all__ = ["FoldMasks", "fold_masks"]


class FoldMasks(PassBase):
    """Multiply each masked tensor by its mask in place, then remove mask nodes and buffers.

    ``self.folded`` lists the tensor fqns that were folded (each once, tied uses included).
    A non-persistent mask buffer (a tied tensor whose mask another graph module owns, see
    ``MaskSpec.persistent``) is removed without multiplying: its owner folds the tensor.
    """

    def __init__(self, tensor_fqns: list[str] | None = None):
        super().__init__()
        self.tensor_fqns = tensor_fqns or []
        self.folded: list[str] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.folded = []
        masks: dict[str, torch.Tensor] = {}

        def fold(tensor_fqn: str, tensor: torch.Tensor, mask_fqn: str) -> None:
            masks[mask_fqn] = mask = fetch_attr(gm, mask_fqn)
            module_fqn, _, name = mask_fqn.rpartition(".")
            if name in gm.get_submodule(module_fqn)._non_persistent_buffers_set:
                return  # a tied tensor's mask that another graph module owns: that one folds it
            with torch.no_grad():
                # In place: optimizers, tied aliases and compiled graphs keep the same tensor.
                tensor.mul_(_like(mask, tensor))
            self.folded.append(tensor_fqn)

        for use in find_masked_uses(gm):
            if use.mask_fqn not in masks:
                fold(use.tensor_fqn, fetch_attr(gm, str(use.tensor.target)), use.mask_fqn)
            use.mul.replace_all_uses_with(use.tensor)
            gm.graph.erase_node(use.mul)
            if not use.mask.users:
                gm.graph.erase_node(use.mask)
        # Tensors the graph never reads have a mask but no mul node; fold them too.
        for tensor_fqn in self.tensor_fqns:
            mask_fqn = mask_fqn_for(tensor_fqn)
            if mask_fqn not in masks and mask_or_none(gm, mask_fqn) is not None:
                fold(tensor_fqn, fetch_attr(gm, tensor_fqn), mask_fqn)
        for mask_fqn in masks:
            module_fqn, _, name = mask_fqn.rpartition(".")
            delattr(gm.get_submodule(module_fqn), name)
        return PassResult(gm, bool(masks))


def _like(mask: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """The mask laid out like ``tensor``: FSDP2 (``fully_shard``) keeps parameters as DTensor
    shards while masks stay whole buffers, so each rank multiplies its shard by its slice."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor anywhere
    if dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor) and not isinstance(
            mask, dtensor_module.DTensor):
        return dtensor_module.distribute_tensor(mask, tensor.device_mesh, tensor.placements, src_data_rank=None)
    return mask


def fold_masks(gm: fx.GraphModule, tensor_fqns: list[str] | None = None) -> list[str]:
    """Fold every mask of ``gm`` in place; returns the fqns of the tensors folded.

    ``tensor_fqns`` names masked tensors to fold even where no graph node reads them.
    """
    folding = FoldMasks(tensor_fqns)
    run_passes(gm, folding)
    return folding.folded
