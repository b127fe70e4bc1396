from .base_sparsifier import BaseSparsifier
from .nearly_diagonal_sparsifier import NearlyDiagonalSparsifier
from .weight_norm_sparsifier import WeightNormSparsifier

__all__ = ["BaseSparsifier", "NearlyDiagonalSparsifier", "WeightNormSparsifier"]
