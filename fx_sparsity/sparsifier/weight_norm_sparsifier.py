"""``WeightNormSparsifier``: zero the blocks of smallest norm (torch.ao.pruning's numbers)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .base_sparsifier import BaseSparsifier
from .levels import warn_if_clamped
from .mask_math import check_2d, check_weight_norm_config, resolve_norm_fn, weight_norm_mask

__all__ = ["WeightNormSparsifier"]


class WeightNormSparsifier(BaseSparsifier):
    """Zero the ``sparsity_level`` fraction of ``sparse_block_shape`` blocks with the lowest norm.

    ``zeros_per_block`` (default: the whole block) zeroes only that many smallest values
    inside each block. Blocks start at index 0, ``(rows, cols)`` of the 2-D tensor; for a
    Linear weight ``(out, in)`` the default ``(1, 4)`` groups 4 consecutive inputs. ``norm``
    is 1, 2 (default) or a callable mapping the tensor to elementwise norms. All four
    are defaults that a config entry may override per tensor. As in torch.ao, a level
    outside ``[0, 1]`` acts as 0 or 1 (with a warning when given), and ``zeros_per_block``
    beyond the block is refused when a mask is computed (``step()``).
    """

    def __init__(self, sparsity_level: float = 0.5, sparse_block_shape: tuple[int, int] = (1, 4),
                 zeros_per_block: int | None = None, norm: Callable | int | None = None):
        if zeros_per_block is None:
            check_weight_norm_config(sparsity_level, sparse_block_shape, 0)
            zeros_per_block = math.prod(sparse_block_shape)
        # Ranges are checked at step(), as torch.ao does (a level outside [0, 1] acts as 0 or 1).
        check_weight_norm_config(sparsity_level, sparse_block_shape, zeros_per_block, ranges=False)
        warn_if_clamped(sparsity_level)
        self.norm_fn = resolve_norm_fn(norm)
        # The dtype torch.ao's masked weight has at the next step, per tensor (see update_mask).
        self._norm_dtype: dict[str, torch.dtype] = {}
        super().__init__(defaults={
            "sparsity_level": sparsity_level,
            "sparse_block_shape": sparse_block_shape,
            "zeros_per_block": zeros_per_block,
        })

    def validate_group(self, group, tensor):
        where = f"group '{group['tensor_fqn']}'"
        check_2d(tensor, where=where)
        check_weight_norm_config(group["sparsity_level"], group["sparse_block_shape"], group["zeros_per_block"],
                                 where=where, ranges=False)
        if group["sparsity_level"] != self.defaults["sparsity_level"]:
            warn_if_clamped(group["sparsity_level"], where=where)
        start = group.get("mask")
        self._norm_dtype[group["tensor_fqn"]] = start.dtype if isinstance(start, torch.Tensor) else tensor.dtype

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, sparsity_level: float,  # type: ignore[override]
                    sparse_block_shape: tuple[int, int], zeros_per_block: int, **kwargs) -> None:
        check_weight_norm_config(sparsity_level, sparse_block_shape, zeros_per_block,
                                 where=f"group '{kwargs.get('tensor_fqn', tensor_name)}'")
        # torch.ao reads the parametrized (masked) tensor; so do we, or masks would diverge. Its dtype follows
        # torch.ao's mask: the weight's at first, float32 once a step computed one (bool, so the weight's again,
        # for partial blocks). For float16/bfloat16 weights the norms, so the masks, depend on it.
        fqn = kwargs.get("tensor_fqn", tensor_name)
        weight = getattr(module, tensor_name)
        dtype = torch.promote_types(weight.dtype, self._norm_dtype.get(fqn, weight.dtype))
        weight_norm_mask(weight.to(dtype) * mask, sparsity_level, sparse_block_shape, zeros_per_block, self.norm_fn,
                         out=mask)
        whole_blocks = zeros_per_block == math.prod(sparse_block_shape)
        if not (sparsity_level <= 0 or zeros_per_block == 0 or (sparsity_level >= 1 and whole_blocks)):
            self._norm_dtype[fqn] = torch.get_default_dtype() if whole_blocks else torch.bool
