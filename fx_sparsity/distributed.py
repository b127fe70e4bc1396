"""Masks under FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 shards parameters and leaves buffers whole, so by default every rank holds whole
masks. :func:`masks_as_parameters` makes them frozen parameters before ``fully_shard``: then
FSDP2 shards each mask like its weight and gathers both for the layer's forward, and each rank
keeps only its shard. :func:`whole_tensors` is what ``sparsifier.step()`` uses to compute masks
from whole weights between forwards.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from .passes import MASK_SUFFIX, mask_or_none

__all__ = ["masks_as_parameters", "whole_tensors", "refuse_unsharded_fsdp", "dtensor_type"]


def masks_as_parameters(model: nn.Module) -> list[str]:
    """Turn every ``*_mask`` buffer of ``model`` into a frozen ``nn.Parameter`` of the same name; in place.

    Call it on a prepared model before ``fully_shard``, so FSDP2 shards the masks with their
    weights (each rank holds its shard; the forward gathers the mask with the weight). The
    ``state_dict()`` keys stay the same; optimizers skip the masks (no gradient). Returns the
    mask fqns converted.
    """
    converted = []
    for module_fqn, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None or not name.endswith(MASK_SUFFIX) or name in module._non_persistent_buffers_set:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buffer, requires_grad=False))
            converted.append(f"{module_fqn}.{name}" if module_fqn else name)
    return converted


def dtensor_type():
    # No DTensor exists unless its module was imported (by fully_shard); importing it here costs seconds.
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


@contextlib.contextmanager
def whole_tensors(model: nn.Module, tensor_fqns: list[str]) -> Iterator[None]:
    """Inside, the tensors (and masks) at ``tensor_fqns`` are whole, also under FSDP2; masks written
    inside reach every rank's shard after.

    Unshards every FSDP2 module of ``model`` when one of the tensors is a shard, and reshards
    them after; a sharded mask (:func:`masks_as_parameters`) gets its whole new value sliced
    back into the local shard. Shards without FSDP2 to gather them are refused.
    """
    dtensor = dtensor_type()
    sharded = [fqn for fqn in tensor_fqns if dtensor is not None and isinstance(_tensor(model, fqn), dtensor)]
    if not sharded:
        yield
        return
    fsdp_type = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    fsdp = [m for m in model.modules() if fsdp_type is not None and isinstance(m, fsdp_type)]
    if not fsdp:
        raise RuntimeError(f"{sharded} are DTensor shards with no FSDP2 module to gather them; masks are computed "
                           f"from whole tensors")
    mask_shards = {fqn: mask for fqn in tensor_fqns
                   if isinstance(mask := mask_or_none(model, fqn + MASK_SUFFIX), dtensor)}
    for module in fsdp:
        module.unshard()
    try:
        yield
        whole = {fqn: mask_or_none(model, fqn + MASK_SUFFIX).detach().clone() for fqn in mask_shards}
    finally:
        for module in fsdp:
            module.reshard()
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for fqn, shard in mask_shards.items():
            local = distribute_tensor(whole[fqn], shard.device_mesh, shard.placements, src_data_rank=None)
            shard.to_local().copy_(local.to_local())


def refuse_unsharded_fsdp(model: nn.Module) -> None:
    """Between FSDP2's unshard() and reshard(), in-place writes to parameters are dropped at reshard."""
    dtensor = dtensor_type()
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if dtensor is None or fsdp_module is None:
        return
    if any(isinstance(m, fsdp_module) for m in model.modules()) and not all(
            isinstance(p, dtensor) for p in model.parameters()):
        raise RuntimeError(
            "squash_mask() on an unsharded FSDP2 module: reshard() would drop the folded weights; call "
            "prepared.reshard() first (squash_mask works on the DTensor shards)")
    sharded_masks = [n for n, p in model.named_parameters() if n.endswith(MASK_SUFFIX) and isinstance(p, dtensor)]
    if sharded_masks:
        raise RuntimeError(
            f"squash_mask(): {sharded_masks} are masks FSDP2 shards as parameters (masks_as_parameters), which it "
            f"would gather again at every forward after they are folded; take the model's full state dict "
            f"(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True) into an "
            f"unsharded prepared copy and squash that")


def _tensor(model: nn.Module, fqn: str):
    module_fqn, _, name = fqn.rpartition(".")
    return getattr(model.get_submodule(module_fqn), name, None)
