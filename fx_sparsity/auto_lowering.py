"""``convert_fx_sparse(prepared, mapping="auto", example_inputs=...)``: the fastest kernel per layer.

For each sparse Linear, the input it receives from ``example_inputs`` is recorded (an
``Interpreter`` run of the prepared module), then the candidates are timed on that very
input, round-robin, a few rounds; a candidate's speedup is the median over rounds of
dense time / its time in the same round (load changes between rounds cancel out):

- ``dense``: ``nn.Linear`` holding weight·mask (what leaving the layer dense costs);
- ``csr``: :class:`~fx_sparsity.nn.SparseCSRLinear`;
- ``bsr<b>x<b>``: :class:`~fx_sparsity.nn.SparseBSRLinear` for square blocks ``b`` of 4, 8,
  16 and the group's own block when square, when ``b`` divides the weight and the stored
  blocks hold at most half of the weight (zeros inside a stored block cost time);
- ``int8`` (dense dynamic int8, x86 engine) and ``sparse_int8`` (the seed's
  ``torch.ao.nn.sparse.quantized.dynamic.Linear``, qnnpack): float32 weights only, and
  only when ``max_rel_error`` is at least :data:`INT8_ERROR_FLOOR`, since 8-bit weights do
  not get closer than that; their error on the recorded input must then be within it.

A sparse candidate wins only when it is at least :data:`MIN_SPEEDUP` times faster than
dense; otherwise, and on ties within noise, the layer stays dense. Every candidate's
output is checked against the float masked layer on the recorded input. The choice, the
timings and the speedup go into the lowered module's ``_fx_sparsity_info`` and the node's
``meta["sparsity"]``.
"""
from __future__ import annotations

import copy
import inspect
import statistics
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.nn.quantized.dynamic import Linear as _AoDynamicInt8Linear
from torch.ao.nn.quantized.modules.linear import LinearPackedParams as _AoLinearPackedParams

from .errors import SparsityConfigError
from .nn import SparseBSRLinear, SparseCSRLinear, sparse_kernel_available
from .quantized_engine import quantized_engine
from .timing import interleaved_times_ms

__all__ = ["LayerChoice", "choose_linear_lowering", "record_linear_inputs", "convert_auto",
           "DenseDynamicInt8Linear", "MIN_SPEEDUP", "INT8_ERROR_FLOOR"]

MIN_SPEEDUP = 1.05  # below this the difference is within timing noise: keep dense
INT8_ERROR_FLOOR = 1e-3  # relative error 8-bit weights cannot get under
_MAX_STORED_FRACTION = 0.5  # skip formats that would store (multiply) at least half the weight
_BSR_SIZES = (4, 8, 16)
_SAMPLE_S = 2e-4  # each timed sample runs the candidate for at least this long
_BUDGET_S = 0.05  # per layer: more rounds than `repeat` while within this time
_MAX_ROUNDS = 101
INT8_ENGINE = "x86"


# -- dense dynamic int8, pinned to its engine ------------------------------------------------

class _X86PackedParams(_AoLinearPackedParams):
    # torch.ao packs under the global engine, also when unpickling or loading a state dict;
    # a weight packed under qnnpack gives other numbers (it ignores reduce_range).
    def set_weight_bias(self, weight, bias) -> None:
        with quantized_engine(INT8_ENGINE):
            super().set_weight_bias(weight, bias)

    # The packed object would pickle itself and repack under the global engine: pickle the
    # quantized weight instead and pack it here.
    def __getstate__(self):
        state = super().__getstate__()
        state["_packed_params"] = self._weight_bias()
        return state

    def __setstate__(self, state):
        weight, bias = state.pop("_packed_params")
        super().__setstate__(state)
        self.set_weight_bias(weight, bias)


class DenseDynamicInt8Linear(_AoDynamicInt8Linear):
    """``torch.ao.nn.quantized.dynamic.Linear`` (int8 weight, dynamic activations) pinned to the x86 engine.

    Runs and (re)packs under ``x86`` whatever the global engine is, and restores it.
    """

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, dtype=torch.qint8):
        super().__init__(in_features, out_features, bias_, dtype=dtype)
        weight, bias = self._packed_params._weight_bias()
        self._packed_params = _X86PackedParams(dtype)
        self._packed_params.set_weight_bias(weight, bias)

    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, *,
                    sparse_block_shape=None) -> DenseDynamicInt8Linear:
        """Per-channel symmetric int8 weight of ``weight * mask`` (zeros stay exactly zero)."""
        masked = (weight.detach() * mask.detach()).float()
        scale = (masked.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny).double()
        qweight = torch.quantize_per_channel(masked, scale, torch.zeros_like(scale, dtype=torch.int64), 0,
                                             torch.qint8)
        module = cls(masked.shape[1], masked.shape[0], bias is not None)
        module.set_weight_bias(qweight, None if bias is None else bias.detach().float())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with quantized_engine(INT8_ENGINE):
            return super().forward(x)


# -- the choice for one layer ------------------------------------------------------------------

@dataclass
class LayerChoice:
    """What :func:`choose_linear_lowering` decided for one layer, and why."""

    choice: str  # candidate name: "dense", "csr", "bsr8x8", "int8", "sparse_int8"
    module: nn.Module
    speedup_vs_dense: float  # median over rounds of dense time / chosen time (1.0 for dense)
    rows: int  # input rows the timing used (batch × other leading dims)
    timings_ms: dict[str, float] = field(default_factory=dict)
    rel_errors: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not timed

    def info(self) -> dict[str, Any]:
        return {"auto_choice": self.choice, "speedup_vs_dense": round(self.speedup_vs_dense, 3),
                "timed_rows": self.rows,
                "candidates_ms": {k: round(v, 4) for k, v in self.timings_ms.items()},
                "rel_error": self.rel_errors.get(self.choice, 0.0),
                **({"not_timed": dict(self.skipped)} if self.skipped else {})}


def _dense_module(masked: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    module = nn.Linear(masked.shape[1], masked.shape[0], bias=bias is not None, device=masked.device,
                       dtype=masked.dtype)
    with torch.no_grad():
        module.weight.copy_(masked)
        if bias is not None:
            module.bias.copy_(bias)
    module._fx_sparsity_info = {"lowered_to": "Linear", "format": "dense"}
    return module


def _stored_fraction(pattern: torch.Tensor, b: int) -> float:
    rows, cols = pattern.shape
    return pattern.reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1).float().mean().item()


def _candidates(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                sparse_block_shape: tuple[int, int] | None, max_rel_error: float
                ) -> tuple[dict[str, Callable[[], nn.Module]], dict[str, str]]:
    masked = weight * mask.to(weight.dtype)
    pattern = masked != 0
    density = pattern.float().mean().item()
    rows, cols = masked.shape
    build: dict[str, Callable[[], nn.Module]] = {"dense": lambda: _dense_module(masked, bias)}
    skipped: dict[str, str] = {}
    if not sparse_kernel_available(torch.sparse_csr, masked.dtype, masked.device):
        skipped["csr"] = skipped["bsr"] = f"no {masked.device.type} sparse kernel for {masked.dtype}"
    elif density > _MAX_STORED_FRACTION:
        skipped["csr"] = skipped["bsr"] = f"{density:.0%} of the weight is nonzero"
    else:
        build["csr"] = lambda: SparseCSRLinear.from_masked(weight, mask, bias, sparse_block_shape=sparse_block_shape)
        sizes = set(_BSR_SIZES)
        if sparse_block_shape is not None and sparse_block_shape[0] == sparse_block_shape[1] > 1:
            sizes.add(int(sparse_block_shape[0]))  # 1x1 blocks: CSR does the same with less overhead
        for b in sorted(sizes):
            name = f"bsr{b}x{b}"
            if rows % b or cols % b:
                continue  # not a candidate for this shape; not worth a line in the record
            stored = _stored_fraction(pattern, b)
            if stored > _MAX_STORED_FRACTION:
                skipped[name] = f"{b}x{b} blocks would store {stored:.0%} of the weight"
                continue
            build[name] = lambda b=b: SparseBSRLinear.from_masked(weight, mask, bias, sparse_block_shape=(b, b))
    if masked.dtype != torch.float32:
        skipped["int8"] = skipped["sparse_int8"] = f"int8 kernels take float32 weights, this one is {masked.dtype}"
    elif max_rel_error < INT8_ERROR_FLOOR:
        skipped["int8"] = skipped["sparse_int8"] = (
            f"max_rel_error={max_rel_error:g} is below what int8 weights reach (~{INT8_ERROR_FLOOR:g})")
    else:
        build["int8"] = lambda: DenseDynamicInt8Linear.from_masked(weight, mask, bias)
        from .quantized_engine import DYNAMIC_ENGINE, SparseQuantizedDynamicLinear, block_shape_supported

        block = tuple(sparse_block_shape) if sparse_block_shape is not None else (1, 4)
        block = block if block_shape_supported(DYNAMIC_ENGINE, block) else (1, 4)
        build["sparse_int8"] = lambda: SparseQuantizedDynamicLinear.from_masked(
            weight, mask, bias, sparse_block_shape=block)
    return build, skipped


def _time(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, one short sample per round, round-robin over the fns.

    Short samples, many rounds: a sample preempted by another process is an outlier the
    median drops, where a long sample would carry the stall in all of its calls.
    """
    times = interleaved_times_ms(fns, warmup=1, repeat=repeat, number=None, min_sample_ms=_SAMPLE_S * 1e3,
                                 budget_s=_BUDGET_S, max_rounds=_MAX_ROUNDS)
    return {name: [t / 1e3 for t in samples] for name, samples in times.items()}


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64, out64 = ref.double(), out.double()
    scale = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    return err / scale if scale > 0 else err


def choose_linear_lowering(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                           x: torch.Tensor, *, sparse_block_shape: tuple[int, int] | None = None,
                           max_rel_error: float = 1e-4, repeat: int = 7,
                           min_speedup: float = MIN_SPEEDUP) -> LayerChoice:
    """Time the candidates for ``F.linear(x, weight * mask, bias)`` on ``x`` and keep the fastest.

    Candidates whose output differs from the float masked layer by more than
    ``max_rel_error`` (relative Frobenius norm) are dropped; a sparse one must beat dense
    by ``min_speedup``. The returned module carries the record in ``_fx_sparsity_info``.
    """
    if max_rel_error < 0:
        raise ValueError(f"max_rel_error must be >= 0, got {max_rel_error}")
    weight, mask = weight.detach(), mask.detach()
    bias = None if bias is None else bias.detach()
    builders, skipped = _candidates(weight, mask, bias, sparse_block_shape, max_rel_error)
    x = x.detach()
    # Modules are built under no_grad only: inference-mode tensors could not be used with autograd later.
    with torch.no_grad():
        ref = F.linear(x, weight * mask.to(weight.dtype), bias)
        modules, errors = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # beta-state and deprecation notices of the candidate kernels
            for name, build in builders.items():
                try:
                    module = build().eval()
                    errors[name] = _rel_error(module(x), ref)
                except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
                    if name == "dense":
                        raise
                    skipped[name] = f"failed: {str(e).splitlines()[0]}"
                    continue
                if errors[name] > max_rel_error and name != "dense":
                    skipped[name] = f"relative error {errors[name]:.2g} > max_rel_error={max_rel_error:g}"
                    continue
                modules[name] = module
            with torch.inference_mode():
                samples = _time({name: (lambda m=m: m(x)) for name, m in modules.items()}, repeat)
    timings = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    # Speedups are medians of same-round ratios: a load change between rounds cancels out.
    speedups = {name: statistics.median(d / c for d, c in zip(samples["dense"], s)) for name, s in samples.items()}
    speedups["dense"] = 1.0
    best = max((n for n in speedups if n != "dense"), key=speedups.__getitem__, default=None)
    if best is None or speedups[best] < min_speedup:
        best = "dense"
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    choice = LayerChoice(best, modules[best], speedups[best], rows, timings,
                         {n: errors[n] for n in modules}, skipped)
    module = choice.module
    module._fx_sparsity_info = {**getattr(module, "_fx_sparsity_info", {}), **choice.info()}
    return choice


# -- the graph -------------------------------------------------------------------------------

def _flat_inputs(gm: fx.GraphModule, example_inputs: Any) -> list:
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    codegen = gm.graph._codegen
    in_spec = getattr(getattr(codegen, "pytree_info", None), "in_spec", None)
    if in_spec is not None:  # torch.export graphs take the flattened (args, kwargs)
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((args, kwargs), in_spec))
    if kwargs:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())
    return list(args)


class _InputRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node]):
        super().__init__(gm)
        self.nodes, self.values = nodes, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.nodes:
            self.values[n] = out
        return out


def record_linear_inputs(gm: fx.GraphModule, nodes: list[fx.Node], example_inputs: Any) -> dict[fx.Node, torch.Tensor]:
    """The value each of ``nodes`` takes when ``gm`` runs on ``example_inputs`` (in eval mode, no grad)."""
    recorder = _InputRecorder(gm, set(nodes))
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            recorder.run(*_flat_inputs(gm, example_inputs), enable_io_processing=False)
    finally:
        for module, training in modes.items():
            module.training = training
    missing = [n.name for n in nodes if not isinstance(recorder.values.get(n), torch.Tensor)]
    if missing:
        raise SparsityConfigError(f"running example_inputs through the module gave no tensor input for the "
                                  f"linear(s) fed by {missing}; pass inputs that reach every sparse layer")
    return recorder.values


def convert_auto(prepared: fx.GraphModule, *, example_inputs: Any, max_rel_error: float = 1e-4,
                 inplace: bool = False, repeat: int = 7) -> fx.GraphModule:
    """``convert_fx_sparse(prepared, "auto", ...)``: lower each sparse Linear to its fastest candidate."""
    from .lowering import DEFAULT_BLOCK_SHAPE, LowerSparseLinears, _check_sites, find_sparse_linears, sparse_block_shapes

    if example_inputs is None:
        raise SparsityConfigError(
            "mapping='auto' times each layer on its real input: pass example_inputs=(x,), a batch like the ones "
            "the model will serve (its batch size is the one the choice is made for)")
    if not isinstance(max_rel_error, (int, float)) or max_rel_error < 0:
        raise SparsityConfigError(f"max_rel_error must be a number >= 0, got {max_rel_error!r}")
    shapes = sparse_block_shapes(prepared)
    sites = find_sparse_linears(prepared, shapes, DEFAULT_BLOCK_SHAPE)
    _check_sites(sites, "masked")
    if not sites:
        warnings.warn("convert_fx_sparse: no Linear over a sparse weight in this module; nothing was lowered",
                      stacklevel=3)
    gm = prepared if inplace else copy.deepcopy(prepared)
    sites = find_sparse_linears(gm, shapes, DEFAULT_BLOCK_SHAPE)
    inputs = record_linear_inputs(gm, [s.input for s in sites], example_inputs)
    own_info: dict[str, dict] = {}

    def build(site, weight, mask, bias):
        choice = choose_linear_lowering(weight, mask, bias, inputs[site.input], sparse_block_shape=site.block_shape,
                                        max_rel_error=max_rel_error, repeat=repeat)
        own_info[site.node.name] = dict(choice.module._fx_sparsity_info)
        return choice.module

    lowering = LowerSparseLinears(build, shapes, DEFAULT_BLOCK_SHAPE)
    lowering(gm)
    for lowered in lowering.lowered:
        # The pass writes its own record (tensor_fqn, ...); the format and the choice stay under it.
        module = gm.get_submodule(lowered.module_fqn)
        module._fx_sparsity_info = {**own_info[lowered.linear_name], **lowered.info}
        lowered.info = module._fx_sparsity_info
        lowered.node.meta["sparsity"] = dict(module._fx_sparsity_info)
    from .lowering import warn_kept_dense  # lowering imports this module lazily; no cycle at import time

    warn_kept_dense(lowering, stacklevel=5)  # the user's convert_fx_sparse call
    return gm
