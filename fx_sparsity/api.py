"""The graph API: ``prepare_fx_sparse`` composes tracing, the pass library and a sparsifier."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from .errors import SparsityConfigError
from .fqn import fqn_to_module, get_arg_info_from_tensor_fqn, nearest_fqns
from .parametrization import fake_sparsity_masks, strip_fake_sparsity, tensor_at
from .passes import InlineModules, InsertMasks, MaskSpec, fetch_attr, mask_fqn_for
from .tracing import TRACERS, trace

__all__ = ["prepare_fx_sparse", "default_config", "publish_config"]


def default_config(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per ``nn.Linear`` weight (exact type), in torch.ao.pruning's order.

    torch.ao walks the module tree with a stack (children of a module in order, then the
    last non-Linear child first); group order matters for per-group scheduler lists and
    state dicts, so we keep it.
    """
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    config, stack = [], [model]
    while stack:
        module = stack.pop()
        for child in module.children():
            if type(child) is nn.Linear:
                prefix = names[id(child)]
                config.append({"tensor_fqn": f"{prefix}.weight" if prefix else "weight"})
            else:
                stack.append(child)
    return config


def _resolve_tensor(model: nn.Module, tensor_fqn: Any, where: str) -> torch.Tensor:
    if not isinstance(tensor_fqn, str):
        raise SparsityConfigError(f"{where}: tensor_fqn must be a string like 'fc1.weight', got {tensor_fqn!r}")
    target = fqn_to_module(model, tensor_fqn)
    if not isinstance(target, nn.Module):
        target = tensor_at(model, tensor_fqn)
    if isinstance(target, nn.Module):
        tensors = [f"{tensor_fqn}.{n}" if tensor_fqn else n for n, _ in target.named_parameters(recurse=False)]
        raise SparsityConfigError(
            f"{where}: tensor_fqn '{tensor_fqn}' names a module ({type(target).__name__}), not a tensor; "
            f"name one of its tensors, e.g. {tensors or nearest_fqns(model, tensor_fqn)}")
    if not isinstance(target, torch.Tensor):
        raise SparsityConfigError(
            f"{where}: tensor_fqn '{tensor_fqn}' is not a parameter or buffer of {type(model).__name__}; "
            f"nearest real tensor fqns: {nearest_fqns(model, tensor_fqn)}")
    if not target.is_floating_point():
        raise SparsityConfigError(
            f"{where}: '{tensor_fqn}' has dtype {target.dtype}; only floating-point tensors can be "
            f"sparsified (a mask multiplies the tensor)")
    return target


def _build_groups(model: nn.Module, original: nn.Module, defaults: dict, config: list) -> list[dict[str, Any]]:
    """Merge defaults into each config entry, check it, and add module/tensor info (torch.ao's rules)."""
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
        mask_dtype = group.get("mask_dtype")
        if mask_dtype is not None and not (mask_dtype == torch.bool or (
                isinstance(mask_dtype, torch.dtype) and mask_dtype.is_floating_point)):
            raise SparsityConfigError(
                f"config[{i}]: mask_dtype must be torch.bool or a floating dtype (default: the tensor's), "
                f"got {mask_dtype!r}")
        group.update(info)
        groups.append(group)
    return groups


def _place_in_graph_module(gm: fx.GraphModule, tensor_fqn: str, tensor: torch.Tensor) -> None:
    """Make sure ``gm`` holds the tensor under the configured name.

    GraphModules only copy the attributes their graph uses, and torch.export keeps one
    name per tied tensor; an alias keeps masks and state dicts under the user's names.
    """
    try:
        fetch_attr(gm, tensor_fqn)
        return
    except AttributeError:
        pass
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


def _initial_mask(group: dict, tensor: torch.Tensor, imported: dict[str, torch.Tensor]) -> torch.Tensor:
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


def prepare_fx_sparse(model: nn.Module, sparsifier, config: list[dict] | None = None, *,
                      example_inputs: Any = None, tracer: str = "symbolic", inplace: bool = False) -> fx.GraphModule:
    """Trace ``model`` and put a mask-multiply node in front of every use of each configured tensor.

    Same config semantics as ``torch.ao.pruning.BaseSparsifier.prepare``: each entry is a
    dict with a ``tensor_fqn`` plus overrides of the sparsifier's defaults; ``config=None``
    means every ``nn.Linear`` weight (or, for a model prepared by torch.ao.pruning, every
    tensor carrying a ``FakeSparsity`` mask — those masks are imported).

    The input model is left as it was unless ``inplace=True``. Returns the prepared
    ``GraphModule``, which is also ``sparsifier.model``.
    """
    from .sparsifier.base_sparsifier import BaseSparsifier

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sparsifier, BaseSparsifier):
        hint = (" (a torch.ao.pruning sparsifier? use the fx_sparsity class of the same name)"
                if type(sparsifier).__module__.startswith("torch.ao") else "")
        raise TypeError(f"sparsifier must be an fx_sparsity BaseSparsifier, got {type(sparsifier).__name__}{hint}")
    if sparsifier.groups:
        raise SparsityConfigError(
            f"{type(sparsifier).__name__} is already prepared ({len(sparsifier.groups)} groups); "
            f"use a new sparsifier for each model")
    if config is not None and not isinstance(config, (list, tuple)):
        raise TypeError(f"config must be a list of dicts (or None for every nn.Linear weight), got "
                        f"{type(config).__name__}")
    if tracer not in TRACERS:
        raise SparsityConfigError(f"tracer={tracer!r} is not one of {TRACERS}")

    # Everything that can fail on the user's input is checked before the model is touched.
    if inplace:
        work = model
    else:
        try:
            work = copy.deepcopy(model)
        except Exception as e:
            raise TypeError(f"cannot copy {type(model).__name__} ({e}); pass inplace=True to prepare it in place") from e
    # A failure half-way must not leave a half-prepared model (in place) or sparsifier behind.
    undo = _undo_log(work, sparsifier) if inplace else _undo_log(None, sparsifier)
    try:
        return _prepare_work(work, model, sparsifier, config, tracer, example_inputs)
    except BaseException:
        undo()
        raise


def _undo_log(model: nn.Module | None, sparsifier):
    """A function that puts ``model``'s modules (class, tensors, hooks, graph) and the sparsifier back as now."""
    saved = []
    for m in model.modules() if model is not None else ():
        attrs = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in m.__dict__.items()}
        graph = copy.deepcopy(m.graph) if isinstance(m, fx.GraphModule) else None
        saved.append((m, m.__class__, attrs, graph))
    sparsifier_attrs = {k: copy.copy(v) for k, v in sparsifier.__dict__.items() if k in ("model", "config", "groups", "state")}

    def undo():
        for m, cls, attrs, graph in saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            if graph is not None:
                m.graph = graph
                m.recompile()
        sparsifier.__dict__.update(sparsifier_attrs)

    return undo


def _prepare_work(work: nn.Module, model: nn.Module, sparsifier, config, tracer: str, example_inputs) -> fx.GraphModule:
    imported = fake_sparsity_masks(work)
    groups = _build_groups(work, model, sparsifier.defaults, _config_or_default(work, config, imported))
    for group in groups:
        sparsifier.validate_group(group, tensor_at(work, group["tensor_fqn"]))
    strip_fake_sparsity(work)

    gm = trace(work, tracer, example_inputs)
    specs = []
    for index, group in enumerate(groups):
        tensor = fetch_attr(work, group["tensor_fqn"])
        _place_in_graph_module(gm, group["tensor_fqn"], tensor)
        tensor = fetch_attr(gm, group["tensor_fqn"])
        specs.append(MaskSpec(group["tensor_fqn"], _initial_mask(group, tensor, imported), {"group": index}))
    masked = {id(fetch_attr(gm, spec.tensor_fqn)) for spec in specs}
    InlineModules(lambda fqn, m: any(id(t) in masked for t in m.parameters(recurse=False)))(gm)
    InsertMasks(specs)(gm)

    for group in groups:
        group["module"] = gm.get_submodule(group["module_fqn"])
        sparsifier.state[group["tensor_fqn"]]["mask"] = gm.get_buffer(mask_fqn_for(group["tensor_fqn"]))
    sparsifier.model = gm
    sparsifier.config = list(config) if config is not None else None
    sparsifier.groups = groups
    publish_config(gm, groups)
    # A sparsifier that needs more than masks in the graph (Wanda: activation observers) adds it here.
    on_prepared = getattr(sparsifier, "_on_prepared", None)
    if on_prepared is not None:
        on_prepared(gm)
    return gm


def publish_config(gm: fx.GraphModule, groups: list[dict[str, Any]]) -> None:
    """Record ``gm._fx_sparsity_config = {tensor_fqn: group}`` for printing and lowering.

    The values are the sparsifier's own group dicts, so a scheduler's in-place level
    changes show up. A GraphModule's deepcopy keeps only what its graph uses, so the
    attribute is also listed among the user-preserved attributes in ``gm.meta``.
    """
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

    config = {group["tensor_fqn"]: group for group in groups}
    gm._fx_sparsity_config = config
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})["_fx_sparsity_config"] = config


def _config_or_default(model: nn.Module, config, imported: dict) -> list:
    if config is not None:
        return list(config)
    if imported:
        return [{"tensor_fqn": fqn} for fqn in imported]
    return default_config(model)


# Re-exported so that BaseSparsifier.convert, which looks it up here, delegates to it.
from .lowering import convert_fx_sparse  # noqa: E402
