"""Channel masks with a block scope: the blocks, and the layers between them, followed as one graph.

Each block is traced alone, and so is each layer outside the blocks that holds parameters (a Hugging
Face decoder's embeddings, final norm and LM head). One run of the model on the example records what
each unit gets and returns; where a unit gets the very tensor an earlier one returned (the model's own
code passes it on), the two are joined (``passes.channels.stitch``), so a group may span units: a
decoder's hidden width is one group from the embeddings through every block to the head. Each unit's
graph is masked with its part of the analysis; a layer between blocks that a chosen group reaches is
replaced by its masked graph too, and gets its own class back when pruned. A group's mask is a buffer of
the unit holding its first producer; a unit that only reads it holds it as a non-persistent buffer,
linked back to it before each call (as tied masks are), so ``state_dict()`` has it once and ``.to()``
cannot split it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..errors import SparsityConfigError, warn_user
from ..inputs import CallInputs, as_args_kwargs, call_with
from ..passes import fetch_attr, run_passes, unique_attr_name
from ..passes.channels import ChannelGroup, InsertChannelMasks, MaskNorms
from ..passes.channels.stitch import UnitGraph, output_pairs, same_value, stitch, unit_analysis
from ..scopes import Scope
from ..scoping import UNITS_ATTR, Unit, _link_tied_masks, _quiet_run, _TiedLinks, relative
from .channels import (
    ChannelTarget,
    Part,
    add_mask,
    analyse,
    batch_of_two,
    choose,
    placeholder_values,
    trace_unit,
    warn_nothing_to_prune,
)
from .protocol import SparsifierLike

__all__ = ["place_stitched", "SHARED_MASK"]

SHARED_MASK = "_shared_channel_mask"  # a unit's non-persistent handle on a mask another unit holds


def _between(model: nn.Module, blocks: list[str]) -> list[str]:
    """The outermost submodules outside the blocks that hold parameters and contain no block (the embeddings, a
    final norm, a head), in ``named_modules`` order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name == b or name.startswith(b + ".") for b in blocks) or any(
                name.startswith(f + ".") for f in found):
            continue
        if any(b.startswith(name + ".") for b in blocks):
            continue  # holds blocks: look inside
        if next(module.parameters(), None) is not None:
            found.append(name)
    return found


class _ReadOutside(TorchFunctionMode):
    """Records the tensors the model's own code computes something from outside every unit (``depth`` 0): code
    between blocks that reads a block's output (``if h.sum() > 0``, a loss on it) sees all of its channels, so its
    width cannot change there. Not reads: metadata (shape, dtype, device: no tensor made), and an op that only
    passes its one tensor on (the same values: ``x.to(x.dtype)``, a slice of all of it); what reads such a copy
    reads the tensor it copies."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.read: dict[int, torch.Tensor] = {}
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(copy) -> (copy, the tensor copied)

    def _origin(self, t: torch.Tensor) -> torch.Tensor:
        return self.copies[id(t)][1] if id(t) in self.copies and self.copies[id(t)][0] is t else t

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if self.depth:
            return result
        made = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        got = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not made or not got:
            return result
        if len(got) == 1 and all(same_value(m, got[0]) for m in made):
            for m in made:
                if m is not got[0]:
                    self.copies[id(m)] = (m, self._origin(got[0]))
            return result
        for t in got:
            origin = self._origin(t)
            self.read[id(origin)] = origin
        return result


def _run(model: nn.Module, fqns: list[str], example_inputs: Any) -> tuple[list[str], dict[str, tuple], set[str], Any,
                                                                        list[torch.Tensor]]:
    """One run of ``model``: the units in the order of their first call, ``{fqn: (inputs, output)}`` of that
    call, the units called more than once, the model's output, and the tensors its own code read outside the
    units."""
    order: list[str] = []
    calls: dict[str, tuple] = {}
    again: set[str] = set()
    outside = _ReadOutside()

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        outside.depth += 1

    def hook(fqn: str) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            outside.depth -= 1
            if fqn not in calls:
                order.append(fqn)
                calls[fqn] = (CallInputs(args, kwargs), output)
            else:
                again.add(fqn)
        return record

    handles = [model.get_submodule(f).register_forward_hook(hook(f), with_kwargs=True) for f in fqns]
    handles += [model.get_submodule(f).register_forward_pre_hook(enter, with_kwargs=True) for f in fqns]
    try:
        with _quiet_run(model), outside:
            returned = call_with(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order, calls, again, returned, list(outside.read.values())


def _units(work: nn.Module, scope: Scope, tracer: str,
           example_inputs: Any) -> tuple[list[UnitGraph], dict[str, CallInputs], list[str], Any]:
    """Each unit traced on what it gets, in call order; what each got; the blocks; the tensors the model's own
    code sees (its output, and what it reads between the units)."""
    blocks = scope.blocks(work)
    between = _between(work, blocks)
    order, calls, again, returned, read = _run(work, blocks + between, example_inputs)
    missing = [b for b in blocks if b not in order]
    if missing:
        raise SparsityConfigError(
            f"each block is traced on the inputs it gets when the model runs on example_inputs, but {missing} "
            f"{'was' if len(missing) == 1 else 'were'} not called; pass inputs that reach them")
    units = []
    for fqn in order:
        if fqn in again and fqn not in blocks:
            continue  # a layer between blocks called more than once: what it reads and makes is not followed
        inputs, output = calls[fqn]
        try:
            gm = trace_unit(work.get_submodule(fqn), tracer, inputs, fqn)
        except Exception:
            if fqn in blocks:
                raise
            continue  # a layer between blocks that does not trace: what it reads and makes is not followed
        units.append(UnitGraph(fqn, gm, placeholder_values(gm, inputs), output_pairs(gm, output),
                               alone=fqn in again))  # a block called more than once: on its own
    seen = [t for t in pytree.tree_leaves(returned) if isinstance(t, torch.Tensor)] + read
    return units, {fqn: calls[fqn][0] for fqn in order}, blocks, seen


def _traced(work: nn.Module, scope: Scope, tracer: str,
            example_inputs: Any) -> tuple[list[UnitGraph], dict[str, CallInputs], list[str], Any, Any]:
    """:func:`_units` on an example repeated to a batch of 2 when it has a batch of 1 (torch.export fixes a size-1
    dim), else on the example (with a warning when that was not possible)."""
    batched = batch_of_two(example_inputs) if tracer == "export" else None
    failed: Exception | None = None
    if batched is not None:
        try:
            return (*_units(work, scope, tracer, batched), batched)
        except SparsityConfigError:
            raise
        except Exception as e:
            failed = e
    found = _units(work, scope, tracer, example_inputs)
    if failed is not None:
        warn_user(f"example_inputs have a batch of 1, which torch.export fixes: the masked and the pruned model will "
                  f"take batch 1 only (the example repeated to a batch of 2 did not export: {type(failed).__name__}). "
                  f"Pass example_inputs with a batch of 2 or more to keep the batch dynamic")
    return (*found, example_inputs)


def _unit_of(units: list[str], fqn: str) -> str:
    return next(u for u in units if fqn.startswith(u + "."))


def _explain_problems(groups: list[ChannelGroup], units: list[str]) -> None:
    for group in groups:
        if group.problem and group.producers and ("model output" in group.problem or "model input" in group.problem):
            unit = _unit_of(units, group.anchor[0])
            group.problem = (f"its channels leave the block '{unit}' (the group crosses graphs): prune it with "
                             f"scope=\"model\" or a block scope holding the whole group")


def place_stitched(sparsifier: SparsifierLike, work: nn.Module, config: list[dict] | None, scope: Scope, tracer: str,
                   example_inputs: Any) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
    """``channels.place`` for a block scope: trace the units, follow them as one graph, mask the chosen groups in
    each unit's graph, put the touched units in place."""
    traced, calls, blocks, seen, example = _traced(work, scope, tracer, example_inputs)
    stitched = stitch(traced, seen)  # what the model's own code sees keeps its width
    analysis = analyse(stitched.gm, None, stitched.inputs)
    names = [u.fqn for u in traced]
    _explain_problems(analysis.groups, names)
    whole = Part("", stitched.gm, analysis, CallInputs(*as_args_kwargs(example)), None)
    held = [e.get("tensor_fqn") for e in config or [] if not any(
        str(e.get("tensor_fqn", "")).startswith(u + ".") for u in names)]
    if held:
        raise SparsityConfigError(f"{held} lie outside every block of the scope {scope.block_types} and every layer "
                                  f"between them that the model calls")
    groups: list[dict[str, Any]] = []
    targets: dict[str, ChannelTarget] = {}
    unit_gm = {u.fqn: u.gm for u in traced}
    mask_of: dict[int, str] = {}  # group -> mask fqn in the model
    for group, entry in choose(whole, config, getattr(sparsifier, "prune_normalized", True)):
        unit = _unit_of(names, group.anchor[0])
        local = add_mask(sparsifier, unit_gm[unit], unit, relative(group.anchor[0], unit), group, entry, groups)
        mask_of[group.index] = f"{unit}.{local}"
        targets[group.anchor[0]] = ChannelTarget(unit, group, mask_of[group.index], model_names=True)
    parts: list[Part] = []
    links: dict[str, list[tuple[str, str]]] = {}
    for unit in traced:
        view = unit_analysis(analysis, stitched, unit.fqn, unit.gm)
        involved = {int(g) for s in view.sinks for g in analysis.group_of[s.ids].unique().tolist()} & set(mask_of)
        masks: dict[int, str] = {}
        for g in sorted(involved):
            if mask_of[g].startswith(unit.fqn + "."):
                masks[g] = relative(mask_of[g], unit.fqn)
                continue
            owner = _unit_of(names, mask_of[g])
            alias = unique_attr_name(unit.gm, SHARED_MASK)
            unit.gm.register_buffer(alias, fetch_attr(unit_gm[owner], relative(mask_of[g], owner)), persistent=False)
            masks[g] = alias
            links.setdefault(unit.fqn, []).append((alias, mask_of[g]))
        cut = any(int(g) in mask_of for s in view.spaces
                  for g in analysis.group_of[s.base:s.base + s.size].unique().tolist())
        if unit.fqn not in blocks and not masks and not cut:
            continue  # a layer between blocks no chosen group reaches stays the user's layer
        run_passes(unit.gm, InsertChannelMasks(view, masks), MaskNorms(view, masks))
        parts.append(Part(unit.fqn, unit.gm, view, calls[unit.fqn], work.get_submodule(unit.fqn),
                          model_inputs=CallInputs(*as_args_kwargs(example))))
    if not groups and config is None:
        warn_nothing_to_prune(type(sparsifier).__name__, [whole])
    for part in parts:
        work.set_submodule(part.fqn, part.graph_module)
    for fqn, pairs in links.items():  # after set_submodule: the masks are looked up in the model
        gm = work.get_submodule(fqn)
        gm.__dict__["_fx_sparsity_tied_masks"] = _TiedLinks(work, pairs)
        gm.register_forward_pre_hook(_link_tied_masks)
    setattr(work, UNITS_ATTR, [Unit(p.fqn, p.original, p.graph_module) for p in parts if p.original is not None])
    for group in groups:
        group["module"] = work.get_submodule(group["module_fqn"])
    return work, groups, {"parts": parts, "targets": targets}

