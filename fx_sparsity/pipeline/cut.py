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
from ..scoping import UNITS_ATTR, relative
from .channels import ChannelTarget, Part
from .hf_config import update_attention_attributes, update_config

__all__ = ["cut_model"]


@torch.no_grad()
def cut_model(model: nn.Module, parts: list[Part], targets: dict[str, ChannelTarget]) -> nn.Module:
    """A physically smaller copy of ``model`` computing what the masked one does; ``model`` is left as it is."""
    pruned = copy.deepcopy(model)  # (exported graphs keep their hooks: tracing.keep_hooks_when_copied)
    for part in parts:
        gm = pruned.get_submodule(part.fqn) if part.fqn else pruned
        assert isinstance(gm, fx.GraphModule)
        mine = {fqn: t for fqn, t in targets.items() if t.part == part.fqn}
        exact = all(t.channel_group.normalized is None for t in mine.values())
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


def _restore_class(part: Part, gm: fx.GraphModule) -> nn.Module | None:
    """The block's own class holding the cut tensors, if its forward computes what the cut graph does."""
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
