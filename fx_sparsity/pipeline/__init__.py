"""The one prepare pipeline every sparsifier, pruner and ``one_shot`` goes through.

::

    prepare(sparsifier, model, config, scope=..., tracer=..., example_inputs=..., inplace=...)
      validate   the model, the config's type, the tracer; the scope decoded once (scopes.as_scope)
      copy       unless inplace (a model that cannot be copied says so)
      place      element masks (elements.place: scope units, trace, mask every use, observers)
                 or channel masks (channels.place: trace each unit, find channel groups, mask the chosen)
      attach     sparsifier.model / config / groups (and a pruner's parts and targets)
      publish    each graph module records the live groups (printing and lowering read them)
    any failure puts the user's model and the sparsifier back as they were (rollback.snapshot)

A sparsifier only declares what it needs (see :class:`SparsifierLike`): its ``defaults``,
``masks`` (``"elements"`` or ``"channels"``), ``validate_group``, ``observer_type`` (observers
on the inputs of the linears it sparsifies, or ``None``) and ``on_prepared``. It computes masks
and levels; it never traces or scopes.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import fx, nn

from ..errors import SparsityConfigError
from ..rollback import snapshot
from ..scopes import Scope, as_scope
from ..scoping import check_not_prepared, graph_parts, relative
from ..tracing import TRACERS, check_model
from . import channels, elements, stitched
from .channels import ChannelTarget, Part
from .cut import cut_model
from .elements import publish, remove_observers, squash_masks
from .protocol import SparsifierLike

__all__ = ["SparsifierLike", "prepare", "publish", "squash_masks", "remove_observers", "graph_modules", "relative",
           "cut_model", "ChannelTarget", "Part"]


def prepare(sparsifier: SparsifierLike, model: nn.Module, config: list[dict] | None = None, *, scope: Any = "model",
            example_inputs: Any = None, tracer: str = "symbolic", inplace: bool = False) -> nn.Module:
    """Prepare ``model`` for ``sparsifier``: masks in the graph, groups on the sparsifier; returns the model to use.

    The input model is left as it was unless ``inplace=True``; a failure leaves the model and the
    sparsifier as they were.
    """
    check_model(model)
    name = type(sparsifier).__name__
    if sparsifier.model is not None:
        raise SparsityConfigError(f"{name} is already prepared ({len(sparsifier.groups)} groups); use a new "
                                  f"sparsifier for each model")
    channel_masks = sparsifier.masks == "channels"
    if config is not None and not isinstance(config, (list, tuple)):
        every = "prunable group" if channel_masks else "nn.Linear weight"
        raise TypeError(f"config must be a list of dicts (or None for every {every}), got {type(config).__name__}")
    if tracer not in TRACERS:
        raise SparsityConfigError(f"tracer={tracer!r} is not one of {TRACERS}")
    scope_: Scope = as_scope(scope)
    check_not_prepared(model)
    if not scope_.whole_model and isinstance(model, fx.GraphModule):
        raise SparsityConfigError("a GraphModule is prepared as it is: scope applies to an nn.Module to trace; "
                                  "leave scope=\"model\"")
    if inplace:
        work = model
    else:
        try:
            work = copy.deepcopy(model)
        except Exception as e:
            raise TypeError(f"cannot copy {type(model).__name__} ({e}); pass inplace=True to prepare it in "
                            f"place") from e
    if channel_masks and example_inputs is None:  # torch.ao's prepare(model, config) takes none
        example_inputs = channels.guess_inputs(work)
    restore = snapshot(work if inplace else None, sparsifier, ("model", "config", "groups", "_state", "state",
                                                                "parts", "targets"))
    try:
        if channel_masks:
            # block scopes: the blocks (and the layers between them) followed as one graph (stitched.py)
            place = stitched.place_stitched if scope_.block_types else channels.place
            placed, groups, extra = place(sparsifier, work, config, scope_, tracer, example_inputs)
        else:
            placed, groups = elements.place(sparsifier, work, model, config, scope_, tracer, example_inputs)
            extra = {}
        sparsifier.model = placed
        sparsifier.config = list(config) if config is not None else None
        sparsifier.groups = groups
        for key, value in extra.items():
            setattr(sparsifier, key, value)
        if not channel_masks:
            publish(placed, groups)
            if sparsifier.observer_type is not None:
                elements.place_observers(placed, groups, sparsifier.make_observer, name)
        sparsifier.on_prepared(placed)
        return placed
    except BaseException:
        restore()
        raise


def graph_modules(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """``[(fqn, graph module)]`` of a prepared model: ``[("", gm)]`` for a whole-model graph, else its units."""
    return graph_parts(model)

