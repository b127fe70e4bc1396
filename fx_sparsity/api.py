"""The graph API's front door: ``prepare_fx_sparse`` hands the model to the sparsifier's ``prepare``."""
from __future__ import annotations

from typing import Any

from torch import nn

from .sparsifier.base_sparsifier import BaseSparsifier

__all__ = ["prepare_fx_sparse"]


def prepare_fx_sparse(model: nn.Module, sparsifier: BaseSparsifier, config: list[dict] | None = None, *,
                      scope: Any = "model", example_inputs: Any = None, tracer: str = "symbolic",
                      inplace: bool = False) -> nn.Module:
    """Trace ``model`` and put a mask-multiply node in front of every use of each configured tensor.

    Same as ``sparsifier.prepare(model, config, ...)`` (see :meth:`BaseSparsifier.prepare`):
    torch.ao.pruning's config semantics, ``config=None`` for every ``nn.Linear`` weight,
    ``tracer="symbolic"`` or ``"export"`` (with ``example_inputs``, a tuple or a dict of
    keyword inputs), the input model left as it was unless ``inplace=True``.

    ``scope="model"`` (default) returns one ``GraphModule``; ``scope="layers"`` returns the
    user's model (same class) whose layers owning configured tensors are GraphModules;
    ``scope=<nn.Module subclass or tuple>`` makes a GraphModule of each block of that type.
    The result is also ``sparsifier.model``.
    """
    if not isinstance(sparsifier, BaseSparsifier):
        hint = (" (a torch.ao.pruning sparsifier? use the fx_sparsity class of the same name)"
                if type(sparsifier).__module__.startswith("torch.ao") else "")
        raise TypeError(f"sparsifier must be an fx_sparsity BaseSparsifier, got {type(sparsifier).__name__}{hint}")
    return sparsifier.prepare(model, config, scope=scope, example_inputs=example_inputs, tracer=tracer,
                              inplace=inplace)
