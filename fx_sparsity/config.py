"""Sparsity configs: from torch.ao.pruning's config list to checked groups, and back onto the graph.

Plain functions over modules and dicts; nothing here traces, masks or trains.
"""
from __future__ import annotations

import copy
import difflib
import re
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .errors import NotATensorError, SparsityConfigError, UnknownTensorError, warn_user
from .fqn import fqn_to_module, get_arg_info_from_tensor_fqn, nearest_fqns
from .parametrization import tensor_at

# Internal: no __all__ (not API); the pipeline and the front end import what they use by name.

#: The attribute of a prepared GraphModule that holds ``{tensor_fqn: group}`` (the sparsifier's live groups).
CONFIG_ATTR = "fx_sparsity_config"


def default_config(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per ``nn.Linear`` weight (exact type), in torch.ao.pruning's order.

    torch.ao walks the module tree with a stack (children of a module in order, then the
    last non-Linear child first); group order matters for per-group scheduler lists and
    state dicts, so we keep it.
    """
    names = {id(m): name for name, m in model.named_modules()}  # a module under two names: its first, as torch.ao
    config, stack, seen = [], [model], set()
    while stack:
        module = stack.pop()
        for child in module.children():
            if type(child) is nn.Linear:
                if id(child) in seen:  # reached again under another name: torch.ao configures (masks) it twice
                    continue
                seen.add(id(child))
                prefix = names[id(child)]
                config.append({"tensor_fqn": f"{prefix}.weight" if prefix else "weight"})
            else:
                stack.append(child)
    return config


def config_or_default(model: nn.Module, config: list | None, imported: dict[str, torch.Tensor]) -> list:
    """The config to use: the user's, else the imported torch.ao masks' tensors, else every nn.Linear weight."""
    if config is not None:
        return list(config)
    if imported:
        return [{"tensor_fqn": fqn} for fqn in imported]
    default = default_config(model)
    _warn_tied(model, [entry["tensor_fqn"] for entry in default])
    return default


def _warn_tied(model: nn.Module, tensor_fqns: list[str]) -> None:
    """Say so when the default config takes a weight another module uses too (a tied lm_head and embedding):
    its mask then zeroes part of the other module's tensor as well."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append(f"{name}.{leaf}" if name else leaf)
    for fqn in tensor_fqns:
        others = [h for h in dict.fromkeys(holders.get(id(tensor_at(model, fqn)), [])) if h != fqn]
        if others:
            warn_user(f"config=None takes every nn.Linear weight, and '{fqn}' is tied to {others}: its mask zeroes "
                      f"the same entries there (half an embedding table at 50%). To keep it dense, name the tensors "
                      f"to sparsify in config= and leave '{fqn}' out")


def _resolve_tensor(model: nn.Module, tensor_fqn: Any, where: str) -> torch.Tensor:
    if not isinstance(tensor_fqn, str):
        raise SparsityConfigError(f"{where}: tensor_fqn must be a string like 'fc1.weight', got {tensor_fqn!r}")
    target = fqn_to_module(model, tensor_fqn)
    if not isinstance(target, nn.Module):
        target = tensor_at(model, tensor_fqn)
    if isinstance(target, nn.Module):
        tensors = [f"{tensor_fqn}.{n}" if tensor_fqn else n for n, _ in target.named_parameters(recurse=False)]
        raise NotATensorError(
            f"{where}: tensor_fqn '{tensor_fqn}' names a module ({type(target).__name__}), not a tensor; "
            f"name one of its tensors, e.g. {tensors or nearest_fqns(model, tensor_fqn)}")
    if not isinstance(target, torch.Tensor):
        raise UnknownTensorError(
            f"{where}: tensor_fqn '{tensor_fqn}' is not a parameter or buffer of {type(model).__name__}; "
            f"nearest real tensor fqns: {nearest_fqns(model, tensor_fqn)}")
    if not target.is_floating_point():
        raise SparsityConfigError(
            f"{where}: '{tensor_fqn}' has dtype {target.dtype}; only floating-point tensors can be "
            f"sparsified (a mask multiplies the tensor)")
    return target


_PARAMETRIZED = re.compile(r"(.*?)parametrizations\.(\w+)\.(?:original\d*|\d+\.\w+)")


def build_groups(model: nn.Module, original: nn.Module, defaults: dict, config: list) -> list[dict[str, Any]]:
    """Merge defaults into each config entry, check it, and add module/tensor info (torch.ao's rules).

    ``model`` is the module being prepared; ``original`` the user's (a config entry may
    name a ``module`` of either).
    """
    if not isinstance(defaults, dict):
        raise SparsityConfigError(f"sparsifier defaults must be a dict, got {type(defaults).__name__}")
    groups: list[dict[str, Any]] = []
    seen: dict[int, str] = {}
    for i, entry in enumerate(config):
        if not isinstance(entry, dict):
            raise SparsityConfigError(
                f"config[{i}] is a {type(entry).__name__}; config elements should be dicts, e.g. "
                f"[{{'tensor_fqn': 'foo.bar.weight'}}, {{'tensor_fqn': ...}}, ...]")
        group = copy.deepcopy(defaults)
        group.update(entry)
        tensor_fqn = group.get("tensor_fqn")
        storage = _PARAMETRIZED.fullmatch(tensor_fqn) if isinstance(tensor_fqn, str) else None
        if storage:  # a torch.ao-prepared tensor's storage, not the tensor
            raise SparsityConfigError(f"config[{i}]: '{tensor_fqn}' is the storage of a parametrization; name the "
                                      f"tensor itself, '{storage[1]}{storage[2]}'")
        if tensor_fqn is None:
            raise SparsityConfigError(
                f"config[{i}] has no tensor_fqn: tensor_fqn is a required argument in the sparsity config "
                f"(it replaces the older `module` and [module]`fqn` arguments)")
        tensor = _resolve_tensor(model, tensor_fqn, f"config[{i}]")
        info = get_arg_info_from_tensor_fqn(model, tensor_fqn)
        for key, value in info.items():
            if key not in group:
                continue
            given = group[key]
            agrees = (given is value or given is fqn_to_module(original, info["module_fqn"])
                      if key == "module" else given == value)
            if not agrees:
                raise SparsityConfigError(
                    f"config[{i}]: given both `{key}`={given!r} and `tensor_fqn`='{tensor_fqn}'; "
                    f"they must agree (drop `{key}`: it is derived from tensor_fqn)")
        if id(tensor) in seen:
            other = seen[id(tensor)]
            what = "twice" if other == tensor_fqn else f"as '{other}' and as '{tensor_fqn}' (tied: the same tensor)"
            raise SparsityConfigError(
                f"config[{i}]: tensor '{tensor_fqn}' is configured {what}; configure each tensor once "
                f"(one mask is applied at every use of a tied tensor)")
        seen[id(tensor)] = tensor_fqn
        owner = info.get("module")
        if isinstance(owner, nn.modules.batchnorm._NormBase) and info.get("tensor_name") in owner._buffers:
            raise SparsityConfigError(
                f"config[{i}]: '{tensor_fqn}' is a running statistic {type(owner).__name__} updates in place while "
                f"training; a mask in front of it would stop those updates. Configure its weight instead")
        _warn_typos(entry, defaults, i)
        mask_dtype = group.get("mask_dtype")
        if mask_dtype is not None and not (mask_dtype == torch.bool or (
                isinstance(mask_dtype, torch.dtype) and mask_dtype.is_floating_point)):
            raise SparsityConfigError(
                f"config[{i}]: mask_dtype must be torch.bool or a floating dtype (default: the tensor's), "
                f"got {mask_dtype!r}")
        group.update(info)
        groups.append(group)
    return groups


_KNOWN_KEYS = ("tensor_fqn", "module", "module_fqn", "tensor_name", "mask", "mask_dtype", "sparsity_level")


def _warn_typos(entry: dict, defaults: dict, i: int) -> None:
    """A config key close to a known one is most likely a typo: the sparsifier would ignore it (torch.ao passes
    every key on to ``update_mask`` as it is, so an unknown key is not an error)."""
    known = set(_KNOWN_KEYS) | set(defaults)
    for key in entry:
        if isinstance(key, str) and key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if near:
                warn_user(f"config[{i}]: unknown key '{key}' (did you mean '{near[0]}'?); it is kept in the group "
                          f"and the sparsifier ignores it")


def initial_mask(group: dict, tensor: torch.Tensor, imported: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mask a group starts with: its config ``mask``, an imported torch.ao mask, or all ones.

    Pops ``mask`` from the group (a mask lives in the graph, not in the config).
    """
    mask = group.pop("mask", None)
    if mask is None:
        mask = imported.get(group["tensor_fqn"])
    dtype = group.get("mask_dtype") or tensor.dtype
    if mask is None:
        return torch.ones(tensor.shape, dtype=dtype, device=tensor.device)
    mask = torch.as_tensor(mask)
    if mask.shape != tensor.shape:
        raise SparsityConfigError(
            f"initial mask for '{group['tensor_fqn']}' has shape {tuple(mask.shape)}, the tensor has "
            f"{tuple(tensor.shape)}")
    return mask.detach().to(dtype=dtype, device=tensor.device).clone()


def publish_config(gm: fx.GraphModule, config: dict[str, dict[str, Any]]) -> None:
    """Record ``gm.fx_sparsity_config = {tensor_fqn in gm: group}`` for printing and lowering.

    The values are the sparsifier's own group dicts, so a scheduler's in-place level
    changes show up. A GraphModule's deepcopy keeps only what its graph uses, so the
    attribute is also listed among the user-preserved attributes in ``gm.meta``.
    """
    setattr(gm, CONFIG_ATTR, config)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[CONFIG_ATTR] = config


def sparsity_config(gm: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``{tensor_fqn: group}`` that :func:`publish_config` recorded on ``gm`` (empty if none)."""
    return getattr(gm, CONFIG_ATTR, None) or {}
