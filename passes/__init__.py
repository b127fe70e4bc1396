"""The fx_sparsity pass library: small graph transformations, each doing one thing.

Passes know graphs, not training: nothing here imports a sparsifier or a scheduler.
"""
from .fold_masks import FoldMasks, fold_masks
from .inline_modules import INLINABLE_MODULES, InlineModules, inline_modules, is_inlinable
from .insert_masks import (
    InsertMasks,
    MaskedUse,
    MaskInsertionError,
    MaskSpec,
    fetch_attr,
    find_masked_uses,
    insert_masks,
    mask_fqn_for,
)

__all__ = [
    "FoldMasks", "fold_masks",
    "INLINABLE_MODULES", "InlineModules", "inline_modules", "is_inlinable",
    "InsertMasks", "MaskedUse", "MaskInsertionError", "MaskSpec", "fetch_attr", "find_masked_uses",
    "insert_masks", "mask_fqn_for",
]
