"""fx_sparsity: torch.ao.pruning as a torch.fx graph-transformation pass.

Masks are visible ``mul`` nodes of a traced graph; sparsifiers and schedulers update the
mask buffers those nodes read; lowering rewrites sparse Linear nodes into sparse ops.
"""
from . import passes
from .api import prepare_fx_sparse
from .compressed import load_compressed, save_compressed
from .distributed import masks_as_parameters
from .errors import FxSparsityError, SparsityConfigError, TraceError
from .fqn import fqn_to_module, get_arg_info_from_tensor_fqn, module_to_fqn
from .lowering import convert_fx_sparse, register_lowering_target
from .mappings import (
    get_dynamic_sparse_quantized_mapping,
    get_sparse_bsr_mapping,
    get_sparse_csr_mapping,
    get_sparse_semi_structured_mapping,
    get_static_sparse_quantized_mapping,
)
from .nn import SemiStructuredSparseLinear, SparseBSRLinear, SparseCSRLinear
from .one_shot import one_shot
from .parametrization import FakeSparsity
from .pretrained import one_shot_pretrained
from .printing import format_sparse_code, format_sparse_graph, print_sparse_graph
from .scheduler import BaseScheduler, CubicSL, LambdaSL
from .scopes import BlockScope, LayersScope, ModelScope, Scope
from .sparsifier import (
    ADMMSparsifier,
    BaseSparsifier,
    GlobalMagnitudeSparsifier,
    NearlyDiagonalSparsifier,
    NMSparsifier,
    SparseGPTSparsifier,
    WandaSparsifier,
    WeightNormSparsifier,
    owl_levels,
)
from .structured import BaseStructuredSparsifier, FPGMPruner, SaliencyPruner, register_channel_rule

__all__ = [
    "get_dynamic_sparse_quantized_mapping",
    "get_static_sparse_quantized_mapping",
    "get_sparse_csr_mapping",
    "get_sparse_bsr_mapping",
    "get_sparse_semi_structured_mapping",
    "SparseCSRLinear",
    "SparseBSRLinear",
    "SemiStructuredSparseLinear",
    "BaseScheduler",
    "CubicSL",
    "LambdaSL",
    "BaseSparsifier",
    "NearlyDiagonalSparsifier",
    "WeightNormSparsifier",
    "GlobalMagnitudeSparsifier",
    "NMSparsifier",
    "WandaSparsifier",
    "SparseGPTSparsifier",
    "ADMMSparsifier",
    "owl_levels",
    "BaseStructuredSparsifier",
    "SaliencyPruner",
    "FPGMPruner",
    "register_channel_rule",
    "FakeSparsity",
    "fqn_to_module",
    "get_arg_info_from_tensor_fqn",
    "module_to_fqn",
    "prepare_fx_sparse",
    "format_sparse_graph",
    "print_sparse_graph",
    "format_sparse_code",
    "convert_fx_sparse",
    "register_lowering_target",
    "masks_as_parameters",
    "one_shot",
    "one_shot_pretrained",
    "save_compressed",
    "load_compressed",
    "Scope",
    "ModelScope",
    "LayersScope",
    "BlockScope",
    "FxSparsityError",
    "SparsityConfigError",
    "TraceError",
    "passes",
]
