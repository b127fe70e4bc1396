"""Module mappings for lowering, as torch.ao.pruning exports them."""
from __future__ import annotations

from torch import nn

__all__ = ["get_dynamic_sparse_quantized_mapping", "get_static_sparse_quantized_mapping"]


def get_static_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    import torch.ao.nn.sparse

    return {nn.Linear: torch.ao.nn.sparse.quantized.Linear}


def get_dynamic_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    import torch.ao.nn.sparse

    return {nn.Linear: torch.ao.nn.sparse.quantized.dynamic.Linear}
