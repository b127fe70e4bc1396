"""``NearlyDiagonalSparsifier``: keep the ``nearliness`` diagonals closest to the main one."""
from __future__ import annotations

import torch
from torch import nn

from .base_sparsifier import BaseSparsifier
from .mask_math import check_2d, check_nearliness, nearly_diagonal_mask

__all__ = ["NearlyDiagonalSparsifier"]


class NearlyDiagonalSparsifier(BaseSparsifier):
    """Mask keeping entries ``(i, j)`` with ``|i - j| <= nearliness // 2``; ``nearliness`` must be odd.

    ``nearliness=1`` keeps the main diagonal; ``nearliness <= 0`` zeroes everything (as torch.ao).
    An even or too large ``nearliness`` is refused by ``step()``, where torch.ao refuses it.
    """

    def __init__(self, nearliness: int = 1):
        check_nearliness(nearliness, ranges=False)  # odd and small enough: checked at step(), as torch.ao does
        super().__init__(defaults={"nearliness": nearliness})

    def validate_group(self, group, tensor):
        where = f"group '{group['tensor_fqn']}'"
        check_2d(tensor, where=where)
        check_nearliness(group["nearliness"], tuple(tensor.shape), where=where, ranges=False)

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, nearliness: int,  # type: ignore[override]
                    **kwargs) -> None:
        check_nearliness(nearliness, tuple(mask.shape), where=f"group '{kwargs.get('tensor_fqn', tensor_name)}'")
        nearly_diagonal_mask(tuple(mask.shape), nearliness, out=mask)
