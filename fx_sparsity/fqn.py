"""Fully-qualified-name helpers, with the same contract as torch.ao.pruning's."""
from __future__ import annotations

import difflib
from typing import Any

from torch import nn

__all__ = ["fqn_to_module", "module_to_fqn", "get_arg_info_from_tensor_fqn", "nearest_fqns"]


def module_to_fqn(model: nn.Module, module: nn.Module, prefix: str = "") -> str | None:
    """The fqn of ``module`` inside ``model`` ("" for the model itself), or None."""
    if module is model:
        return ""
    for name, child in model.named_children():
        found = module_to_fqn(child, module, ".")
        if found is not None:
            return prefix + name + found
    return None


def fqn_to_module(model: nn.Module | None, path: str) -> Any:
    """The module or tensor at ``path`` (like ``get_submodule``, tensors included), or None."""
    obj = model
    if path:
        for part in path.split("."):
            obj = getattr(obj, part, None)
    return obj


def get_arg_info_from_tensor_fqn(model: nn.Module, tensor_fqn: str) -> dict[str, Any]:
    """Split ``tensor_fqn`` into ``module_fqn``/``tensor_name`` and look the module up."""
    module_fqn, _, tensor_name = tensor_fqn.rpartition(".")
    return {
        "module_fqn": module_fqn,
        "module": fqn_to_module(model, module_fqn),
        "tensor_name": tensor_name,
        "tensor_fqn": tensor_fqn,
    }


def tensor_fqns(model: nn.Module) -> list[str]:
    """Every parameter and buffer name of ``model``, tied aliases included."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return names


def nearest_fqns(model: nn.Module, fqn: str, n: int = 3) -> list[str]:
    """The real tensor fqns closest in spelling to ``fqn`` (for error messages)."""
    names = tensor_fqns(model)
    close = difflib.get_close_matches(fqn, names, n=n, cutoff=0.0)
    return close or names[:n]
