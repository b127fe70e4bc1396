"""Undo for a prepare that fails half-way: the user's model and the sparsifier are put back as they were."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from torch import fx, nn

__all__ = ["snapshot"]


def snapshot(model: nn.Module | None, obj: object, attrs: Iterable[str]) -> Callable[[], None]:
    """A function that restores ``model``'s modules (class, tensors, hooks, graph) and ``obj``'s ``attrs`` as now.

    Shallow: tensors are kept by reference (a prepare that fails never writes into them),
    containers of module state are copied.
    """
    saved = []
    for m in model.modules() if model is not None else ():
        state = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in m.__dict__.items()}
        graph = copy.deepcopy(m.graph) if isinstance(m, fx.GraphModule) else None
        saved.append((m, m.__class__, state, graph))
    obj_state = {k: copy.copy(v) for k, v in obj.__dict__.items() if k in set(attrs)}

    def restore() -> None:
        for m, cls, state, graph in saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(state)
            if isinstance(m, fx.GraphModule) and graph is not None:
                m.graph = graph
                m.recompile()
        obj.__dict__.update(obj_state)

    return restore
