"""``SparseGPTSparsifier``: one-shot pruning with weight reconstruction (Frantar & Alistarh, 2023)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparsityConfigError
from ..passes import GramObserver, SharedProduct
from .levels import check_level
from .wanda_sparsifier import WandaSparsifier

__all__ = ["SparseGPTSparsifier", "sparsegpt_prune"]


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, *, n: int = 0, m: int = 0,
                    block_size: int = 128, percdamp: float = 0.01,
                    overwrite_gram: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one linear weight ``(out, in)`` with the inputs' Gram matrix ``XᵀX`` ``(in, in)``.

    Columns are processed left to right in blocks of ``block_size``. In each block the weights
    to prune are those with the smallest ``w² / [H⁻¹]ᵢᵢ²`` (``sparsity`` of the block, or ``n`` of
    every ``m`` consecutive inputs per row when ``n``), chosen once per block (per ``m``
    columns for n:m); pruning a column spreads its error over the columns not yet processed
    through the Cholesky factor of ``H⁻¹``, so the kept weights compensate. ``H`` is damped by
    ``percdamp`` × its mean diagonal; inputs never seen (zero diagonal) get a unit diagonal and
    their weights are pruned. Returns ``(new weight, keep mask)``, float32. ``overwrite_gram``: a float32
    ``gram`` is damped and factored in place (one ``(in, in)`` matrix less), for a caller done with it.
    """
    w = weight.detach().float().clone()
    h = gram.detach().to(torch.float32)  # a copy already unless gram is float32
    if h.data_ptr() == gram.data_ptr() and not overwrite_gram:
        h = h.clone()
    del gram
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    # the upper Cholesky factor of H⁻¹, holding two (in, in) matrices at a time at most (H's own copy freed first)
    factor = torch.linalg.cholesky(h)
    del h
    h_inv = torch.cholesky_inverse(factor)
    del factor
    h_inv = torch.linalg.cholesky(h_inv, upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        diag = h_block.diagonal()
        block_pruned = torch.zeros_like(block, dtype=torch.bool)
        if not n:
            scores = block.square() / diag.square()
            k = int(scores.numel() * sparsity)
            if k:
                block_pruned.view(-1)[torch.topk(scores.view(-1), k, largest=False).indices] = True
        for i in range(end - start):
            if n and i % m == 0:
                scores = block[:, i:i + m].square() / diag[i:i + m].square()
                block_pruned.scatter_(1, i + torch.topk(scores, n, dim=1, largest=False).indices, True)
            column = block[:, i]
            kept = torch.where(block_pruned[:, i], torch.zeros_like(column), column)
            error = (column - kept) / diag[i]
            block[:, i:] -= error.unsqueeze(1) @ h_block[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ h_inv[start:end, end:]
        pruned[:, start:end] = block_pruned
    pruned[:, dead] = True
    return w, ~pruned


class SparseGPTSparsifier(WandaSparsifier):
    """SparseGPT: choose each weight's mask from ``w² / [H⁻¹]ᵢᵢ²`` and update the kept weights.

    Like :class:`WandaSparsifier`, ``prepare`` observes the input of every linear that uses a
    configured weight (a :class:`~fx_sparsity.passes.GramObserver` accumulating ``XᵀX``), the
    user runs calibration batches through the prepared module, and ``step()`` prunes. Unlike
    masks alone, ``step()`` **rewrites the kept weights** to compensate for the pruned ones (the
    point of the method), so it is a one-shot step: call it once after calibration, then
    ``squash_mask()``. ``semi_structured_block_size=m`` gives ``m/2:m`` sparsity (2:4 for 4),
    with ``sparsity_level`` 0.5.

    ``block_size`` (columns processed together) and ``percdamp`` (dampening, as a fraction of
    the mean of ``H``'s diagonal) are the paper's; a config entry may override any of them.
    """

    observer_type = GramObserver
    #: Free each linear's Gram matrix when its weight is pruned, and factor it in place (no copy): the peak of a
    #: step() is then the largest layer's matrices, not every layer's. ``one_shot`` sets it on each block's copy,
    #: whose one step() is the last; a second step() then says the statistics are gone.
    free_statistics: bool = False

    def __init__(self, sparsity_level: float = 0.5, semi_structured_block_size: int | None = None,
                 block_size: int = 128, percdamp: float = 0.01):
        super().__init__(sparsity_level, semi_structured_block_size)
        if semi_structured_block_size is not None and sparsity_level != 0.5:
            raise SparsityConfigError(f"semi_structured_block_size={semi_structured_block_size} prunes exactly half "
                                      f"of every run: sparsity_level must be 0.5, got {sparsity_level!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise SparsityConfigError(f"block_size must be a positive int (columns per block), got {block_size!r}")
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp > 0:
            raise SparsityConfigError(f"percdamp must be a number > 0 (e.g. 0.01), got {percdamp!r}")
        self.defaults.update(block_size=block_size, percdamp=float(percdamp))
        self._shared_product = SharedProduct()

    def make_observer(self, num_channels: int) -> nn.Module:
        """Observers share the last ``xᵀx``: linears that read one input (q/k/v, gate/up) compute it once."""
        return GramObserver(num_channels, shared=self._shared_product)

    def _take_gram(self, tensor_fqn: str, device: torch.device) -> torch.Tensor:
        """``tensor_fqn``'s Gram matrix on ``device``; with ``free_statistics`` the observer lets go of it."""
        observer = self._observer(tensor_fqn)
        gram = observer.gram
        if gram.numel() == 0:
            raise RuntimeError(f"'{tensor_fqn}': its Gram matrix was freed by the step() that pruned it "
                               f"(free_statistics=True, as one_shot sets): prepare and calibrate again to step again")
        if self.free_statistics:
            observer.gram = gram.new_empty(0)
        return gram.to(device)

    def step(self, use_path: bool = True) -> None:
        self._shared_product.clear()  # calibration is over: free the last product before pruning
        super().step(use_path)

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor,  # type: ignore[override]
                    sparsity_level: float, semi_structured_block_size: int | None = None, tensor_fqn: str = "",
                    block_size: int = 128, percdamp: float = 0.01, **kwargs) -> None:
        m = semi_structured_block_size
        level = check_level(sparsity_level, high=0.5 if m else 1.0, where=f"group '{tensor_fqn}'")
        weight = getattr(module, tensor_name)
        new_weight, keep = sparsegpt_prune(weight * mask, self._take_gram(tensor_fqn, weight.device), level,
                                           n=m // 2 if m else 0, m=m or 0, block_size=block_size, percdamp=percdamp,
                                           overwrite_gram=self.free_statistics)
        weight.copy_(new_weight.to(weight.dtype))
        mask.copy_(keep)
