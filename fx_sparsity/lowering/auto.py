"""``convert_fx_sparse(prepared, mapping="auto", example_inputs=...)``: the fastest kernel per layer.

For each sparse Linear, the input it receives from ``example_inputs`` is recorded (an
``Interpreter`` run of the prepared module), then the candidates are timed on that very
input, round-robin, a few rounds; a candidate's speedup is the median over rounds of
dense time / its time in the same round (load changes between rounds cancel out):

- every target of the registry registered with ``auto=True`` (:mod:`.targets`; the
  built-ins are in ``builtin_targets.py``) whose ``applies`` accepts the layer, each under
  its name: ``dense`` (``nn.Linear`` holding weight·mask: what leaving the layer dense
  costs), ``csr``, ``bsr4x4`` / ``bsr8x8`` / ``bsr16x16`` and ``bsr`` (the group's own
  block when square and not one of those), when the blocks divide the weight and store at
  most half of it (zeros inside a stored block cost time); ``2:4`` on CUDA for
  float16/bfloat16 weights whose mask is 2:4 (``NMSparsifier(2, 4)``); ``int8`` (dense
  dynamic int8, x86 engine) and ``sparse_int8`` (torch.ao's
  ``torch.ao.nn.sparse.quantized.dynamic.Linear``, qnnpack) for float32 weights, only when
  ``max_rel_error`` is at least :data:`INT8_ERROR_FLOOR`, since 8-bit weights do not get
  closer than that; and the user's own targets. Each skipped one is recorded with the reason.

A sparse candidate wins only when it is at least :data:`MIN_SPEEDUP` times faster than
dense; otherwise, and on ties within noise, the layer stays dense. Every candidate's
output is checked against the masked layer on the recorded input (see
:func:`choose_linear_lowering` for the bound). The choice, the
timings and the speedup go into the lowered module's ``fx_sparsity_info`` and the node's
``meta["sparsity"]``.
"""
from __future__ import annotations

import functools
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import SparsityConfigError
from ..inputs import graph_inputs
from ..passes import INFO_ATTR, LowerSparseLinears, SparseLinear
from ..timing import device_synchronizer, interleaved_times_ms
from .strategies import LoweringOptions, LoweringStrategy
from .targets import lowering_targets

__all__ = ["LayerChoice", "choose_linear_lowering", "record_linear_inputs", "Auto", "MIN_SPEEDUP",
           "INT8_ERROR_FLOOR"]

MIN_SPEEDUP = 1.05  # below this the difference is within timing noise: keep dense
INT8_ERROR_FLOOR = 1e-3  # relative error 8-bit weights cannot get under
_SAMPLE_S = 2e-4  # each timed sample runs the candidate for at least this long
_BUDGET_S = 0.05  # per layer: more rounds than `repeat` while within this time
_MAX_ROUNDS = 101


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


def _candidates(weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                sparse_block_shape: tuple[int, int] | None, max_rel_error: float, example: torch.Tensor | None = None
                ) -> tuple[dict[str, Callable[[], nn.Module]], dict[str, str]]:
    """``{name: make the module}`` of the auto targets that apply to this layer, and ``{name: why not}``."""
    masked = weight * mask.to(weight.dtype)
    build: dict[str, Callable[[], nn.Module]] = {}
    skipped: dict[str, str] = {}
    for name, target in lowering_targets().items():
        if not target.auto:
            continue
        verdict = target.verdict(masked, mask, sparse_block_shape=sparse_block_shape, max_rel_error=max_rel_error)
        if isinstance(verdict, str):
            skipped[name] = verdict
        elif verdict:
            build[name] = functools.partial(target.make, masked, bias, mask=mask,
                                            sparse_block_shape=sparse_block_shape, example=example)
    return build, skipped


def _time(fns: dict[str, Callable[[], object]], repeat: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, one short sample per round, round-robin over the fns.

    Short samples, many rounds: a sample preempted by another process is an outlier the
    median drops, where a long sample would carry the stall in all of its calls. On a GPU
    each sample waits for its kernels (else the clock measures launches).
    """
    times = interleaved_times_ms(fns, warmup=1, repeat=repeat, number=None, min_sample_ms=_SAMPLE_S * 1e3,
                                 budget_s=_BUDGET_S, max_rounds=_MAX_ROUNDS, synchronize=device_synchronizer(device))
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

    A candidate's error is the relative Frobenius norm of its output against the masked
    layer computed in float64. Candidates beyond ``max_rel_error`` are dropped, except
    that a layer is judged at the precision its dtype and device give: a candidate within
    twice the dense layer's own error passes too (dense float16 is ~1e-4 off, bfloat16 and
    TF32 ~1e-3). A sparse one must beat dense by ``min_speedup``. The returned module
    carries the record in ``fx_sparsity_info``.
    """
    if max_rel_error < 0:
        raise ValueError(f"max_rel_error must be >= 0, got {max_rel_error}")
    weight, mask, x = weight.detach(), mask.detach(), x.detach()
    bias = None if bias is None else bias.detach()
    builders, skipped = _candidates(weight, mask, bias, sparse_block_shape, max_rel_error, x)
    # Modules are built under no_grad only: inference-mode tensors could not be used with autograd later.
    with torch.no_grad():
        # float64: exact beside any float32 kernel, also where float32 matmuls run in TF32
        ref = F.linear(x.double(), (weight * mask.to(weight.dtype)).double(), None if bias is None else bias.double())
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
                allowed = max(max_rel_error, 2 * errors["dense"])
                if errors[name] > allowed and name != "dense":
                    dense_own = f", 2x the dense {weight.dtype} layer's own error" if allowed > max_rel_error else ""
                    skipped[name] = (f"relative error {errors[name]:.2g} > {allowed:.2g} "
                                     f"(max_rel_error={max_rel_error:g}{dense_own})")
                    continue
                try:  # once as it is timed, so that a module failing in inference mode is skipped, not fatal
                    with torch.inference_mode():
                        module(x)
                except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
                    if name == "dense":
                        raise
                    skipped[name] = f"failed in inference mode: {str(e).splitlines()[0]}"
                    continue
                modules[name] = module
            with torch.inference_mode():
                samples = _time({name: functools.partial(m, x) for name, m in modules.items()}, repeat, x.device)
    # Speedups are medians of same-round ratios: a load change between rounds cancels out. The times recorded are
    # dense's median over each candidate's speedup, the numbers the choice is made on (a median of ratios is not
    # a ratio of medians: raw medians could show dense ahead of the candidate chosen for being faster).
    speedups = {name: statistics.median(d / c for d, c in zip(samples["dense"], s)) for name, s in samples.items()}
    speedups["dense"] = 1.0
    dense_ms = statistics.median(samples["dense"]) * 1e3
    timings = {name: dense_ms / speedups[name] for name in samples}
    best = max((n for n in speedups if n != "dense"), key=speedups.__getitem__, default=None)
    if best is None or speedups[best] < min_speedup:
        best = "dense"
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    choice = LayerChoice(best, modules[best], speedups[best], rows, timings,
                         {n: errors[n] for n in modules}, skipped)
    module = choice.module
    setattr(module, INFO_ATTR, {**getattr(module, INFO_ATTR, {}), **choice.info()})
    return choice


# -- the graph -------------------------------------------------------------------------------

class _InputRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node]):
        super().__init__(gm)
        self.nodes = nodes
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.nodes:
            self.values[n] = out
        return out


def record_linear_inputs(gm: fx.GraphModule, nodes: list[fx.Node], example_inputs: Any) -> dict[fx.Node, torch.Tensor]:
    """The value each of ``nodes`` takes when ``gm`` runs on ``example_inputs`` (run it in eval mode, no grad)."""
    recorder = _InputRecorder(gm, set(nodes))
    recorder.run(*graph_inputs(gm, example_inputs), enable_io_processing=False)
    missing = [n.name for n in nodes if not isinstance(recorder.values.get(n), torch.Tensor)]
    if missing:
        raise SparsityConfigError(f"running example_inputs through the module gave no tensor input for the "
                                  f"linear(s) fed by {missing}; pass inputs that reach every sparse layer")
    return recorder.values


class Auto(LoweringStrategy):
    """``mapping="auto"``: each layer gets the candidate that times fastest on its real input."""

    name = "auto"
    repeat = 7

    def __init__(self, options: LoweringOptions):
        super().__init__(options)
        if options.example_inputs is None:
            raise SparsityConfigError(
                "mapping='auto' times each layer on its real input: pass example_inputs=(x,), a batch like the ones "
                "the model will serve (its batch size is the one the choice is made for)")
        error = options.max_rel_error
        if isinstance(error, bool) or not isinstance(error, (int, float)) or error < 0:
            raise SparsityConfigError(f"max_rel_error must be a number >= 0, got {error!r}")
        self.inputs: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict] = {}

    def observe(self, gm: fx.GraphModule, sites: list[SparseLinear]) -> None:
        values = record_linear_inputs(gm, [s.input for s in sites], self.options.example_inputs)
        self.inputs = {s.node.name: values[s.input] for s in sites}

    def make(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
             bias: torch.Tensor | None) -> nn.Module:
        choice = choose_linear_lowering(weight, mask, bias, self.inputs[site.node.name],
                                        sparse_block_shape=site.block_shape,
                                        max_rel_error=self.options.max_rel_error, repeat=self.repeat)
        self.records[site.node.name] = dict(getattr(choice.module, INFO_ATTR))
        return choice.module

    def finish(self, gm: fx.GraphModule, lowering: LowerSparseLinears) -> None:
        for lowered in lowering.lowered:
            # The pass writes its own record (tensor_fqn, ...); the format and the choice stay under it.
            module = gm.get_submodule(lowered.module_fqn)
            info = {**self.records[lowered.linear_name], **lowered.info}
            setattr(module, INFO_ATTR, info)
            lowered.info = info
            lowered.node.meta["sparsity"] = dict(info)

