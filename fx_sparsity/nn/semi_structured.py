"""``SemiStructuredSparseLinear``: a Linear whose weight is 2:4 semi-structured sparse (CUDA, fp16/bf16).

The weight is a ``torch.sparse.SparseSemiStructuredTensor`` (cuSPARSELt, or CUTLASS where
cuSPARSELt is missing): half the values and a small metadata tensor, multiplied by sparse
tensor cores. Reported gains are modest and depend on the GPU and the shapes (BERT 1.3× on
A100, slower than dense on some H100 shapes, slower for a single token), so
``mapping="auto"`` times it against dense on the real input and keeps it only when it wins.

Refused, each with the reason: weights that are not exactly 2:4 along the input dim (at most
2 nonzeros in every 4 consecutive inputs; ``NMSparsifier(2, 4)`` gives that), dtypes other
than float16/bfloat16, shapes the kernels do not take (out % 32, in % 64), and devices other
than CUDA. The forward is kept out of ``torch.compile`` graphs (``torch.compiler.disable``):
it runs eagerly between compiled pieces, with the same result.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SemiStructuredSparseLinear", "semi_structured_problem", "is_two_four"]

_DTYPES = (torch.float16, torch.bfloat16)
_ROW_MULTIPLE, _COL_MULTIPLE = 32, 64  # the stricter (CUTLASS) kernel's weight shape constraints


def is_two_four(pattern: torch.Tensor) -> bool:
    """At most 2 nonzeros in every run of 4 consecutive entries of each row."""
    rows, cols = pattern.shape
    return cols % 4 == 0 and bool(((pattern != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def semi_structured_problem(masked: torch.Tensor) -> str | None:
    """Why a masked weight cannot be stored 2:4 semi-structured, or None."""
    if masked.dim() != 2:
        return f"the weight has {masked.dim()} dims, not 2"
    if masked.dtype not in _DTYPES:
        return (f"the 2:4 kernels take float16 or bfloat16 weights, this one is {masked.dtype} "
                f"(convert the model first, e.g. model.half())")
    rows, cols = masked.shape
    if cols % 4 or not is_two_four(masked):
        return ("the weight is not 2:4 along the input dim (at most 2 nonzeros in every 4 consecutive inputs); "
                "sparsify it with fx_sparsity.NMSparsifier(2, 4) or WandaSparsifier(semi_structured_block_size=4)")
    if rows % _ROW_MULTIPLE or cols % _COL_MULTIPLE:
        return (f"the 2:4 kernels need out_features % {_ROW_MULTIPLE} == 0 and in_features % {_COL_MULTIPLE} == 0, "
                f"the weight is {tuple(masked.shape)}")
    if masked.device.type != "cuda":
        return f"the 2:4 kernels run on CUDA only, the weight is on {masked.device.type}"
    return _kernel_problem(masked.device)


def _kernel_problem(device: torch.device) -> str | None:
    """Why this torch build has no 2:4 kernel for the GPU ``device``, or None."""
    if torch.backends.cusparselt.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major == 8:
        return None  # CUTLASS's 2:4 kernels
    return (f"this torch build has no cuSPARSELt, and its CUTLASS 2:4 kernels run on sm8x GPUs only; "
            f"this GPU is sm{major}{minor} (install a torch CUDA build that ships cuSPARSELt)")


def _pack(dense: torch.Tensor) -> torch.Tensor:
    """``dense`` (exactly 2:4) as a semi-structured tensor: cuSPARSELt where the build has it, else CUTLASS."""
    if torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense(dense.contiguous())
    return torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(dense.contiguous())


class SemiStructuredSparseLinear(nn.Module):
    """``F.linear`` with a 2:4 semi-structured sparse weight; inference only.

    ``state_dict()`` holds the weight dense (``weight``, zeros included) and the bias, so a
    checkpoint loads into ``nn.Linear`` too; loading packs it again.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        problem = semi_structured_problem(weight)
        if problem is not None:
            raise ValueError(f"SemiStructuredSparseLinear: {problem}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(_pack(weight.detach()), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        self.fx_sparsity_info: dict[str, Any] = {"lowered_to": type(self).__name__, "format": "2:4"}

    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, *,
                    sparse_block_shape: Any = None) -> SemiStructuredSparseLinear:
        """From a dense weight, its mask (exactly 2:4, e.g. from ``NMSparsifier(2, 4)``) and the bias."""
        return cls(weight.detach() * mask.detach().to(weight.dtype), bias)

    @torch.compiler.disable(reason="fx_sparsity: the 2:4 semi-structured Linear runs eagerly between compiled "
                                   "graphs (its sparse tensor subclass is not traced)")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.to_dense() if keep_vars else self.weight.to_dense().detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        dense = state_dict[key].to(device=self.weight.device, dtype=self.weight.dtype)
        problem = semi_structured_problem(dense)
        if problem is not None:
            error_msgs.append(f"SemiStructuredSparseLinear '{prefix[:-1]}': {problem}")
            return
        self.weight = nn.Parameter(_pack(dense), requires_grad=False)
        if self.bias is not None and prefix + "bias" in state_dict:
            with torch.no_grad():
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"
