"""Module mappings for lowering, as torch.ao.pruning exports them."""
from __future__ import annotations

from torch import nn

__all__ = ["get_dynamic_sparse_quantized_mapping", "get_static_sparse_quantized_mapping", "get_sparse_csr_mapping",
           "get_sparse_bsr_mapping"]


def get_static_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    import torch.ao.nn.sparse

    return {nn.Linear: torch.ao.nn.sparse.quantized.Linear}


def get_dynamic_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    import torch.ao.nn.sparse

    return {nn.Linear: torch.ao.nn.sparse.quantized.dynamic.Linear}


def get_sparse_csr_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """Lower each sparse Linear to an fp32 CSR-weight Linear (exact; any sparsity pattern)."""
    from .nn import SparseCSRLinear

    return {nn.Linear: SparseCSRLinear}


def get_sparse_bsr_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """Lower each sparse Linear to a BSR-weight Linear with the group's block; non-square blocks give CSR."""
    from .nn import SparseBSRLinear

    return {nn.Linear: SparseBSRLinear}
