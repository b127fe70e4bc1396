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

It rewrites literal sizes of ``view``/``reshape``/``expand``/``unflatten`` (``-1`` and sizes
computed at run time are left to adapt; a size computed as ``n * <int>`` gets a new factor), the
bounds of slices, ``narrow`` and ``select`` along cut dims, ``chunk``/``split`` into
``split_with_sizes`` with the new sizes, and the ``normalized_shape`` of layer norms.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import TensorMetadata

from .attrs import fetch_attr
from .channel_groups import ChannelAnalysis, Seen
from .channel_values import Many, keep_sizes, kept_along

__all__ = ["CutPlan", "plan_cut", "cut_tensors", "RewriteSizes", "update_layer_attributes", "CutError"]


class CutError(RuntimeError):
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
    """Make each standard layer's size attributes (``in_features``, ``out_channels``, ``num_features``, ...)
    match its cut tensors."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            if m.groups > 1 and m.weight.shape[1] * m.groups == m.in_channels and not m.transposed \
                    and m.in_channels == m.groups:  # depthwise (times a multiplier): one conv-group per input
                m.groups = m.weight.shape[0] // (m.out_channels // m.groups)
            if m.transposed:
                m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            source = m.weight if m.weight is not None else m.running_mean
            if source is not None:
                m.num_features = source.shape[0]
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()
        elif isinstance(m, nn.RNNBase):
            m.hidden_size, m.input_size = int(m.weight_hh_l0.shape[1]), int(m.weight_ih_l0.shape[1])
            m._init_flat_weights()  # the tensors were replaced under it


def _new_shape(value: Any, shape: tuple, keep: torch.Tensor) -> list[int]:
    out = list(shape)
    for blk in value:
        for d, n in keep_sizes(blk, keep).items():
            out[d] = n
    return out


def _kept_along(value: Any, dim: int, keep: torch.Tensor) -> torch.Tensor | None:
    """Per index along ``dim`` of a value: kept? (None when no block holds ``dim``)."""
    return next((kept_along(blk, dim, keep) for blk in value if dim in blk.dims), None)


def _shape_of(meta: Any) -> tuple:
    return tuple(meta.shape)


class RewriteSizes(PassBase):
    """Rewrite the size arguments of the graph's shape ops for the cut ``keep`` describes."""

    def __init__(self, analysis: ChannelAnalysis, keep: torch.Tensor):
        super().__init__()
        self.analysis, self.keep = analysis, keep
        self.factors: dict[fx.Node, tuple[int, int]] = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {node.name: node for node in gm.graph.nodes}
        changed = False
        for name, seen in self.analysis.seen.items():
            node = nodes.get(name)
            if node is not None:
                changed |= self._rewrite(gm, node, seen)
        return PassResult(gm, changed)

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, seen: Seen) -> bool:
        keep, kind = self.keep, seen.kind
        if kind in ("view", "reshape", "_unsafe_view", "expand", "broadcast_to", "unflatten"):
            old = _shape_of(seen.out_shape)
            new = _new_shape(seen.output, old, keep)
            if new == list(old):
                return False
            if kind == "unflatten":
                dim = int(node.args[1]) % len(seen.in_shape)
                sizes = list(node.args[2])
                for i in range(len(sizes)):
                    sizes[i] = self._size(node, sizes[i], old[dim + i], new[dim + i])
                node.update_arg(2, sizes)
                return True
            listed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
            sizes = list(node.args[1]) if listed else list(node.args[1:])
            if len(sizes) != len(old):
                raise CutError(f"'{node.name}' has {len(sizes)} sizes for a {len(old)}-dim result")
            for d in range(len(old)):
                if old[d] != new[d]:
                    sizes[d] = self._size(node, sizes[d], old[d], new[d])
            node.args = (node.args[0], sizes) if listed else (node.args[0], *sizes)
            return True
        if kind in ("slice", "narrow", "select"):
            ndim = len(seen.in_shape)
            dim = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % ndim
            kept = _kept_along(seen.inputs, dim, keep)
            if kept is None or bool(kept.all()):
                return False
            before = torch.cat([torch.zeros(1, dtype=torch.long), kept.long().cumsum(0)])
            size = seen.in_shape[dim]
            args = list(node.args)
            if kind == "select":
                args[2] = int(before[int(args[2]) % size])
            elif kind == "narrow":
                start, length = int(args[2]), int(args[3])
                args[2], args[3] = int(before[start]), int(before[start + length] - before[start])
            else:
                if len(args) > 2 and args[2] is not None:
                    start = int(args[2]) + (size if int(args[2]) < 0 else 0)
                    args[2] = int(before[min(max(start, 0), size)])
                if len(args) > 3 and args[3] is not None and int(args[3]) < size:
                    end = int(args[3]) + (size if int(args[3]) < 0 else 0)
                    args[3] = int(before[min(max(end, 0), size)])
            node.args = tuple(args)
            return True
        if kind == "getitem":
            return self._getitem(node, seen)
        if kind == "depthwise":  # a depthwise conv as a function: its groups argument is its channel count
            before = _shape_of(seen.out_shape)[1]
            after = _new_shape(seen.output, _shape_of(seen.out_shape), keep)[1]
            position = 8 if len(node.args) > 8 else 6
            groups = int(node.args[position])  # type: ignore[arg-type]
            if after == before:
                return False
            node.update_arg(position, after // (before // groups))
            return True
        if kind in ("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk"):
            return self._split(node, seen)
        if kind in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
            shape = node.args[1]
            meta = seen.out_shape if isinstance(seen.out_shape, TensorMetadata) else seen.out_shape[0]
            old = _shape_of(meta)
            value = seen.output[0] if isinstance(seen.output, Many) else seen.output
            new = _new_shape(value, old, keep)
            trailing = new[len(new) - len(shape):]
            if list(trailing) == list(shape):
                return False
            node.update_arg(1, trailing)
            return True
        return False

    def _size(self, node: fx.Node, size: Any, old: int, new: int) -> Any:
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
            if len(const) == 1 and (size.args[const[0]] * new) % old == 0:
                if self.factors.get(size) != (old, new):
                    size.update_arg(const[0], size.args[const[0]] * new // old)
                    self.factors[size] = (old, new)
                return size
        return new

    def _getitem(self, node: fx.Node, seen: Seen) -> bool:
        items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        shape = seen.in_shape
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        d, new_items, changed = 0, [], False
        for item in items:
            if item is Ellipsis:
                d += len(shape) - explicit
            elif item is not None:
                kept = _kept_along(seen.inputs, d, self.keep)
                if kept is not None and not bool(kept.all()):
                    before = torch.cat([torch.zeros(1, dtype=torch.long), kept.long().cumsum(0)])
                    if isinstance(item, int):
                        item = int(before[item % shape[d]])
                    else:
                        start, stop, _ = slice(item.start, item.stop, item.step).indices(shape[d])
                        item = slice(int(before[start]), int(before[stop]) if item.stop is not None else None,
                                     item.step)
                    changed = True
                d += 1
            new_items.append(item)
        if changed:
            node.update_arg(1, tuple(new_items) if isinstance(node.args[1], tuple) else new_items[0])
        return changed

    def _split(self, node: fx.Node, seen: Seen) -> bool:
        ndim = len(seen.in_shape)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = int(dim) % ndim
        kept = _kept_along(seen.inputs, dim, self.keep)
        if kept is None or bool(kept.all()):
            return False
        sizes, start = [], 0
        for meta in seen.out_shape:
            size = int(meta.shape[dim])
            sizes.append(int(kept[start:start + size].sum()))
            start += size
        x = node.args[0]
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (x, sizes, dim), {}
        elif node.op == "call_method":
            node.target = "split"
            node.args, node.kwargs = (x, sizes), {"dim": dim}
        else:
            node.target = torch.split
            node.args, node.kwargs = (x, sizes), {"dim": dim}
        return True
