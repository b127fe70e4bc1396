"""The root of every fx_sparsity error, at the bottom of the ladder so the pass library can use it too."""
from __future__ import annotations

__all__ = ["FxSparsityError"]


class FxSparsityError(Exception):
    """Base class of every error fx_sparsity raises on purpose.

    ``except fx_sparsity.FxSparsityError`` catches them all. Each subclass keeps the builtin base
    that torch.ao.pruning (or torch) raises for the same mistake (``ValueError``,
    ``AssertionError``, ``AttributeError``, ``RuntimeError``, ...), so code written against those
    keeps working.
    """
