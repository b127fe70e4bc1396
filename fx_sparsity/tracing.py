"""Tracing front ends: turn an ``nn.Module`` into a ``torch.fx.GraphModule``."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import linecache
import logging
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from .errors import OUR_DIRS, SparsityConfigError, TraceError, warn_user
from .inputs import as_args_kwargs
from .nn.attention import multi_head_attention
from .passes import SetTrainingMode, inline_modules, run_passes
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


#: Where library code lives: frames there are not the user's.
_LIBRARY_DIRS = (*OUR_DIRS, os.path.dirname(torch.__file__) + os.sep, os.path.dirname(contextlib.__file__) + os.sep)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def user_frame(e: BaseException) -> str:
    """`` (at file:line in func: `code`)`` for the innermost frame of the user's own code in ``e``'s traceback
    (not torch's, not ours, not generated code); empty when there is none."""
    found = ""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        name = code.co_filename
        if not (name.startswith(_LIBRARY_DIRS) or name.startswith("<")):
            line = linecache.getline(name, tb.tb_lineno).strip()
            found = f" (at {name}:{tb.tb_lineno} in {code.co_name}{f': `{line}`' if line else ''})"
        tb = tb.tb_next
    return found


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


def cache_hint(error: BaseException) -> str:
    """What to do when a Hugging Face KV cache reached torch.export (it cannot be an input or output)."""
    return (" A Hugging Face cache reached it: pass use_cache=False in example_inputs, e.g. "
            "example_inputs={\"input_ids\": ids, \"use_cache\": False} (generate() keeps its cache after "
            "squash_mask(), or with the layers and block scopes).") if "Cache" in str(error) else ""


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


def export_failure(name: str, e: BaseException, ways: str | None = None) -> TraceError:
    """torch.export failing on ``name``: what failed and where first, then the ways that work (by default those
    for a whole model's forward), torch's own text left to the chained exception."""
    if ways is None:
        ways = (f"Ways that work, in order: scope=\"layers\" (only the layers that own configured tensors are "
                f"traced; {name}'s own forward runs as written) or a block class whose forward exports; "
                f"example_inputs that match the forward; data-dependent control flow rewritten with torch.cond.")
    return TraceError(f"torch.export cannot trace {name}: {type(e).__name__}: {first_line(e)}{user_frame(e)}\n"
                      f"{ways} (torch's full message is chained below.){cache_hint(e)}")


def _auto_dims(value: Any) -> Any:
    """``dynamic_shapes`` for one input: every dim of every tensor ``Dim.AUTO``."""
    if isinstance(value, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(value.dim())}
    if isinstance(value, (tuple, list)):
        return type(value)(_auto_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _auto_dims(v) for k, v in value.items()}
    return None


@contextlib.contextmanager
def _stderr_kept_on_success() -> Iterator[None]:
    """What torch writes to stderr while exporting, passed on only if the export succeeds: a failed export
    prints its partial graph there before raising, and the error we raise (torch's chained) says it better."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        yield
    sys.stderr.write(captured.getvalue())


@contextlib.contextmanager
def _tensor_caches_emptied(module: nn.Module) -> Iterator[None]:
    """While exporting, each dict of tensors a layer caches in an attribute named ``*cache*`` (timm's LeViT and
    EfficientFormer: ``attention_bias_cache``, ``attention_biases[:, attention_bias_idxs]`` kept in eval mode) is
    an empty one, so the graph computes the value from its parameters (a head's biases go with the head) instead
    of folding it in as a constant that pins the heads; the cache is put back after."""
    caches = [(m, name, value) for m in module.modules() for name, value in list(vars(m).items())
              if "cache" in name.lower() and isinstance(value, dict)
              and any(isinstance(v, torch.Tensor) for v in value.values())]
    for m, name, value in caches:
        setattr(m, name, type(value)())
    try:
        with warnings.catch_warnings():  # the cache filled while tracing (torch.export puts it back as it was)
            warnings.filterwarnings("ignore", message=r"The tensor attributes? .*cache.* assigned during export")
            yield
    finally:
        for m, name, value in caches:
            setattr(m, name, value)


_EXPORT_LOGGERS = ("torch._export.non_strict_utils", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
                   "torch.export", "torch._export")


def export_module(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """``torch.export`` of ``module`` on these inputs, as a GraphModule that trains and evaluates.

    Every tensor dim is ``Dim.AUTO``: dims the code does not tie to a constant (batch,
    sequence) stay dynamic, so the module runs on other shapes; a dim of size 0 or 1 in the
    example is specialised by torch.export. Inputs torch.export cannot make dynamic are
    exported static. ``train()``/``eval()`` switch dropout and batch norm in the graph.
    """
    # A None keyword input is not exported (its dynamic shape cannot be described) and torch.export
    # would not notice a tensor passed there later: leave it out and check every call instead.
    # (A None for a parameter without a default cannot be left out: it goes in, and must stay None.)
    parameters = inspect.signature(type(module).forward).parameters
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty}
    absent = sorted(k for k, v in kwargs.items() if v is None and k not in required)
    kept_none = sorted(k for k, v in kwargs.items() if v is None and k in required)
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in required}
    # torch.export logs each 0/1-specialised AUTO dim as a warning (the docstring says it once), and a failed
    # export dumps graphs to the log before raising: the error we raise says what failed, with torch's chained.
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with _named_keywords(module, kwargs), _tensor_caches_emptied(module):
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            dynamic = {name: _auto_dims(value) for name, value in bound.arguments.items()}
            with _stderr_kept_on_success():
                exported = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
    except Exception as e:  # inputs dynamic shapes cannot describe (custom objects): specialise them all
        with _stderr_kept_on_success(), _tensor_caches_emptied(module):
            exported = torch.export.export(module, args, kwargs)
        warn_user(f"{type(module).__name__} was exported with every input dim fixed (batch and sequence "
                  f"included): torch.export could not make them dynamic ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); call it on inputs of these shapes only")
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    gm = exported.module()
    allow_train_eval(gm, module.training)
    defaults = {n: p.default for n, p in parameters.items() if p.default is not inspect.Parameter.empty}
    present = sorted(k for k in kwargs if k not in kept_none)
    gm.register_forward_pre_hook(SameNoneInputs(type(module).__name__, absent, present, defaults, kept_none),
                                 with_kwargs=True, prepend=True)
    keep_hooks_when_copied(gm)
    return gm


#: A module's forward hook dicts (what ``register_forward_hook``/``register_forward_pre_hook`` fill).
HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called")


def keep_hooks_when_copied(gm: fx.GraphModule) -> None:
    """Make ``copy.deepcopy`` of ``gm`` keep its forward hooks and the attributes set on it.

    ``GraphModule.__deepcopy__`` rebuilds the module from its graph and tensors only: it drops
    torch.export's input checks, our ``SameNoneInputs`` check and ``train``/``eval``, and the hooks a
    scoped unit runs for its layer; a copy would then compute or check something else. Each
    GraphModule has a class of its own, so this changes ``gm`` (and its copies) alone.
    """
    cls = type(gm)
    if getattr(cls.__dict__.get("__deepcopy__"), "keeps_hooks", False):
        return

    def __deepcopy__(self: fx.GraphModule, memo: dict) -> fx.GraphModule:
        twin = fx.GraphModule.__deepcopy__(self, memo)
        for name in HOOK_DICTS:
            if getattr(self, name, None) and not getattr(twin, name, None):
                setattr(twin, name, copy.deepcopy(getattr(self, name), memo))
        for name in set(self.__dict__) - set(twin.__dict__):
            value = self.__dict__[name]
            if isinstance(value, types.MethodType) and value.__self__ is self:
                twin.__dict__[name] = types.MethodType(value.__func__, twin)
            else:
                twin.__dict__[name] = copy.deepcopy(value, memo)
        return twin

    __deepcopy__.keeps_hooks = True  # type: ignore[attr-defined]
    cls.__deepcopy__ = __deepcopy__  # type: ignore[method-assign]


@contextlib.contextmanager
def _named_keywords(module: nn.Module, kwargs: dict) -> Iterator[None]:
    """While exporting, give ``module.forward`` a signature naming each keyword in ``kwargs`` that its
    ``**kwargs`` would take: torch.export cannot give dynamic shapes to inputs under ``**kwargs``."""
    signature = inspect.signature(type(module).forward)
    params = list(signature.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params) or all(k in signature.parameters for k in kwargs):
        yield
        return
    named = [p for p in params if p.kind is not p.VAR_KEYWORD]
    named += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs if k not in signature.parameters]
    original = type(module).forward

    def forward(self: nn.Module, *args: Any, **kw: Any) -> Any:
        return original(self, *args, **kw)

    forward.__signature__ = signature.replace(parameters=named)  # type: ignore[attr-defined]
    module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward


class SameNoneInputs:
    """Forward pre-hook of an exported module: the keyword inputs that were None when it was exported
    must be None (and are dropped), the others must not be; anything else would run the wrong graph."""

    def __init__(self, name: str, absent: list[str], present: list[str], defaults: dict[str, Any] | None = None,
                 kept_none: list[str] | None = None):
        self.name, self.absent, self.present = name, absent, present
        self.defaults = defaults or {}  # the forward's keyword defaults (what ran for a keyword not given)
        self.kept_none = kept_none or []  # None at export for a parameter without a default: passed, must be None

    def _as_exported(self, name: str, value: Any) -> bool:
        """Whether ``name=value``, not given at export, computes what the export ran with."""
        if name in self.defaults:
            default = self.defaults[name]
            return value is default or (value is None or value is False) and (default is None or default is False)
        return value is None or value is False  # taken by **kwargs: a flag left off

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        given = [k for k in self.absent + self.kept_none if kwargs.get(k) is not None]
        missing = [k for k in self.present if k in kwargs and kwargs[k] is None]
        # keywords it was not exported with: fine where they ask for what ran (output_attentions=False)
        unseen = [k for k in kwargs if k not in self.present and k not in self.absent and k not in self.kept_none]
        other = [k for k in unseen if not self._as_exported(k, kwargs[k])]
        if other:
            raise TraceError(
                f"{self.name} was exported (tracer=\"export\") without the keyword inputs {other}, and got them now; "
                f"its graph cannot take them. Prepare with example_inputs that pass them, or use scope=\"layers\".")
        if given or missing:
            what = (f"{given} {'was' if len(given) == 1 else 'were'} None" if given else
                    f"{missing} {'was a tensor' if len(missing) == 1 else 'were tensors'}")
            raise TraceError(
                f"{self.name} was exported (tracer=\"export\") on inputs where {what}; torch.export fixed that "
                f"into the graph, which would compute something else now. Prepare with example_inputs like the "
                f"ones it will get (e.g. with a padding attention_mask), or use scope=\"layers\".")
        return args, {k: v for k, v in kwargs.items() if k not in self.absent and k not in unseen}


def allow_train_eval(gm: fx.GraphModule, training: bool) -> None:
    """Make ``gm.train(mode)``/``gm.eval()`` work on an exported module (its own refuse)."""
    for m in gm.modules():
        m.training = training
    gm.train = types.MethodType(_train_exported, gm)  # type: ignore[method-assign]
    gm.eval = types.MethodType(_eval_exported, gm)  # type: ignore[method-assign]


def _eval_exported(self: fx.GraphModule) -> fx.GraphModule:
    return _train_exported(self, False)


def _train_exported(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    if mode != self.training:
        run_passes(self, SetTrainingMode(mode))
    for m in self.modules():
        m.training = mode
    return self
