"""Looking up and naming attributes of a GraphModule: the one place the pass library does it."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

__all__ = ["fetch_attr", "fetch_attr_or_none", "buffer_or_none", "mask_or_none", "has_submodule", "get_submodule",
           "unique_attr_name"]


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute at dotted ``target`` (a ``get_attr`` node's target); ``AttributeError`` if none.

    Unlike ``get_parameter``/``get_buffer`` it also finds plain tensor attributes, which
    torch.export and ``torch.fx.Tracer`` leave for constants.
    """
    obj = root
    for part in target.split(".") if target else ():
        obj = getattr(obj, part)
    return obj


def fetch_attr_or_none(root: nn.Module | None, target: str) -> Any:
    if root is None:
        return None
    try:
        return fetch_attr(root, target)
    except AttributeError:
        return None


def buffer_or_none(root: nn.Module | None, fqn: str) -> torch.Tensor | None:
    """The buffer at ``fqn``, or None when there is none (no module, or not a buffer)."""
    if root is None:
        return None
    try:
        return root.get_buffer(fqn)
    except AttributeError:
        return None


def mask_or_none(root: nn.Module | None, fqn: str) -> torch.Tensor | None:
    """The mask at ``fqn``: a buffer, or a frozen parameter (masks sharded with the weights by FSDP2)."""
    mask = buffer_or_none(root, fqn)
    if mask is None and root is not None:
        try:
            mask = root.get_parameter(fqn)
        except AttributeError:
            return None
    return mask


def has_submodule(root: nn.Module, fqn: str) -> bool:
    try:
        root.get_submodule(fqn)
    except AttributeError:
        return False
    return True


def get_submodule(root: nn.Module, node: fx.Node) -> nn.Module:
    """The module a ``call_module`` node calls: its target is the module's dotted name.

    torch types every node target as ``Callable | str``; a ``call_module`` node's is a str by construction.
    """
    return root.get_submodule(str(node.target))


def unique_attr_name(owner: nn.Module, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ... : the first that ``owner`` does not have yet."""
    candidate, i = name, 1
    while hasattr(owner, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate
