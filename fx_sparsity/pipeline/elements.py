"""Element masks: one mask per configured tensor, multiplied in at every use (the unstructured sparsifiers).

Before (``nn.Sequential(nn.Linear(4, 4))``, config ``[{"tensor_fqn": "0.weight"}]``)::

    %linear : call_module[target=0](args = (%x,))

After :func:`place` (the layer written out, its weight read through the mask)::

    %_0_weight : get_attr[target=0.weight]
    %_0_weight_mask : get_attr[target=0.weight_mask]
    %mul : call_function[target=operator.mul](args = (%_0_weight, %_0_weight_mask))
    %linear : call_function[target=torch._C._nn.linear](args = (%x, %mul, %_0_bias))

and, for a sparsifier with an ``observer_type`` (Wanda, SparseGPT), :func:`place_observers` puts an
observer in front of the linear's input. :func:`squash_masks` folds the masks into the tensors and
puts a scoped model's own modules back.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from ..config import CONFIG_ATTR, build_groups, config_or_default, initial_mask, publish_config
from ..distributed import refuse_unsharded_fsdp
from ..errors import SparsityConfigError, warn_user
from ..parametrization import fake_sparsity_masks, strip_fake_sparsity, tensor_at
from ..passes import (
    MaskSpec,
    fold_masks,
    observe_linear_inputs,
    owns_one_of,
    prepare_masks,
)
from ..passes import remove_observers as remove_observer_nodes
from ..scopes import Scope
from ..scoping import (
    UNITS_ATTR,
    check_eager_quantization,
    graph_parts,
    prepare_units,
    relative,
    restore_units,
    stand_in,
    units_of,
)
from ..tracing import trace, warn_hooks_traced_through
from .protocol import SparsifierLike

__all__ = ["place", "place_observers", "publish", "squash_masks", "remove_observers"]


def place(sparsifier: SparsifierLike, work: nn.Module, original: nn.Module, config: list[dict] | None, scope: Scope,
          tracer: str, example_inputs: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Build the groups from ``config``, trace ``work`` as ``scope`` says and mask every use of each tensor.

    Returns ``(prepared model, groups)``; ``work`` is changed in place (the caller copied it).
    """
    imported = fake_sparsity_masks(work)
    groups = build_groups(work, original, sparsifier.defaults, config_or_default(work, config, imported))
    _validate(sparsifier, groups, work)
    if not groups:
        _warn_nothing_configured(work, config)
    strip_fake_sparsity(work)
    specs = [MaskSpec(g["tensor_fqn"], initial_mask(g, tensor_at(work, g["tensor_fqn"]), imported), {"group": i})
             for i, g in enumerate(groups)]
    if scope.whole_model:
        if not isinstance(work, fx.GraphModule):  # a GraphModule's qconfigs are prepare_fx's
            check_eager_quantization(work, [g["module_fqn"] for g in groups])
        graph = trace(work, tracer, example_inputs,
                      see_inside=owns_one_of([tensor_at(work, g["tensor_fqn"]) for g in groups]))
        if graph is not work:
            warn_hooks_traced_through(work, graph)
        prepare_masks(graph, specs, work)
        if graph is not work:
            stand_in(work, graph)
        prepared: nn.Module = graph
    else:
        prepared = work
        prepare_units(work, specs, scope, tracer, example_inputs)
    for group in groups:
        group["module"] = prepared.get_submodule(group["module_fqn"])
    return prepared, groups


def _validate(sparsifier: SparsifierLike, groups: list[dict[str, Any]], model: nn.Module) -> None:
    """The sparsifier's ``validate_group`` on every group; one error naming every group refused."""
    errors = []
    for group in groups:
        try:
            sparsifier.validate_group(group, tensor_at(model, group["tensor_fqn"]))
        except ValueError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        lines = "\n".join(f"  {e}" for e in errors)
        raise SparsityConfigError(
            f"{type(sparsifier).__name__} cannot sparsify {len(errors)} of the {len(groups)} configured tensors:\n"
            f"{lines}\nLeave them out of the config (or configure them with a sparsifier that accepts them).")


def _in_part(fqn: str, prefix: str) -> bool:
    return not prefix or fqn.startswith(prefix + ".")


def publish(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Record the live groups on each graph module of ``model`` (printing and lowering read them)."""
    units = units_of(model)
    if not units and isinstance(model, fx.GraphModule):
        publish_config(model, {group["tensor_fqn"]: group for group in groups})
        return
    model.__dict__[CONFIG_ATTR] = {g["tensor_fqn"]: g for g in groups}  # the whole config on the user's model too
    tensors = {id(tensor_at(model, g["tensor_fqn"])): g for g in groups}
    for unit in units:
        config = {relative(g["tensor_fqn"], unit.fqn): g for g in groups if _in_part(g["tensor_fqn"], unit.fqn)}
        held = [*unit.graph_module.named_parameters(remove_duplicate=False),
                *unit.graph_module.named_buffers(remove_duplicate=False)]
        for name, tensor in held:  # tied tensors this unit reads under its own name
            if id(tensor) in tensors and name not in config:
                config[name] = tensors[id(tensor)]
        publish_config(unit.graph_module, config)


def place_observers(model: nn.Module, groups: list[dict[str, Any]], make_observer: Callable[[int], nn.Module],
                    who: str) -> None:
    """An observer (``make_observer(in_features)``) on the input of every linear that uses a configured weight."""
    observed = set()
    for prefix, gm in graph_parts(model):
        fqns = [relative(g["tensor_fqn"], prefix) for g in groups if _in_part(g["tensor_fqn"], prefix)]
        found = observe_linear_inputs(gm, fqns, make_observer)
        observed |= {f"{prefix}.{fqn}" if prefix else fqn for fqn in found}
    missing = [g["tensor_fqn"] for g in groups if g["tensor_fqn"] not in observed]
    if missing:
        one = len(missing) == 1
        raise SparsityConfigError(
            f"{who} scores a weight by the inputs of the linear that uses it, but {missing} {'is' if one else 'are'} "
            f"not the weight of any linear (F.linear / aten.linear) in the traced graph; leave "
            f"{'it' if one else 'them'} out of the config (use GlobalMagnitudeSparsifier or WeightNormSparsifier for "
            f"such tensors)")


def remove_observers(model: nn.Module, observer_type: type[nn.Module]) -> None:
    """Take every observer of ``observer_type`` out of the graphs of ``model``."""
    for _, gm in graph_parts(model):
        remove_observer_nodes(gm, observer_type)


def squash_masks(model: nn.Module, groups: list[dict[str, Any]]) -> nn.Module:
    """Fold every group's mask into its tensor; on a scoped model put the original modules back. In place."""
    refuse_unsharded_fsdp(model)
    units = units_of(model)
    for prefix, gm in graph_parts(model):
        fold_masks(gm, [relative(g["tensor_fqn"], prefix) for g in groups if _in_part(g["tensor_fqn"], prefix)])
    if units:  # the user's own modules back, holding the folded tensors
        kept = restore_units(model, units)
        if kept:
            setattr(model, UNITS_ATTR, kept)
            warn_user(f"squash_mask: {[u.fqn for u in kept]} are sharded by FSDP2 (fully_shard) and stay "
                      f"GraphModules (without masks); squash before sharding to get the original layers back")
        else:
            delattr(model, UNITS_ATTR)
            model.__dict__.pop(CONFIG_ATTR, None)
        for group in groups:
            group["module"] = model.get_submodule(group["module_fqn"])
    return model


def _warn_nothing_configured(model: nn.Module, config: list | None) -> None:
    if config is None:
        why = (f"the default config takes the weight of every nn.Linear (exact type), and "
               f"{type(model).__name__} has none")
    else:
        why = "the config is empty"
    example = next((name for name, p in model.named_parameters() if p.dim() > 1), "features.0.weight")
    warn_user(
        f"prepare: no tensor is configured for sparsity ({why}); step(), squash_mask() and schedulers will do "
        f"nothing. Name the tensors to sparsify, e.g. config=[{{'tensor_fqn': '{example}'}}]")
