"""Structured pruners (torch.ao's ``_experimental.pruner`` names): mask channel groups, then cut them out.

``prepare`` traces the model (or each block of a block scope), finds its channel groups
(``passes.channel_groups``) and, per chosen group, adds one mask buffer with an entry per class
(``<first producer>.out_channel_mask``) and multiplies every sink's input by it, so the masked
model computes exactly what the cut one will. ``step()`` scores each group's classes and keeps
the best; ``prune()`` returns a physically smaller copy, checked against the masked model on
the example inputs.
"""
from __future__ import annotations

import copy
import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import SparsityConfigError, TraceError, warn_user
from ..inputs import CallInputs, as_args_kwargs, call_with, graph_inputs
from ..passes import fetch_attr, run_passes
from ..passes.channel_groups import ChannelAnalysis, ChannelGroup, find_channel_groups
from ..passes.channel_masks import InsertChannelMasks, RemoveChannelMasks
from ..passes.cut_channels import CutError, RewriteSizes, cut_tensors, plan_cut, update_layer_attributes
from ..rollback import snapshot
from ..scoping import UNITS_ATTR, Unit, capture_inputs, check_not_prepared, check_scope, relative, unit_fqns
from ..sparsifier.base_sparsifier import BaseSparsifier, check_sparsifier_state
from ..sparsifier.nm_sparsifier import check_level
from ..tracing import TRACERS, check_model, export_module, trace_written_out
from .hf import update_attention_attributes, update_config

__all__ = ["BaseStructuredSparsifier", "SaliencyPruner", "FPGMPruner", "analyse"]

MASK_NAME = "out_channel_mask"
_GRAPH_KEYS = ("module", "channel_group", "graph_module")  # group keys that are not saved


@dataclass
class _Part:
    """One traced graph of the prepared model: the whole model (fqn "") or one block."""

    fqn: str
    graph_module: fx.GraphModule
    analysis: ChannelAnalysis
    inputs: CallInputs
    original: nn.Module | None  # the block it replaced


def analyse(gm: fx.GraphModule, inputs: Any) -> ChannelAnalysis:
    """``find_channel_groups`` on ``gm`` run with ``inputs``, leaving its buffers, mode and the RNG as they were."""
    buffers = {name: b.clone() for name, b in gm.named_buffers()}
    args, kwargs = as_args_kwargs(inputs)
    if getattr(gm.graph._codegen, "pytree_info", None) is not None:  # exported: None keywords were left out,
        taken = inspect.signature(gm.forward).parameters              # but where the forward has no default
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in taken}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return find_channel_groups(gm, graph_inputs(gm, CallInputs(args, kwargs)))
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


def _inherits(cls: type, method: str) -> bool:
    """Whether ``cls`` takes ``method`` from BaseStructuredSparsifier itself (does not override it)."""
    return getattr(cls, method) is getattr(BaseStructuredSparsifier, method)


def _mask_name(tensor_name: str) -> str:
    return MASK_NAME if tensor_name == "weight" else f"{tensor_name}_channel_mask"


class BaseStructuredSparsifier(BaseSparsifier):
    """Prune whole channels of coupled layers; subclasses score them in :meth:`filter_scores`."""

    def __init__(self, sparsity_level: float | dict[str, Any] = 0.5, patterns: Any = None):
        if all(_inherits(type(self), m) for m in ("filter_scores", "channel_scores", "update_mask")):
            raise TypeError(f"Can't instantiate {type(self).__name__}: it scores no channels. Use SaliencyPruner or "
                            f"FPGMPruner, or subclass it and implement filter_scores(weight, dim) (one score per "
                            f"channel), channel_scores(gm, group) or update_mask")
        defaults = dict(sparsity_level) if isinstance(sparsity_level, dict) else {"sparsity_level": sparsity_level}
        defaults.setdefault("sparsity_level", 0.5)  # torch.ao's SaliencyPruner(defaults) takes a dict
        check_level(defaults["sparsity_level"])
        if patterns is not None:
            warn_user(f"{type(self).__name__}: patterns are not used; fx_sparsity follows every channel dependency "
                      f"in the traced graph (docs/structured.md)")
        super().__init__(defaults=defaults)
        self.parts: list[_Part] = []

    # -- preparing
    def prepare(self, model: nn.Module, config: list[dict] | None = None, *, example_inputs: Any = None,
                inplace: bool = False, scope: Any = "model", tracer: str = "symbolic",
                **kwargs: Any) -> nn.Module:  # type: ignore[override]
        """Trace ``model``, find its channel groups and mask the configured ones.

        ``example_inputs`` (required) is what the model is run on to learn its shapes. A config entry
        names any weight of a group (``{"tensor_fqn": "layer1.0.conv1.weight"}``); ``config=None``
        takes every group that can be cut exactly without changing the model's output shapes.
        ``scope=<block class>`` keeps the user's model and traces each block alone: only groups
        inside a block can be cut. ``tracer="export"`` traces with ``torch.export`` (models
        ``symbolic_trace`` cannot trace: Hugging Face blocks, data-dependent code).
        """
        check_model(model)
        if self.model is not None:
            raise SparsityConfigError(f"{type(self).__name__} is already prepared; use a new one for each model")
        if tracer not in TRACERS:
            raise SparsityConfigError(f"tracer={tracer!r} is not one of {TRACERS}")
        block_types = check_scope(scope)
        check_not_prepared(model)
        if config is not None and not isinstance(config, (list, tuple)):
            raise TypeError(f"config must be a list of dicts (or None for every prunable group), got "
                            f"{type(config).__name__}")
        work = model if inplace else copy.deepcopy(model)
        if example_inputs is None:  # torch.ao's prepare(model, config) takes none: make one from the first layer
            example_inputs = _guess_inputs(work)
        restore = snapshot(work if inplace else None, self, ("model", "config", "groups", "_state", "parts"))
        try:
            return self._prepare_groups(work, config, block_types, tracer, example_inputs)
        except BaseException:
            restore()
            raise

    def _prepare_groups(self, work: nn.Module, config: list[dict] | None, block_types: tuple | None, tracer: str,
                 example_inputs: Any) -> nn.Module:
        if block_types is None:
            units = [("", work, CallInputs(*as_args_kwargs(example_inputs)))]
        else:
            blocks = unit_fqns(work, block_types, []) if block_types else _layers(work)
            if not block_types:  # scope="layers": a standard layer alone holds no whole group; its channels leave it
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
            units = [(fqn, work.get_submodule(fqn), captured[fqn]) for fqn in blocks]
            outside = [e.get("tensor_fqn") for e in config or []
                       if not any(str(e.get("tensor_fqn", "")).startswith(b + ".") for b in blocks)]
            if outside:
                raise SparsityConfigError(f"{outside} lie outside every block of the scope {block_types}; structured "
                                          f"pruning with a block scope cuts channels inside the blocks only")
        parts, groups = [], []
        for fqn, module, inputs in units:
            gm = self._trace(module, tracer, inputs, fqn)
            analysis = analyse(gm, inputs)
            part = _Part(fqn, gm, analysis, inputs, module if fqn else None)
            part_config = None if config is None else [
                {**e, "tensor_fqn": relative(e["tensor_fqn"], fqn)} for e in config
                if not fqn or str(e.get("tensor_fqn", "")).startswith(fqn + ".")]
            masks = {}
            for group, entry in self._choose(part, part_config):
                tensor_fqn, _dim = group.anchor
                owner_fqn, _, tensor_name = tensor_fqn.rpartition(".")
                owner = gm.get_submodule(owner_fqn)
                anchor = fetch_attr(gm, tensor_fqn)
                dtype = anchor.dtype if anchor.is_floating_point() else torch.float32
                owner.register_buffer(_mask_name(tensor_name), torch.ones(group.num_classes, dtype=dtype,
                                                                          device=anchor.device))
                masks[group.index] = f"{owner_fqn}.{_mask_name(tensor_name)}" if owner_fqn else _mask_name(tensor_name)
                settings = {**copy.deepcopy(self.defaults), **{k: v for k, v in entry.items() if k != "tensor_fqn"}}
                check_level(settings["sparsity_level"], where=f"group of '{tensor_fqn}'")
                prefix = f"{fqn}." if fqn else ""
                module_fqn = ".".join(n for n in (fqn, owner_fqn) if n)
                groups.append({**settings, "tensor_fqn": prefix + tensor_fqn, "module_fqn": module_fqn,
                               "tensor_name": tensor_name, "mask_name": _mask_name(tensor_name), "module": owner,
                               "channel_group": group, "graph_module": gm, "part": fqn})
            run_passes(gm, InsertChannelMasks(analysis, masks))
            parts.append(part)
        if not groups and config is None:
            _warn_nothing_to_prune(self, parts)
        for part in parts:
            if part.fqn:
                work.set_submodule(part.fqn, part.graph_module)
        if block_types is not None:  # what printing and the scoped helpers read
            traced = [Unit(p.fqn, p.original, p.graph_module) for p in parts if p.original is not None]
            setattr(work, UNITS_ATTR, traced)
        self.parts, self.groups = parts, groups
        self.model = work if block_types is not None else parts[0].graph_module
        self.config = list(config) if config is not None else None
        return self.model

    def _trace(self, module: nn.Module, tracer: str, inputs: CallInputs, fqn: str) -> fx.GraphModule:
        where = f"'{fqn}' ({type(module).__name__})" if fqn else type(module).__name__
        if isinstance(module, nn.MultiheadAttention):
            tracer = "export"  # a layer of its own (scope="layers"): its forward branches on its flags
        if tracer == "symbolic":
            try:
                return trace_written_out(module)
            except TraceError as e:
                raise TraceError(f"{where}: {e}") from e
        try:
            gm = export_module(module, *as_args_kwargs(inputs))
        except Exception as e:
            hint = (" A Hugging Face cache reached it: pass use_cache=False in example_inputs (the pruned blocks get "
                    "their own class back, and generate() with the cache works on them)." if "Cache" in str(e) else "")
            raise TraceError(f"torch.export cannot trace {where} on its example inputs: {type(e).__name__}: {e}\n"
                             f"Check that example_inputs match the model's forward.{hint}") from e
        gm.graph.eliminate_dead_code()  # what is computed and dropped (attention weights never read) moves nothing
        gm.recompile()
        return gm

    def _choose(self, part: _Part, config: list[dict] | None) -> list[tuple[ChannelGroup, dict]]:
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
            return [(g, {}) for g in found if g.prunable and g.normalized is None]
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
            if group.normalized is not None:
                warn_user(f"pruning the channels of '{prefix}{fqn}' changes what the model computes: "
                          f"{group.normalized}, so the pruned model computes something else than the masked one (close "
                          f"when the channels cut are small); fine-tune after pruning")
            chosen.append((group, entry))
        return chosen

    # -- masks and steps
    @property
    def state(self) -> dict[str, dict]:
        """torch.ao's ``state``: ``{tensor_fqn: {"mask": channel mask}}`` per group, the live buffers (after
        ``.to()`` too)."""
        for group in self.groups:
            self._state[group["tensor_fqn"]]["mask"] = self.get_mask(group["tensor_fqn"])
        return self._state

    @state.setter
    def state(self, value: dict[str, dict]) -> None:
        self._state = value

    def _part(self, name: str) -> _Part:
        return next(p for p in self.parts if p.fqn == name)

    def get_mask(self, tensor_fqn: str) -> torch.Tensor:
        """The live channel mask of the group whose first producer is ``tensor_fqn`` (one entry per class)."""
        model = self._require_prepared("get_mask")
        group = next((g for g in self.groups if g["tensor_fqn"] == tensor_fqn), None)
        if group is None:
            raise RuntimeError(f"'{tensor_fqn}' is not the first producer of a pruned group; groups: "
                               f"{[g['tensor_fqn'] for g in self.groups]}")
        return model.get_buffer(f"{group['module_fqn']}.{group['mask_name']}" if group["module_fqn"]
                                else group["mask_name"])

    def filter_scores(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        """How much each entry of ``weight`` along ``dim`` (an output channel) is worth keeping."""
        raise NotImplementedError

    def channel_scores(self, gm: fx.GraphModule, group: ChannelGroup) -> torch.Tensor:
        """One score per class: :meth:`filter_scores` of each producer, summed over the class's channels."""
        total = torch.zeros(group.num_classes, dtype=torch.float64)
        for (fqn, dim), classes in group.classes_of.items():
            scores = self.filter_scores(fetch_attr(gm, fqn).detach(), dim).double().cpu()
            live = classes >= 0
            total.index_add_(0, classes[live], scores[live])
        return total

    def drop_count(self, sparsity_level: float, classes: int) -> int:
        """How many of ``classes`` go at ``sparsity_level`` (never all)."""
        return min(round(check_level(sparsity_level) * classes), classes - 1)

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, sparsity_level: float = 0.5,
                    channel_group: ChannelGroup | None = None, graph_module: fx.GraphModule | None = None,
                    part: str = "", **kwargs: Any) -> None:
        assert channel_group is not None and graph_module is not None
        scores = self.channel_scores(graph_module, channel_group)
        keep = torch.ones(channel_group.num_classes, dtype=torch.bool)
        block_of = self._part(part).analysis.balances.get(channel_group.index)
        for members in ([torch.arange(len(scores))] if block_of is None else
                        [(block_of == b).nonzero().flatten() for b in range(channel_group.balance)]):
            drop = self.drop_count(sparsity_level, len(members))
            if not channel_group.keep_one:  # the common case: the lowest scores go (torch.ao's topk)
                keep[members[(-scores[members]).topk(drop).indices]] = False
                continue
            order = members[(-scores[members]).topk(len(members)).indices]  # lowest score first
            for k in order.tolist():
                if drop == 0:
                    break
                keep[k] = False
                if any(not bool(keep[held].any()) for held in channel_group.keep_one):
                    keep[k] = True  # it would empty a tensor (a split's half): the next one goes instead
                else:
                    drop -= 1
        mask.copy_(keep)

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {tensor_fqn: {"mask": channel mask}}, "groups": [...]}`` (groups without the graph analysis)."""
        groups = [{k: v for k, v in g.items() if k not in _GRAPH_KEYS} for g in self.groups]
        state = {g["tensor_fqn"]: {"mask": self.get_mask(g["tensor_fqn"])} for g in self.groups}
        return {"state": state, "groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load channel masks and levels saved by :meth:`state_dict` into this prepared pruner."""
        self._require_prepared("load_state_dict")
        check_sparsifier_state(state_dict, type(self).__name__)
        levels = {g["tensor_fqn"]: g for g in state_dict["groups"]}
        copies = []  # every group is checked before any mask is written: a failed load changes nothing
        for group in self.groups:
            saved = state_dict["state"].get(group["tensor_fqn"])
            if saved is None:
                if strict:
                    raise RuntimeError(f"Error loading: no channel mask for '{group['tensor_fqn']}' in the state dict")
                continue
            live = self.get_mask(group["tensor_fqn"])
            if saved["mask"].shape != live.shape:
                raise RuntimeError(f"Error loading '{group['tensor_fqn']}': saved mask has {saved['mask'].numel()} "
                                   f"entries, this model's group {live.numel()} (a state dict from another model?)")
            copies.append((group, live, saved["mask"]))
        with torch.no_grad():
            for group, live, mask in copies:
                live.copy_(mask)
                group["sparsity_level"] = levels.get(group["tensor_fqn"], group)["sparsity_level"]

    def squash_mask(self, *args: Any, **kwargs: Any) -> nn.Module:
        """For structured pruners: :meth:`prune` (the channels are cut out, not folded)."""
        return self.prune()

    # -- cutting
    def prune(self) -> nn.Module:
        """A physically smaller copy of the prepared model, computing what the masked one does.

        The copy is checked against the masked model on the example inputs; the prepared model is
        left as it is. With a block scope, each block gets its own class back when its forward runs
        with the smaller layers (a block whose code fixes a size stays a pruned GraphModule).
        """
        with torch.no_grad():
            return self._prune(self._require_prepared("prune"))

    def _prune(self, model: nn.Module) -> nn.Module:
        pruned = copy.deepcopy(model)  # (exported graphs keep their hooks: tracing.keep_hooks_when_copied)
        exact = True
        for part in self.parts:
            gm = pruned.get_submodule(part.fqn) if part.fqn else pruned
            assert isinstance(gm, fx.GraphModule)
            groups = [g for g in self.groups if g["part"] == part.fqn]
            exact &= all(g["channel_group"].normalized is None for g in groups)
            chosen = {g["channel_group"].index: gm.get_buffer(relative(
                f"{g['module_fqn']}.{g['mask_name']}" if g["module_fqn"] else g["mask_name"], part.fqn)) != 0
                for g in groups}
            keep = part.analysis.keep(chosen)
            plan = plan_cut(part.analysis, keep)
            run_passes(gm, RemoveChannelMasks(), RewriteSizes(part.analysis, keep))
            for g in groups:
                owner = gm.get_submodule(relative(g["module_fqn"], part.fqn))
                delattr(owner, g["mask_name"])
            cut_tensors(gm, plan)
            update_layer_attributes(gm)
            masked = model.get_submodule(part.fqn) if part.fqn else model
            _check(masked, gm, part.inputs, exact, part.fqn or type(model).__name__)
            if part.original is not None:
                restored = _restore_class(part, gm)
                if restored is not None:
                    pruned.set_submodule(part.fqn, restored)
        update_config(pruned)
        if hasattr(pruned, UNITS_ATTR):
            delattr(pruned, UNITS_ATTR)
        return pruned


_SIDES = (28, 32, 224, 64, 16, 8, 7, 4, 1)  # spatial sizes tried for a guessed convolution input


def _guess_inputs(model: nn.Module) -> tuple:
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


def _warn_nothing_to_prune(pruner: BaseStructuredSparsifier, parts: list[_Part]) -> None:
    reasons = sorted({g.problem or g.normalized or "" for p in parts for g in p.analysis.groups if g.producers} - {""})
    warn_user(f"prepare: {type(pruner).__name__} found no channel group it can cut exactly (without changing the "
              f"model's output shapes); step() and prune() will do nothing. Why the groups were left out: "
              f"{reasons[:4]}{' ...' if len(reasons) > 4 else ''}. A group a LayerNorm/RMSNorm normalises can still "
              f"be named in the config.")


def _outputs(module: nn.Module, inputs: CallInputs) -> list[torch.Tensor]:
    training = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.random.fork_rng(devices=[]):
            out = call_with(module, inputs)
    finally:
        for m, mode in training:
            m.training = mode
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _check(masked: nn.Module, pruned: nn.Module, inputs: CallInputs, exact: bool, where: str) -> None:
    """The pruned graph must run, and (unless a normalised group was cut) give the masked one's outputs."""
    try:
        theirs = _outputs(pruned, inputs)
    except Exception as e:
        raise CutError(f"prune(): the cut {where} does not run on the example inputs ({type(e).__name__}: {e}); "
                       f"the prepared model is unchanged. This is a gap in fx_sparsity's channel analysis: please "
                       f"report it with the model") from e
    if not exact:
        return
    ours = _outputs(masked, inputs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        # the cut model sums fewer terms: equal up to the rounding of the output's dtype
        rtol = _rtol(a)
        scale = float(a.float().abs().max()) if a.numel() and a.is_floating_point() else 1.0
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * 0.1 * max(1.0, scale)):
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else "shapes differ"
            raise CutError(f"prune(): the cut {where} computes something else than the masked one (output {i}: "
                           f"{diff}); the prepared model is unchanged. This is a gap in fx_sparsity's channel "
                           f"analysis: please report it with the model")


_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-7}


def _rtol(output: torch.Tensor) -> float:
    """How close a cut model's ``output`` is to the masked one's: the rounding of the math that made it.

    float32 is computed at float16's precision where TF32 (or bf16) may be used: CUDA convolutions by
    default (``torch.backends.cudnn.allow_tf32``), and any matmul under ``set_float32_matmul_precision``
    "high" or "medium".
    """
    if output.dtype == torch.float32 and (torch.get_float32_matmul_precision() != "highest" or (
            output.device.type == "cuda" and torch.backends.cudnn.allow_tf32)):
        return _RTOL[torch.float16]
    return _RTOL.get(output.dtype, 1e-4)


def _restore_class(part: _Part, gm: fx.GraphModule) -> nn.Module | None:
    """The block's own class holding the cut tensors, if its forward computes what the cut graph does."""
    assert part.original is not None
    restored = copy.deepcopy(part.original)
    current = dict(gm.named_parameters(remove_duplicate=False))
    current.update(gm.named_buffers(remove_duplicate=False))
    for name, tensor in current.items():
        owner_fqn, _, leaf = name.rpartition(".")
        try:
            owner = restored.get_submodule(owner_fqn)
        except AttributeError:
            continue
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor  # type: ignore[assignment]
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor
    update_layer_attributes(restored)
    update_attention_attributes(restored)
    restored.train(gm.training)
    try:
        ours, theirs = _outputs(gm, part.inputs), _outputs(restored, part.inputs)
        same = len(ours) == len(theirs) and all(
            a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=_rtol(a), atol=_rtol(a) * 0.1)
            for a, b in zip(ours, theirs))
    except Exception:
        same = False
    if not same:
        warn_user(f"prune(): '{part.fqn}' ({type(part.original).__name__}) does not run with its smaller layers "
                  f"(its code fixes a size); it stays a pruned GraphModule")
        return None
    return restored


class SaliencyPruner(BaseStructuredSparsifier):
    """Drop the channels of smallest L1 norm (torch.ao's ``SaliencyPruner``), summed over the group's producers."""

    def filter_scores(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        rows = weight.movedim(dim, 0)
        return rows.norm(dim=tuple(range(1, rows.dim())), p=1) if rows.dim() > 1 else rows.abs()

    def drop_count(self, sparsity_level: float, classes: int) -> int:
        return min(int(classes * check_level(sparsity_level)), classes - 1)  # torch.ao: int(len(mask) * level)


class FPGMPruner(BaseStructuredSparsifier):
    """Drop the filters nearest the geometric median (He et al. 2019; torch.ao's ``FPGMPruner``): each filter's
    summed distance to the others, summed over the group's producers. ``dist``: 1, 2 (default) or a callable
    taking the flattened filters and returning their distance matrix."""

    def __init__(self, sparsity_level: float = 0.5, dist: Callable | int | None = None):
        super().__init__(sparsity_level)
        if dist is None or dist in (1, 2):
            self.dist_fn: Callable = _Cdist(2 if dist is None else int(dist))
        elif callable(dist):
            self.dist_fn = dist
        else:
            raise SparsityConfigError(f"FPGMPruner: dist={dist!r}; use 1, 2 or a callable")

    def filter_scores(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        filters = weight.movedim(dim, 0).reshape(weight.shape[dim], -1).float()
        return self.dist_fn(filters).abs().sum(1)


class _Cdist:
    """``torch.cdist`` of the filters with themselves, at norm ``p`` (a class: pruners pickle)."""

    def __init__(self, p: int):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x, p=self.p)
