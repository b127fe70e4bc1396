"""Linear layers whose weight is stored sparse (CSR or BSR) in the weight's own float dtype.

Measured on torch 2.13, x86 CPU (Linear 1024², batch 64, 90% zeros): the product
``torch.addmm(bias[:, None], W_sparse, x.T).T`` takes 0.3-0.4× the dense fp32 time and is
exact, while the obvious ``F.linear(x, W_csr, bias)`` takes 1.8×. For a single input row
``torch.addmv`` beats ``addmm`` (0.9× vs 1.2× dense at 90%), so one row takes that path.
CPU BSR needs square blocks, and neither kernel exists on CPU for float16/bfloat16.

The weight lives in three plain buffers (``weight_crow_indices``, ``weight_col_indices``,
``weight_values``) rather than in one sparse tensor: they go through ``state_dict``,
``torch.load(weights_only=True)``, ``.to()`` and ``torch.compile`` like any dense tensor
(dynamo refuses to wrap sparse tensors: "Attempted to wrap sparse Tensor"). The sparse
tensor is rebuilt at each call (~2 µs, no copy). Under ``torch.compile`` the product runs
as the custom op ``torch.ops.fx_sparsity.sparse_linear``, opaque to inductor, so the rest
of the model compiles around it with ``fullgraph=True``.

These are inference modules: the weight and bias buffers get no gradient; the input does.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, TypeVar, cast

import torch
from torch import nn

__all__ = ["SparseCSRLinear", "SparseBSRLinear", "sparse_kernel_available"]

_WEIGHT_BUFFERS = ("weight_crow_indices", "weight_col_indices", "weight_values")
_BSR_BLOCKS = (16, 8, 4, 2)  # tried largest first when a BSR block size is inferred from the mask

# The first sparse CSR/BSR tensor a process builds makes torch warn "Sparse CSR tensor support
# is in beta state. If you miss a functionality ..." (TORCH_WARN_ONCE in SparseCsrTensorImpl).
# Our sparse tensors are an implementation detail of these modules, so every place that builds
# one ignores exactly that message. torch warns once per process: after our first sparse tensor
# is built there is nothing left to catch, and the hot path (one tensor per call) skips the
# warnings machinery (catch_warnings costs ~1.6 µs, as much as the rebuild itself).
_BETA_WARNING = r"Sparse (CSR|CSC|BSR|BSC) tensor support is in beta state"
_beta_warning_spent = False
_NO_FILTER = contextlib.nullcontext()


@contextlib.contextmanager
def _ignore_beta_warning():
    global _beta_warning_spent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING, category=UserWarning)
        yield
    _beta_warning_spent = True  # only once a sparse tensor was built without an error


def _quiet_sparse_beta():
    """Context for code that builds a sparse CSR/BSR tensor: torch's beta-state warning is not shown."""
    return _NO_FILTER if _beta_warning_spent else _ignore_beta_warning()


def _rebuild(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    layout = torch.sparse_bsr if values.dim() == 3 else torch.sparse_csr
    # Indices come from to_sparse_* or a checked state dict: no per-call invariant check.
    with _quiet_sparse_beta():
        return torch.sparse_compressed_tensor(crow, col, values, (rows, cols), layout=layout,
                                              check_invariants=False)


def _sparse_linear_2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    """``x @ W.T + bias`` for 2-D ``x``; the result is the transpose of a contiguous (rows, n) tensor."""
    weight = _rebuild(crow, col, values, rows, cols)
    if x.shape[0] == 1:
        out = torch.mv(weight, x[0]) if bias is None else torch.addmv(bias, weight, x[0])
        return out.unsqueeze(0)
    out = torch.mm(weight, x.T) if bias is None else torch.addmm(bias[:, None], weight, x.T)
    return out.T


@torch.library.custom_op("fx_sparsity::sparse_linear", mutates_args=())
def _sparse_linear_op(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    # A custom op may not return a view; the copy only happens under torch.compile.
    return _sparse_linear_2d(x, crow, col, values, bias, rows, cols).contiguous()


@_sparse_linear_op.register_fake
def _(x, crow, col, values, bias, rows, cols):
    return x.new_empty((x.shape[0], rows))


def _grad_input_2d(grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   rows: int, cols: int) -> torch.Tensor:
    # grad @ W as (Wᵀ @ gradᵀ)ᵀ: CPU multiplies only CSR/BSR on the left, so Wᵀ (CSC/BSC) is converted.
    weight_t = _rebuild(crow, col, values, rows, cols).t()
    with _quiet_sparse_beta():
        weight_t = weight_t.to_sparse_bsr(tuple(values.shape[1:])) if values.dim() == 3 else weight_t.to_sparse_csr()
    return torch.mm(weight_t, grad.T).T


@torch.library.custom_op("fx_sparsity::sparse_linear_grad_input", mutates_args=())
def _grad_input_op(grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   rows: int, cols: int) -> torch.Tensor:
    return _grad_input_2d(grad, crow, col, values, rows, cols).contiguous()


@_grad_input_op.register_fake
def _(grad, crow, col, values, rows, cols):
    return grad.new_empty((grad.shape[0], cols))


def _setup_backward(ctx, inputs, output):
    _, crow, col, values, _, ctx.rows, ctx.cols = inputs
    ctx.save_for_backward(crow, col, values)


def _backward(ctx, grad):
    crow, col, values = ctx.saved_tensors
    grad_x = _grad_input_op(grad, crow, col, values, ctx.rows, ctx.cols) if ctx.needs_input_grad[0] else None
    grad_bias = grad.sum(0) if ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_bias, None, None  # the weight gets no gradient


_sparse_linear_op.register_autograd(_backward, setup_context=_setup_backward)


class _BSRLinearFunction(torch.autograd.Function):
    """Eager BSR with an input that needs a gradient (torch has no CPU backward for it).

    Cheaper per call than the custom op's autograd, whose first call also costs seconds.
    """

    @staticmethod
    def forward(ctx, x, crow, col, values, bias, rows, cols):
        ctx.save_for_backward(crow, col, values)
        ctx.rows, ctx.cols = rows, cols
        return _sparse_linear_2d(x, crow, col, values, bias, rows, cols)

    @staticmethod
    def backward(ctx, grad):
        crow, col, values = ctx.saved_tensors
        grad_x = _grad_input_2d(grad, crow, col, values, ctx.rows, ctx.cols) if ctx.needs_input_grad[0] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, None, grad_bias, None, None


@functools.cache
def _kernel_error(layout: torch.layout, dtype: torch.dtype, device: str) -> str | None:
    try:
        eye = torch.eye(2, dtype=dtype, device=device)
        with _quiet_sparse_beta():
            weight = eye.to_sparse_bsr((1, 1)) if layout == torch.sparse_bsr else eye.to_sparse_csr()
        torch.addmm(torch.zeros(2, 2, dtype=dtype, device=device), weight, eye)
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0]
    return None


def sparse_kernel_available(layout: torch.layout, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether this torch build multiplies a ``layout`` (CSR/BSR) matrix of ``dtype`` on ``device``."""
    return _kernel_error(layout, dtype, str(torch.device(device))) is None


def _is_block_structured(mask: torch.Tensor, block: int) -> bool:
    rows, cols = mask.shape
    blocks = (mask != 0).reshape(rows // block, block, cols // block, block)
    return bool((blocks.all(dim=(1, 3)) == blocks.any(dim=(1, 3))).all())


class _SparseLinear(nn.Module):
    """Shared by the CSR and BSR Linears: buffers, forward, state dict, constructors."""

    _format: str
    # The buffers registered in __init__ (torch types a module attribute as Tensor | Module).
    weight_crow_indices: torch.Tensor
    weight_col_indices: torch.Tensor
    weight_values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 blocksize: tuple[int, int] | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        dtype = dtype or torch.get_default_dtype()
        block_rows = 1 if blocksize is None else blocksize[0]
        self.register_buffer("weight_crow_indices",
                             torch.zeros(self.out_features // block_rows + 1, dtype=torch.int64, device=device))
        self.register_buffer("weight_col_indices", torch.zeros(0, dtype=torch.int64, device=device))
        values_shape = (0,) if blocksize is None else (0, *blocksize)
        self.register_buffer("weight_values", torch.zeros(values_shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(self.out_features, dtype=dtype, device=device) if bias else None)
        self.fx_sparsity_info: dict[str, Any] = {"lowered_to": type(self).__name__, "format": self._format}

    # -- the weight ------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a sparse CSR/BSR tensor of shape ``(out_features, in_features)`` (no copy)."""
        return _rebuild(self.weight_crow_indices, self.weight_col_indices, self.weight_values,
                        self.out_features, self.in_features)

    @property
    def weight_sparsity(self) -> float:
        """Fraction of zeros in the weight (zeros stored inside BSR blocks count as zeros)."""
        nonzero = int(torch.count_nonzero(self.weight_values))
        return 1.0 - nonzero / (self.out_features * self.in_features)

    def _set_weight(self, weight: torch.Tensor) -> None:
        self.weight_crow_indices = weight.crow_indices().clone()
        self.weight_col_indices = weight.col_indices().clone()
        self.weight_values = weight.values().clone()

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features in its last dimension, "
                             f"expected in_features={self.in_features} (input shape {tuple(x.shape)})")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        args = (x2d, self.weight_crow_indices, self.weight_col_indices, self.weight_values, self.bias,
                self.out_features, self.in_features)
        if torch.compiler.is_compiling():  # dynamo cannot trace sparse tensors: hand it the opaque op
            out = _sparse_linear_op(*args)
        elif self.weight_values.dim() == 3 and torch.is_grad_enabled() and (
                x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            out = _BSRLinearFunction.apply(*args)
        else:  # CSR products have their own backward for the input
            out = _sparse_linear_2d(*args)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        block = f", blocksize={tuple(self.weight_values.shape[1:])}" if self.weight_values.dim() == 3 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self._format}{block}, weight_sparsity={self.weight_sparsity:.3f}")

    # -- state dict ------------------------------------------------------------------------

    def _check_loaded_weight(self, crow, col, values) -> str | None:
        if crow.dim() != 1 or col.dim() != 1 or values.dim() != self.weight_values.dim():
            return (f"expected 1-D crow/col indices and {self.weight_values.dim()}-D values, got shapes "
                    f"{tuple(crow.shape)}, {tuple(col.shape)}, {tuple(values.shape)}")
        block_rows, block_cols = values.shape[1:] if values.dim() == 3 else (1, 1)
        if values.dim() == 3 and (block_rows != block_cols or self.out_features % block_rows
                                  or self.in_features % block_cols):
            return (f"blocksize {(block_rows, block_cols)} is not square or does not divide the weight "
                    f"shape {(self.out_features, self.in_features)}")
        if crow.numel() != self.out_features // block_rows + 1:
            return (f"{crow.numel()} crow indices do not fit out_features={self.out_features} "
                    f"(expected {self.out_features // block_rows + 1})")
        if col.numel() != values.shape[0] or (crow.numel() and int(crow[-1]) != col.numel()):
            return f"{col.numel()} column indices, {values.shape[0]} values and crow[-1]={int(crow[-1])} disagree"
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= self.in_features // block_cols):
            return f"column indices out of range for in_features={self.in_features}"
        try:  # the rest (ordering, dtypes): calls skip this check, so a bad index must not get in
            with _quiet_sparse_beta():
                torch.sparse_compressed_tensor(crow, col, values, (self.out_features, self.in_features),
                                               layout=torch.sparse_bsr if values.dim() == 3 else torch.sparse_csr,
                                               check_invariants=True)
        except RuntimeError as e:
            return str(e).splitlines()[0]
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + name for name in _WEIGHT_BUFFERS]
        rejected = []
        if all(key in state_dict for key in keys):
            loaded = [state_dict[key] for key in keys]
            problem = self._check_loaded_weight(*loaded)
            if problem is None:
                # The number of nonzeros is the data's, not the module's: resize, then let
                # nn.Module copy (dtype, device and assign= handled as for any buffer).
                for name, tensor in zip(_WEIGHT_BUFFERS, loaded):
                    current = getattr(self, name)
                    setattr(self, name, current.new_empty(tensor.shape))
            else:
                error_msgs.append(f"{type(self).__name__} '{prefix[:-1]}': the sparse weight in the state dict "
                                  f"is not valid for this module: {problem}")
                rejected = [(key, state_dict.pop(key)) for key in keys]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key, tensor in rejected:
            state_dict[key] = tensor
            if key in missing_keys:
                missing_keys.remove(key)

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def _build(cls: type[_S], masked: torch.Tensor, bias: torch.Tensor | None, blocksize, info: dict) -> _S:
        layout = torch.sparse_csr if blocksize is None else torch.sparse_bsr
        problem = _kernel_error(layout, masked.dtype, str(masked.device))
        if problem is not None:
            raise TypeError(f"{cls.__name__}: this torch build has no {masked.device.type} sparse kernel for "
                            f"{masked.dtype} ({problem}); lower a float32/float64 weight, or keep the layer dense")
        module = cls(masked.shape[1], masked.shape[0], bias is not None, blocksize=blocksize,
                     device=masked.device, dtype=masked.dtype)
        with _quiet_sparse_beta():
            weight = masked.to_sparse_csr() if blocksize is None else masked.to_sparse_bsr(blocksize)
        module._set_weight(weight)
        if bias is not None:
            module.bias = bias.detach().to(masked.dtype).clone()
        module.fx_sparsity_info = {**module.fx_sparsity_info, **info, "weight_sparsity": module.weight_sparsity}
        return module

    @staticmethod
    def _masked(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        weight = weight.detach()
        if not weight.is_floating_point() or weight.dim() != 2:
            raise TypeError(f"expected a 2-D floating-point Linear weight, got {weight.dtype} of shape "
                            f"{tuple(weight.shape)}")
        if mask is None:
            return weight.clone()
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        return weight * mask.detach().to(weight.dtype)

    @classmethod
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None, *,
                   blocksize: tuple[int, int] | None = None) -> _SparseLinear:
        """Build from an ``nn.Linear`` (any module with ``weight`` and ``bias``), keeping ``weight * mask``.

        Without ``mask``, the weight's own zeros are the sparsity pattern.
        """
        weight = cast(torch.Tensor, linear.weight)  # an nn.Linear's (or the like's) weight
        return cls._from_weight(cls._masked(weight, mask), getattr(linear, "bias", None), blocksize, None)

    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, *,
                    sparse_block_shape: tuple[int, int] | None = None) -> _SparseLinear:
        """Build from a dense weight, its mask and bias; ``sparse_block_shape`` is the sparsifier's block.

        This is what ``convert_fx_sparse`` calls for each sparse Linear of a prepared model.
        """
        block = None if sparse_block_shape is None else tuple(int(b) for b in sparse_block_shape)
        return cls._from_weight(cls._masked(weight, mask), bias, block, block)

    @classmethod
    def _from_weight(cls, masked, bias, blocksize, requested) -> _SparseLinear:
        raise NotImplementedError


_S = TypeVar("_S", bound=_SparseLinear)


class SparseCSRLinear(_SparseLinear):
    """``nn.Linear`` with its weight stored in CSR format (any sparsity pattern), inference only.

    Input ``(*, in_features)``, output ``(*, out_features)``, as ``nn.Linear``; exact in the
    weight's dtype (float32 or float64 on CPU). Build with :meth:`from_dense` or :meth:`from_masked`.
    """

    _format = "csr"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None,
                 blocksize=None):
        if blocksize is not None:
            raise ValueError("SparseCSRLinear has no blocks; use SparseBSRLinear for blocksize=...")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)

    @classmethod
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None, *, blocksize=None) -> SparseCSRLinear:
        if blocksize is not None:
            raise ValueError(f"SparseCSRLinear has no blocks (got blocksize={blocksize}); use "
                             f"SparseBSRLinear.from_dense(linear, mask, blocksize=(b, b))")
        return cast(SparseCSRLinear, super().from_dense(linear, mask))

    @classmethod
    def _from_weight(cls, masked, bias, blocksize, requested) -> SparseCSRLinear:
        info = {} if requested is None else {"requested_block": requested}
        return cls._build(masked, bias, None, info)


class SparseBSRLinear(_SparseLinear):
    """``nn.Linear`` with its weight stored in BSR format (square ``b×b`` blocks), inference only.

    CPU BSR kernels need square blocks that divide the weight's shape. The constructors
    fall back to :class:`SparseCSRLinear` (and say so in ``fx_sparsity_info["detail"]``)
    when the requested block cannot be used, e.g. the ``(1, 4)`` blocks of
    ``WeightNormSparsifier``'s default. Zeros inside a stored block are kept: exact, slower.
    """

    _format = "bsr"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 blocksize: tuple[int, int] = (4, 4), device=None, dtype=None):
        blocksize = cast(tuple[int, int], tuple(int(b) for b in blocksize))
        if len(blocksize) != 2 or blocksize[0] != blocksize[1] or out_features % blocksize[0] or \
                in_features % blocksize[1]:
            raise ValueError(f"SparseBSRLinear needs a square blocksize dividing ({out_features}, {in_features}), "
                             f"got {blocksize}; use SparseCSRLinear for other patterns")
        super().__init__(in_features, out_features, bias, blocksize=blocksize, device=device, dtype=dtype)

    @property
    def blocksize(self) -> tuple[int, int]:
        return cast(tuple[int, int], tuple(self.weight_values.shape[1:]))

    @classmethod
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None, *,
                   blocksize: tuple[int, int] | None = None) -> SparseBSRLinear | SparseCSRLinear:
        """Without ``blocksize``, the largest square block (16, 8, 4 or 2) the pattern is made of.

        Returns a :class:`SparseCSRLinear` when no square block fits (see the class doc).
        """
        return cast("SparseBSRLinear | SparseCSRLinear", super().from_dense(linear, mask, blocksize=blocksize))

    @classmethod
    def _from_weight(cls, masked, bias, blocksize, requested) -> SparseBSRLinear | SparseCSRLinear:
        rows, cols = masked.shape
        info = {} if requested is None else {"requested_block": requested}
        if blocksize is None:
            pattern = masked != 0
            blocksize = next(((b, b) for b in _BSR_BLOCKS
                              if rows % b == 0 and cols % b == 0 and _is_block_structured(pattern, b)), None)
            if blocksize is None:
                info["detail"] = "no square block pattern: stored as CSR"
                return SparseCSRLinear._build(masked, bias, None, info)
        elif blocksize[0] != blocksize[1]:
            info["detail"] = f"CPU BSR needs square blocks: {blocksize} stored as CSR"
            return SparseCSRLinear._build(masked, bias, None, info)
        elif rows % blocksize[0] or cols % blocksize[1]:
            info["detail"] = f"block {blocksize} does not divide the weight shape {(rows, cols)}: stored as CSR"
            return SparseCSRLinear._build(masked, bias, None, info)
        return cls._build(masked, bias, tuple(blocksize), {**info, "blocksize": tuple(blocksize)})
