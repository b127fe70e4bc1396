"""Cutting: the physically smaller copy of a model prepared with channel masks, checked against the masked one.

Per part, the masks are read as keep-vectors, the masking nodes go (``RemoveChannelMasks``), the
graph's size arguments are rewritten for the kept channels (``RewriteSizes``), and every tensor
indexed by a cut channel is sliced (``cut_tensors``). The cut part must give the masked part's
outputs on the example inputs; a block of a block scope then gets its own class back when its
forward runs with the smaller layers.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import warn_user
from ..inputs import CallInputs, call_with
from ..passes import run_passes
from ..passes.channels import (
    CutError,
    RemoveChannelMasks,
    RewriteSizes,
    cut_tensors,
    plan_cut,
    update_layer_attributes,
)
from ..scoping import UNITS_ATTR, capture_inputs, relative
from ..scoping import _unlink_tied_masks as unlink_tied_masks
from .channels import ChannelTarget, Part
from .hf_config import update_attention_attributes, update_config
from .stitched import SHARED_MASK

__all__ = ["cut_model"]


@torch.no_grad()
def cut_model(model: nn.Module, parts: list[Part], targets: dict[str, ChannelTarget]) -> nn.Module:
    """A physically smaller copy of ``model`` computing what the masked one does; ``model`` is left as it is."""
    pruned = copy.deepcopy(model)  # (exported graphs keep their hooks: exporting.keep_hooks_when_copied)
    if any(part.model_inputs is not None for part in parts):
        _cut_together(model, pruned, parts, targets)
        parts = []
    for part in parts:
        gm = pruned.get_submodule(part.fqn) if part.fqn else pruned
        assert isinstance(gm, fx.GraphModule)
        mine = {fqn: t for fqn, t in targets.items() if t.part == part.fqn}
        exact = all(t.channel_group.inexact is None for t in mine.values())
        chosen = {t.channel_group.index: gm.get_buffer(relative(t.mask_fqn, part.fqn)) != 0 for t in mine.values()}
        keep = part.analysis.keep(chosen)
        plan = plan_cut(part.analysis, keep)
        run_passes(gm, RemoveChannelMasks(), RewriteSizes(part.analysis, keep))
        for target in mine.values():
            owner_fqn, _, name = relative(target.mask_fqn, part.fqn).rpartition(".")
            delattr(gm.get_submodule(owner_fqn), name)
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


def _cut_together(model: nn.Module, pruned: nn.Module, parts: list[Part], targets: dict[str, ChannelTarget]) -> None:
    """The units of a block scope followed as one graph (``stitched``): every unit cut with every chosen group, the
    whole model checked against the masked one, each unit given its class back on what it now gets, tied tensors
    tied again."""
    ties = [names for names in _tied(pruned) if len(names) > 1]
    chosen = {t.channel_group.index: pruned.get_buffer(t.mask_fqn) != 0 for t in targets.values()}
    exact = all(t.channel_group.inexact is None for t in targets.values())
    for part in parts:
        gm = pruned.get_submodule(part.fqn)
        assert isinstance(gm, fx.GraphModule)
        keep = part.analysis.keep(chosen)
        plan = plan_cut(part.analysis, keep)
        run_passes(gm, RemoveChannelMasks(), RewriteSizes(part.analysis, keep))
        for target in targets.values():
            if target.part == part.fqn:
                owner_fqn, _, name = relative(target.mask_fqn, part.fqn).rpartition(".")
                delattr(gm.get_submodule(owner_fqn), name)
        for name in [n for n, _ in gm.named_buffers(recurse=False) if n.startswith(SHARED_MASK)]:
            delattr(gm, name)
        unlink_tied_masks(gm)
        _drop_input_guards(gm)
        cut_tensors(gm, plan)
        update_layer_attributes(gm)
    inputs = parts[0].model_inputs
    assert inputs is not None
    _check(model, pruned, inputs, exact, type(model).__name__)
    originals = [part for part in parts if part.original is not None]
    captured = capture_inputs(pruned, [part.fqn for part in originals], inputs)  # what each cut unit now gets
    for part in originals:
        gm = pruned.get_submodule(part.fqn)
        assert isinstance(gm, fx.GraphModule)
        restored = _restore_class(part, gm, captured[part.fqn])
        if restored is not None:
            pruned.set_submodule(part.fqn, restored)
    _tie(pruned, ties)


def _drop_input_guards(gm: fx.GraphModule) -> None:
    """torch.export's checks of a unit's input shapes (``_guards_fn``, its pre-hook): its inputs may now be
    narrower."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)
    gm.recompile()


def _tied(module: nn.Module) -> list[list[str]]:
    """The names of each parameter (tied ones: several)."""
    names: dict[int, list[str]] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), []).append(name)
    return list(names.values())


def _tie(module: nn.Module, ties: list[list[str]]) -> None:
    """Make each set of names hold one parameter again (the cut gave each holder its own copy)."""
    for names in ties:
        first = module.get_parameter(names[0])
        for name in names[1:]:
            owner_fqn, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_fqn)
            held = owner._parameters.get(leaf)
            if held is not None and held.shape == first.shape:
                owner._parameters[leaf] = first


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
    """The pruned graph must run, and (unless a group the masked graph cannot reproduce was cut) give the masked
    one's outputs."""
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


def _restore_class(part: Part, gm: fx.GraphModule, inputs: CallInputs | None = None) -> nn.Module | None:
    """The block's own class holding the cut tensors, if its forward computes what the cut graph does (on ``inputs``,
    what it gets in the cut model; by default the example it was traced on)."""
    inputs = part.inputs if inputs is None else inputs
    assert part.original is not None
    restored = copy.deepcopy(part.original)
    current: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
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
        ours, theirs = _outputs(gm, inputs), _outputs(restored, inputs)
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
