"""Masked normalisation: norms and means over channels of a masked group take the kept channels only.

A LayerNorm, RMSNorm or GroupNorm (a mean, a variance) averages over channels; once some are cut,
the cut model averages over the others. For the masked model to compute the same, each such node
whose channels are masked is rewritten into its masked form, which reads the same input (already
multiplied by the masks: the node is a sink) and the mask, and divides by the number of channels
kept. Before (a LayerNorm over a masked residual width of 32)::

    mul = torch.mul(add, type_as)                               # the sink: pruned channels zeroed
    norm = self.norm(mul)

After::

    mul = torch.mul(add, type_as)
    norm = masked_layer_norm(mul, type_as, (32,), self.norm.weight, self.norm.bias, 1e-05)

where, with ``m`` the mask (1 for a kept channel) and ``k`` the kept count over the normalised dims::

    mean = sum(x·m) / k;   var = sum(((x - mean)·m)²) / k;   y = ((x - mean)·m / sqrt(var + eps)·w + b)·m

An RMSNorm (``nn.RMSNorm``, ``F.rms_norm``) divides ``x`` by ``sqrt(sum((x·m)²)/k + eps)``; a GroupNorm does
the LayerNorm's per group of channels (each group keeps as many); a ``mean`` over channels (Hugging Face's
``LlamaRMSNorm``: ``x * rsqrt(x.pow(2).mean(-1) + eps)``, a LayerNorm written out) is multiplied by
``n / k``; ``var``/``std`` are taken over the kept entries. On the cut model each of these is the
original op on the kept channels, so the cut model computes what the masked one does; the masked
graph's other nodes are unchanged. ``masks.RemoveChannelMasks`` puts the original nodes back (before a cut).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .groups import ChannelAnalysis, NormSite
from .masks import CHANNEL_MASK_META, MASKED_NORM_META, mark_part, node_refs
from .tracker import arg, op_name

__all__ = ["MaskNorms", "masked_layer_norm", "masked_rms_norm",
           "masked_group_norm", "masked_mean", "masked_var"]

# -- the masked forms (plain torch ops: they run eagerly, compile and export)


def _kept(mask: torch.Tensor, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """How many entries of ``x`` along ``dims`` the mask keeps (``mask`` of ``x``'s rank, 1 where it does not
    vary), kept dims of size 1; never below 1."""
    count = mask.sum(dims, keepdim=True)
    for d in dims:
        if mask.shape[d] == 1:
            count = count * x.shape[d]
    return count.clamp_min(1)


def _opmath(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-5, outputs: int = 1) -> Any:
    """``F.layer_norm`` over the entries ``mask`` keeps (``x`` is zero elsewhere); 3 ``outputs``: aten's
    ``native_layer_norm`` (output, mean, rstd)."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    xf, m = _opmath(x), mask.to(_opmath(x).dtype)
    count = _kept(m, xf, dims)
    mean = (xf * m).sum(dims, keepdim=True) / count
    centered = (xf - mean) * m
    rstd = torch.rsqrt(centered.square().sum(dims, keepdim=True) / count + eps)
    y = (centered * rstd).to(x.dtype)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = (y + bias) * mask
    return (y, mean, rstd) if outputs == 3 else y


def masked_rms_norm(x: torch.Tensor, mask: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
                    eps: float | None = None, outputs: int = 1) -> Any:
    """``F.rms_norm`` over the entries ``mask`` keeps; 2 ``outputs``: aten's ``_fused_rms_norm`` (output, rstd)."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    xf = _opmath(x) * mask.to(_opmath(x).dtype)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    rstd = torch.rsqrt(xf.square().sum(dims, keepdim=True) / _kept(mask, xf, dims) + eps)
    y = (xf * rstd).to(x.dtype)
    if weight is not None:
        y = y * weight
    return (y, rstd) if outputs == 2 else y


def masked_group_norm(x: torch.Tensor, mask: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-5, outputs: int = 1) -> Any:
    """``F.group_norm`` over the channels ``mask`` keeps (``mask``: 1 at every dim but the channels'); 3
    ``outputs``: aten's ``native_group_norm`` (output, mean, rstd)."""
    n, c = x.shape[0], x.shape[1]
    xf = _opmath(x)
    grouped = xf.reshape(n, num_groups, c // num_groups, -1)
    m = mask.to(xf.dtype).reshape(1, num_groups, c // num_groups, 1)
    count = (m.sum(2, keepdim=True) * grouped.shape[3]).clamp_min(1)
    mean = (grouped * m).sum((2, 3), keepdim=True) / count
    centered = (grouped - mean) * m
    rstd = torch.rsqrt(centered.square().sum((2, 3), keepdim=True) / count + eps)
    y = (centered * rstd).reshape(x.shape).to(x.dtype)
    affine = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(affine)
    if bias is not None:
        y = (y + bias.reshape(affine)) * mask
    if outputs == 3:
        return y, mean.reshape(n, num_groups), rstd.reshape(n, num_groups)
    return y


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], keepdim: bool = False,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.mean(dims)`` over the entries ``mask`` keeps (``x`` is zero elsewhere): the mean times ``n / kept``."""
    ratio = math.prod(x.shape[d] for d in dims) / _kept(mask, x, dims)
    if not keepdim:
        ratio = ratio.squeeze(dims) if dims else ratio
    return x.mean(dims, keepdim=keepdim, dtype=dtype) * ratio.to(dtype or x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...], correction: float = 1.0,
               keepdim: bool = False, kind: str = "var") -> Any:
    """``var``/``std``/``var_mean``/``std_mean`` over ``dims`` of the entries ``mask`` keeps."""
    xf, m = _opmath(x), mask.to(_opmath(x).dtype)
    count = _kept(m, xf, dims)
    mean = (xf * m).sum(dims, keepdim=True) / count
    var = ((xf - mean) * m).square().sum(dims, keepdim=True) / (count - correction)
    if not keepdim:
        var, mean = var.squeeze(dims), mean.squeeze(dims)
    out = (var.sqrt() if kind.startswith("std") else var).to(x.dtype)
    return (out, mean.to(x.dtype)) if kind.endswith("_mean") else out


# -- the pass


def _masks_on(value: object) -> tuple[object, list[fx.Node]]:
    """The value a sink's masking muls multiply, and the masks they multiply it by."""
    masks = []
    while isinstance(value, fx.Node) and value.meta.get(CHANNEL_MASK_META):
        mask = value.args[1]
        assert isinstance(mask, fx.Node)
        masks.append(mask)
        value = value.args[0]
    return value, masks


class MaskNorms(PassBase):
    """Rewrite each norm, mean or variance over channels of a masked group (``masks``: group index -> mask fqn)
    into its masked form; run after ``InsertChannelMasks``."""

    def __init__(self, analysis: ChannelAnalysis, masks: dict[int, str]):
        super().__init__()
        self.analysis, self.masks = analysis, masks

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {node.name: node for node in gm.graph.nodes}
        changed = False
        for site in self.analysis.norms:
            involved = {int(g) for g in self.analysis.group_of[site.ids].unique().tolist()} & set(self.masks)
            node = nodes.get(site.node)
            if not involved or node is None or MASKED_NORM_META in node.meta:
                continue
            _, masks = _masks_on(node.args[0])
            if not masks:
                continue
            with gm.graph.inserting_before(node):
                mask = masks[0]
                for other in masks[1:]:
                    mask = mark_part(gm.graph.call_function(torch.mul, (mask, other)))
                target, args = _masked_call(gm, node, site, mask)
            which = f"group{'s' if len(involved) > 1 else ''} {', '.join(map(str, sorted(involved)))}"
            node.meta[MASKED_NORM_META] = {"op": node.op, "target": node.target, "args": node_refs(node.args),
                                           "kwargs": node_refs(node.kwargs),
                                           "note": f"{site.what} over the kept channels of {which}"}
            node.op, node.target = "call_function", target
            node.args, node.kwargs = args, {}
            changed = True
        if changed:
            gm.recompile()
        return PassResult(gm, changed)


def _weight(gm: fx.GraphModule, module: nn.Module, owner: str, name: str) -> fx.Node | None:
    if getattr(module, name, None) is None:
        return None
    return mark_part(gm.graph.get_attr(f"{owner}.{name}"))


def _masked_call(gm: fx.GraphModule, node: fx.Node, site: NormSite, mask: fx.Node) -> tuple[Callable[..., Any], tuple]:
    """The masked form of ``node`` (its target and arguments), reading ``mask``."""
    x = node.args[0]
    if node.op == "call_module":
        owner = str(node.target)
        module = gm.get_submodule(owner)
        w = _weight(gm, module, owner, "weight")
        if isinstance(module, nn.GroupNorm):
            return masked_group_norm, (x, mask, module.num_groups, w, _weight(gm, module, owner, "bias"), module.eps)
        assert isinstance(module, (nn.LayerNorm, nn.RMSNorm))
        shape = tuple(module.normalized_shape)
        if isinstance(module, nn.RMSNorm):
            return masked_rms_norm, (x, mask, shape, w, module.eps)
        return masked_layer_norm, (x, mask, shape, w, _weight(gm, module, owner, "bias"), module.eps)
    name = op_name(node)
    if name in ("layer_norm", "native_layer_norm"):
        outputs = 3 if name.startswith("native") else 1
        return masked_layer_norm, (x, mask, arg(node, 1, "normalized_shape"), arg(node, 2, "weight"),
                                   arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5), outputs)
    if name in ("rms_norm", "_fused_rms_norm"):
        return masked_rms_norm, (x, mask, arg(node, 1, "normalized_shape"), arg(node, 2, "weight"),
                                 arg(node, 3, "eps"), 2 if name.startswith("_fused") else 1)
    if name == "group_norm":
        return masked_group_norm, (x, mask, arg(node, 1, "num_groups"), arg(node, 2, "weight"), arg(node, 3, "bias"),
                                   arg(node, 4, "eps", 1e-5))
    if name == "native_group_norm":  # (input, weight, bias, N, C, HxW, group, eps)
        return masked_group_norm, (x, mask, node.args[6], node.args[1], node.args[2], node.args[7], 3)
    if site.kind == "mean":
        dtype = node.kwargs.get("dtype", node.args[3] if isinstance(node.target, torch._ops.OpOverload)
                                and len(node.args) > 3 else None)
        return masked_mean, (x, mask, site.dims, site.keepdim, dtype)
    return masked_var, (x, mask, site.dims, site.correction, site.keepdim, site.kind)
