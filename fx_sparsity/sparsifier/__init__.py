from .admm_sparsifier import ADMMSparsifier
from .base_sparsifier import BaseSparsifier
from .global_magnitude_sparsifier import GlobalMagnitudeSparsifier
from .nearly_diagonal_sparsifier import NearlyDiagonalSparsifier
from .nm_sparsifier import NMSparsifier
from .owl import owl_levels
from .sparsegpt_sparsifier import SparseGPTSparsifier
from .wanda_sparsifier import WandaSparsifier
from .weight_norm_sparsifier import WeightNormSparsifier

__all__ = ["ADMMSparsifier", "BaseSparsifier", "GlobalMagnitudeSparsifier", "NearlyDiagonalSparsifier", "NMSparsifier",
           "SparseGPTSparsifier", "WandaSparsifier", "WeightNormSparsifier", "owl_levels"]
