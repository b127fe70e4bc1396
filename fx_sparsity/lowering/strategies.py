"""Lowering strategies: how one mapping turns the sparse linears of a graph into modules.

``convert_fx_sparse`` runs one loop for every strategy: find the sparse linears,
:meth:`~LoweringStrategy.check` them (before anything changes), let the strategy
:meth:`~LoweringStrategy.observe` the graph on the user's inputs (in eval mode), rewrite
each linear into ``strategy.build(...)`` (:class:`~fx_sparsity.passes.LowerSparseLinears`),
then :meth:`~LoweringStrategy.finish`. Which strategy a name or a mapping dict gets is the
registry's business (:mod:`fx_sparsity.lowering.targets`): a registered target's ``build``
runs through :class:`~fx_sparsity.lowering.targets.TargetStrategy`, and the built-ins that
need the whole graph (``dynamic``, ``static``, ``semi_structured``, ``auto``) are the classes here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn
from torch.ao.quantization import get_default_qconfig
from torch.ao.quantization.observer import ObserverBase

from ..errors import SparsityConfigError
from ..inputs import call_with
from ..nn import SemiStructuredSparseLinear
from ..nn.quantized import (
    DYNAMIC_ENGINE,
    STATIC_ENGINE,
    SparseQuantizedDynamicLinear,
    SparseQuantizedLinear,
    block_shape_supported,
)
from ..nn.semi_structured import semi_structured_problem
from ..passes import (
    FoldRequantize,
    LowerSparseLinears,
    QuantizeBoundaries,
    SparseLinear,
    fetch_attr,
    observe_linears,
    remove_observers,
    run_passes,
)

__all__ = ["LoweringOptions", "LoweringStrategy", "DynamicQuantized", "StaticQuantized", "FromMasked", "FromDense",
           "SemiStructured"]

# Block shapes torch documents for its sparse kernels; which of them work is measured per build.
_DOCUMENTED_KERNEL_SHAPES = ((1, 4), (8, 1))


@dataclass
class LoweringOptions:
    """The keyword arguments of ``convert_fx_sparse`` that strategies may need."""

    calibration_data: Any = None
    example_inputs: Any = None
    max_rel_error: float = 1e-4


class LoweringStrategy:
    """One way to lower sparse linears. Subclasses implement :meth:`make`; the rest is optional.

    ``shares_modules``: a weight read by several linears (tied, or called twice) gets one
    module that every site calls.
    """

    name = ""
    shares_modules = True

    def __init__(self, options: LoweringOptions):
        self.options = options
        self._made: dict[tuple, nn.Module] = {}

    def check(self, sites: list[SparseLinear]) -> None:
        """Refuse, naming each layer, what this strategy cannot lower. Runs before anything changes."""
        problems = [f"  '{s.tensor_fqn}' (node {s.node.name}): {s.problem}" for s in sites if s.problem]
        if problems:
            raise SparsityConfigError("these sparse Linear layers cannot be lowered:\n" + "\n".join(problems))

    def observe(self, gm: fx.GraphModule, sites: list[SparseLinear]) -> None:
        """Run the user's inputs through ``gm`` (in eval mode, no grad) if the strategy needs to."""

    def make(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
             bias: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    def build(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
              bias: torch.Tensor | None) -> nn.Module:
        if not self.shares_modules:
            return self.make(site, weight, mask, bias)
        key = (site.tensor_fqn, None if bias is None else bias.data_ptr())
        if key not in self._made:
            self._made[key] = self.make(site, weight, mask, bias)
        return self._made[key]

    def finish(self, gm: fx.GraphModule, lowering: LowerSparseLinears) -> None:
        """Anything left to do once every linear is rewritten."""


def _kernel_shape(block_shape: tuple[int, int], supported: list[tuple[int, int]]) -> tuple[int, int] | None:
    """A kernel block shape whose blocks tile ``block_shape``: its zero blocks are then zero kernel blocks."""
    rows, cols = block_shape
    for r, c in supported:
        if rows % r == 0 and cols % c == 0:
            return (r, c)
    return None


class _SparseQuantized(LoweringStrategy):
    """torch.ao's sparse-quantized kernels: CPU only, and only the block shapes this build runs."""

    engine = ""

    def check(self, sites: list[SparseLinear]) -> None:
        super().check(sites)
        tensors = {s.node.name: fetch_attr(s.node.graph.owning_module, s.weight.target) for s in sites}
        off_cpu = [f"  '{s.tensor_fqn}' on {tensors[s.node.name].device}" for s in sites
                   if tensors[s.node.name].device.type != "cpu"]
        if off_cpu:
            raise SparsityConfigError("the sparse-quantized kernels run on CPU only; move the module first "
                                      "(prepared.cpu()). Tensors elsewhere:\n" + "\n".join(off_cpu))
        supported = [shape for shape in _DOCUMENTED_KERNEL_SHAPES if block_shape_supported(self.engine, shape)]
        self.kernel: dict[str, tuple[int, int]] = {}
        bad = []
        for site in sites:
            shape = _kernel_shape(site.block_shape, supported)
            if shape is None:
                bad.append(f"  '{site.tensor_fqn}': sparse_block_shape={site.block_shape}")
            else:
                self.kernel[site.node.name] = shape
        if bad:
            failing = [shape for shape in _DOCUMENTED_KERNEL_SHAPES if shape not in supported]
            raise SparsityConfigError(
                f"the {self.name} sparse-quantized kernel ({self.engine} engine) of this torch build runs only block "
                f"shapes {supported} (and shapes they tile, e.g. (4, 4) over (1, 4))"
                + (f"; torch also documents {failing}, which fail to run here" if failing else "")
                + ". Layers with other shapes:\n" + "\n".join(bad)
                + f"\nSparsify them with sparse_block_shape={supported[0] if supported else (1, 4)}, "
                  f"or lower them with another mapping.")


class DynamicQuantized(_SparseQuantized):
    """int8 weights, activations quantized per call (``torch.ao.nn.sparse.quantized.dynamic.Linear``)."""

    name = "dynamic"
    engine = DYNAMIC_ENGINE

    def make(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
             bias: torch.Tensor | None) -> nn.Module:
        return SparseQuantizedDynamicLinear.from_masked(weight, mask, bias,
                                                        sparse_block_shape=self.kernel[site.node.name])


class StaticQuantized(_SparseQuantized):
    """int8 weights and activations (``torch.ao.nn.sparse.quantized.Linear``), scales from calibration data.

    Consecutive lowered linears with only relus / identity dropouts between them stay
    quantized in between (:class:`~fx_sparsity.passes.FoldRequantize`).
    """

    name = "static"
    engine = STATIC_ENGINE
    shares_modules = False  # each call site has its own output scale

    def __init__(self, options: LoweringOptions):
        super().__init__(options)
        data = options.calibration_data
        if data is None:
            raise SparsityConfigError(
                "the static sparse-quantized mapping needs calibration_data: an iterable of input tuples, "
                "drawn like the inputs the model will see, e.g. calibration_data=[(x,) for x in batches]; "
                "the activation scales are chosen from them")
        if isinstance(data, torch.Tensor):
            raise SparsityConfigError("calibration_data is one tensor; pass an iterable of input tuples, "
                                      "e.g. calibration_data=[(x,)]")
        self.qparams: dict[str, tuple] = {}

    def observe(self, gm: fx.GraphModule, sites: list[SparseLinear]) -> None:
        """Observe inputs and outputs of the sparse linears over the calibration data."""
        observed = observe_linears(gm, [s.node.name for s in sites], get_default_qconfig(STATIC_ENGINE).activation)
        fqns = {o.input for o in observed.values()} | {o.output for o in observed.values()}
        try:
            batches = 0
            for batch in self.options.calibration_data:
                call_with(gm, batch)
                batches += 1
            if batches == 0:
                raise SparsityConfigError("calibration_data is empty: the static mapping needs at least one batch of "
                                          "inputs to choose activation scales, e.g. calibration_data=[(x,), ...]")
            by_fqn = {}
            for fqn in fqns:
                observer = cast(ObserverBase, gm.get_submodule(fqn))
                scale, zero_point = observer.calculate_qparams()
                by_fqn[fqn] = (float(scale), int(zero_point), observer.dtype)
        finally:
            remove_observers(gm, fqns=fqns)
        self.qparams = {name: (by_fqn[o.input], by_fqn[o.output]) for name, o in observed.items()}

    def make(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
             bias: torch.Tensor | None) -> nn.Module:
        _, (out_scale, out_zero_point, _) = self.qparams[site.node.name]
        return SparseQuantizedLinear.from_masked(weight, mask, bias, sparse_block_shape=self.kernel[site.node.name],
                                                 output_scale=out_scale, output_zero_point=out_zero_point)

    def finish(self, gm: fx.GraphModule, lowering: LowerSparseLinears) -> None:
        inputs = {lowered.node.name: self.qparams[lowered.linear_name][0] for lowered in lowering.lowered}
        run_passes(gm, QuantizeBoundaries(inputs), FoldRequantize())


class FromMasked(LoweringStrategy):
    """A target class with ``from_masked(weight, mask, bias, *, sparse_block_shape)`` (CSR, BSR, yours)."""

    target: type[Any] = nn.Module  # a class with from_masked (from_dense for FromDense)

    def __init__(self, options: LoweringOptions, target: type[Any] | None = None):
        super().__init__(options)
        if target is not None:
            self.target = target
        self.name = self.name or self.target.__name__

    def make(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
             bias: torch.Tensor | None) -> nn.Module:
        return self.target.from_masked(weight, mask, bias, sparse_block_shape=site.block_shape)


class FromDense(FromMasked):
    """A target class with torch.ao's ``from_dense(module)`` (what ``torch.ao.pruning``'s ``convert`` calls).

    It gets an ``nn.Linear`` holding weight·mask and the bias, with ``sparse_params``
    (``{"sparse_block_shape": ...}``), as torch.ao hands it the masked (parametrized) layer.
    """

    def make(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
             bias: torch.Tensor | None) -> nn.Module:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight * mask.to(weight.dtype))
            if bias is not None:
                linear.bias.copy_(bias)
        linear.sparse_params = {"sparse_block_shape": site.block_shape}  # type: ignore[assignment]
        return self.target.from_dense(linear)


class SemiStructured(FromMasked):
    """2:4 semi-structured weights (:class:`~fx_sparsity.nn.SemiStructuredSparseLinear`): CUDA, fp16/bf16."""

    name, target = "semi_structured", SemiStructuredSparseLinear

    def check(self, sites: list[SparseLinear]) -> None:
        super().check(sites)
        problems = []
        for site in sites:
            gm = site.node.graph.owning_module
            weight = fetch_attr(gm, site.weight.target)
            mask = fetch_attr(gm, site.mask.target) if site.mask is not None else (weight != 0)
            problem = semi_structured_problem(weight.detach() * mask.detach().to(weight.dtype))
            if problem is not None:
                problems.append(f"  '{site.tensor_fqn}': {problem}")
        if problems:
            raise SparsityConfigError("these sparse Linear layers cannot be stored 2:4 semi-structured:\n"
                                      + "\n".join(problems))

