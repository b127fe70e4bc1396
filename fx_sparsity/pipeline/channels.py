"""Channel masks: trace each unit, find its coupled channel groups, mask the chosen ones (the structured pruners).

Per unit (the whole model, or each layer of the layers scope; block scopes: ``stitched``, the
blocks and the layers between them followed as one graph) the graph is run on the example inputs
to find its channel groups (``passes.channels``). For each chosen group one mask buffer with an
entry per class (``<first producer>.out_channel_mask``) is added, every sink's input is
multiplied by it (``InsertChannelMasks``) and every norm over masked channels averages over the
kept ones only (``MaskNorms``), so the masked model computes exactly what the cut one will.
Before (``nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))``)::

    %_0 : call_module[target=0](args = (%input_1,))
    %_1 : call_module[target=1](args = (%_0,))
    %_2 : call_module[target=2](args = (%_1,))

After: ``0``'s output channels pass ``0.out_channel_mask`` before ``2`` reads them::

    %_0 : call_module[target=0](args = (%input_1,))
    %_1 : call_module[target=1](args = (%_0,))
    %_0_out_channel_mask : get_attr[target=0.out_channel_mask]
    %mul : call_function[target=operator.mul](args = (%_1, %_0_out_channel_mask))
    %_2 : call_module[target=2](args = (%mul,))
"""
from __future__ import annotations

import copy
import difflib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import SparsityConfigError, TraceError, warn_user
from ..exporting import export_failure, export_module
from ..inputs import CallInputs, as_args_kwargs, graph_inputs
from ..passes import fetch_attr, run_passes
from ..passes.channels import ChannelAnalysis, ChannelGroup, InsertChannelMasks, MaskNorms, find_channel_groups
from ..scopes import Scope
from ..scoping import UNITS_ATTR, Unit, capture_inputs, relative
from ..tracing import trace_written_out
from .protocol import SparsifierLike

__all__ = ["Part", "ChannelTarget", "place", "analyse", "guess_inputs", "MASK_NAME", "add_mask", "placeholder_values",
           "choose", "trace_unit", "batch_of_two", "warn_nothing_to_prune"]

MASK_NAME = "out_channel_mask"


@dataclass
class Part:
    """One traced graph of the prepared model: the whole model (fqn "") or one block."""

    fqn: str
    graph_module: fx.GraphModule
    analysis: ChannelAnalysis
    inputs: CallInputs
    original: nn.Module | None  # the block it replaced
    model_inputs: CallInputs | None = None  # (units followed together, ``stitched``) the model's example inputs


@dataclass
class ChannelTarget:
    """What the pipeline placed for one pruned group (kept apart from the group's config dict, which saves as is)."""

    part: str  # the fqn of the Part whose graph holds the group (its mask)
    channel_group: ChannelGroup
    mask_fqn: str  # the mask buffer, a model fqn
    model_names: bool = False  # the group names tensors by their model fqns (a group across units)


def mask_name(tensor_name: str) -> str:
    return MASK_NAME if tensor_name == "weight" else f"{tensor_name}_channel_mask"


def placeholder_values(gm: fx.GraphModule, inputs: Any) -> list:
    """The values of ``gm``'s placeholders for a call with ``inputs``."""
    args, kwargs = as_args_kwargs(inputs)
    if getattr(gm.graph._codegen, "pytree_info", None) is not None:  # exported: None keywords were left out,
        taken = inspect.signature(gm.forward).parameters              # but where the forward has no default
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in taken}
    return graph_inputs(gm, CallInputs(args, kwargs))


def analyse(gm: fx.GraphModule, inputs: Any, values: list | None = None) -> ChannelAnalysis:
    """``find_channel_groups`` on ``gm`` run with ``inputs`` (or its placeholders' ``values``), leaving its buffers,
    mode and the RNG as they were."""
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return find_channel_groups(gm, placeholder_values(gm, inputs) if values is None else values)
    except RuntimeError as e:
        if "ShapeProp error" not in str(e):
            raise
        cause = e.__cause__ or e
        raise SparsityConfigError(
            f"the model does not run on example_inputs ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else ''}): pass inputs like the ones it is called with "
            f"(shape, dtype, device)") from e
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])


def _units(work: nn.Module, config: list[dict] | None, scope: Scope,
           example_inputs: Any) -> list[tuple[str, nn.Module, CallInputs]]:
    """``[(fqn, module, inputs)]`` to trace: the whole model, or (layers scope) each parameter-holding layer that is
    not a standard torch layer (a standard layer alone holds no whole group). Block scopes: ``stitched``."""
    if scope.whole_model:
        return [("", work, CallInputs(*as_args_kwargs(example_inputs)))]
    blocks = _layers(work)
    alone = [b for b in blocks if not isinstance(work.get_submodule(b), nn.MultiheadAttention)
             and type(work.get_submodule(b)).__module__.startswith("torch.nn")]
    for entry in config or []:
        holder = next((b for b in alone if str(entry.get("tensor_fqn", "")).startswith(b + ".")), None)
        if holder is not None:
            raise SparsityConfigError(
                f"'{entry['tensor_fqn']}': with scope=\"layers\" each layer is a graph of its own, and "
                f"the channels of '{holder}' ({type(work.get_submodule(holder)).__name__}) leave it (the "
                f"group crosses graphs): prune it with scope=\"model\" or a block scope holding the "
                f"whole group")
    blocks = [b for b in blocks if b not in alone]
    captured = capture_inputs(work, blocks, example_inputs)
    outside = [e.get("tensor_fqn") for e in config or []
               if not any(str(e.get("tensor_fqn", "")).startswith(b + ".") for b in blocks)]
    if outside:
        raise SparsityConfigError(f"{outside} lie outside every block of the scope {scope.block_types}; structured "
                                  f"pruning with a block scope cuts channels inside the blocks only")
    return [(fqn, work.get_submodule(fqn), captured[fqn]) for fqn in blocks]


def place(sparsifier: SparsifierLike, work: nn.Module, config: list[dict] | None, scope: Scope, tracer: str,
          example_inputs: Any) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
    """Trace, analyse and mask ``work`` (changed in place); returns ``(prepared, groups, {"parts", "targets"})``."""
    parts: list[Part] = []
    groups: list[dict[str, Any]] = []
    targets: dict[str, ChannelTarget] = {}
    for fqn, module, inputs, gm in _traced_units(work, config, scope, tracer, example_inputs):
        part = Part(fqn, gm, analyse(gm, inputs), inputs, module if fqn else None)
        part_config = None if config is None else [
            {**e, "tensor_fqn": relative(e["tensor_fqn"], fqn)} for e in config
            if not fqn or str(e.get("tensor_fqn", "")).startswith(fqn + ".")]
        masks = {}
        prefix = f"{fqn}." if fqn else ""
        for group, entry in choose(part, part_config, getattr(sparsifier, "prune_normalized", True)):
            masks[group.index] = add_mask(sparsifier, gm, fqn, group.anchor[0], group, entry, groups)
            targets[prefix + group.anchor[0]] = ChannelTarget(fqn, group, prefix + masks[group.index])
        run_passes(gm, InsertChannelMasks(part.analysis, masks), MaskNorms(part.analysis, masks))
        parts.append(part)
    if not groups and config is None:
        warn_nothing_to_prune(type(sparsifier).__name__, parts)
    for part in parts:
        if part.fqn:
            work.set_submodule(part.fqn, part.graph_module)
    if not scope.whole_model:  # what printing and the scoped helpers read
        setattr(work, UNITS_ATTR, [Unit(p.fqn, p.original, p.graph_module) for p in parts if p.original is not None])
    model = parts[0].graph_module if scope.whole_model else work
    for group in groups:
        group["module"] = model.get_submodule(group["module_fqn"])
    return model, groups, {"parts": parts, "targets": targets}


def _traced_units(work: nn.Module, config: list[dict] | None, scope: Scope, tracer: str,
                  example_inputs: Any) -> list[tuple[str, nn.Module, CallInputs, fx.GraphModule]]:
    """Each unit with its inputs and its graph. torch.export fixes a dim of size 1 in the example (batch 1 would
    give a masked and a pruned model that take batch 1 only): an example of batch 1 is exported repeated to a
    batch of 2, so the batch stays dynamic; if the model does not run or export that way, it is exported at
    batch 1, with a warning."""
    batched = batch_of_two(example_inputs) if tracer == "export" else None
    failed: Exception | None = None
    if batched is not None:
        try:
            return [(fqn, module, inputs, trace_unit(module, tracer, inputs, fqn))
                    for fqn, module, inputs in _units(work, config, scope, batched)]
        except SparsityConfigError:
            raise
        except Exception as e:
            failed = e
    traced = [(fqn, module, inputs, trace_unit(module, tracer, inputs, fqn))
              for fqn, module, inputs in _units(work, config, scope, example_inputs)]
    if failed is not None:
        why = str(failed).splitlines()[0] if str(failed) else ""
        warn_user(f"example_inputs have a batch of 1, which torch.export fixes: the masked and the pruned model will "
                  f"take batch 1 only (the example repeated to a batch of 2 did not export: {type(failed).__name__}: "
                  f"{why[:200]}). Pass example_inputs with a batch of 2 or more to keep the batch dynamic")
    return traced


def batch_of_two(example_inputs: Any) -> Any:
    """``example_inputs`` with every tensor repeated to a batch of 2, when each tensor's first dim is 1 (else
    None: the batch is not 1, or no tensor has a dim)."""
    leaves = [t for t in pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not leaves or any(t.shape[0] != 1 for t in leaves):
        return None
    return pytree.tree_map(lambda t: t.repeat(2, *[1] * (t.dim() - 1)).contiguous()
                           if isinstance(t, torch.Tensor) and t.dim() >= 1 else t, example_inputs)


def add_mask(sparsifier: SparsifierLike, gm: fx.GraphModule, fqn: str, tensor_fqn: str, group: ChannelGroup,
             entry: dict, groups: list[dict[str, Any]]) -> str:
    """Register ``group``'s mask next to its first producer ``tensor_fqn`` (in ``gm``, the graph of unit ``fqn``) and
    append the group's dict to ``groups``; returns the mask's name in ``gm``."""
    owner_fqn, _, tensor_name = tensor_fqn.rpartition(".")
    anchor = fetch_attr(gm, tensor_fqn)
    dtype = anchor.dtype if anchor.is_floating_point() else torch.float32
    name = mask_name(tensor_name)
    gm.get_submodule(owner_fqn).register_buffer(name, torch.ones(group.num_classes, dtype=dtype, device=anchor.device))
    settings = {**copy.deepcopy(sparsifier.defaults), **{k: v for k, v in entry.items() if k != "tensor_fqn"}}
    prefix = f"{fqn}." if fqn else ""
    module_fqn = ".".join(n for n in (fqn, owner_fqn) if n)
    groups.append({**settings, "tensor_fqn": prefix + tensor_fqn, "module_fqn": module_fqn, "tensor_name": tensor_name,
                   "mask_name": name, "part": fqn})
    sparsifier.validate_group(groups[-1], anchor)
    return f"{owner_fqn}.{name}" if owner_fqn else name


#: Structured pruning follows channels only within what it traces: scope="layers" runs on any model but cuts only
#: what lies inside one layer, so a block scope comes first.
_LAYERS_CUT_LESS = " scope=\"layers\" also runs, but cuts only what lies inside one layer."
_MODEL_WAYS_SYMBOLIC = ("Ways that work, in order: scope=<a block class> whose forward traces (channels are followed "
                        "and cut within each block; {name}'s own forward runs as written); tracer=\"export\" with "
                        "example_inputs=(...) (torch.export specialises such control flow on the example inputs)."
                        + _LAYERS_CUT_LESS)
_UNIT_WAYS_SYMBOLIC = ("Ways that work, in order: tracer=\"export\" with example_inputs=(...) (torch.export "
                       "specialises such control flow on the inputs each block gets)." + _LAYERS_CUT_LESS)


def trace_unit(module: nn.Module, tracer: str, inputs: CallInputs, fqn: str) -> fx.GraphModule:
    """``module`` (the model, or the unit ``fqn``) as a graph whose channels can be followed; a failure says what
    failed, where, and the ways that work for structured pruning."""
    where = f"'{fqn}' ({type(module).__name__})" if fqn else type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        tracer = "export"  # a layer of its own (scope="layers"): its forward branches on its flags
    if tracer == "symbolic":
        try:
            return trace_written_out(module, _UNIT_WAYS_SYMBOLIC if fqn else _MODEL_WAYS_SYMBOLIC)
        except TraceError as e:
            if not fqn:
                raise  # it names the model already
            raise TraceError(f"'{fqn}': {e}") from e
    try:
        gm = export_module(module, *as_args_kwargs(inputs))
    except Exception as e:
        if fqn:
            raise export_failure(f"{where} on the inputs it got from example_inputs", e,
                                 "Ways that work, in order: tracer=\"symbolic\" (no example inputs needed)."
                                 + _LAYERS_CUT_LESS) from e
        raise export_failure(where, e, f"Ways that work, in order: scope=<a block class> whose forward exports "
                             f"(channels are followed and cut within each block; {where}'s own forward runs as "
                             f"written); example_inputs that match the forward; data-dependent control flow "
                             f"rewritten with torch.cond." + _LAYERS_CUT_LESS) from e
    gm.graph.eliminate_dead_code()  # what is computed and dropped (attention weights never read) moves nothing
    gm.recompile()
    return gm


def choose(part: Part, config: list[dict] | None, normalized: bool = True) -> list[tuple[ChannelGroup, dict]]:
    """The groups to mask: those the config names (checked), or every one that can be cut exactly (those a norm
    averages over too unless ``normalized`` is False)."""
    found = part.analysis.groups
    if part.fqn:  # in a block's own graph, what leaves the graph is the block's output or input
        averaged = isinstance(part.original, nn.MultiheadAttention) and part.inputs.kwargs.get(
            "need_weights", len(part.inputs.args) < 5 or part.inputs.args[4])
        for group in found:
            if group.problem and ("model output" in group.problem or "model input" in group.problem):
                group.problem = (f"its channels leave the block '{part.fqn}' (the group crosses graphs): prune "
                                 f"it with scope=\"model\" or a block scope holding the whole group")
            hint = (f"; '{part.fqn}' is called with need_weights=True, and the attention weights it returns "
                    f"average its heads: call it with need_weights=False")
            if averaged and group.problem:  # the attention weights it returns are averaged over its heads
                group.problem += hint
            if averaged and group.normalized:
                group.normalized += hint
    if config is None:
        return [(g, {}) for g in found if g.prunable and g.inexact is None and (normalized or g.normalized is None)]
    chosen: list[tuple[ChannelGroup, dict]] = []
    prefix = f"{part.fqn}." if part.fqn else ""
    for i, entry in enumerate(config):
        if not isinstance(entry, dict) or "tensor_fqn" not in entry:
            raise SparsityConfigError(f"config[{i}] must be a dict with a 'tensor_fqn', got {entry!r}")
        fqn = entry["tensor_fqn"]
        group = part.analysis.group_of_tensor(fqn)
        if group is None or not group.producers:
            names = sorted({prefix + p for g in found if g.prunable for p, _ in g.producers})
            nearest = difflib.get_close_matches(prefix + fqn, names, n=3, cutoff=0.0)
            raise SparsityConfigError(
                f"config[{i}]: '{prefix}{fqn}' is not a weight whose channels fx_sparsity follows to a group; "
                f"the nearest that name a prunable group: {nearest}")
        if group.problem is not None:
            raise SparsityConfigError(f"config[{i}]: the channels of '{prefix}{fqn}' cannot be pruned exactly: "
                                      f"{group.problem}")
        if any(g is group for g, _ in chosen):
            raise SparsityConfigError(f"config[{i}]: '{prefix}{fqn}' is in a group an earlier entry already names "
                                      f"(its producers: {[prefix + p for p, _ in group.producers]})")
        if group.inexact is not None:
            warn_user(f"pruning the channels of '{prefix}{fqn}' changes what the model computes: "
                      f"{group.inexact}, so the pruned model computes something else than the masked one (close "
                      f"when the channels cut are small); fine-tune after pruning")
        chosen.append((group, entry))
    return chosen


_SIDES = (28, 32, 224, 64, 16, 8, 7, 4, 1)  # spatial sizes tried for a guessed convolution input


def guess_inputs(model: nn.Module) -> tuple:
    """An input for a model whose one input goes straight into a Linear, Conv or Embedding: the first size that
    runs (torch.ao's ``prepare(model, config)`` takes no example); else the error asks for example_inputs."""
    def ask(why: str) -> SparsityConfigError:
        return SparsityConfigError(
            f"structured pruning needs example_inputs (the shapes decide how channels move through views and "
            f"flattens), and {why}: pass them, e.g. example_inputs=(torch.randn(1, 3, 32, 32),)")

    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception:
        raise ask("the model does not trace to find its first layer") from None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        raise ask("its input does not feed one layer")
    user = next(iter(inputs[0].users))
    first = model.get_submodule(str(user.target)) if user.op == "call_module" else None
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(first, nn.Linear):
        candidates = [torch.randn(2, first.in_features, dtype=dtype, device=device)]
    elif isinstance(first, nn.Embedding):
        candidates = [torch.randint(0, first.num_embeddings, (2, 8), device=device)]
    elif isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
        candidates = [torch.randn(2, first.in_channels, *([side] * dims), dtype=dtype, device=device)
                      for side in _SIDES]
    else:
        raise ask("its input does not go straight into a Linear, Conv or Embedding")
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for x in candidates:
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    model(x)
                return (x,)
            except Exception:
                continue
    finally:
        for m, mode in modes:
            m.training = mode
    raise ask(f"no input of the sizes tried runs through it (spatial sides {list(_SIDES)})")


def _layers(model: nn.Module) -> list[str]:
    """scope="layers": the outermost submodules that hold parameters themselves (each a graph of its own)."""
    owners: list[str] = []
    for name, module in model.named_modules():
        if name and next(module.parameters(recurse=False), None) is not None and not any(
                name.startswith(o + ".") for o in owners):
            owners.append(name)
    return owners


def warn_nothing_to_prune(who: str, parts: list[Part]) -> None:
    reasons = sorted({g.problem or g.inexact or g.normalized or "" for p in parts for g in p.analysis.groups
                      if g.producers} - {""})
    why = (f"Why the groups were left out: {reasons[:4]}{' ...' if len(reasons) > 4 else ''}. A group a norm "
           f"averages over is pruned with prune_normalized=True (the default), or when named in the config."
           if reasons else
           "Every channel found is an output of a traced graph, and outputs keep their shapes: with "
           "scope=\"layers\" each layer is traced alone, so only what lies inside one layer can be cut; a block "
           "class or scope=\"model\" follows channels from layer to layer.")
    warn_user(f"prepare: {who} found no channel group it can cut exactly (without changing the "
              f"model's output shapes); step() and prune() will do nothing. {why}")
