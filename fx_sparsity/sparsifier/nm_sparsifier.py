"""``NMSparsifier``: keep ``n`` of every ``m`` consecutive weights along the input dim (2:4 and friends)."""
from __future__ import annotations

import numbers
from typing import cast

import torch
from torch import nn

from ..errors import SparsityConfigError
from .base_sparsifier import BaseSparsifier
from .levels import check_level

__all__ = ["NMSparsifier", "nm_keep_mask", "check_nm"]


def _where(where: str) -> str:
    return f"{where}: " if where else ""


def check_nm(n, m, *, where: str = "") -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, numbers.Integral) \
            or not isinstance(m, numbers.Integral):
        raise SparsityConfigError(f"{_where(where)}n and m must be ints (keep n of every m), got n={n!r}, m={m!r}")
    if not 1 <= int(n) < int(m):
        raise SparsityConfigError(f"{_where(where)}need 1 <= n < m (keep n of every m weights), got n={n}, m={m}; "
                         f"e.g. n=2, m=4 for 2:4")


def check_nm_tensor(tensor: torch.Tensor, m: int, *, what: str, where: str = "") -> None:
    if tensor.dim() != 2:
        raise SparsityConfigError(f"{_where(where)}{what} needs a 2-D (out_features, in_features) weight, got shape "
                         f"{tuple(tensor.shape)}; configure only Linear-like weights")
    if tensor.shape[1] % m:
        raise SparsityConfigError(
            f"{_where(where)}{what} needs in_features (last dim) divisible by m={m}; shape is "
            f"{tuple(tensor.shape)} ({tensor.shape[1]} % {m} = {tensor.shape[1] % m}). Leave this tensor out "
            f"of the config or pick an m that divides {tensor.shape[1]}")


@torch.no_grad()
def nm_keep_mask(scores: torch.Tensor, n: int, m: int, group_fraction: float = 1.0, *,
                 per_row: bool = False) -> torch.Tensor:
    """Boolean keep-mask: in each run of ``m`` consecutive columns keep the ``n`` highest scores.

    With ``group_fraction < 1`` only that fraction of the runs is pruned: the runs whose
    pruned scores sum lowest (over the whole tensor, or within each row if ``per_row``);
    the other runs stay dense. This is how a scheduler ramps N:M sparsity up gradually.
    Ties go by ``torch.topk`` order.
    """
    rows, cols = scores.shape
    runs = scores.reshape(rows, cols // m, m)
    drop = torch.topk(runs, m - n, dim=-1, largest=False).indices
    pruned = torch.zeros(runs.shape, dtype=torch.bool, device=scores.device).scatter_(-1, drop, True)
    if group_fraction < 1:
        cost = runs.gather(-1, drop).sum(-1)
        flat = cost if per_row else cost.reshape(1, -1)
        count = round(group_fraction * flat.shape[1])
        chosen = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
        if count:
            chosen.scatter_(1, torch.topk(flat, count, dim=1, largest=False).indices, True)
        pruned &= chosen.reshape(rows, -1, 1)
    return ~pruned.reshape(rows, cols)


class NMSparsifier(BaseSparsifier):
    """Keep the ``n`` largest-magnitude weights of every ``m`` consecutive ones along dim 1.

    For a Linear weight ``(out, in)`` that is ``n:m`` structured sparsity along the input
    dim (2:4 is what sparse tensor cores run); for Hugging Face's ``Conv1D``, whose weight is
    ``(in, out)``, along dim 0, its input dim (the group records ``"input_dim": 0``). ``n`` and
    ``m`` are defaults that a config entry may override per tensor; ``in`` must be divisible by
    ``m`` (checked at prepare: hardware N:M formats have no partial runs, so there is no tail
    rule to guess).

    ``sparsity_level`` is the fraction of zeros, as for every sparsifier; it defaults to the
    full pattern's ``(m - n) / m`` and may not exceed it. A lower level (set by a config
    entry or a scheduler such as ``CubicSL``) prunes only that share of the runs, choosing
    the runs whose pruned magnitudes sum lowest; every pruned run is exactly ``n:m``, the
    others stay dense. So ramping the level from 0 to ``(m - n) / m`` is gradual N:M.

    Like torch.ao's sparsifiers it reads ``weight * mask``: pruned weights score 0 and
    stay pruned as the level grows.
    """

    def __init__(self, n: int = 2, m: int = 4):
        check_nm(n, m)
        super().__init__(defaults={"n": n, "m": m, "sparsity_level": None})

    def validate_group(self, group, tensor):
        where = f"group '{group['tensor_fqn']}'"
        n, m = group["n"], group["m"]
        check_nm(n, m, where=where)
        if _inputs_first(group.get("module"), group.get("tensor_name", "")):
            group["input_dim"] = 0  # recorded here: once prepared, a scoped layer is a graph module
        check_nm_tensor(tensor.t() if group.get("input_dim") == 0 else tensor, m, what=f"{n}:{m} sparsity",
                        where=where)
        if group.get("sparsity_level") is None:
            group["sparsity_level"] = (m - n) / m  # the full pattern, for this group's n and m
        check_level(group["sparsity_level"], high=(m - n) / m, where=f"{where} ({n}:{m})")

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, n: int, m: int,  # type: ignore[override]
                    sparsity_level: float, **kwargs) -> None:
        full = (m - n) / m
        level = check_level(sparsity_level, high=full,
                            where=f"group '{kwargs.get('tensor_fqn', tensor_name)}' ({n}:{m})")
        scores = (getattr(module, tensor_name) * mask).abs()
        if kwargs.get("input_dim") == 0:  # runs along the input features, wherever the layer keeps them
            mask.copy_(nm_keep_mask(scores.t(), n, m, min(1.0, level / full)).t())
        else:
            mask.copy_(nm_keep_mask(scores, n, m, min(1.0, level / full)))


def _inputs_first(module: nn.Module | None, tensor_name: str) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2) keeps its weight as ``(in, out)``, a Linear's transposed (``input_dim``
    0 in the group)."""
    return (module is not None and tensor_name == "weight" and type(module).__name__ == "Conv1D"
            and hasattr(module, "nf") and cast(torch.Tensor, module.weight).dim() == 2)
