"""The built-in lowering targets, registered as a user's are (:func:`~.targets.register_lowering_target`).

Their order is the order auto times them in. ``build`` gets the masked weight (weight·mask),
so ``from_masked(weight, mask, ...)`` of our modules sees the same values either way.

- ``dense``: ``nn.Linear`` holding weight·mask, auto's reference;
- ``csr``: :class:`~fx_sparsity.nn.SparseCSRLinear` (mapping class ``SparseCSRLinear``);
- ``bsr``: :class:`~fx_sparsity.nn.SparseBSRLinear` with the group's block (mapping class
  ``SparseBSRLinear``); auto times it only for a square block not in :data:`BSR_SIZES`;
- ``bsr4x4``, ``bsr8x8``, ``bsr16x16``: ``SparseBSRLinear`` with that block;
- ``2:4``: :class:`~fx_sparsity.nn.SemiStructuredSparseLinear`, timed on CUDA;
- ``int8`` (dense dynamic int8, x86) and ``sparse_int8`` (torch.ao's sparse dynamic int8,
  qnnpack): timed when ``max_rel_error`` >= ``INT8_ERROR_FLOOR``;
- ``dynamic``, ``static``, ``semi_structured`` (mapping classes: torch.ao's two
  sparse-quantized Linears and ``SemiStructuredSparseLinear``, subclasses included) and
  ``auto``: whole-graph strategies, never timed.

Names other than ``dense``/``auto`` can be replaced with ``replace=True``. Auto's own
candidates (``dense``, ``bsr<b>x<b>``, ``2:4``, ``int8``, ``sparse_int8``) can be named
too but are left out of the list an unknown mapping name prints.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.ao.nn.sparse.quantized import Linear as _AoStaticLinear
from torch.ao.nn.sparse.quantized.dynamic import Linear as _AoDynamicLinear

from ..nn import SemiStructuredSparseLinear, SparseBSRLinear, SparseCSRLinear, sparse_kernel_available
from ..nn.quantized import DYNAMIC_ENGINE, DenseDynamicInt8Linear, SparseQuantizedDynamicLinear, block_shape_supported
from ..nn.semi_structured import semi_structured_problem
from ..passes import INFO_ATTR
from .auto import INT8_ERROR_FLOOR, Auto
from .strategies import DynamicQuantized, SemiStructured, StaticQuantized
from .targets import LoweringTarget, _add

__all__ = ["BSR_SIZES", "MAX_STORED_FRACTION"]

BSR_SIZES = (4, 8, 16)  # square BSR blocks auto tries on every layer they divide
MAX_STORED_FRACTION = 0.5  # auto skips sparse formats that would store (multiply) more than this of the weight

Shape = tuple[int, int] | None


def _builtin(name: str, build=None, applies=None, *, auto: bool = True, **fields) -> None:
    _add(LoweringTarget(name, build, applies, auto, builtin=True, **fields), replace=False)


# -- dense ---------------------------------------------------------------------------------------

def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, *, mask: torch.Tensor | None = None,
                 sparse_block_shape: Shape = None, example: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (already masked) and ``bias``: what leaving the layer dense costs."""
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None and module.bias is not None:
            module.bias.copy_(bias)
    setattr(module, INFO_ATTR, {"lowered_to": "Linear", "format": "dense"})
    return module


# -- CSR / BSR -----------------------------------------------------------------------------------

@functools.cache
def _kernel_available(dtype: torch.dtype, device: str) -> bool:
    return sparse_kernel_available(torch.sparse_csr, dtype, device)


def _storage_problem(weight: torch.Tensor) -> str | None:
    """Why auto does not time a CSR/BSR copy of ``weight`` (masked), or None."""
    if not _kernel_available(weight.dtype, str(weight.device)):
        return f"no {weight.device.type} sparse kernel for {weight.dtype}"
    density = (weight != 0).float().mean().item()
    if density > MAX_STORED_FRACTION:
        return f"{density:.0%} of the weight is nonzero"
    return None


def _stored_fraction(pattern: torch.Tensor, b: int) -> float:
    rows, cols = pattern.shape
    return pattern.reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1).float().mean().item()


def _csr_build(weight: torch.Tensor, bias: torch.Tensor | None, *, mask: torch.Tensor, sparse_block_shape: Shape,
               example: torch.Tensor | None = None) -> nn.Module:
    return SparseCSRLinear.from_masked(weight, mask, bias, sparse_block_shape=sparse_block_shape)


def _csr_applies(weight: torch.Tensor, mask: torch.Tensor, *, sparse_block_shape: Shape,
                 device: torch.device) -> bool | str:
    return _storage_problem(weight) or True


def _bsr_build(weight: torch.Tensor, bias: torch.Tensor | None, *, mask: torch.Tensor, sparse_block_shape: Shape,
               example: torch.Tensor | None = None, size: int | None = None) -> nn.Module:
    """BSR with ``size``-square blocks, or with the group's block (non-square: stored as CSR, the record says so)."""
    block = (size, size) if size is not None else sparse_block_shape
    return SparseBSRLinear.from_masked(weight, mask, bias, sparse_block_shape=block)


def _bsr_applies(weight: torch.Tensor, mask: torch.Tensor, *, sparse_block_shape: Shape, device: torch.device,
                 size: int | None = None) -> bool | str:
    if size is None:  # the group's own block, when square and not one of BSR_SIZES (CSR does 1x1 blocks better)
        if sparse_block_shape is None or sparse_block_shape[0] != sparse_block_shape[1]:
            return False
        size = int(sparse_block_shape[0])
        if size <= 1 or size in BSR_SIZES:
            return False
    rows, cols = weight.shape
    if rows % size or cols % size:
        return False  # not a candidate for this shape; not worth a line in the record
    problem = _storage_problem(weight)
    if problem is not None:
        return problem
    stored = _stored_fraction(weight != 0, size)
    if stored > MAX_STORED_FRACTION:
        return f"{size}x{size} blocks would store {stored:.0%} of the weight"
    return True


# -- 2:4 and int8 --------------------------------------------------------------------------------

def _semi_structured_build(weight: torch.Tensor, bias: torch.Tensor | None, *, mask: torch.Tensor,
                           sparse_block_shape: Shape, example: torch.Tensor | None = None) -> nn.Module:
    return SemiStructuredSparseLinear.from_masked(weight, mask, bias)


def _semi_structured_applies(weight: torch.Tensor, mask: torch.Tensor, *, sparse_block_shape: Shape,
                             device: torch.device) -> bool | str:
    if device.type != "cuda":
        return False  # 2:4 tensor cores; a CPU build has no kernel, so no line in the record
    return semi_structured_problem(weight) or True


def _int8_applies(weight: torch.Tensor, mask: torch.Tensor, *, sparse_block_shape: Shape,
                  device: torch.device) -> bool | str:
    if weight.dtype != torch.float32:
        return f"int8 kernels take float32 weights, this one is {weight.dtype}"
    return True


def _int8_build(weight: torch.Tensor, bias: torch.Tensor | None, *, mask: torch.Tensor, sparse_block_shape: Shape,
                example: torch.Tensor | None = None) -> nn.Module:
    return DenseDynamicInt8Linear.from_masked(weight, mask, bias)


def _sparse_int8_build(weight: torch.Tensor, bias: torch.Tensor | None, *, mask: torch.Tensor,
                       sparse_block_shape: Shape, example: torch.Tensor | None = None) -> nn.Module:
    block = (int(sparse_block_shape[0]), int(sparse_block_shape[1])) if sparse_block_shape is not None else (1, 4)
    block = block if block_shape_supported(DYNAMIC_ENGINE, block) else (1, 4)
    return SparseQuantizedDynamicLinear.from_masked(weight, mask, bias, sparse_block_shape=block)


# -- the registrations, in auto's order ------------------------------------------------------------

_builtin("dense", dense_linear, listed=False)
_builtin("csr", _csr_build, _csr_applies, produces=SparseCSRLinear)
_builtin("bsr", _bsr_build, _bsr_applies, produces=SparseBSRLinear)
for _size in BSR_SIZES:
    _builtin(f"bsr{_size}x{_size}", functools.partial(_bsr_build, size=_size),
             functools.partial(_bsr_applies, size=_size), listed=False)
_builtin("2:4", _semi_structured_build, _semi_structured_applies, strategy_factory=SemiStructured, listed=False)
_builtin("int8", _int8_build, _int8_applies, error_floor=INT8_ERROR_FLOOR, floor_reason="int8 weights", listed=False)
_builtin("sparse_int8", _sparse_int8_build, _int8_applies, strategy_factory=DynamicQuantized,
         error_floor=INT8_ERROR_FLOOR, floor_reason="int8 weights", listed=False)
_builtin("dynamic", auto=False, strategy_factory=DynamicQuantized, produces=_AoDynamicLinear, match_subclasses=True)
_builtin("static", auto=False, strategy_factory=StaticQuantized, produces=_AoStaticLinear, match_subclasses=True)
_builtin("semi_structured", auto=False, strategy_factory=SemiStructured, produces=SemiStructuredSparseLinear,
         match_subclasses=True)
_builtin("auto", auto=False, strategy_factory=Auto)
