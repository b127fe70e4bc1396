"""Tracing front ends: turn an ``nn.Module`` into a ``torch.fx.GraphModule``."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .errors import SparsityConfigError, TraceError
from .inputs import as_args_kwargs

__all__ = ["trace", "TRACERS"]

TRACERS = ("symbolic", "export")


def trace(model: nn.Module, tracer: str = "symbolic", example_inputs: Any = None) -> fx.GraphModule:
    """Trace ``model`` (which the caller owns: the result shares its submodules and tensors).

    ``"symbolic"``: ``torch.fx.symbolic_trace``; standard layers stay ``call_module`` nodes.
    ``"export"``: ``torch.export.export(model, example_inputs).module()``; parameters are
    ``get_attr`` nodes, ops are aten ops, and Python control flow is specialised away.
    A ``GraphModule`` is returned as it is.
    """
    if isinstance(model, fx.GraphModule):
        return model
    if tracer not in TRACERS:
        raise SparsityConfigError(f"tracer={tracer!r} is not one of {TRACERS}")
    name = type(model).__name__
    if tracer == "symbolic":
        try:
            return fx.symbolic_trace(model)
        except Exception as e:  # symbolic_trace raises many types; all mean "not traceable"
            raise TraceError(
                f"torch.fx.symbolic_trace cannot trace {name}: {type(e).__name__}: {e}\n"
                f"Symbolic tracing fails on Python control flow that depends on tensor values or "
                f"shapes, and on non-tensor inputs. Use tracer=\"export\" with example_inputs=(...) "
                f"(torch.export specialises such code on the example inputs).") from e
    if example_inputs is None:
        raise SparsityConfigError(
            "tracer=\"export\" needs example_inputs: a tuple of inputs (or a dict of keyword "
            "inputs) the model can be called with, e.g. example_inputs=(torch.randn(1, 16),)")
    args, kwargs = as_args_kwargs(example_inputs)
    try:
        return torch.export.export(model, args, kwargs).module()
    except Exception as e:
        raise TraceError(
            f"torch.export cannot trace {name}: {type(e).__name__}: {e}\n"
            f"Check that example_inputs match the model's forward; if the model has "
            f"data-dependent control flow, rewrite it with torch.cond or try tracer=\"symbolic\".") from e
