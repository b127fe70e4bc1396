"""The fx_sparsity pass library: small graph transformations, each doing one thing.

Passes know graphs, not training: nothing here imports a sparsifier or a scheduler.
Each pass changes ``gm.graph``; :func:`run_passes` (torch.fx's ``PassManager``) runs
them and recompiles and lints after each, and every functional form uses it.
"""
from .attrs import buffer_or_none, fetch_attr, fetch_attr_or_none, has_submodule, mask_or_none, unique_attr_name
from .fold_masks import FoldMasks, fold_masks
from .inline_modules import InlineError, InlineModules, inline_modules, splice_module
from .insert_masks import (
    MASK_SUFFIX,
    InsertMasks,
    MaskedUse,
    MaskInsertionError,
    MaskSpec,
    find_masked_uses,
    insert_masks,
    mask_fqn_for,
)
from .linear import LINEAR_TARGETS, is_linear, linear_args
from .lower_linear import (
    DEFAULT_BLOCK_SHAPE,
    INFO_ATTR,
    FoldRequantize,
    LoweredLinear,
    LowerSparseLinears,
    QuantizeBoundaries,
    SparseLinear,
    find_sparse_linears,
    tensor_readers,
)
from .manager import run_passes
from .observers import (
    ChannelNormObserver,
    GramObserver,
    InsertObservers,
    Observation,
    ObservedNode,
    RemoveObservers,
    SharedProduct,
    observe_linear_inputs,
    observe_linears,
    observer_fqn_for,
    remove_observers,
)
from .prepare_masks import owns_one_of, place_tensor, prepare_masks
from .training_mode import SetTrainingMode

__all__ = [
    "buffer_or_none", "fetch_attr", "fetch_attr_or_none", "has_submodule", "mask_or_none", "unique_attr_name",
    "FoldMasks", "fold_masks",
    "InlineError", "InlineModules", "inline_modules", "splice_module",
    "MASK_SUFFIX", "InsertMasks", "MaskedUse", "MaskInsertionError", "MaskSpec", "find_masked_uses", "insert_masks",
    "mask_fqn_for",
    "LINEAR_TARGETS", "is_linear", "linear_args",
    "DEFAULT_BLOCK_SHAPE", "INFO_ATTR", "FoldRequantize", "LoweredLinear", "LowerSparseLinears", "QuantizeBoundaries",
    "SparseLinear", "find_sparse_linears", "tensor_readers",
    "run_passes",
    "ChannelNormObserver", "GramObserver", "SharedProduct", "InsertObservers", "Observation", "ObservedNode",
    "RemoveObservers",
    "observe_linear_inputs",
    "observe_linears", "observer_fqn_for", "remove_observers",
    "owns_one_of", "place_tensor", "prepare_masks",
    "SetTrainingMode",
]
