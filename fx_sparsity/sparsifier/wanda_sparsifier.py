"""``WandaSparsifier``: prune by |W|·‖X‖₂ (Sun et al. 2023), with activation norms observed in the graph."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SparsityConfigError
from ..passes import ChannelNormObserver, observer_fqn_for
from .base_sparsifier import BaseSparsifier
from .levels import check_level
from .nm_sparsifier import check_nm_tensor, nm_keep_mask

__all__ = ["WandaSparsifier"]


class WandaSparsifier(BaseSparsifier):
    """Wanda: score ``|W_ij| · ‖X_j‖₂`` and drop the lowest scores within each output row.

    ``prepare`` (or ``prepare_fx_sparse``) puts a :class:`ChannelNormObserver` in front of
    the input of every linear that uses a configured weight, and nowhere else. Run
    calibration batches through the prepared module, then ``step()``: each row ``i`` of a
    weight loses its ``int(sparsity_level * in_features)`` lowest scores (truncated, as the
    published code and llm-compressor count them: 268 of 384 at 70%, not 269). The norms
    accumulate over every calibration batch (and every use of a tied weight).
    ``squash_mask()`` folds the masks and removes the observers.

    ``semi_structured_block_size=m`` gives ``m/2:m`` sparsity instead (2:4 for ``m=4``, as
    torchao's Wanda did): in each run of ``m`` inputs the ``m/2`` lowest scores go. Then
    ``sparsity_level`` may be at most 0.5; below that, only that share of each row's runs
    is pruned (lowest summed score first), which is how a scheduler ramps it.

    Only weights used as the weight of a linear (``F.linear`` / ``aten.linear``) can be
    configured. Scores use ``weight * mask`` as torch.ao's sparsifiers do, so weights already
    pruned stay pruned.
    """

    def __init__(self, sparsity_level: float = 0.5, semi_structured_block_size: int | None = None):
        m = semi_structured_block_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2 or m % 2):
            raise SparsityConfigError(
                f"semi_structured_block_size must be an even int >= 2 (4 for 2:4) or None, got {m!r}")
        check_level(sparsity_level, high=0.5 if m else 1.0,
                    where="semi-structured (m/2:m) Wanda" if m else "")
        super().__init__(defaults={"sparsity_level": sparsity_level, "semi_structured_block_size": m})

    def validate_group(self, group, tensor):
        where = f"group '{group['tensor_fqn']}'"
        m = group.get("semi_structured_block_size")
        if m is not None:
            check_nm_tensor(tensor, m, what=f"Wanda {m // 2}:{m}", where=where)
        elif tensor.dim() != 2:
            raise SparsityConfigError(f"{where}: Wanda needs a 2-D (out_features, in_features) linear weight, "
                                      f"got shape {tuple(tensor.shape)}")
        check_level(group["sparsity_level"], high=0.5 if m else 1.0, where=where)

    #: What is observed on each sparsified linear's input (the pipeline places one per configured weight, and
    #: ``squash_mask()`` removes them).
    observer_type: type[nn.Module] | None = ChannelNormObserver

    def _observer(self, tensor_fqn: str) -> Any:
        try:
            observer = self._require_prepared("step").get_submodule(observer_fqn_for(tensor_fqn))
        except AttributeError:
            observer = None
        assert self.observer_type is not None  # set by every sparsifier that reads observers
        if not isinstance(observer, self.observer_type):
            raise RuntimeError(
                f"no activation observer for '{tensor_fqn}' in the prepared module (removed by squash_mask()?); "
                f"{type(self).__name__} needs one: prepare the model again and run calibration data through it")
        return observer

    def step(self, use_path: bool = True) -> None:
        if not self.enable_mask_update:
            return
        self._require_prepared("step")
        unseen = [g["tensor_fqn"] for g in self.groups if int(self._observer(g["tensor_fqn"]).num_rows) == 0]
        if unseen:
            raise RuntimeError(
                f"{type(self).__name__}.step() before calibration: no activations were observed for {unseen}. Run "
                f"calibration inputs through the prepared module first (with torch.no_grad(): "
                f"sparsifier.model(*batch) for a few batches), then call step()")
        super().step(use_path)

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, sparsity_level: float,  # type: ignore[override]
                    semi_structured_block_size: int | None = None, tensor_fqn: str = "", **kwargs) -> None:
        m = semi_structured_block_size
        level = check_level(sparsity_level, high=0.5 if m else 1.0, where=f"group '{tensor_fqn}'")
        norms = self._observer(tensor_fqn).channel_norms().to(mask.device)
        scores = (getattr(module, tensor_name) * mask).abs().float() * norms
        if m is not None:
            mask.copy_(nm_keep_mask(scores, m // 2, m, level / 0.5, per_row=True))
            return
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        k = int(level * scores.shape[1])  # truncated, as the published code and llm-compressor do
        if k:
            keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
        mask.copy_(keep)
