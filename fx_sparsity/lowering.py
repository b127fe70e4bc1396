"""``convert_fx_sparse``: lower the sparse Linears of a prepared (or squashed) GraphModule.

The API composes passes from :mod:`fx_sparsity.passes` (find the sparse linears, observe
and calibrate for the static mapping, rewrite, put quantize/dequantize at the edges) with
the target modules of :mod:`fx_sparsity.quantized_engine`. Everything that can fail on
the user's input is checked before the module is touched.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.ao.nn.sparse.quantized import Linear as _AoStaticLinear
from torch.ao.nn.sparse.quantized.dynamic import Linear as _AoDynamicLinear

from .errors import SparsityConfigError
from .mappings import get_dynamic_sparse_quantized_mapping
from .passes.insert_masks import fetch_attr
from .passes.lower_linear import (
    DEFAULT_BLOCK_SHAPE,
    FoldRequantize,
    LowerSparseLinears,
    QuantizeBoundaries,
    SparseLinear,
    find_sparse_linears,
)
from .passes.observers import observe_linears, remove_observers
from .quantized_engine import (
    DYNAMIC_ENGINE,
    STATIC_ENGINE,
    SparseQuantizedDynamicLinear,
    SparseQuantizedLinear,
    block_shape_supported,
)

__all__ = ["convert_fx_sparse", "sparse_block_shapes"]

# Block shapes torch documents for its sparse kernels; which of them work is measured per build.
_DOCUMENTED_KERNEL_SHAPES = ((1, 4), (8, 1))

Builder = Callable[[SparseLinear, torch.Tensor, torch.Tensor, "torch.Tensor | None"], nn.Module]


def sparse_block_shapes(gm: fx.GraphModule) -> dict[str, tuple[int, int] | None]:
    """``{tensor_fqn: sparse_block_shape}`` of every tensor ``gm`` knows to be sparse.

    From the config ``prepare_fx_sparse`` records on the module (``_fx_sparsity_config``)
    and from the ``sparse_params`` that ``squash_mask(params_to_keep=...)`` leaves on
    owner modules (torch.ao's convention; their ``weight`` is the sparse tensor).
    """
    shapes: dict[str, tuple[int, int] | None] = {}
    for fqn, group in (getattr(gm, "_fx_sparsity_config", None) or {}).items():
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


def _target_for_linear(mapping: Any) -> type[nn.Module]:
    if not isinstance(mapping, Mapping):
        raise SparsityConfigError(
            f"mapping must be a dict from float module type to target class (e.g. "
            f"fx_sparsity.get_dynamic_sparse_quantized_mapping()), None, or 'auto'; got {type(mapping).__name__}")
    others = [k for k in mapping if k is not nn.Linear]
    if others:
        names = ", ".join(getattr(k, "__name__", repr(k)) for k in others)
        raise SparsityConfigError(f"mapping has entries for {names}: fx_sparsity lowers Linear layers only; "
                                  f"keep just the torch.nn.Linear entry")
    if nn.Linear not in mapping:
        raise SparsityConfigError("mapping has no torch.nn.Linear entry; nothing to lower to "
                                  "(e.g. fx_sparsity.get_dynamic_sparse_quantized_mapping())")
    target = mapping[nn.Linear]
    if not isinstance(target, type):
        raise SparsityConfigError(f"mapping[torch.nn.Linear] must be a class, got {target!r}")
    return target


def _kind(target: type) -> str:
    if issubclass(target, _AoStaticLinear):
        return "static"
    if issubclass(target, _AoDynamicLinear):
        return "dynamic"
    if callable(getattr(target, "from_masked", None)):
        return "masked"
    raise SparsityConfigError(
        f"cannot lower to {target.__module__}.{target.__qualname__}: the target must be "
        f"torch.ao.nn.sparse.quantized.dynamic.Linear, torch.ao.nn.sparse.quantized.Linear, or a class "
        f"with a classmethod from_masked(weight, mask, bias, *, sparse_block_shape)")


def _kernel_shape(block_shape: tuple[int, int], supported: list[tuple[int, int]]) -> tuple[int, int] | None:
    """A kernel block shape whose blocks tile ``block_shape``: its zero blocks are then zero kernel blocks."""
    rows, cols = block_shape
    for r, c in supported:
        if rows % r == 0 and cols % c == 0:
            return (r, c)
    return None


def _tensor(site: SparseLinear) -> torch.Tensor:
    return fetch_attr(site.weight.graph.owning_module, site.weight.target)


def _check_sites(sites: list[SparseLinear], kind: str) -> dict[str, tuple[int, int]]:
    """Refuse layers that cannot be lowered, naming each; returns the kernel block shape per site."""
    problems = [f"  '{s.tensor_fqn}' (node {s.node.name}): {s.problem}" for s in sites if s.problem]
    if problems:
        raise SparsityConfigError("these sparse Linear layers cannot be lowered:\n" + "\n".join(problems))
    if kind == "masked":
        return {s.node.name: s.block_shape for s in sites}
    engine = DYNAMIC_ENGINE if kind == "dynamic" else STATIC_ENGINE
    off_cpu = [f"  '{s.tensor_fqn}' on {_tensor(s).device}" for s in sites if _tensor(s).device.type != "cpu"]
    if off_cpu:
        raise SparsityConfigError("the sparse-quantized kernels run on CPU only; move the module first "
                                  "(prepared.cpu()). Tensors elsewhere:\n" + "\n".join(off_cpu))
    supported = [shape for shape in _DOCUMENTED_KERNEL_SHAPES if block_shape_supported(engine, shape)]
    kernel, bad = {}, []
    for site in sites:
        shape = _kernel_shape(site.block_shape, supported)
        if shape is None:
            bad.append(f"  '{site.tensor_fqn}': sparse_block_shape={site.block_shape}")
        kernel[site.node.name] = shape
    if bad:
        failing = [shape for shape in _DOCUMENTED_KERNEL_SHAPES if shape not in supported]
        raise SparsityConfigError(
            f"the {kind} sparse-quantized kernel ({engine} engine) of this torch build runs only block shapes "
            f"{supported} (and shapes they tile, e.g. (4, 4) over (1, 4))"
            + (f"; torch also documents {failing}, which fail to run here" if failing else "")
            + ". Layers with other shapes:\n" + "\n".join(bad)
            + f"\nSparsify them with sparse_block_shape={supported[0] if supported else (1, 4)}, "
              f"or lower them with another mapping.")
    return kernel


def _drop_observers(gm: fx.GraphModule) -> None:
    """Take torch.ao observers (e.g. Wanda's activation statistics) out: a lowered module only infers."""
    from torch.ao.quantization.observer import ObserverBase

    fqns = {n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ObserverBase)}
    if fqns:
        remove_observers(gm, fqns)


def _call(gm: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        gm(**batch)
    elif isinstance(batch, (tuple, list)):
        gm(*batch)
    else:
        gm(batch)


def _calibrate(gm: fx.GraphModule, sites: list[SparseLinear], calibration_data) -> dict[str, tuple]:
    """Observe inputs/outputs of the sparse linears over the calibration data; ``{node: qparams}``."""
    from torch.ao.quantization import get_default_qconfig

    qconfig = get_default_qconfig(STATIC_ENGINE)
    observed = observe_linears(gm, [s.node.name for s in sites], qconfig.activation)
    fqns = {o.input for o in observed.values()} | {o.output for o in observed.values()}
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()  # calibrate what inference will see (no dropout, frozen norms)
        batches = 0
        with torch.no_grad():
            for batch in calibration_data:
                _call(gm, batch)
                batches += 1
        if batches == 0:
            raise SparsityConfigError("calibration_data is empty: the static mapping needs at least one batch of "
                                      "inputs to choose activation scales, e.g. calibration_data=[(x,), ...]")
        qparams = {}
        for fqn in fqns:
            observer = gm.get_submodule(fqn)
            scale, zero_point = observer.calculate_qparams()
            qparams[fqn] = (float(scale), int(zero_point), observer.dtype)
    finally:
        remove_observers(gm, fqns)
        for module, training in modes.items():
            module.training = training
    return {name: (qparams[o.input], qparams[o.output]) for name, o in observed.items()}


def _dynamic_builder(kernel: dict[str, tuple[int, int]]) -> Builder:
    cache: dict[tuple, nn.Module] = {}

    def build(site, weight, mask, bias):
        key = (site.tensor_fqn, None if bias is None else bias.data_ptr())  # one module per weight used twice
        if key not in cache:
            cache[key] = SparseQuantizedDynamicLinear.from_masked(
                weight, mask, bias, sparse_block_shape=kernel[site.node.name])
        return cache[key]

    return build


def _static_builder(kernel: dict[str, tuple[int, int]], qparams: dict[str, tuple]) -> Builder:
    def build(site, weight, mask, bias):
        _, (out_scale, out_zero_point, _) = qparams[site.node.name]
        return SparseQuantizedLinear.from_masked(weight, mask, bias, sparse_block_shape=kernel[site.node.name],
                                                 output_scale=out_scale, output_zero_point=out_zero_point)

    return build


def _masked_builder(target: type, kernel: dict[str, tuple[int, int]]) -> Builder:
    cache: dict[tuple, nn.Module] = {}

    def build(site, weight, mask, bias):
        key = (site.tensor_fqn, None if bias is None else bias.data_ptr())
        if key not in cache:
            cache[key] = target.from_masked(weight, mask, bias, sparse_block_shape=kernel[site.node.name])
        return cache[key]

    return build


def _convert_auto(prepared: fx.GraphModule, *, example_inputs: Any, max_rel_error: float,
                  inplace: bool) -> fx.GraphModule:
    # mapping="auto" (per-layer timing of the float sparse targets) plugs in here.
    from .auto_lowering import convert_auto

    return convert_auto(prepared, example_inputs=example_inputs, max_rel_error=max_rel_error, inplace=inplace)


def convert_fx_sparse(prepared: fx.GraphModule, mapping: Mapping[type, type] | str | None = None, *,
                      calibration_data: Any = None, example_inputs: Any = None, max_rel_error: float = 1e-4,
                      inplace: bool = False) -> fx.GraphModule:
    """Rewrite every Linear over a sparse weight into a ``call_module`` of the mapped target.

    ``prepared`` is what ``prepare_fx_sparse`` returned, with masks still in the graph or
    squashed (``sparsifier.squash_mask()``). The mapping is a dict ``{nn.Linear: target}``:

    - ``None`` / ``get_dynamic_sparse_quantized_mapping()``: int8 weights, activations
      quantized per call; float in, float out.
    - ``get_static_sparse_quantized_mapping()``: int8 weights and activations, with
      activation scales observed over ``calibration_data`` (an iterable of input tuples);
      consecutive lowered linears with only relus/identity dropouts between them stay
      quantized in between.
    - a class with ``from_masked(weight, mask, bias, *, sparse_block_shape)``.

    Each group's ``sparse_block_shape`` becomes the kernel's block size (a shape the kernel
    blocks tile, e.g. (4, 4) over (1, 4), is run with the kernel's). The lowered modules
    give the right answer whatever ``torch.backends.quantized.engine`` is and leave it as
    they found it. torch.ao observers left in the graph (Wanda's activation statistics)
    are taken out, as torch.ao's ``convert`` drops them. ``prepared`` is left as it was
    unless ``inplace=True``.
    ``example_inputs`` and ``max_rel_error`` are for ``mapping="auto"``.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"convert_fx_sparse lowers the GraphModule returned by prepare_fx_sparse (or "
                        f"sparsifier.squash_mask()), got {type(prepared).__name__}")
    if isinstance(mapping, str):
        if mapping == "auto":
            return _convert_auto(prepared, example_inputs=example_inputs, max_rel_error=max_rel_error,
                                 inplace=inplace)
        raise SparsityConfigError(f"mapping={mapping!r}: use a dict such as get_dynamic_sparse_quantized_mapping(), "
                                  f"None (dynamic), or 'auto'")
    target = _target_for_linear(get_dynamic_sparse_quantized_mapping() if mapping is None else mapping)
    kind = _kind(target)
    if kind == "static":
        if calibration_data is None:
            raise SparsityConfigError(
                "the static sparse-quantized mapping needs calibration_data: an iterable of input tuples, "
                "drawn like the inputs the model will see, e.g. calibration_data=[(x,) for x in batches]; "
                "the activation scales are chosen from them")
        if isinstance(calibration_data, torch.Tensor):
            raise SparsityConfigError("calibration_data is one tensor; pass an iterable of input tuples, "
                                      "e.g. calibration_data=[(x,)]")

    shapes = sparse_block_shapes(prepared)
    sites = find_sparse_linears(prepared, shapes, DEFAULT_BLOCK_SHAPE)
    kernel = _check_sites(sites, kind)
    if not sites:
        warnings.warn("convert_fx_sparse: no Linear over a sparse weight in this module; nothing was lowered",
                      stacklevel=2)

    gm = prepared if inplace else copy.deepcopy(prepared)
    if sites:
        _drop_observers(gm)  # as torch.ao's convert drops activation_post_process
    if kind == "static" and sites:
        sites = find_sparse_linears(gm, shapes, DEFAULT_BLOCK_SHAPE)
        qparams = _calibrate(gm, sites, calibration_data)
        build = _static_builder(kernel, qparams)
    elif kind == "dynamic":
        build = _dynamic_builder(kernel)
    elif kind == "masked":
        build = _masked_builder(target, kernel)
    else:
        build = None
    if build is None:
        return gm

    lowering = LowerSparseLinears(build, shapes, DEFAULT_BLOCK_SHAPE)
    lowering(gm)
    if kind == "static":
        QuantizeBoundaries({lowered.node.name: qparams[lowered.linear_name][0] for lowered in lowering.lowered})(gm)
        FoldRequantize()(gm)
    warn_kept_dense(lowering, stacklevel=3)
    return gm


def warn_kept_dense(lowering: LowerSparseLinears, stacklevel: int) -> None:
    """Say which lowered weights something else still reads (their dense copy stays)."""
    for tensor_fqn, readers in lowering.kept_dense.items():
        warnings.warn(f"convert_fx_sparse: '{tensor_fqn}' is also read by {readers}, so its dense weight (and "
                      f"mask) stay in the module next to the lowered copy; memory does not drop for it",
                      stacklevel=stacklevel)
