"""``convert_fx_sparse``: lower the sparse Linears of a prepared (or squashed) GraphModule.

One loop for every mapping; what differs between mappings is a
:class:`~fx_sparsity.lowering.strategies.LoweringStrategy`, found through one registry of
lowering targets (:mod:`~fx_sparsity.lowering.targets`) by name, by a mapping dict's class,
or by ``"auto"``. Everything that can fail on the user's input is checked before the
module is touched.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn

from ..config import sparsity_config
from ..errors import warn_user
from ..passes import (
    DEFAULT_BLOCK_SHAPE,
    LowerSparseLinears,
    fetch_attr_or_none,
    find_sparse_linears,
    remove_observers,
    run_passes,
    tensor_readers,
)
from ..scoping import capture_calls, capture_inputs, units_of
from . import builtin_targets  # noqa: F401  (registers the built-in targets)
from .auto import Auto, choose_linear_lowering
from .strategies import LoweringOptions, LoweringStrategy
from .targets import (
    STRATEGIES,
    LoweringTarget,
    lowering_targets,
    register_lowering,
    register_lowering_target,
    strategy_for,
    unregister_lowering_target,
)

__all__ = ["convert_fx_sparse", "sparse_block_shapes", "LoweringStrategy", "LoweringOptions", "register_lowering",
           "STRATEGIES", "Auto", "choose_linear_lowering", "LoweringTarget", "register_lowering_target",
           "unregister_lowering_target", "lowering_targets"]


def sparse_block_shapes(gm: nn.Module) -> dict[str, tuple[int, int] | None]:
    """``{tensor_fqn: sparse_block_shape}`` of every tensor ``gm`` knows to be sparse.

    From the config ``prepare_fx_sparse`` records on the module (``fx_sparsity_config``)
    and from the ``sparse_params`` that ``squash_mask(params_to_keep=...)`` leaves on
    owner modules (torch.ao's convention; their ``weight`` is the sparse tensor).
    """
    shapes: dict[str, tuple[int, int] | None] = {}
    for fqn, group in sparsity_config(gm).items():
        shape = group.get("sparse_block_shape") if isinstance(group, Mapping) else None
        shapes[fqn] = tuple(shape) if shape is not None else None
    for name, module in gm.named_modules():
        params = getattr(module, "sparse_params", None)
        if isinstance(params, Mapping) and isinstance(getattr(module, "weight", None), torch.Tensor):
            shape = params.get("sparse_block_shape")
            fqn = f"{name}.weight" if name else "weight"
            if shape is not None or fqn not in shapes:
                shapes[fqn] = tuple(shape) if shape is not None else None
    return shapes


@contextlib.contextmanager
def _eval_mode(gm: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside (inputs run as inference will see them), each module's mode restored after."""
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def convert_fx_sparse(prepared: nn.Module, mapping: Mapping[type, type] | str | None = None, *,
                      calibration_data: Any = None, example_inputs: Any = None, max_rel_error: float = 1e-4,
                      inplace: bool = False) -> nn.Module:
    """Rewrite every Linear over a sparse weight into a ``call_module`` of the mapped target.

    ``prepared`` is what ``prepare_fx_sparse`` returned, with masks still in the graph or
    squashed (``sparsifier.squash_mask()``); for a model prepared with ``scope="layers"`` or a
    block scope (masks in place), each of its graph modules is lowered, on the inputs it gets
    when the model runs on ``example_inputs`` / ``calibration_data``. ``mapping``:

    - ``None`` / ``get_dynamic_sparse_quantized_mapping()`` / ``"dynamic"``: int8 weights,
      activations quantized per call; float in, float out.
    - ``get_static_sparse_quantized_mapping()`` / ``"static"``: int8 weights and activations,
      with activation scales observed over ``calibration_data`` (an iterable of input tuples
      or keyword dicts); consecutive lowered linears with only relus/identity dropouts
      between them stay quantized in between.
    - ``get_sparse_csr_mapping()`` / ``"csr"``, ``get_sparse_bsr_mapping()`` / ``"bsr"``, or a
      class with ``from_masked(weight, mask, bias, *, sparse_block_shape)``.
    - the name of a target registered with ``register_lowering_target`` (or a dict naming
      the class it ``produces``).
    - ``"auto"``: per layer, the fastest of dense / CSR / BSR (and int8 kernels when
      ``max_rel_error`` admits them, and registered targets), timed on the input
      ``example_inputs`` gives it.

    Each group's ``sparse_block_shape`` becomes the kernel's block size (a shape the kernel
    blocks tile, e.g. (4, 4) over (1, 4), is run with the kernel's). The lowered modules
    give the right answer whatever ``torch.backends.quantized.engine`` is and leave it as
    they found it. torch.ao observers left in the graph (Wanda's activation statistics)
    are taken out, as torch.ao's ``convert`` drops them. ``prepared`` is left as it was
    unless ``inplace=True``. Sparse tensors that stay unlowered (not read by a linear in
    this graph, or also read elsewhere) are named in a warning.
    """
    options = LoweringOptions(calibration_data, example_inputs, max_rel_error)
    if units_of(prepared):
        return _convert_units(prepared, mapping, options, inplace)
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"convert_fx_sparse lowers the GraphModule returned by prepare_fx_sparse (or "
                        f"sparsifier.squash_mask()), or a model prepared with scope=\"layers\" or a block scope "
                        f"(before squash_mask(), which puts its plain modules back); got {type(prepared).__name__}")
    strategy = strategy_for(mapping, options)
    shapes = sparse_block_shapes(prepared)
    gm = prepared if inplace else copy.deepcopy(prepared)
    sites = find_sparse_linears(gm, shapes, DEFAULT_BLOCK_SHAPE)
    strategy.check(sites)  # before anything changes (in place, the user's module)
    if not sites:
        warn_user("convert_fx_sparse: no Linear over a sparse weight in this module; nothing was lowered")
        return gm
    remove_observers(gm)  # as torch.ao's convert drops activation_post_process
    with _eval_mode(gm):
        strategy.observe(gm, sites)
    lowering = LowerSparseLinears(strategy.build, sites)
    run_passes(gm, lowering)
    strategy.finish(gm, lowering)
    _warn_unlowered(gm, shapes, lowering)
    return gm


def _convert_units(prepared: nn.Module, mapping: Any, options: LoweringOptions, inplace: bool) -> nn.Module:
    """Lower each graph module of a scoped model on the inputs it gets from the user's."""
    strategy_for(mapping, options)  # the options are checked before anything else happens
    model = prepared if inplace else copy.deepcopy(prepared)
    todo = [unit for unit in units_of(model)
            if find_sparse_linears(unit.graph_module, sparse_block_shapes(unit.graph_module), DEFAULT_BLOCK_SHAPE)]
    if not todo:
        warn_user("convert_fx_sparse: no Linear over a sparse weight in this module; nothing was lowered")
        return model
    fqns = [unit.fqn for unit in todo]
    examples = capture_inputs(model, fqns, options.example_inputs) if options.example_inputs is not None else {}
    calibration = (capture_calls(model, fqns, options.calibration_data)
                   if options.calibration_data is not None and not isinstance(options.calibration_data, torch.Tensor)
                   else {})
    for unit in todo:
        convert_fx_sparse(unit.graph_module, mapping, calibration_data=calibration.get(unit.fqn,
                          options.calibration_data), example_inputs=examples.get(unit.fqn),
                          max_rel_error=options.max_rel_error, inplace=True)
    return model


def _warn_unlowered(gm: fx.GraphModule, shapes: Mapping[str, Any], lowering: LowerSparseLinears) -> None:
    """Name the sparse tensors that are still read densely, and what reads them."""
    for tensor_fqn, readers in lowering.kept_dense.items():
        warn_user(f"convert_fx_sparse: '{tensor_fqn}' is also read by {readers}, so its dense weight (and "
                  f"mask) stay in the module next to the lowered copy; memory does not drop for it")
    lowered = {record.info.get("tensor_fqn") for record in lowering.lowered}
    missed = {}
    for fqn in shapes:
        if fqn in lowered:
            continue
        readers = tensor_readers(gm, fetch_attr_or_none(gm, fqn))
        if readers:
            missed[fqn] = ", ".join(f"{n.name} ({_describe(n)})" for n in readers)
    if missed:
        lines = "\n".join(f"  '{fqn}' read by {readers}" for fqn, readers in missed.items())
        warn_user(f"convert_fx_sparse: {len(missed)} of {len(missed) + len(lowered)} sparse tensors stay unlowered: "
                  f"no linear op reads them in this graph (only linears are lowered; a function that hides its "
                  f"linear from the tracer keeps it dense — tracer=\"export\" sees inside):\n{lines}")


def _describe(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"
