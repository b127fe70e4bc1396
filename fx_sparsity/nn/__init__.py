"""The modules lowering produces: sparse fp32 weights (CSR/BSR), and torch.ao's quantized Linears
pinned to their engines."""
from .attention import PrunedMultiheadAttention
from .quantized import (
    DenseDynamicInt8Linear,
    SparseQuantizedDynamicLinear,
    SparseQuantizedLinear,
    block_shape_supported,
    quantized_engine,
)
from .semi_structured import SemiStructuredSparseLinear
from .sparse_linear import SparseBSRLinear, SparseCSRLinear, sparse_kernel_available

__all__ = ["SparseCSRLinear", "SparseBSRLinear", "sparse_kernel_available", "SparseQuantizedDynamicLinear",
           "SparseQuantizedLinear", "DenseDynamicInt8Linear", "block_shape_supported", "quantized_engine",
           "SemiStructuredSparseLinear", "PrunedMultiheadAttention"]
