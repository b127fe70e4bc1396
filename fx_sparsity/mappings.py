"""Module mappings for lowering, as torch.ao.pruning exports them."""
from __future__ import annotations

import torch.ao.nn.sparse
from torch import nn

from .nn import SemiStructuredSparseLinear, SparseBSRLinear, SparseCSRLinear

__all__ = ["get_dynamic_sparse_quantized_mapping", "get_static_sparse_quantized_mapping", "get_sparse_csr_mapping",
           "get_sparse_bsr_mapping", "get_sparse_semi_structured_mapping"]


def get_static_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    return {nn.Linear: torch.ao.nn.sparse.quantized.Linear}


def get_dynamic_sparse_quantized_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    return {nn.Linear: torch.ao.nn.sparse.quantized.dynamic.Linear}


def get_sparse_csr_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """Lower each sparse Linear to an fp32 CSR-weight Linear (exact; any sparsity pattern)."""
    return {nn.Linear: SparseCSRLinear}


def get_sparse_bsr_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """Lower each sparse Linear to a BSR-weight Linear with the group's block; non-square blocks give CSR."""
    return {nn.Linear: SparseBSRLinear}


def get_sparse_semi_structured_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """Lower each sparse Linear to a 2:4 semi-structured Linear (CUDA, float16/bfloat16, exact 2:4 masks)."""
    return {nn.Linear: SemiStructuredSparseLinear}
