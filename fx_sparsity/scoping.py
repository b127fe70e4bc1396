"""Scoped preparation: graphs for parts of the user's model, each put in place of the part it was traced from.

``scope="model"`` traces the whole model into one GraphModule. Any other scope keeps the
user's model object and replaces *units* inside it:

- ``"layers"``: every submodule that directly owns a configured tensor;
- an ``nn.Module`` subclass (or a tuple of them): every outermost submodule of those
  types, plus, as with ``"layers"``, the owners of configured tensors outside them.

Each unit is traced alone (symbolically, or with ``torch.export`` on the inputs it received
when the model ran on ``example_inputs``) and put in the model under its own name. The
originals are kept, so :func:`restore_units` puts them back.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.ao.nn.intrinsic import _FusedModule

from .distributed import dtensor_type
from .errors import SparsityConfigError, TraceError, warn_user
from .exporting import HOOK_DICTS, export_failure, export_module, keep_hooks_when_copied
from .inputs import CallInputs, as_args_kwargs, call_with
from .passes import MaskSpec, fetch_attr, owns_one_of, prepare_masks
from .passes.insert_masks import mask_fqn_for
from .scopes import Scope
from .tracing import TRACERS, trace, warn_hooks_traced_through

#: The attribute on a scoped model that lists its units.
UNITS_ATTR = "fx_sparsity_units"


@dataclass
class Unit:
    """One traced part of a scoped model."""

    fqn: str  # where it sits in the model
    original: nn.Module  # the module it replaced
    graph_module: fx.GraphModule


def _inside(fqn: str, prefix: str) -> bool:
    return fqn == prefix or fqn.startswith(prefix + ".")


@contextlib.contextmanager
def _quiet_run(model: nn.Module, buffers: Iterable[torch.Tensor] | None = None) -> Iterator[None]:
    """Run as inference does, leaving no trace: eval mode (no batch-norm updates), no grad, RNG restored, and
    every buffer as it was (observers record even in eval mode). ``buffers``: the ones the run may change, when
    the caller knows (saving every buffer clones them all)."""
    modes = {m: m.training for m in model.modules()}
    saved = [(b, b.clone()) for b in (model.buffers() if buffers is None else buffers)]
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for live, value in saved:
                if live.shape == value.shape:
                    live.copy_(value)


class _Captured(Exception):
    """Raised by the capture hook to stop the model once the inputs it wanted are recorded."""


def capture_calls(model: nn.Module, fqns: list[str], batches: Iterable[Any], *, stop: bool = False,
                  buffers: Iterable[torch.Tensor] | None = None) -> dict[str, list[CallInputs]]:
    """``{fqn: [inputs of each call]}``: what those submodules get when ``model`` runs on each batch.

    Runs in eval mode without grad, and leaves the RNG, every module's mode and the buffers (all, or
    ``buffers``) as they were. With ``stop=True`` (one fqn), each batch runs only up to that submodule's
    first call: nothing after it (later blocks, a language-model head and its logits) is computed.
    """
    if stop and len(fqns) != 1:
        raise ValueError("capture_calls(stop=True) records the inputs of one submodule")
    calls: dict[str, list[CallInputs]] = {fqn: [] for fqn in fqns}

    def hook(fqn: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[fqn].append(CallInputs(args, kwargs))
            if stop:
                raise _Captured
        return record

    handles = [model.get_submodule(fqn).register_forward_pre_hook(hook(fqn), with_kwargs=True) for fqn in fqns]
    try:
        with _quiet_run(model, buffers):
            for batch in batches:
                try:
                    call_with(model, batch)
                except _Captured:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return calls


def capture_inputs(model: nn.Module, fqns: list[str], example_inputs: Any,
                   optional: Iterable[str] = ()) -> dict[str, CallInputs]:
    """``{fqn: inputs}``: what each of those submodules gets (first call) when ``model`` runs on ``example_inputs``;
    one of ``optional`` that is not called is left out, any other is an error."""
    calls = capture_calls(model, fqns, [example_inputs])
    captured = {fqn: found[0] for fqn, found in calls.items() if found}
    missing = _uncalled(calls, optional)
    if missing:
        raise SparsityConfigError(
            f"tracer=\"export\" traces each unit on the inputs it gets when the model runs on example_inputs, but "
            f"{missing} {'was' if len(missing) == 1 else 'were'} not called; pass inputs that reach them, or use "
            f"tracer=\"symbolic\". If a parent reads the layer's tensors directly (`self.proj.weight @ x`), use a "
            f"block scope that holds the parent.")
    return captured


_UNCALLED = ("If its parent reads its tensors directly (`self.proj.weight @ x`), a mask in the layer's graph "
             "never applies there: use a block scope that holds the parent (a layer these inputs just do not use "
             "is fine).")


def _uncalled(calls: dict[str, list[CallInputs]], optional: Iterable[str]) -> list[str]:
    skip = set(optional)
    return [fqn for fqn, found in calls.items() if not found and fqn not in skip]


def _warn_uncalled(model: nn.Module, fqns: list[str], example_inputs: Any, optional: Iterable[str]) -> None:
    """Run ``model`` on ``example_inputs`` and warn about units it does not call (their masks could not act)."""
    silent = _uncalled(capture_calls(model, fqns, [example_inputs]), optional)
    if silent:
        warn_user(f"{silent} {'was' if len(silent) == 1 else 'were'} not called when the model ran on "
                  f"example_inputs. {_UNCALLED}")


def trace_unit(fqn: str, module: nn.Module, tracer: str, inputs: CallInputs | None,
               see_inside: Callable[[str, nn.Module], bool], block: bool = False) -> fx.GraphModule:
    """One unit as a GraphModule; errors name the unit and the ways that work for a unit (a block's own
    forward failing: scope="layers" traces less; a layer's: the other tracer)."""
    if tracer not in TRACERS:
        raise SparsityConfigError(f"tracer={tracer!r} is not one of {TRACERS}")
    smaller = ("scope=\"layers\" (only the layers that own configured tensors are traced, not the block's own "
               "forward); " if block else "")
    if tracer == "symbolic":
        ways = (f"Ways that work, in order: {smaller}tracer=\"export\" with example_inputs=(...) (torch.export "
                f"specialises such control flow on the inputs each unit gets).")
        try:
            return trace(module, "symbolic", see_inside=see_inside, ways=ways)
        except TraceError as e:
            raise TraceError(f"'{fqn}': {e}") from e
    assert inputs is not None
    try:
        return export_module(module, *as_args_kwargs(inputs))
    except Exception as e:
        raise export_failure(f"'{fqn}' ({type(module).__name__}) on the inputs it got from example_inputs", e,
                             f"Ways that work, in order: {smaller}tracer=\"symbolic\" (no example inputs "
                             f"needed).") from e


#: What eager-mode ``torch.ao.quantization.prepare`` reads (``qconfig``) and adds (the output observer).
_EAGER_QUANT_ATTR, _EAGER_QUANT_CHILD = "qconfig", "activation_post_process"
_OWN_HOOKS = "_fx_sparsity_own_hooks"


def stand_in(original: nn.Module, graph_module: fx.GraphModule) -> None:
    """Let ``graph_module``, put in ``original``'s place, act as it for hooks and eager-mode quantization.

    It runs the original's forward hooks: the same dicts (a hook added or a handle removed while
    prepared acts on the original too), or, for an exported graph with input-check hooks of its
    own, the original's added to those. It carries the original's ``qconfig`` and output observer,
    so ``torch.ao.quantization.prepare`` run on the prepared model sees the layer.
    """
    own = {name: set(getattr(graph_module, name)) for name in HOOK_DICTS}
    for name in HOOK_DICTS:
        if own[name]:
            getattr(graph_module, name).update(getattr(original, name))
        else:
            graph_module.__dict__[name] = getattr(original, name)
    graph_module.__dict__[_OWN_HOOKS] = own
    keep_hooks_when_copied(graph_module)
    if _EAGER_QUANT_ATTR in original.__dict__:
        setattr(graph_module, _EAGER_QUANT_ATTR, getattr(original, _EAGER_QUANT_ATTR))
    if _EAGER_QUANT_CHILD in original._modules:
        graph_module.add_module(_EAGER_QUANT_CHILD, original._modules[_EAGER_QUANT_CHILD])


def check_not_prepared(model: nn.Module) -> None:
    """Refuse a model fx_sparsity has prepared already: its masks would be masked again, and shared by two
    sparsifiers (each squash would break the other's graph)."""
    masks = []
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            masks += [n.meta["sparsity"]["mask_fqn"] for n in module.graph.nodes
                      if n.op == "call_function" and "mask_fqn" in n.meta.get("sparsity", {})]
            masks += [f for n in module.graph.nodes for f in n.meta.get("channel_mask", [])]
    if masks or units_of(model):
        found = sorted(set(masks))
        raise SparsityConfigError(
            f"{type(model).__name__} is already prepared by fx_sparsity (masks {found[:4]}"
            f"{' ...' if len(found) > 4 else ''}): one sparsifier per model. Prepare the original model with the new "
            f"sparsifier, or call squash_mask() (prune() for a structured pruner) on this one first")


def check_eager_quantization(model: nn.Module, owner_fqns: list[str]) -> None:
    """Refuse to write a layer that eager-mode ``torch.ao.quantization.prepare`` observes into one model graph;
    warn for one that has a ``qconfig`` for it."""
    for fqn in dict.fromkeys(owner_fqns):
        owner = model.get_submodule(fqn)
        if getattr(owner, _EAGER_QUANT_ATTR, None) is not None and _EAGER_QUANT_CHILD not in owner._modules:
            warn_user(f"'{fqn}' ({type(owner).__name__}) has a qconfig for eager-mode torch.ao.quantization, which "
                      f"cannot find the layers scope=\"model\" writes into one graph: prepare with scope=\"layers\" "
                      f"and quantize after squash_mask(), or quantize the prepared GraphModule with "
                      f"prepare_fx/convert_fx")
        if _EAGER_QUANT_CHILD in owner._modules:
            raise SparsityConfigError(
                f"'{fqn}' ({type(owner).__name__}) carries an output observer of eager-mode torch.ao.quantization "
                f"(torch.ao.quantization.prepare ran before): scope=\"model\" writes it into one graph, where "
                f"torch.ao.quantization.convert cannot find it. Prepare with scope=\"layers\" (the layers stay in "
                f"your model; squash_mask() puts each back, with its observer, before convert), or quantize the "
                f"prepared GraphModule with prepare_fx/convert_fx instead")


def _hand_back(graph_module: fx.GraphModule, original: nn.Module) -> None:
    """What was added to the unit while prepared (hooks, ``torch.ao.quantization.prepare``'s qconfig and
    observer) goes to the original that takes its place again."""
    own = graph_module.__dict__.get(_OWN_HOOKS, {})
    for name in HOOK_DICTS:
        hooks, theirs = getattr(graph_module, name), getattr(original, name)
        if hooks is not theirs:
            theirs.update({k: v for k, v in hooks.items() if k not in own.get(name, ()) and k not in theirs})
    if _EAGER_QUANT_ATTR in graph_module.__dict__:
        setattr(original, _EAGER_QUANT_ATTR, getattr(graph_module, _EAGER_QUANT_ATTR))
    if _EAGER_QUANT_CHILD in graph_module._modules:
        original.add_module(_EAGER_QUANT_CHILD, graph_module._modules[_EAGER_QUANT_CHILD])


def _copy_back(original: nn.Module, graph_module: nn.Module) -> None:
    """Put the graph module's current values into the original's tensors where they are other objects."""
    current: dict[str, torch.Tensor] = dict(graph_module.named_parameters(remove_duplicate=False))
    current.update(graph_module.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in [*original.named_parameters(remove_duplicate=False),
                             *original.named_buffers(remove_duplicate=False)]:
            value = current.get(name)
            if value is not None and value is not tensor and value.shape == tensor.shape:
                tensor.copy_(value)


def _sharded(module: nn.Module) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters(recurse=False))


def restore_units(model: nn.Module, units: list[Unit]) -> list[Unit]:
    """Put each unit's original module back (with the values and the train/eval mode it has now).

    A unit that FSDP2's ``fully_shard`` wrapped holds DTensor shards the original cannot run
    with: it stays a (mask-free) GraphModule. Returns the units that stayed.
    """
    kept = []
    observed = any(_EAGER_QUANT_CHILD in m._modules for m in model.modules())
    places = _places(model)
    for unit in units:
        if _sharded(unit.graph_module):
            kept.append(unit)
            continue
        _copy_back(unit.original, unit.graph_module)
        _unlink_tied_masks(unit.graph_module)
        _hand_back(unit.graph_module, unit.original)
        parent = model.get_submodule(unit.fqn.rpartition(".")[0])
        if (observed and getattr(unit.original, _EAGER_QUANT_ATTR, None) is not None
                and _EAGER_QUANT_CHILD not in unit.original._modules
                and not isinstance(parent, _FusedModule)):  # (a fused LinearReLU observes for its Linear)
            warn_user(f"'{unit.fqn}' ({type(unit.original).__name__}) has a qconfig but no observer: "
                      f"torch.ao.quantization.prepare ran while it was an fx_sparsity graph module, which eager-mode "
                      f"quantization does not recognise. Run torch.ao.quantization.prepare again now, before "
                      f"calibrating and convert (the layers it already observes are kept as they are)")
        unit.original.train(unit.graph_module.training)
        for name in places.get(id(unit.graph_module), [unit.fqn]):
            model.set_submodule(name, unit.original)
    return kept


def _places(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): every name it is registered under in model}`` (a layer may sit in two places)."""
    places: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            places.setdefault(id(module), []).append(name)
    return places


def units_of(model: nn.Module) -> list[Unit]:
    """The units a scoped prepare recorded on ``model`` (empty for a model-scope GraphModule)."""
    return list(getattr(model, UNITS_ATTR, None) or [])


def relative(fqn: str, prefix: str) -> str:
    """``fqn`` seen from the module at ``prefix`` (``"a.b.weight"``, ``"a"`` -> ``"b.weight"``)."""
    return fqn[len(prefix) + 1:] if prefix else fqn


def graph_parts(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """``[(fqn, graph module)]``: the units of a scoped model, or ``[("", model)]`` for one GraphModule."""
    units = units_of(model)
    if units:
        return [(unit.fqn, unit.graph_module) for unit in units]
    return [("", model)] if isinstance(model, fx.GraphModule) else []


def _first_names(module: nn.Module) -> dict[int, str]:
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {id(t): name for name, t in reversed(tensors)}


def prepare_units(model: nn.Module, specs: list[MaskSpec], scope: Scope, tracer: str,
                  example_inputs: Any) -> list[Unit]:
    """Trace each unit of ``model``, mask the tensors of ``specs`` (model fqns) in it, and put it in place.

    A tensor's mask is a buffer of the unit that owns the tensor; a unit that only reads a
    tied tensor owned elsewhere multiplies by the same mask, held as a non-persistent buffer
    (one mask in ``state_dict()``) and linked back to the owner's before each call
    (:func:`_link_tied_masks`), so ``.to()`` cannot split them.
    """
    tensors = {spec.tensor_fqn: fetch_attr(model, spec.tensor_fqn) for spec in specs}
    owns_masked = owns_one_of(list(tensors.values()))
    owners = [spec.tensor_fqn.rpartition(".")[0] for spec in specs]
    # and the modules that hold a configured tensor under another name (tied): they read it too
    readers = [name for name, module in model.named_modules() if name not in owners and owns_masked(name, module)]
    block_types = scope.block_types
    if block_types and not any(isinstance(m, block_types) for m in model.modules()):
        warn_user(f"scope={[t.__name__ for t in block_types]}: the model has no module of that type; each layer that "
                  f"owns a configured tensor is a graph of its own, as with scope=\"layers\"")
    fqns = scope.units(model, owners + readers)
    if tracer == "export" and example_inputs is None:
        raise SparsityConfigError(
            "tracer=\"export\" needs example_inputs: a tuple of inputs (or a dict of keyword inputs) the model "
            "can be called with; each unit is traced on the inputs it gets from them")
    inputs = capture_inputs(model, fqns, example_inputs, optional=readers) if tracer == "export" else {}
    if tracer != "export" and example_inputs is not None:
        _warn_uncalled(model, fqns, example_inputs, readers)
    if tracer == "export":  # a reader of a tied tensor that the model never calls (T5's `shared`) needs no graph
        fqns = [fqn for fqn in fqns if fqn in inputs]
    units: list[Unit] = []
    for fqn in fqns:
        module = model.get_submodule(fqn)
        gm = trace_unit(fqn, module, tracer, inputs.get(fqn), owns_masked,
                        block=isinstance(module, block_types) if block_types else False)
        names = _first_names(module)
        unit_specs = []
        for spec in specs:
            owned = _inside(spec.tensor_fqn.rpartition(".")[0], fqn)
            if owned:
                name = relative(spec.tensor_fqn, fqn)
            elif id(tensors[spec.tensor_fqn]) in names:
                name = names[id(tensors[spec.tensor_fqn])]
            else:
                continue
            unit_specs.append(MaskSpec(name, spec.mask, {**spec.meta, "model_fqn": spec.tensor_fqn}, persistent=owned))
        prepare_masks(gm, unit_specs, module)
        warn_hooks_traced_through(module, gm, fqn)
        stand_in(module, gm)
        units.append(Unit(fqn, module, gm))
    places = _places(model)
    for unit in units:
        for name in places.get(id(unit.original), [unit.fqn]):  # every name it is registered under (aliases too)
            model.set_submodule(name, unit.graph_module)
    _tie_masks(model, units, specs)
    setattr(model, UNITS_ATTR, units)
    return units


def _tie_masks(model: nn.Module, units: list[Unit], specs: list[MaskSpec]) -> None:
    """Link each non-persistent (tied) mask buffer of a unit to its owner's, before every call."""
    owner_mask = {mask_fqn_for(spec.tensor_fqn): spec.mask for spec in specs}
    for unit in units:
        links = []
        for name, buffer in unit.graph_module.named_buffers():
            module_fqn, _, leaf = name.rpartition(".")
            holder = unit.graph_module.get_submodule(module_fqn)
            if leaf in holder._non_persistent_buffers_set:  # a tied mask, or the model's own (Gemma's embed_scale)
                source = next((fqn for fqn, mask in owner_mask.items() if mask is buffer), None)
                if source is not None:
                    links.append((name, source))
        if links:
            unit.graph_module.__dict__["_fx_sparsity_tied_masks"] = _TiedLinks(model, links)
            unit.graph_module.register_forward_pre_hook(_link_tied_masks)


class _TiedLinks:
    """The model a unit's tied masks live in, and ``[(buffer name in the unit, mask fqn in the model)]``.

    A deep copy links to the copy of the model when the model is copied too, else to the model itself
    (a unit copied alone, as lowering does, reads the masks of the model it came from).
    """

    def __init__(self, root: nn.Module, links: list[tuple[str, str]]):
        self.root, self.links = root, links

    def __deepcopy__(self, memo: dict) -> _TiedLinks:
        return _TiedLinks(memo.get(id(self.root), self.root), list(self.links))


def _unlink_tied_masks(module: nn.Module) -> None:
    """Remove :func:`_link_tied_masks` from ``module``'s pre-hooks (from its original's: a unit shares them)."""
    for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _link_tied_masks]:
        del module._forward_pre_hooks[key]


def _link_tied_masks(module: nn.Module, args: Any) -> None:
    tied: _TiedLinks = module.__dict__["_fx_sparsity_tied_masks"]
    for name, source in tied.links:
        try:
            live = tied.root.get_buffer(source)
        except AttributeError:  # folded into the weight (lowered): nothing to link any more
            continue
        module_fqn, _, leaf = name.rpartition(".")
        holder = module.get_submodule(module_fqn)
        if leaf in holder._buffers and holder._buffers[leaf] is not live:
            holder._buffers[leaf] = live
