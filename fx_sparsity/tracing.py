"""The symbolic tracing front end (torch.export's is exporting.py): an ``nn.Module`` as a ``torch.fx.GraphModule``."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .errors import SparsityConfigError, TraceError, first_line, user_frame, warn_user
from .exporting import export_failure, export_module
from .inputs import as_args_kwargs
from .nn.attention import multi_head_attention
from .passes import inline_modules
from .passes.channels.registry import has_user_rule
from .passes.recurrent import recurrent_graph

# Internal: no __all__ (not API); the pipeline and the front end import what they use by name.

TRACERS = ("symbolic", "export")


class _KeepRegistered(fx.Tracer):
    """``symbolic_trace``'s tracer, keeping also the layers ``register_channel_rule`` describes as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or has_user_rule(m)


class _SeeInside(_KeepRegistered):
    """``symbolic_trace``'s tracer, tracing also into the leaf modules ``see_inside(qualname, module)`` picks."""

    def __init__(self, see_inside: Callable[[str, nn.Module], bool] | None = None):
        super().__init__()  # no argument needed: torch.fx rebuilds a tracer of this class to unpickle
        self.see_inside = see_inside or (lambda qualname, module: False)
        self._parameters_by_name: dict[str, nn.Parameter] | None = None
        self.seen_inside: dict[str, nn.Module] = {}
        self._first_names: dict[int, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if not super().is_leaf_module(m, module_qualified_name):
            return False
        if self.see_inside(module_qualified_name, m):
            self.seen_inside[module_qualified_name] = m
            return False
        return True

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        # nn.MultiheadAttention's own forward branches on its inputs: one traced into runs its written-out form
        # (fx_sparsity.nn.attention, equal to the module), on the flags this call passes
        if isinstance(m, nn.MultiheadAttention) and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = functools.partial(multi_head_attention, m)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # The base class searches every parameter of the root for each one read (quadratic when
        # every layer is traced into) and names a tied one by its first name. We name it by the
        # module it is read through, so a mask and its state-dict key follow the user's name.
        if isinstance(attr_val, nn.Parameter):
            if self._parameters_by_name is None:
                self._parameters_by_name = dict(self.root.named_parameters(remove_duplicate=False))
                self._first_names = {id(p): n for n, p in reversed(self._parameters_by_name.items())}
            path = self.scope.module_path
            name = f"{path}.{attr}" if path else attr
            if self._parameters_by_name.get(name) is not attr_val:
                name = self._first_names.get(id(attr_val), "")
            if name:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _in_original_order(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """``gm`` with each module's parameters and buffers in ``model``'s order, not the order the graph reads them
    (HF's Conv1D reads its bias first): ``parameters()`` is what optimizers index their state by."""
    for name, module in gm.named_modules():
        try:
            source = model.get_submodule(name)
        except AttributeError:
            continue
        for attr in ("_parameters", "_buffers"):
            mine, theirs = getattr(module, attr), getattr(source, attr)
            order = [k for k in theirs if k in mine] + [k for k in mine if k not in theirs]
            if list(mine) != order:
                setattr(module, attr, {k: mine[k] for k in order})
    return gm


def _symbolic_trace(model: nn.Module, see_inside: Callable[[str, nn.Module], bool] | None) -> fx.GraphModule:
    return _in_original_order(_symbolic_trace_any_order(model, see_inside), model)


def _symbolic_trace_any_order(model: nn.Module, see_inside: Callable[[str, nn.Module], bool] | None) -> fx.GraphModule:
    if isinstance(model, nn.RNNBase):  # its forward does not trace; the layer alone is one call on its weights
        return fx.GraphModule(model, recurrent_graph(model), type(model).__name__)
    # a transposed conv traced alone: its optional output_size (None unless given) decides the padding in Python
    fixed = {"output_size": None} if isinstance(model, nn.modules.conv._ConvTransposeNd) else None
    if see_inside is not None:
        try:
            tracer = _SeeInside(see_inside)
            graph = tracer.trace(model, concrete_args=fixed)
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
            # GraphModule keeps only the attributes the graph reads, in plain Modules: put each
            # layer traced into back, so its class, hooks and other attributes stay (groups' "module").
            for qualname, module in tracer.seen_inside.items():
                gm.set_submodule(qualname, module)
            return gm
        except Exception:  # a chosen layer that cannot be traced: passes.InlineModules says which, later
            pass
    plain = _KeepRegistered()  # symbolic_trace's, keeping registered layers whole
    graph = plain.trace(model, concrete_args=fixed)
    return fx.GraphModule(plain.root, graph, type(model).__name__)


#: What to try when the whole model's forward does not trace.
MODEL_WAYS = ("Ways that work, in order: scope=\"layers\" (only the layers that own configured tensors are traced; "
              "{name}'s own forward runs as written), or scope=<a block class> whose forward traces; "
              "tracer=\"export\" with example_inputs=(...) (torch.export specialises such control flow on the "
              "example inputs).")


def _untraceable(name: str, e: Exception, hint: str = "", ways: str = MODEL_WAYS) -> TraceError:
    """What failed and where on the first line; the ways that work after it (torch's own text stays chained)."""
    return TraceError(
        f"torch.fx.symbolic_trace cannot trace {name}: {type(e).__name__}: {first_line(e)}{user_frame(e)}\n"
        f"{ways.format(name=name)}{hint}")


class _WriteOut(_SeeInside):
    """``symbolic_trace``'s tracer with every ``nn.MultiheadAttention`` written out in plain ops (its heads
    visible)."""

    failed_in: tuple[str, type] | None = None  # the innermost layer a failed trace was in

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, nn.MultiheadAttention) and super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m))
            raise


def _rule_hint(failed_in: tuple[str, type] | None) -> str:
    """For structured pruning: a layer symbolic tracing cannot enter can be described instead."""
    if failed_in is None or not failed_in[0]:
        return ""
    path, cls = failed_in
    return (f"\nIt fails inside '{path}' ({cls.__name__}). If that layer's channels come out as they went in, or "
            f"must stay, describe it instead of tracing it: fx_sparsity.register_channel_rule({cls.__name__}, "
            f"\"same\") or \"fixed\" keeps it a leaf (docs/structured.md).")


def trace_written_out(model: nn.Module, ways: str = MODEL_WAYS) -> fx.GraphModule:
    """``model`` traced symbolically with every ``nn.MultiheadAttention`` written out in plain ops
    (``fx_sparsity.nn.attention``), unused values removed; ``TraceError`` (with ``ways``) when it cannot be
    traced."""
    name = type(model).__name__
    tracer = _WriteOut()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise _untraceable(name, e, _rule_hint(tracer.failed_in), ways) from e
    gm = fx.GraphModule(tracer.root, graph, name)
    inline_modules(gm, lambda fqn, module: isinstance(module, nn.RNNBase))  # one call on its weights
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def warn_hooks_traced_through(model: nn.Module, gm: fx.GraphModule, where: str = "") -> None:
    """Warn about the forward hooks of ``model``'s submodules that ``gm`` traced through instead of calling."""
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    hooked = [name for name, module in model.named_modules() if name and name not in called
              and (module._forward_hooks or module._forward_pre_hooks)]
    if hooked:
        prefix = f"{where}." if where else ""
        warn_user(f"forward hooks on {[prefix + n for n in hooked][:5]}{' ...' if len(hooked) > 5 else ''} ran once "
                  f"while tracing: the prepared graph holds their tensor ops but does not call them (side effects, "
                  f"such as recording activations, will not happen). Register them on the prepared model, or use "
                  f"scope=\"layers\" (each layer stays a module and keeps its hooks)")


def check_model(model: Any) -> None:
    """A clear error for what cannot be prepared as given: not a module, or a module wrapping the real one."""
    name = type(model).__name__
    if name == "ExportedProgram":
        raise TypeError("model is a torch.export ExportedProgram: pass its module, ep.module() (with "
                        "tracer=\"export\" fx_sparsity exports the model itself)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {name}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"model is a TorchScript module ({name}): fx_sparsity traces Python modules; prepare the "
                        f"nn.Module you scripted, then script the prepared one")
    if name == "OptimizedModule":
        attribute, rewrap = "_orig_mod", "torch.compile"
    elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        attribute, rewrap = "module", name
    else:
        return
    inner = getattr(model, attribute)
    raise TypeError(f"model is a {name} wrapping a {type(inner).__name__}: prepare model.{attribute}, then wrap the "
                    f"prepared model again ({rewrap})")


def trace(model: nn.Module, tracer: str = "symbolic", example_inputs: Any = None,
          see_inside: Callable[[str, nn.Module], bool] | None = None, ways: str = MODEL_WAYS) -> fx.GraphModule:
    """Trace ``model`` (which the caller owns: the result shares its submodules and tensors).

    ``"symbolic"``: ``torch.fx.symbolic_trace``; standard layers stay ``call_module`` nodes,
    except those ``see_inside(qualname, module)`` picks, whose own forward is traced (one
    trace for the whole model; if one of them cannot be traced, none is).
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
            return _symbolic_trace(model, see_inside)
        except Exception as e:  # symbolic_trace raises many types; all mean "not traceable"
            raise _untraceable(name, e, ways=ways) from e
    if example_inputs is None:
        raise SparsityConfigError(
            "tracer=\"export\" needs example_inputs: a tuple of inputs (or a dict of keyword "
            "inputs) the model can be called with, e.g. example_inputs=(torch.randn(1, 16),)")
    args, kwargs = as_args_kwargs(example_inputs)
    try:
        return export_module(model, args, kwargs)
    except Exception as e:
        raise export_failure(name, e) from e
