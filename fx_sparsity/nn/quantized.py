"""torch.ao's quantized Linears (sparse and dense int8), made to run whatever the global quantized engine is.

Measured on torch 2.13 (x86 CPU), torch.ao's modules as they ship:

- the dynamic kernel exists only under the ``qnnpack`` engine, the static one only under
  ``fbgemm``; a packed weight belongs to the engine it was packed under (a weight packed
  under fbgemm fails inside the qnnpack kernel), and the default engine, ``x86``, has
  neither ("Didn't find engine");
- the dynamic Linear cannot load its own ``state_dict`` (it parses ``op_type`` with
  ``int()``), and the static one pops an ``op_type`` key it never saves;
- pickling a module packs again under the *global* engine ("Unknown qengine" under x86),
  and the unpickled packed-params module has lost its ``nn.Module`` state;
- the qnnpack dynamic kernel recomputes its requantization scales only when the input
  scale differs from the scale of the *first* call, and never updates that reference:
  an input whose scale equals the first call's, seen after inputs of other scales, is
  computed with stale scales (relative errors of 17% to 980% measured). Priming each packed weight
  with one call at a scale no real input has works around it.

The classes below subclass torch.ao's (``isinstance`` holds, same packed op, same
numbers) and fix all of that: each module switches to its engine around its own calls
and restores the caller's setting, saves plain quantized tensors, and packs again under
its own engine when loaded or unpickled.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as _AoDynamicInt8Linear
from torch.ao.nn.quantized.modules.linear import LinearPackedParams as _AoLinearPackedParams
from torch.ao.nn.sparse.quantized import Linear as _AoStaticLinear
from torch.ao.nn.sparse.quantized.dynamic import Linear as _AoDynamicLinear
from torch.ao.nn.sparse.quantized.linear import LinearPackedParams as _AoPackedParams

__all__ = [
    "quantized_engine",
    "SparseQuantizedDynamicLinear",
    "SparseQuantizedLinear",
    "DYNAMIC_ENGINE",
    "STATIC_ENGINE",
    "block_shape_supported",
    "quantize_weight",
    "DenseDynamicInt8Linear",
    "INT8_ENGINE",
]

DYNAMIC_ENGINE = "qnnpack"
STATIC_ENGINE = "fbgemm"
INT8_ENGINE = "x86"  # dense dynamic int8 (a candidate of mapping="auto")


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` to ``name`` inside the block, then restore it.

    The setting is process-global: modules using this must not be called from several
    threads at once with different engines.
    """
    previous = torch.backends.quantized.engine
    if previous == name:
        yield
        return
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def quantize_weight(weight: torch.Tensor, observer: Any) -> torch.Tensor:
    """Quantize ``weight`` to qint8 with the qparams ``observer`` computes for it (torch.ao's rule)."""
    weight = weight.detach().float()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    if torch.any(zero_point != 0):
        raise ValueError(f"the sparse kernels need symmetric weights (zero point 0); {type(observer).__name__} "
                         f"gave zero points {zero_point.tolist()}")
    if observer.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        return torch.quantize_per_channel(weight, scale.to(torch.double), zero_point.to(torch.int64),
                                          observer.ch_axis, torch.qint8)
    return torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)


def _empty_qweight(out_features: int, in_features: int) -> torch.Tensor:
    return torch.quantize_per_tensor(torch.zeros(out_features, in_features), 1.0, 0, torch.qint8)


# The packed weights are TorchScript objects dynamo cannot trace: say so, instead of dynamo's
# "Failed to convert args/kwargs to proxy", and run the kernel eagerly between compiled graphs.
_NOT_COMPILABLE = ("fx_sparsity: torch.ao's sparse-quantized kernels cannot be compiled (TorchScript packed "
                   "weights); they run eagerly between graphs. For fullgraph=True, compile the prepared or "
                   "squashed float module, or lower with get_sparse_csr_mapping() / mapping='auto'.")


class _EnginePackedParams(_AoPackedParams):
    """torch.ao's sparse packed params, packed under a fixed engine rather than the global one."""

    def __init__(self, engine: str, row_block_size: int = 1, col_block_size: int = 4, dtype=torch.qint8):
        nn.Module.__init__(self)
        if dtype != torch.qint8:
            raise NotImplementedError("sparse quantized Linear weights are qint8 only")
        self.engine = engine
        self.dtype = dtype
        self.set_weight_bias(_empty_qweight(1, 4), None, row_block_size, col_block_size)

    def set_weight_bias(self, weight, bias, row_block_size, col_block_size) -> None:
        if row_block_size is None or col_block_size is None:
            raise ValueError("row_block_size and col_block_size are required")
        with quantized_engine(self.engine):
            self._packed_params = torch.ops.sparse.qlinear_prepack(weight, bias, row_block_size, col_block_size)
            if self.engine == DYNAMIC_ENGINE:
                self._prime(weight.shape[1])

    def _prime(self, in_features: int) -> None:
        # One call whose input scale no real input reaches becomes the kernel's reference
        # scale, so every later call recomputes its requantization scales (see module doc).
        probe = torch.zeros(1, in_features)
        probe[0, 0] = torch.finfo(torch.float32).max
        torch.ops.sparse.qlinear_dynamic(probe, self._packed_params)

    def _weight_bias(self):
        weight, bias, block_sizes = torch.ops.sparse.qlinear_unpack(self._packed_params)
        return weight, bias, int(block_sizes[0]), int(block_sizes[1])

    # Pickle plain quantized tensors, pack again under our engine when unpickled.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed_params"] = self._weight_bias()
        return state

    def __setstate__(self, state):
        packed = state.pop("_packed_params")
        nn.Module.__setstate__(self, state)  # fills attributes a module saved by another torch lacks
        self.set_weight_bias(*packed)

    def __repr__(self):
        weight, bias, rows, cols = self._weight_bias()
        return f"{self._get_name()}(engine={self.engine!r}, weight={tuple(weight.shape)}, block=({rows}, {cols}))"


def _pop_qparam(state_dict, key, missing_keys, cast):
    if key not in state_dict:
        missing_keys.append(key)
        return None
    return cast(state_dict.pop(key))


class SparseQuantizedDynamicLinear(_AoDynamicLinear):
    """``torch.ao.nn.sparse.quantized.dynamic.Linear`` that runs under any global engine.

    Float input and output of any shape ``(*, in_features)``; the weight is per-tensor
    symmetric qint8 (zero point 0, as the kernel requires), the activation is quantized
    per call. Runs under ``qnnpack`` and restores the caller's engine.
    """

    engine = DYNAMIC_ENGINE

    def __init__(self, in_features: int, out_features: int, row_block_size: int = 1, col_block_size: int = 4,
                 bias: bool = True, dtype=torch.qint8):
        nn.Module.__init__(self)
        if dtype != torch.qint8:
            raise NotImplementedError("Only QINT8 is supported for Sparse Quantized Linear Dynamic")
        self.in_features, self.out_features = in_features, out_features
        self._packed_params = _EnginePackedParams(self.engine, row_block_size, col_block_size, dtype)
        self._packed_params.set_weight_bias(_empty_qweight(out_features, in_features),
                                            torch.zeros(out_features) if bias else None,
                                            row_block_size, col_block_size)

    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, *,
                    sparse_block_shape: tuple[int, int], weight_observer: nn.Module | None = None):
        """Build from a dense weight and its mask; the weight is quantized as torch.ao's ``from_float`` does."""
        if weight_observer is None:
            from torch.ao.quantization import default_dynamic_qconfig

            weight_observer = default_dynamic_qconfig.weight()
        qweight = quantize_weight(weight * mask, weight_observer)
        rows, cols = sparse_block_shape
        module = cls(weight.shape[1], weight.shape[0], rows, cols, bias=bias is not None)
        module.set_weight_bias(qweight, None if bias is None else bias.detach().float(), rows, cols)
        return module

    @torch.compiler.disable(reason=_NOT_COMPILABLE)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        dtype = x.dtype
        with quantized_engine(self.engine):
            out = torch.ops.sparse.qlinear_dynamic(x.float(), self._packed_params._packed_params)
        return out if dtype == torch.float32 else out.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        op_type = state_dict.pop(prefix + "op_type", self._op_type)
        if op_type != self._op_type:
            error_msgs.append(f"{prefix}op_type is {op_type!r}, expected {self._op_type!r}")
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)


class SparseQuantizedLinear(_AoStaticLinear):
    """``torch.ao.nn.sparse.quantized.Linear`` that runs under any global engine.

    Quantized (``quint8``) input and output; ``scale``/``zero_point`` are the output's.
    Runs under ``fbgemm`` and restores the caller's engine.
    """

    engine = STATIC_ENGINE

    def __init__(self, in_features: int, out_features: int, row_block_size: int = 1, col_block_size: int = 4,
                 bias: bool = True, dtype=torch.qint8):
        nn.Module.__init__(self)
        if dtype != torch.qint8:
            raise NotImplementedError("Only QINT8 is supported for Sparse Quantized Linear")
        self.in_features, self.out_features = in_features, out_features
        self._packed_params = _EnginePackedParams(self.engine, row_block_size, col_block_size, dtype)
        self._packed_params.set_weight_bias(_empty_qweight(out_features, in_features),
                                            torch.zeros(out_features) if bias else None,
                                            row_block_size, col_block_size)
        self.scale = 1.0
        self.zero_point = 0

    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, *,
                    sparse_block_shape: tuple[int, int], output_scale: float, output_zero_point: int,
                    weight_observer: nn.Module | None = None):
        """Build from a dense weight, its mask and the output qparams; weights as torch.ao's ``from_float``."""
        if weight_observer is None:
            from torch.ao.quantization import get_default_qconfig

            weight_observer = get_default_qconfig(STATIC_ENGINE).weight()
        qweight = quantize_weight(weight * mask, weight_observer)
        rows, cols = sparse_block_shape
        module = cls(weight.shape[1], weight.shape[0], rows, cols, bias=bias is not None)
        module.set_weight_bias(qweight, None if bias is None else bias.detach().float(), rows, cols)
        module.scale, module.zero_point = float(output_scale), int(output_zero_point)
        return module

    @torch.compiler.disable(reason=_NOT_COMPILABLE)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        with quantized_engine(self.engine):
            return torch.ops.sparse.qlinear(x, self._packed_params._packed_params, self.scale, self.zero_point)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        scale = _pop_qparam(state_dict, prefix + "scale", missing_keys, float)
        zero_point = _pop_qparam(state_dict, prefix + "zero_point", missing_keys, int)
        if scale is not None:
            self.scale = scale
        if zero_point is not None:
            self.zero_point = zero_point
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)


@functools.cache
def block_shape_supported(engine: str, block_shape: tuple[int, int]) -> bool:
    """Whether this torch build packs *and runs* ``block_shape`` under ``engine`` (measured once)."""
    rows, cols = block_shape
    weight = torch.quantize_per_tensor(torch.ones(16, 16), 1.0, 0, torch.qint8)
    x = torch.ones(2, 16)
    try:
        with quantized_engine(engine):
            packed = torch.ops.sparse.qlinear_prepack(weight, None, rows, cols)
            if engine == DYNAMIC_ENGINE:
                torch.ops.sparse.qlinear_dynamic(x, packed)
            else:
                torch.ops.sparse.qlinear(torch.quantize_per_tensor(x, 1.0, 0, torch.quint8), packed, 1.0, 0)
    except RuntimeError:
        return False
    return True


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
