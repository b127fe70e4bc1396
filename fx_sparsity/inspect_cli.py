"""``python -m fx_sparsity inspect MODULE:FACTORY``: the annotated graph of any model factory.

Builds the model, prepares it with a ``WeightNormSparsifier`` (default: every
``nn.Linear`` weight at 0.5 in 1x4 blocks), computes the masks once
(``sparsifier.step()``) and prints :func:`fx_sparsity.format_sparse_graph`, so the
pruning plan can be looked at before any training.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx, nn

from .errors import FxSparsityError

__all__ = ["CLIError", "parse_shape", "parse_block_shape", "load_factory", "check_inputs_run", "inspect_model"]

INPUT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}


class CLIError(FxSparsityError):
    """A problem with what the user typed or named; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def parse_shape(text: str, what: str = "--input-shape") -> tuple[int, ...]:
    """``"1,16"`` (or ``"1x16"``) -> ``(1, 16)``; positive integers only."""
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CLIError(f"bad {what} '{text}': expected positive integers separated by commas, e.g. 1,16 "
                       f"(batch 1, 16 features) or 2,3,32,32")
    return shape


def parse_block_shape(text: str) -> tuple[int, int]:
    shape = parse_shape(text, "--block-shape")
    if len(shape) != 2:
        raise CLIError(f"bad --block-shape '{text}': a block has 2 dims (rows, cols), e.g. 1,4")
    return shape  # type: ignore[return-value]


def parse_level(text: str) -> float:
    try:
        level = float(text)
    except ValueError:
        level = -1.0
    if not 0.0 <= level <= 1.0:
        raise CLIError(f"bad --level '{text}': a sparsity level is a fraction of zeros in [0, 1], e.g. 0.9")
    return level


def load_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``package.module:attr.path`` to a callable (modules in the current directory are found)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"'{spec}' is not MODULE:FACTORY: name a module and a callable in it that returns the "
                       f"model, separated by a colon, e.g. mypkg.models:make_mlp or torchvision.models:resnet18")
    # `python -m` puts the current directory on sys.path, a console script does not; make them agree.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CLIError(f"cannot import '{module_name}': no module named '{e.name}' (run from the directory "
                           f"that contains it, or add that directory to PYTHONPATH)") from e
        raise CLIError(f"importing '{module_name}' failed: {e} (a dependency of that module is missing)") from e
    except Exception as e:
        raise CLIError(f"importing '{module_name}' raised {type(e).__name__}: {e}", code=1) from e
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            candidates = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            near = difflib.get_close_matches(part, candidates, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else (
                f"; callables there: {', '.join(candidates[:10])}" if candidates else "")
            raise CLIError(f"'{where}' has no attribute '{part}'{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"'{spec}' is a {type(obj).__name__}, not a callable; name a function or class that "
                       f"returns an nn.Module")
    return obj


def _example_inputs(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    if dtype.is_floating_point:
        return tuple(torch.randn(s, dtype=dtype) for s in shapes)
    return tuple(torch.zeros(s, dtype=dtype) for s in shapes)  # 0 is a valid index for any embedding


def _shapes_text(inputs: tuple[torch.Tensor, ...]) -> str:
    shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
    dtype = "" if inputs[0].dtype == torch.float32 else f" ({str(inputs[0].dtype).removeprefix('torch.')})"
    return (f"an input of shape {shapes}" if len(inputs) == 1 else f"inputs of shapes {shapes}") + dtype


_INPUT_SIZES = ("in_features", "in_channels", "num_embeddings", "embed_dim", "d_model")


def _first_layer(model: nn.Module) -> str:
    """`` ('0' is a Linear with in_features=16)``: the first registered layer with an input size, or ''."""
    for name, module in model.named_modules():
        attr = next((a for a in _INPUT_SIZES if isinstance(getattr(module, a, None), int)), None)
        if attr is not None:
            what = f"a {type(module).__name__} with {attr}={getattr(module, attr)}"
            return f" ('{name}' is {what})" if name else f" (it is {what})"
    return ""


def check_inputs_run(model: nn.Module, inputs: tuple[torch.Tensor, ...], kwargs: dict[str, Any] | None = None) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, no grad); a failure becomes one :class:`CLIError` line.

    Checked before tracing, so a wrong ``--input-shape`` reads as such rather than as an
    export or shape-propagation failure deep in torch (with torch's traceback printed first).
    The training flags of every submodule are restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs, **(kwargs or {}))
    except Exception as e:  # whatever the model raises: the message is all the user needs
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        name = type(model).__name__
        if isinstance(e, TypeError) and "keyword argument" in reason:
            hint = f"check the --kwarg names against {name}.forward"
        elif isinstance(e, TypeError) and "argument" in reason:
            hint = f"pass one --input-shape per input of {name}.forward"
        else:
            options = "--input-shape" if inputs[0].dtype == torch.float32 else "--input-shape and --input-dtype"
            hint = f"pass {options} matching the model's first layer{_first_layer(model)}"
        raise CLIError(f"running {name} on {_shapes_text(inputs)} failed: {reason}; {hint}") from e
    finally:
        for m, training in modes:
            m.training = training


def parse_kwarg(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE a Python literal (``use_cache=False``, ``output_attentions=False``, ``n=3``)."""
    name, eq, value = text.partition("=")
    if not eq or not name.strip().isidentifier():
        raise CLIError(f"bad --kwarg {text!r}: expected NAME=VALUE, e.g. --kwarg use_cache=False")
    try:
        return name.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError) as e:
        raise CLIError(f"bad --kwarg {text!r}: the value must be a Python literal (False, 3, 'text', None)") from e


def parse_scope(text: str) -> Any:
    """``model``, ``layers`` or ``MODULE:CLASS`` (the block class)."""
    if text in ("model", "layers"):
        return text
    module_name, colon, cls_name = text.partition(":")
    if not colon or not module_name or not cls_name:
        raise CLIError(f"bad --scope {text!r}: use model, layers or MODULE:CLASS of the blocks")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"bad --scope {text!r}: {type(e).__name__}: {e}") from e


def inspect_model(spec: str, *, input_shapes: list[str] | None = None, input_dtype: str = "float32",
                  tracer: str = "symbolic", level: float = 0.5, block_shape: tuple[int, int] = (1, 4),
                  tensors: list[str] | None = None, code: bool = False, seed: int = 0, scope: str = "model",
                  kwargs: list[str] | None = None) -> str:
    """Everything ``inspect`` prints, as a string; raises :class:`CLIError` on bad input."""
    import fx_sparsity as fxs
    from fx_sparsity.inputs import CallInputs
    from fx_sparsity.printing import format_sparse_code, format_sparse_graph

    shapes = [parse_shape(s) for s in input_shapes or []]
    keywords = dict(parse_kwarg(k) for k in kwargs or [])
    scope_arg = parse_scope(scope)
    if tracer == "export" and not shapes:
        raise CLIError("--tracer export needs --input-shape (torch.export traces with example inputs)")
    factory = load_factory(spec)
    torch.manual_seed(seed)
    try:
        model = factory()
    except Exception as e:
        raise CLIError(f"{spec}() raised {type(e).__name__}: {e}", code=1) from e
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    positional = _example_inputs(shapes, INPUT_DTYPES[input_dtype]) if shapes else None
    if positional is not None:
        check_inputs_run(model, positional, keywords)
    example: Any = positional if not keywords or positional is None else CallInputs(positional, keywords)

    config = [{"tensor_fqn": t} for t in tensors] if tensors else None
    if config is None and not any(type(m) is nn.Linear for m in model.modules()):
        raise CLIError(f"{type(model).__name__} has no nn.Linear, so the default config is empty; name the "
                       f"tensors to sparsify with --tensors, e.g. --tensors conv1.weight,fc.weight")
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=level, sparse_block_shape=block_shape)
    try:
        prepared = fxs.prepare_fx_sparse(model, sparsifier, config, example_inputs=example, tracer=tracer,
                                         scope=scope_arg)
        sparsifier.step()
    except (fxs.SparsityConfigError, fxs.TraceError) as e:
        raise CLIError(str(e), code=1) from e
    try:
        text = format_sparse_graph(prepared, example_inputs=example)
    except RuntimeError as e:
        raise CLIError(str(e), code=1) from e
    what = ", ".join(g["tensor_fqn"] for g in sparsifier.groups)
    block = "x".join(map(str, block_shape))
    scoped = f", scope={scope!r}" if scope != "model" else ""
    header = (f"{spec}: {type(model).__name__} traced with tracer={tracer!r}{scoped}; WeightNormSparsifier("
              f"sparsity_level={level}, sparse_block_shape=({block.replace('x', ', ')})) on {what}; "
              f"masks after one sparsifier.step()")
    parts = [header, "", text]
    if code:
        graphs = [("", prepared)] if isinstance(prepared, fx.GraphModule) else [
            (name, m) for name, m in prepared.named_modules() if isinstance(m, fx.GraphModule)]
        for name, gm in graphs:
            parts += ["", *([f"# {name}"] if name else []), format_sparse_code(cast(fx.GraphModule, gm))]
    return "\n".join(parts)
