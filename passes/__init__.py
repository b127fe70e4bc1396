"""The fx_sparsity pass library: small graph transformations, each doing one thing.

Passes know graphs, not training: nothing here imports a sparsifier or a scheduler.
"""
from .activation_stats import (
    ChannelNormObserver,
    InsertActivationObservers,
    RemoveActivationObservers,
    insert_activation_observers,
    remove_activation_observers,
)
from .fold_masks import FoldMasks, fold_masks
from .inline_modules import INLINABLE_MODULES, InlineModules, inline_modules, is_inlinable
from .insert_masks import (
    InsertMasks,
    MaskedUse,
    MaskInsertionError,
    MaskSpec,
    buffer_or_none,
    fetch_attr,
    find_masked_uses,
    insert_masks,
    mask_fqn_for,
)
from .lower_linear import LINEAR_TARGETS, FoldRequantize, LowerSparseLinears, QuantizeBoundaries, find_sparse_linears
from .observers import InsertObservers, observe_linears, remove_observers

__all__ = [
    "ChannelNormObserver", "InsertActivationObservers", "RemoveActivationObservers",
    "insert_activation_observers", "remove_activation_observers",
    "LINEAR_TARGETS", "FoldRequantize", "LowerSparseLinears", "QuantizeBoundaries", "find_sparse_linears",
    "InsertObservers", "observe_linears", "remove_observers",
    "FoldMasks", "fold_masks",
    "INLINABLE_MODULES", "InlineModules", "inline_modules", "is_inlinable",
    "InsertMasks", "MaskedUse", "MaskInsertionError", "MaskSpec", "buffer_or_none", "fetch_attr", "find_masked_uses",
    "insert_masks", "mask_fqn_for",
]
