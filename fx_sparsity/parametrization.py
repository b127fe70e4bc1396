"""``FakeSparsity`` (the torch.ao.pruning parametrization) and importing models that carry it."""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList, is_parametrized, type_before_parametrizations

from .errors import SparsityConfigError

__all__ = ["FakeSparsity", "fake_sparsity_masks", "strip_fake_sparsity", "tensor_at"]


class FakeSparsity(nn.Module):
    """Parametrization multiplying a tensor by a fixed-identity ``mask`` buffer.

    Kept for parity with torch.ao.pruning (and so models prepared by it can be
    imported); fx_sparsity itself puts masks in the graph instead.
    """

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask.shape != x.shape:
            raise SparsityConfigError(  # an AssertionError too, as torch.ao's
                f"FakeSparsity: mask shape {tuple(self.mask.shape)} != tensor shape {tuple(x.shape)}")
        return self.mask * x

    def state_dict(self, *args, **kwargs):
        # The mask belongs to the sparsifier's state, not to the module's (as in torch.ao).
        return {}


def _parametrizations(module: nn.Module) -> dict[str, ParametrizationList]:
    """``module.parametrizations`` (a ``ModuleDict`` of ``ParametrizationList``) typed, in its order.

    torch types every module attribute as ``Tensor | Module``.
    """
    return {name: cast(ParametrizationList, plist)
            for name, plist in cast(nn.ModuleDict, module.parametrizations).items()}


def _is_fake_sparsity(p: nn.Module) -> bool:
    # Ours, torch.ao.pruning's, or any class of that name with a mask (older torch paths).
    return isinstance(p, FakeSparsity) or (type(p).__name__ == "FakeSparsity" and hasattr(p, "mask"))


def _mask_of(p: nn.Module) -> torch.Tensor:
    """The ``mask`` buffer of a FakeSparsity (any of those :func:`_is_fake_sparsity` accepts)."""
    return cast(torch.Tensor, p.mask)


def fake_sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{tensor_fqn: mask}`` for every tensor of ``model`` under FakeSparsity; changes nothing.

    Several FakeSparsity on one tensor multiply into one mask; another parametrization on a
    module that also carries FakeSparsity is refused, since importing would silently drop it.
    Modules with other parametrizations only (``weight_norm``) are left alone.
    """
    masks: dict[str, torch.Tensor] = {}
    for module_fqn, module in model.named_modules():
        if not _has_fake_sparsity(module):
            continue
        for tensor_name, plist in _parametrizations(module).items():
            others = [type(p).__name__ for p in plist if not _is_fake_sparsity(p)]
            if others:
                raise SparsityConfigError(
                    f"'{module_fqn}.{tensor_name}' carries parametrizations {others} besides FakeSparsity; "
                    f"fx_sparsity can only import FakeSparsity masks. Remove the others first "
                    f"(torch.nn.utils.parametrize.remove_parametrizations).")
            mask = _mask_of(plist[0])
            for p in list(plist)[1:]:
                mask = mask * _mask_of(p)
            masks[f"{module_fqn}.{tensor_name}" if module_fqn else tensor_name] = mask.detach().clone()
    return masks


def strip_fake_sparsity(model: nn.Module) -> None:
    """Remove the parametrizations from ``model`` in place, putting each dense original back.

    Not ``parametrize.remove_parametrizations``: that deletes the property from the
    parametrized *class*, which a deep copy shares with the user's original model, and
    so breaks the original. Call :func:`fake_sparsity_masks` first (it checks and keeps the masks).
    """
    for module in model.modules():
        if not _has_fake_sparsity(module):
            continue
        originals = {name: plist.original for name, plist in _parametrizations(module).items()}
        module.__class__ = type_before_parametrizations(module)
        del module._modules["parametrizations"]
        for name, original in originals.items():
            if isinstance(original, nn.Parameter):
                module.register_parameter(name, original)
            else:
                module.register_buffer(name, original)


def _has_fake_sparsity(module: nn.Module) -> bool:
    return is_parametrized(module) and any(_is_fake_sparsity(p) for plist in _parametrizations(module).values()
                                           for p in plist)


def tensor_at(model: nn.Module, tensor_fqn: str):
    """The tensor object at ``tensor_fqn``; for a parametrized tensor, its stored original."""
    module_fqn, _, name = tensor_fqn.rpartition(".")
    owner: Any = model
    for part in module_fqn.split(".") if module_fqn else []:
        owner = getattr(owner, part, None)
    if isinstance(owner, nn.Module) and is_parametrized(owner, name):
        plist = _parametrizations(owner)[name]
        others = [type(p).__name__ for p in plist if not _is_fake_sparsity(p)]
        if others:  # weight_norm, spectral_norm: the tensor is computed anew at each use
            raise SparsityConfigError(
                f"'{tensor_fqn}' is computed by the parametrizations {others}; fx_sparsity masks stored tensors: "
                f"remove them first (torch.nn.utils.parametrize.remove_parametrizations) or configure another "
                f"tensor")
        return plist.original
    return getattr(owner, name, None)
