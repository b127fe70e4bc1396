"""The torch.export front end: a module exported on its example inputs as a GraphModule that trains, evaluates,
copies with its hooks and checks its keyword inputs; and the error that says why an export failed."""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from .errors import TraceError, first_line, user_frame, warn_user
from .passes import SetTrainingMode, run_passes

# Internal: no __all__ (not API); tracing, scoping and the pipeline import what they use by name.


def cache_hint(error: BaseException) -> str:
    """What to do when a Hugging Face KV cache reached torch.export (it cannot be an input or output)."""
    return (" A Hugging Face cache reached it: pass use_cache=False in example_inputs, e.g. "
            "example_inputs={\"input_ids\": ids, \"use_cache\": False} (generate() keeps its cache after "
            "squash_mask(), or with the layers and block scopes).") if "Cache" in str(error) else ""



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
            if any(type(kwargs[k]).__name__.endswith("Cache") for k in given):
                raise TraceError(
                    f"{self.name} was exported (tracer=\"export\") without a KV cache, and a Hugging Face cache "
                    f"({type(next(kwargs[k] for k in given)).__name__}) reached it: call the masked model with "
                    f"use_cache=False (generate() with its cache works on the model prune() or squash_mask() "
                    f"returns, whose blocks are the model's own again), or use scope=\"layers\".")
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
