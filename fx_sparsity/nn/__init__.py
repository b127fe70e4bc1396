"""Lowered modules of fx_sparsity's own: sparse-weight layers that need no quantized tensors."""
from .sparse_linear import SparseBSRLinear, SparseCSRLinear, sparse_kernel_available

__all__ = ["SparseCSRLinear", "SparseBSRLinear", "sparse_kernel_available"]
