"""One rule for ``sparsity_level`` values, for every sparsifier and pruner.

- Not a real number (a bool, NaN, a string, a tensor of several values): ``SparsityConfigError``
  everywhere, naming the value (a one-element tensor is read as its number).
- Outside ``[0, 1]``: torch.ao.pruning's names keep torch.ao's semantics, with a warning where
  torch.ao is silent. ``WeightNormSparsifier`` (and the levels schedulers set) act as 0 or 1, as
  torch.ao's do, and warn (:func:`warn_if_clamped`). torch.ao's ``SaliencyPruner`` and
  ``FPGMPruner`` fail at ``step()`` on such a level (``topk`` out of range): ours refuse it up
  front, at construction or in the config (:func:`check_level`). fx_sparsity's own sparsifiers
  (GlobalMagnitude, NM, Wanda, SparseGPT) refuse it the same way; with an ``m/2:m`` pattern the
  top is 0.5.

docs/migrating.md states the same rule for users.
"""
from __future__ import annotations

import math
import numbers
from typing import cast

import torch

from ..errors import SparsityConfigError, warn_user

__all__ = ["check_level", "warn_if_clamped"]


def _where(where: str) -> str:
    return f"{where}: " if where else ""


def check_level(level, *, name: str = "sparsity_level", high: float = 1.0, where: str = "") -> float:
    """``level`` as a float in ``[0, high]``, or ``SparsityConfigError`` naming it (the refusing side of the rule)."""
    if isinstance(level, torch.Tensor) and level.numel() == 1:
        level = level.item()
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or math.isnan(level):
        raise SparsityConfigError(f"{_where(where)}{name} must be a real number in [0, {high:g}], got {level!r}")
    value = float(level)
    if not -1e-9 <= value <= high + 1e-9:
        raise SparsityConfigError(f"{_where(where)}{name} must be in [0, {high:g}], got {level!r}")
    return min(max(value, 0.0), high)


def warn_if_clamped(sparsity_level, *, where: str = "") -> None:
    """Warn that a level outside ``[0, 1]`` acts as 0 or 1 (the clamping side of the rule: torch.ao's semantics)."""
    # Compared as a float (typeshed's numbers.Real has no __ge__, which the real numbers all have).
    if isinstance(sparsity_level, numbers.Real) and not isinstance(sparsity_level, bool) \
            and not 0 <= cast(float, sparsity_level) <= 1:
        end = 0 if sparsity_level < 0 else 1
        warn_user(f"{_where(where)}sparsity_level={sparsity_level!r} is outside [0, 1]; it acts as {end} "
                  f"({'every weight kept' if end == 0 else 'every block zeroed'}), as in torch.ao.pruning")
