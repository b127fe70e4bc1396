"""Structured pruners (torch.ao's ``_experimental.pruner`` names): mask channel groups, then cut them out.

``prepare`` traces the model, finds the channel groups (:mod:`.groups`) and, per group, adds
one channel-mask buffer (``<first producer>.out_channel_mask``) and a multiply of every
consumer's input by it, so the masked model computes exactly what the pruned one will.
``step()`` chooses each group's channels; ``prune()`` returns a physically smaller copy:
producers lose output channels, norms and depthwise convolutions their channels, consumers
their input channels (a flattened map: ``h·w`` features per channel), and the mask nodes go.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import SparsityConfigError
from ..inputs import as_args_kwargs
from ..passes import run_passes
from ..scoping import capture_inputs, check_scope, relative, unit_fqns
from ..sparsifier.base_sparsifier import BaseSparsifier
from ..sparsifier.nm_sparsifier import check_level
from ..tracing import trace
from .groups import ChannelGroup, find_channel_groups

__all__ = ["BaseStructuredSparsifier", "SaliencyPruner", "FPGMPruner"]

MASK_NAME = "out_channel_mask"


class BaseStructuredSparsifier(BaseSparsifier):
    """Prune whole channels of coupled layers; subclasses score channels in :meth:`channel_scores`."""

    def __init__(self, sparsity_level: float = 0.5):
        check_level(sparsity_level)
        super().__init__(defaults={"sparsity_level": sparsity_level})

    def prepare(self, model: nn.Module, config: list[dict] | None = None, *, example_inputs: Any = None,
                inplace: bool = False, scope: Any = "model", tracer: str = "symbolic",
                **kwargs: Any) -> nn.Module:  # type: ignore[override]
        """Trace ``model`` (symbolically), find its channel groups, and mask the configured ones.

        ``example_inputs`` (required) gives the spatial sizes. A config entry names any weight of a
        group (``{"tensor_fqn": "layer1.0.conv1.weight"}``); ``config=None`` takes every group that
        can be pruned exactly. ``scope=<block class>`` traces each block alone (the user's model is
        kept): only groups inside one block can be pruned; one that leaves its block is refused.
        """
        if self.model is not None:
            raise SparsityConfigError(f"{type(self).__name__} is already prepared; use a new one for each model")
        block_types = check_scope(scope)
        if block_types == () or tracer != "symbolic":
            raise SparsityConfigError("structured pruning traces symbolically the whole model (scope=\"model\") or "
                                      "each block (scope=<block class>); scope=\"layers\" puts every layer in its own "
                                      "graph, where no channel group fits, and tracer=\"export\" is not supported yet")
        if example_inputs is None:
            raise SparsityConfigError("structured pruning needs example_inputs (the spatial sizes decide how a "
                                      "flattened map feeds a Linear), e.g. example_inputs=(torch.randn(1, 3, 32, 32),)")
        work = model if inplace else copy.deepcopy(model)
        if block_types is None:
            parts = [("", work, as_args_kwargs(example_inputs)[0])]
        else:
            blocks = unit_fqns(work, block_types, [])
            captured = capture_inputs(work, blocks, example_inputs)
            parts = [(fqn, work.get_submodule(fqn), as_args_kwargs(captured[fqn])[0]) for fqn in blocks]
            outside = [e.get("tensor_fqn") for e in config or []
                       if not any(str(e.get("tensor_fqn", "")).startswith(b + ".") for b in blocks)]
            if outside:
                raise SparsityConfigError(f"{outside} lie outside every block of the scope {block_types}")
        self.groups, self.parts = [], []
        for prefix, module, args in parts:
            gm = trace(module, "symbolic")
            with torch.no_grad():
                found = find_channel_groups(gm, args)
            part_config = None if config is None else [
                {**e, "tensor_fqn": relative(e["tensor_fqn"], prefix)} for e in config
                if not prefix or e["tensor_fqn"].startswith(prefix + ".")]
            masks = {}
            for group, entry in self._choose(gm, found, part_config, prefix):
                producer = gm.get_submodule(group.producers[0])
                producer.register_buffer(MASK_NAME, torch.ones(group.size, device=_device(producer)))
                masks[id(group)] = f"{group.producers[0]}.{MASK_NAME}"
                settings = {**copy.deepcopy(self.defaults), **{k: v for k, v in entry.items() if k != "tensor_fqn"}}
                check_level(settings["sparsity_level"], where=f"group of '{group.producers[0]}'")
                fqn = f"{prefix}.{group.producers[0]}" if prefix else group.producers[0]
                self.groups.append({**settings, "tensor_fqn": f"{fqn}.weight", "module_fqn": fqn,
                                    "tensor_name": "weight", "module": producer, "channel_group": group,
                                    "graph_module": gm, "part": prefix})
            run_passes(gm, _MaskConsumers(found, masks))
            if prefix:
                work.set_submodule(prefix, gm)
            self.parts.append(prefix)
        self.model = work if block_types is not None else gm  # the user's model, or the one graph
        self.config = config
        return self.model

    def _choose(self, gm: fx.GraphModule, found: list[ChannelGroup], config: list[dict] | None,
                prefix: str = "") -> list[tuple[ChannelGroup, dict]]:
        if prefix:  # in a block's own graph, the block's output is what leaves the graph
            for group in found:
                if group.problem in ("its channels are a model output", "its channels are added to a model input"):
                    group.problem = (f"its channels leave the block '{prefix}' (the group crosses graphs): prune it "
                                     f"with scope=\"model\"")
        if config is None:
            return [(g, {}) for g in found if g.problem is None and g.producers]
        chosen = []
        for i, entry in enumerate(config):
            fqn = entry.get("tensor_fqn", "")
            module_fqn = fqn.rpartition(".")[0]
            fqn = f"{prefix}.{fqn}" if prefix else fqn
            match = next((g for g in found if module_fqn in g.producers), None)
            if match is None:
                raise SparsityConfigError(f"config[{i}]: '{fqn}' is not the weight of a Conv2d/Linear whose output "
                                          f"channels fx_sparsity can follow")
            if match.problem is not None:
                raise SparsityConfigError(f"config[{i}]: the channels of '{fqn}' cannot be pruned exactly: "
                                          f"{match.problem}")
            chosen.append((match, entry))
        return chosen

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {tensor_fqn: {"mask": channel mask}}, "groups": [...]}`` (groups without the graph analysis)."""
        groups = [{k: v for k, v in g.items() if k not in ("module", "channel_group", "graph_module")}
                  for g in self.groups]
        state = {g["tensor_fqn"]: {"mask": self.get_mask(g["tensor_fqn"])} for g in self.groups}
        return {"state": state, "groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load channel masks and levels saved by :meth:`state_dict` into this prepared pruner."""
        self._require_prepared("load_state_dict")
        levels = {g["tensor_fqn"]: g for g in state_dict["groups"]}
        for group in self.groups:
            saved = state_dict["state"].get(group["tensor_fqn"])
            if saved is None:
                if strict:
                    raise RuntimeError(f"Error loading: no channel mask for '{group['tensor_fqn']}' in the state dict")
                continue
            with torch.no_grad():
                self.get_mask(group["tensor_fqn"]).copy_(saved["mask"])
            group["sparsity_level"] = levels.get(group["tensor_fqn"], group)["sparsity_level"]

    def get_mask(self, tensor_fqn: str) -> torch.Tensor:
        return self._require_prepared("get_mask").get_buffer(f"{tensor_fqn.rpartition('.')[0]}.{MASK_NAME}")

    def channel_scores(self, gm: fx.GraphModule, group: ChannelGroup) -> torch.Tensor:
        raise NotImplementedError

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, sparsity_level: float = 0.5,
                    channel_group: ChannelGroup | None = None, graph_module: fx.GraphModule | None = None,
                    **kwargs: Any) -> None:
        assert channel_group is not None and graph_module is not None
        scores = self.channel_scores(graph_module, channel_group)
        if channel_group.head_dim > 1:  # attention: whole heads go
            heads = scores.reshape(-1, channel_group.head_dim).sum(1)
            drop = round(check_level(sparsity_level) * len(heads))
            keep_heads = torch.ones_like(heads, dtype=torch.bool)
            if drop:
                keep_heads[torch.topk(heads, drop, largest=False).indices] = False
            mask.copy_(keep_heads.repeat_interleave(channel_group.head_dim))
            return
        blocks = channel_group.balance  # grouped convolutions: the same number from each conv-group
        per_block = scores.reshape(blocks, -1)
        drop = round(check_level(sparsity_level) * per_block.shape[1])
        keep = torch.ones_like(per_block, dtype=torch.bool)
        if drop:
            keep.scatter_(1, torch.topk(per_block, drop, dim=1, largest=False).indices, False)
        mask.copy_(keep.reshape(-1))

    def squash_mask(self, *args: Any, **kwargs: Any) -> nn.Module:
        """For structured pruners: :meth:`prune` (the channels are cut out, not folded)."""
        return self.prune()

    @torch.no_grad()
    def prune(self) -> nn.Module:
        """A physically smaller copy of the prepared model, computing what the masked one does."""
        model = copy.deepcopy(self._require_prepared("prune"))
        for part in self.parts:
            gm = model.get_submodule(part) if part else model
            assert isinstance(gm, fx.GraphModule)
            groups = [g for g in self.groups if g["part"] == part]
            cuts = [(g["channel_group"], (model.get_buffer(f"{g['module_fqn']}.{MASK_NAME}") == 0).nonzero()
                     .flatten().cpu()) for g in groups]
            _cut_all(gm, cuts)
            _rewrite_head_shapes(gm, cuts)
            run_passes(gm, _RemoveChannelMasks())
            for group in groups:
                delattr(model.get_submodule(group["module_fqn"]), MASK_NAME)
        return model


class SaliencyPruner(BaseStructuredSparsifier):
    """Drop the channels of smallest L1 norm, summed over every producer of the group."""

    def channel_scores(self, gm: fx.GraphModule, group: ChannelGroup) -> torch.Tensor:
        scores = [gm.get_submodule(p).weight.detach().abs().flatten(1).sum(1).float() for p in group.producers]
        return torch.stack(scores).sum(0)


class FPGMPruner(BaseStructuredSparsifier):
    """Drop the channels nearest the geometric median of the filters (He et al. 2019), summed over producers."""

    def channel_scores(self, gm: fx.GraphModule, group: ChannelGroup) -> torch.Tensor:
        total = None
        for p in group.producers:
            filters = gm.get_submodule(p).weight.detach().flatten(1).float()
            distance = torch.cdist(filters, filters).sum(1)
            total = distance if total is None else total + distance
        assert total is not None
        return total


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _MaskConsumers(PassBase):
    """Multiply the input of each consumer of a masked group by its channel mask: the group's mask at the
    group's offset, ones for the other segments, ``h·w`` times per channel for a flattened map."""

    def __init__(self, groups: list[ChannelGroup], masks: dict[int, str]):
        super().__init__()
        self.groups, self.masks = groups, masks

    def call(self, gm: fx.GraphModule) -> PassResult:
        layout: dict[str, list[tuple[int, ChannelGroup, int]]] = {}  # consumer -> (offset, group, per channel)
        for group in self.groups:
            for fqn, offset, per_channel in group.consumers:
                layout.setdefault(fqn, []).append((offset, group, per_channel))
        for node in list(gm.graph.nodes):
            segments = sorted(layout.get(str(node.target), []), key=lambda s: s[0]) if node.op == "call_module" else []
            masked_here = [g for _, g, _ in segments if id(g) in self.masks]
            if not masked_here:
                continue
            with gm.graph.inserting_before(node):
                some_mask = gm.graph.get_attr(self.masks[id(masked_here[0])])
                parts = [gm.graph.get_attr(self.masks[id(g)]) if id(g) in self.masks
                         else gm.graph.call_method("new_ones", (some_mask, g.size)) for _, g, _ in segments]
                mask = parts[0] if len(parts) == 1 else gm.graph.call_function(torch.cat, (parts,))
                per_channel = segments[0][2]
                if per_channel > 1:
                    mask = gm.graph.call_method("repeat_interleave", (mask, per_channel))
                shape = (1, -1, 1, 1) if isinstance(gm.get_submodule(str(node.target)), nn.Conv2d) else (1, -1)
                mask = gm.graph.call_method("view", (mask, shape))
                masked = gm.graph.call_function(torch.mul, (node.args[0], mask))
            masked.meta["channel_mask"] = [self.masks[id(g)] for g in masked_here]
            node.update_arg(0, masked)
        return PassResult(gm, True)


class _RemoveChannelMasks(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            if node.meta.get("channel_mask"):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        return PassResult(gm, True)


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.contiguous())


def _cut_all(gm: fx.GraphModule, cuts: list[tuple[ChannelGroup, torch.Tensor]]) -> None:
    """Cut every group's dropped channels out of every module that holds them, one slice per module and dim."""
    keep: dict[tuple[str, str], torch.Tensor] = {}  # (fqn, "out" | "in" | "channels") -> keep vector

    def drop(fqn: str, dim: str, size: int, positions: torch.Tensor) -> None:
        vector = keep.setdefault((fqn, dim), torch.ones(size, dtype=torch.bool))
        vector[positions] = False

    grouped: dict[str, torch.Tensor] = {}
    for group, dropped in cuts:
        for fqn in group.grouped:
            vector = grouped.setdefault(fqn, torch.ones(group.size, dtype=torch.bool))
            vector[dropped] = False
        for fqn in group.producers:
            m = gm.get_submodule(fqn)
            drop(fqn, "out", m.weight.shape[0], dropped)
        for fqn, offset in group.norms:
            drop(fqn, "channels", gm.get_submodule(fqn).num_features, offset + dropped)
        for fqn, offset in group.depthwise:
            drop(fqn, "channels", gm.get_submodule(fqn).out_channels, offset + dropped)
        for fqn, offset, per_channel in group.consumers:
            if fqn in group.grouped:
                continue
            positions = ((offset + dropped)[:, None] * per_channel + torch.arange(per_channel)).flatten()
            drop(fqn, "in", gm.get_submodule(fqn).weight.shape[1], positions)
    for (fqn, dim), vector in keep.items():
        _slice(gm.get_submodule(fqn), dim, vector.nonzero().flatten())
    for fqn, vector in grouped.items():
        _slice_grouped(gm.get_submodule(fqn), vector)


def _rewrite_head_shapes(gm: fx.GraphModule, cuts: list[tuple[ChannelGroup, torch.Tensor]]) -> None:
    """Fewer heads: the splits' head count is the new one, the merges take what is left (-1)."""
    nodes = {node.name: node for node in gm.graph.nodes}
    for group, dropped in cuts:
        if group.head_dim == 1:
            continue
        heads_before = group.size // group.head_dim
        heads_after = heads_before - len(dropped) // group.head_dim
        for name in group.head_splits:
            node = nodes[name]
            args = list(node.args)
            index = len(args) - 2
            if args[index] != heads_before:
                raise SparsityConfigError(f"'{name}' does not split into {heads_before} heads as a constant; "
                                          f"cannot rewrite it")
            node.update_arg(index, heads_after)
        for name in group.head_merges:
            node = nodes[name]
            node.update_arg(len(node.args) - 1, -1)


def _slice_grouped(m: Any, keep: torch.Tensor) -> None:
    """A grouped conv with in == out channels, the same channels kept in and out (equal numbers per group)."""
    groups, block = m.groups, m.out_channels // m.groups
    kept = keep.reshape(groups, block)
    rows = keep.nonzero().flatten()
    columns = torch.stack([kept[k].nonzero().flatten() for k in range(groups)])  # (groups, kept per group)
    weight = m.weight[rows]  # (kept out, block, kh, kw)
    per_group = columns.shape[1]
    weight = torch.stack([weight[k * per_group:(k + 1) * per_group][:, columns[k]] for k in range(groups)])
    m.weight = _param(weight.flatten(0, 1))
    if m.bias is not None:
        m.bias = _param(m.bias[rows])
    m.in_channels = m.out_channels = len(rows)


def _slice(m: Any, dim: str, idx: torch.Tensor) -> None:
    n = len(idx)
    if hasattr(m, "num_features"):  # a batch norm
        if m.weight is not None:
            m.weight, m.bias = _param(m.weight[idx]), _param(m.bias[idx])
        if m.running_mean is not None:
            m.running_mean, m.running_var = m.running_mean[idx].clone(), m.running_var[idx].clone()
        m.num_features = n
    elif dim == "channels":  # a depthwise conv
        m.weight = _param(m.weight[idx])
        if m.bias is not None:
            m.bias = _param(m.bias[idx])
        m.in_channels = m.out_channels = m.groups = n
    elif dim == "out":
        m.weight = _param(m.weight[idx])
        if m.bias is not None:
            m.bias = _param(m.bias[idx])
        if isinstance(m, nn.Conv2d):
            m.out_channels = n
        else:
            m.out_features = n
    else:
        m.weight = _param(m.weight[:, idx])
        if isinstance(m, nn.Conv2d):
            m.in_channels = n
        else:
            m.in_features = n
