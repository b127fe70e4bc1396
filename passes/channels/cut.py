"""Cutting channels out: smaller tensors, the graph's size arguments rewritten, layers' attributes updated.

Given which elements go (``ChannelAnalysis.keep``), :func:`plan_cut` lists, per tensor, the
indices kept along each cut dim (and, for grouped convolutions, the kept columns of each
conv-group); :func:`cut_tensors` applies them to any module holding those tensors under the same
names (the graph module, or the original block it was traced from).

:class:`RewriteSizes` changes the graph. Before, with half the heads of a 4-head attention gone::

    view = linear.view(b, t, 4, 8)
    reshape = transpose.reshape(b, t, 32)

After::

    view = linear.view(b, t, 2, 8)
    reshape = transpose.reshape(b, t, 16)

Each node's rule rewrites it (``ChannelRule.rewrite``): literal sizes of
``view``/``reshape``/``expand``/``unflatten`` (``-1`` and sizes computed at run time are left to
adapt; a size computed as ``n * <int>`` gets a new factor: :meth:`RewriteSizes.size`), the bounds
of slices, ``narrow`` and ``select`` along cut dims, ``chunk``/``split`` into
``split_with_sizes`` with the new sizes, the ``normalized_shape`` of layer norms. Each layer's rule
updates its size attributes (``ChannelRule.update_attributes``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..attrs import fetch_attr
from ..errors import FxSparsityError
from .groups import ChannelAnalysis
from .registry import module_rule

__all__ = ["CutPlan", "plan_cut", "cut_tensors", "RewriteSizes", "update_layer_attributes", "CutError"]


class CutError(FxSparsityError, RuntimeError):
    """The graph holds a size fx_sparsity cannot rewrite for the cut."""


@dataclass
class CutPlan:
    slices: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)  # fqn -> [(dim, kept)]
    grouped: dict[str, torch.Tensor] = field(default_factory=dict)  # conv weight fqn -> kept columns per group


def plan_cut(analysis: ChannelAnalysis, keep: torch.Tensor) -> CutPlan:
    plan = CutPlan()
    for space in analysis.spaces:
        kept = keep[space.base:space.base + space.size]
        if bool(kept.all()):
            continue
        plan.slices.setdefault(space.fqn, []).append((space.dim, kept.nonzero().flatten()))
    for conv in analysis.grouped:
        kept = keep[conv.inputs].reshape(conv.groups, -1)
        if bool(kept.all()):
            continue
        counts = kept.sum(1)
        if not bool((counts == counts[0]).all()):
            raise CutError(f"grouped convolution '{conv.weight}' would keep {counts.tolist()} input channels per "
                           f"conv-group; a grouped convolution needs the same number in each")
        plan.grouped[conv.weight] = torch.stack([row.nonzero().flatten() for row in kept])
    return plan


def _holders(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (owner, attribute name) holding each tensor of ``module`` (tied tensors: several)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for owner in module.modules():
        for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None:
                out.setdefault(id(tensor), []).append((owner, name))
    return out


def cut_tensors(module: nn.Module, plan: CutPlan) -> None:
    """Replace each planned tensor of ``module`` (and every name tied to it) by its kept part."""
    holders = _holders(module)
    for fqn in sorted(set(plan.slices) | set(plan.grouped)):
        try:
            tensor = fetch_attr(module, fqn)
        except AttributeError:
            continue
        new = tensor.detach()
        for dim, kept in plan.slices.get(fqn, ()):
            new = new.index_select(dim, kept.to(new.device))
        if fqn in plan.grouped:
            columns = plan.grouped[fqn].to(new.device)
            rows = new.reshape(columns.shape[0], -1, *new.shape[1:])
            new = torch.stack([rows[k][:, columns[k]] for k in range(columns.shape[0])]).flatten(0, 1)
        new = new.contiguous()
        places = holders.get(id(tensor)) or [(module.get_submodule(fqn.rpartition(".")[0]), fqn.rpartition(".")[2])]
        replacement: torch.Tensor = nn.Parameter(new, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else new
        for owner, name in places:
            if name in owner._parameters:
                owner._parameters[name] = replacement  # type: ignore[assignment]
            elif name in owner._buffers:
                owner._buffers[name] = replacement
            else:
                setattr(owner, name, replacement)


def update_layer_attributes(module: nn.Module) -> None:
    """Make each layer's size attributes (``in_features``, ``out_channels``, ``num_features``, ...) match its cut
    tensors: its rule's ``update_attributes``."""
    for m in module.modules():
        rule = module_rule(m)
        if rule is not None:
            rule.update_attributes(m)


class RewriteSizes(PassBase):
    """Rewrite the size arguments of the graph's shape ops for the cut ``keep`` describes: each node the analysis
    recorded is rewritten by the rule that followed it."""

    def __init__(self, analysis: ChannelAnalysis, keep: torch.Tensor):
        super().__init__()
        self.analysis, self.keep = analysis, keep
        self.factors: dict[fx.Node, tuple[int, int]] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {node.name: node for node in gm.graph.nodes}
        changed = False
        for name, seen in self.analysis.seen.items():
            node = nodes.get(name)
            if node is not None and seen.rule is not None:
                changed |= seen.rule.rewrite(self, node, seen)
        return PassResult(gm, changed)

    def size(self, node: fx.Node, size: object, old: int, new: int) -> int | fx.Node:
        """The size argument for a dim that goes from ``old`` to ``new`` entries. Channel dims are static, so a
        literal does; ``-1`` adapts by itself; ``n * <int>`` (a batch size times a head count, torch.export's
        way of merging them) gets a new factor, so the batch stays dynamic."""
        if isinstance(size, bool) or not isinstance(size, (int, fx.Node)):
            raise CutError(f"'{node.name}' has a size {size!r} fx_sparsity cannot rewrite")
        if isinstance(size, int):
            if size == -1:
                return size
            if size != old:
                raise CutError(f"'{node.name}' has size {size} where {old} was expected")
            return new
        if size.op == "call_function" and size.target is operator.mul:
            const = [i for i, a in enumerate(size.args) if isinstance(a, int) and not isinstance(a, bool)]
            if len(const) == 1:
                factor = size.args[const[0]]
                assert isinstance(factor, int)
                if (factor * new) % old == 0:
                    if self.factors.get(size) != (old, new):
                        size.update_arg(const[0], factor * new // old)
                        self.factors[size] = (old, new)
                    return size
        return new
