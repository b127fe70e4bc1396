"""``GlobalMagnitudeSparsifier``: one magnitude threshold over every group (``prune.global_unstructured``)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SparsityConfigError
from .base_sparsifier import BaseSparsifier
from .levels import check_level

__all__ = ["GlobalMagnitudeSparsifier", "global_magnitude_keep"]


@torch.no_grad()
def global_magnitude_keep(scores: list[torch.Tensor], sparsity_level: float,
                          limits: list[int] | None = None) -> list[torch.Tensor]:
    """Boolean keep-masks that drop the ``round(sparsity_level * total)`` lowest scores over all tensors.

    Without ``limits`` this is the selection of ``prune.global_unstructured`` with
    ``L1Unstructured`` on fresh weights, ties included: the same ``torch.topk`` call on the
    same concatenated vector. ``limits[i]`` caps how many entries tensor ``i`` may lose; a
    tensor that would lose more is pruned to its cap (its own lowest scores) and the rest of
    the budget is spread over the others, again by one global threshold, until no cap is
    exceeded. If the caps cannot absorb the budget, every tensor is pruned to its cap.
    """
    sizes = [s.numel() for s in scores]
    budget = round(sparsity_level * sum(sizes))
    limits = list(sizes) if limits is None else [min(c, s) for c, s in zip(limits, sizes)]
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(scores)) if i not in capped]
        k = min(budget - sum(limits[i] for i in capped), sum(sizes[i] for i in free))
        if not free or k <= 0:
            selected = None
            break
        # One vector, one topk: the k indices are all the extra memory (plus topk's workspace).
        pool = torch.cat([scores[i].reshape(-1) for i in free])
        selected = torch.topk(pool, k=k, largest=False).indices
        del pool
        bounds = torch.tensor([0] + [sizes[i] for i in free], device=selected.device).cumsum(0)
        counts = torch.bucketize(selected, bounds[1:], right=True).bincount(minlength=len(free)).tolist()
        over = [i for i, c in zip(free, counts) if c > limits[i]]
        if not over:
            break
        capped.update(over)

    keeps: list[torch.Tensor] = [None] * len(scores)  # type: ignore[list-item]
    for i in capped:
        keep = torch.ones(sizes[i], dtype=torch.bool, device=scores[i].device)
        if limits[i]:
            keep[torch.topk(scores[i].reshape(-1), k=limits[i], largest=False).indices] = False
        keeps[i] = keep.view(scores[i].shape)
    free = [i for i in range(len(scores)) if i not in capped]
    if free:
        flat = torch.ones(sum(sizes[i] for i in free), dtype=torch.bool, device=scores[free[0]].device)
        if selected is not None:
            flat[selected] = False
        for i, part in zip(free, flat.split([sizes[i] for i in free])):
            keeps[i] = part.view(scores[i].shape)
    return keeps


class GlobalMagnitudeSparsifier(BaseSparsifier):
    """Zero the ``sparsity_level`` fraction of smallest-magnitude weights over all groups together.

    One threshold for the whole model, as ``torch.nn.utils.prune.global_unstructured(...,
    pruning_method=L1Unstructured, amount=sparsity_level)``: the first ``step()`` gives the
    same masks, ties included. Unlike ``global_unstructured`` (whose ``amount`` applies to
    the weights still unpruned, so repeated calls compound), ``sparsity_level`` is the total
    fraction of zeros, computed from ``weight * mask`` like torch.ao's sparsifiers, so a
    scheduler can ramp it.

    The level is one number: every group must carry the same ``sparsity_level`` (the
    constructor's; a scheduler with one setting for all groups keeps them equal).
    ``max_layer_sparsity`` (default: none) caps the fraction of zeros in any one tensor; a
    config entry may set its own cap. Caps cost one extra ``topk`` per round of capping.
    """

    def __init__(self, sparsity_level: float = 0.5, max_layer_sparsity: float | None = None):
        check_level(sparsity_level)
        if max_layer_sparsity is not None:
            check_level(max_layer_sparsity, name="max_layer_sparsity")
        super().__init__(defaults={"sparsity_level": sparsity_level, "max_layer_sparsity": max_layer_sparsity})
        self._planned: dict[str, torch.Tensor] | None = None

    def validate_group(self, group, tensor):
        where = f"group '{group['tensor_fqn']}'"
        check_level(group["sparsity_level"], where=where)
        if group["sparsity_level"] != self.defaults["sparsity_level"]:
            raise SparsityConfigError(
                f"{where}: sparsity_level={group['sparsity_level']!r} differs from the global level "
                f"{self.defaults['sparsity_level']!r}; a global sparsifier has one level "
                f"(GlobalMagnitudeSparsifier(sparsity_level=...)). To limit one layer, give it "
                f"'max_layer_sparsity' instead")
        if group.get("max_layer_sparsity") is not None:
            check_level(group["max_layer_sparsity"], name="max_layer_sparsity", where=where)

    def _level(self) -> float:
        levels = {g["sparsity_level"] for g in self.groups}
        if len(levels) != 1:
            raise SparsityConfigError(
                f"{type(self).__name__} needs one sparsity_level for all groups, got {sorted(levels)} (a scheduler "
                f"with per-group settings?); give the scheduler one setting for every group")
        return check_level(levels.pop())

    def plan_masks(self) -> None:
        """One threshold over every group: each group's keep-mask, before the groups are updated."""
        model = self._require_prepared("step")
        scores, limits = [], []
        for group in self.groups:
            weight = getattr(model.get_submodule(group["module_fqn"]), group["tensor_name"])
            scores.append((weight * self.get_mask(group["tensor_fqn"])).abs())
            cap = group.get("max_layer_sparsity")
            # The tolerance keeps e.g. 0.29 * 100 at 29 despite float error.
            limits.append(weight.numel() if cap is None else math.floor(cap * weight.numel() + 1e-6))
        keeps = global_magnitude_keep(scores, self._level(), limits)
        del scores
        self._planned = {g["tensor_fqn"]: keep for g, keep in zip(self.groups, keeps)}

    def step(self, use_path: bool = True) -> None:
        try:
            super().step(use_path)
        finally:
            self._planned = None

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, tensor_fqn: str = "",  # type: ignore[override]
                    **kwargs) -> None:
        if self._planned is None:
            raise RuntimeError(f"{type(self).__name__}.update_mask needs the masks of every group at once; "
                               f"call step()")
        mask.copy_(self._planned[tensor_fqn])
