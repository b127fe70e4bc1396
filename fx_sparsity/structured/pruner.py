"""Structured pruners (torch.ao's ``_experimental.pruner`` names): score channel classes, keep the best.

``prepare`` (the pipeline, :mod:`fx_sparsity.pipeline.channels`) traces the model (or each block of
a block scope), finds its channel groups and masks the chosen ones, one mask entry per class.
``step()`` scores each group's classes and keeps the best; ``prune()`` returns a physically
smaller copy (:mod:`fx_sparsity.pipeline.cut`), checked against the masked model on the example
inputs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import pipeline
from ..errors import SparsityConfigError, warn_user
from ..passes import fetch_attr
from ..passes.channels import ChannelGroup
from ..sparsifier.base_sparsifier import BaseSparsifier, check_sparsifier_state
from ..sparsifier.levels import check_level

__all__ = ["BaseStructuredSparsifier", "SaliencyPruner", "FPGMPruner"]


def _inherits(cls: type, method: str) -> bool:
    """Whether ``cls`` takes ``method`` from BaseStructuredSparsifier itself (does not override it)."""
    return getattr(cls, method) is getattr(BaseStructuredSparsifier, method)


class BaseStructuredSparsifier(BaseSparsifier):
    """Prune whole channels of coupled layers; subclasses score them in :meth:`filter_scores`.

    ``prune_normalized`` (default True): with ``config=None``, also prune the widths a LayerNorm, RMSNorm,
    GroupNorm or a mean averages over (a transformer's residual width); the masked model then normalises over
    the kept channels only, so the pruned model computes what it does. False leaves those widths whole.
    """

    def __init__(self, sparsity_level: float | dict[str, Any] = 0.5, patterns: Any = None, *,
                 prune_normalized: bool = True):
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
        if not isinstance(prune_normalized, bool):
            raise SparsityConfigError(f"{type(self).__name__}: prune_normalized must be True or False, got "
                                      f"{prune_normalized!r}")
        self.prune_normalized = prune_normalized  # read by the pipeline when config is None
        self.parts: list[pipeline.Part] = []
        self.targets: dict[str, pipeline.ChannelTarget] = {}  # per group's tensor_fqn: what prepare placed

    masks = "channels"

    def validate_group(self, group: dict[str, Any], tensor: torch.Tensor) -> None:
        check_level(group["sparsity_level"], where=f"group of '{group['tensor_fqn']}'")

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

    def _part(self, name: str) -> pipeline.Part:
        return next(p for p in self.parts if p.fqn == name)

    def get_mask(self, tensor_fqn: str) -> torch.Tensor:
        """The live channel mask of the group whose first producer is ``tensor_fqn`` (one entry per class)."""
        model = self._require_prepared("get_mask")
        target = self.targets.get(tensor_fqn)
        if target is None:
            raise RuntimeError(f"'{tensor_fqn}' is not the first producer of a pruned group; groups: "
                               f"{[g['tensor_fqn'] for g in self.groups]}")
        return model.get_buffer(target.mask_fqn)

    def step(self, use_path: bool = True) -> None:
        """Score every group's classes and keep the best (the mask written in place)."""
        if not self.enable_mask_update:
            return
        model = self._require_prepared("step")
        with torch.no_grad():
            self.plan_masks()
            for group in self.groups:
                target = self.targets[group["tensor_fqn"]]
                names_in = model if target.model_names else self._part(target.part).graph_module  # where the
                self.update_mask(**{**group, "module": model.get_submodule(group["module_fqn"]),  # group's names
                                    "mask": self.get_mask(group["tensor_fqn"]), "channel_group": target.channel_group,
                                    "graph_module": names_in})

    def filter_scores(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        """How much each entry of ``weight`` along ``dim`` (an output channel) is worth keeping."""
        raise NotImplementedError

    def channel_scores(self, gm: nn.Module, group: ChannelGroup) -> torch.Tensor:
        """One score per class: :meth:`filter_scores` of each producer (a tensor of ``gm``: the graph holding the
        group, or the model for a group across the units of a block scope), summed over the class's channels."""
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
                    channel_group: ChannelGroup | None = None, graph_module: nn.Module | None = None,
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
        groups = [{k: v for k, v in g.items() if k != "module"} for g in self.groups]
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
        model = self._require_prepared("prune")
        if self.groups and all(bool(self.get_mask(g["tensor_fqn"]).all()) for g in self.groups):
            levels = sorted({float(g["sparsity_level"]) for g in self.groups})
            warn_user(f"prune(): every channel is kept (levels {levels}), so the model comes back uncut. Call step() "
                      f"after setting a level above 0: a scheduler sets the level it starts from (often 0) when it is "
                      f"made, and only its later steps raise it")
        return pipeline.cut_model(model, self.parts, self.targets)


class SaliencyPruner(BaseStructuredSparsifier):
    """Drop the channels of smallest L1 norm (torch.ao's ``SaliencyPruner``), summed over the group's producers
    (``prune_normalized``: see :class:`BaseStructuredSparsifier`)."""

    def filter_scores(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        rows = weight.movedim(dim, 0)
        return rows.norm(dim=tuple(range(1, rows.dim())), p=1) if rows.dim() > 1 else rows.abs()

    def drop_count(self, sparsity_level: float, classes: int) -> int:
        return min(int(classes * check_level(sparsity_level)), classes - 1)  # torch.ao: int(len(mask) * level)


class FPGMPruner(BaseStructuredSparsifier):
    """Drop the filters nearest the geometric median (He et al. 2019; torch.ao's ``FPGMPruner``): each filter's
    summed distance to the others, summed over the group's producers. ``dist``: 1, 2 (default) or a callable
    taking the flattened filters and returning their distance matrix (``prune_normalized``: see
    :class:`BaseStructuredSparsifier`)."""

    def __init__(self, sparsity_level: float = 0.5, dist: Callable | int | None = None, *,
                 prune_normalized: bool = True):
        super().__init__(sparsity_level, prune_normalized=prune_normalized)
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
