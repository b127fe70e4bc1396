"""Example and calibration inputs: one way to read them, for every function that takes them.

Inputs are a tuple (or list) of positional inputs, a dict of keyword inputs, one tensor,
or a :class:`CallInputs` (both kinds, as a forward pre-hook sees them).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn
from torch.fx._pytree import tree_flatten_spec

__all__ = ["CallInputs", "as_args_kwargs", "call_with", "graph_inputs"]


@dataclass
class CallInputs:
    """Positional and keyword inputs of one call."""

    args: tuple
    kwargs: dict[str, Any]


def as_args_kwargs(inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for a call with ``inputs``."""
    if isinstance(inputs, CallInputs):
        return tuple(inputs.args), dict(inputs.kwargs)
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_with(module: nn.Module, inputs: Any) -> Any:
    args, kwargs = as_args_kwargs(inputs)
    return module(*args, **kwargs)


def graph_inputs(gm: fx.GraphModule, inputs: Any) -> list:
    """The values of ``gm``'s placeholders, in order, for a call with ``inputs``.

    What ``Interpreter.run``/``ShapeProp.propagate`` take: a torch.export graph takes the
    flattened ``(args, kwargs)``; a symbolic one binds keywords to its forward's signature.
    """
    args, kwargs = as_args_kwargs(inputs)
    in_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    if in_spec is None and not kwargs:
        return list(args)
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"the inputs do not match the graph's forward{inspect.signature(gm.forward)}: {e}") from e
    if in_spec is None:
        bound.apply_defaults()
        return list(bound.arguments.values())
    # torch.export graphs take the flattened (args, kwargs) as exported: as given, else all positional.
    for call in ((args, kwargs), (bound.args, bound.kwargs)):
        try:
            return list(tree_flatten_spec(call, in_spec))
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError):
            continue
    raise TypeError(f"the inputs do not match the structure the graph was exported with ({in_spec})")
