"""``ADMMSparsifier``: one-shot pruning by ADMM on the layer-wise reconstruction problem (ALPS-class).

Written from the description in Meng, Behdin, Wang & Mazumder, "ALPS: Improved Optimization for
Highly Sparse One-Shot Pruning for Large Language Models" (NeurIPS 2024): operator splitting (ADMM)
with an increasing penalty finds the support, then preconditioned conjugate gradient refits the
kept weights on it.
"""
from __future__ import annotations

import numbers
import time
from typing import Any

import torch
from torch import nn

from ..errors import SparsityConfigError
from .levels import check_level
from .nm_sparsifier import nm_keep_mask
from .sparsegpt_sparsifier import SparseGPTSparsifier, sparsegpt_prune

__all__ = ["ADMMSparsifier", "admm_prune", "reconstruction_error"]

#: The penalty grows by these factors every ``_CHECK_EVERY`` iterations, by how much of the support changed.
_CHECK_EVERY = 3
_GROWTH = ((0.1, 1.3), (0.005, 1.2), (0.0, 1.1))  # (changed share of the kept weights at least, factor)
_STABLE_CHECKS = 3  # support unchanged over this many checks in a row: converged


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)``: the layer's output error on the calibration inputs, relative.

    ``weight`` is the dense ``W`` ``(out, in)``, ``new_weight`` the pruned ``Ŵ`` and ``gram`` the
    undamped ``H = XᵀX``; computed in float64.
    """
    h = gram.to(torch.float64)
    w = weight.to(torch.float64)
    delta = new_weight.to(device=w.device, dtype=torch.float64) - w
    base = float(((w @ h) * w).sum())
    return float(((delta @ h) * delta).sum()) / base if base > 0 else 0.0


def _project(values: torch.Tensor, zeros: int, n: int, m: int, group_fraction: float) -> torch.Tensor:
    """Keep mask of the Euclidean projection of ``values`` onto the sparsity set.

    Unstructured: the ``zeros`` smallest magnitudes of the whole matrix go (exactly that many). ``n``
    of ``m``: in each run of ``m`` inputs the ``m − n`` smallest go (in the share ``group_fraction``
    of the runs whose pruned energy is lowest, the others dense).
    """
    energy = values.square()
    if m:
        return nm_keep_mask(energy, n, m, group_fraction)
    keep = torch.ones_like(values, dtype=torch.bool)
    if zeros:
        keep.view(-1)[torch.topk(energy.view(-1), zeros, largest=False, sorted=False).indices] = False
    return keep


def _pcg(x: torch.Tensor, target: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, steps: int) -> torch.Tensor:
    """Minimise ``½ tr((W − Ŵ) H (W − Ŵ)ᵀ)`` over ``W`` supported on ``keep``, starting from ``x``.

    Conjugate gradient on each row's normal equations ``W_S H_SS = (Ŵ H)_S`` (``S`` the row's kept
    inputs), all rows at once: one matrix product per step, step sizes per row, the Jacobi
    preconditioner ``diag(H)``. ``target`` is ``Ŵ H``.
    """
    support = keep.to(x.dtype)
    inv_diag = 1.0 / h.diagonal()
    x = x * support
    r = (target - x @ h) * support  # minus the gradient, on the support
    z = r * inv_diag
    p = z
    rz = (r * z).sum(1, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(steps):
        q = (p @ h) * support
        pq = (p * q).sum(1, keepdim=True)
        alpha = torch.where(pq > tiny, rz / pq.clamp_min(tiny), torch.zeros_like(pq))  # converged rows stop
        x = x + alpha * p
        r = r - alpha * q
        z = r * inv_diag
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return x


@torch.no_grad()
def admm_prune(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, *, n: int = 0, m: int = 0,
               iterations: int = 50, rho: float = 0.1, pcg_steps: int = 20, percdamp: float = 0.01,
               info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ALPS-class pruning of one linear weight ``(out, in)`` given its inputs' Gram matrix ``H = XᵀX`` ``(in, in)``.

    Minimises ``½ tr((W − Ŵ) H (W − Ŵ)ᵀ)`` subject to ``int(sparsity · numel)`` zeros in the whole
    matrix (or, with ``n`` and ``m``, ``m − n`` zeros in every run of ``m`` inputs; ``sparsity`` below
    ``(m − n) / m`` prunes that share of the runs). ``H`` is damped by ``percdamp`` × its mean diagonal
    and the problem is solved in the coordinates scaled by ``√diag(H)`` (magnitude there is
    ``|w|·‖x‖``, and ``H`` gets a unit diagonal). Inputs never seen (zero diagonal) get zero weights.

    1. ADMM on the split ``W = D`` (``D`` in the sparsity set), scaled dual ``V``, penalty ``rho``:
       ``W ← (ŴH − V + ρD)(H + ρI)⁻¹`` (one eigendecomposition of ``H`` serves every ``ρ``),
       ``D ← Π(W + V/ρ)`` (the projection: keep the largest magnitudes), ``V ← V + ρ(W − D)``.
       Every 3 iterations ``ρ`` grows by 1.3, 1.2 or 1.1 as ≥ 10%, ≥ 0.5% or less of the support
       changed since the last check; the loop stops after ``iterations`` or once the support has not
       changed for 3 checks in a row.
    2. The support of ``D`` is fixed and the kept weights are refitted by ``pcg_steps`` steps of
       preconditioned conjugate gradient (see :func:`_pcg`), starting from ``D``.

    Returns ``(new weight, keep mask)``, float32 on ``weight``'s device; ``info`` (a dict), if given,
    receives ``iterations`` (run) and ``rho`` (final).
    """
    w = weight.detach().float().clone()
    zeros = int(sparsity * w.numel())
    if sparsity <= 0 or (not m and zeros == 0):
        if info is not None:
            info.update(iterations=0, rho=float(rho))
        return w, torch.ones_like(w, dtype=torch.bool)
    if not m and zeros >= w.numel():
        if info is not None:
            info.update(iterations=0, rho=float(rho))
        return torch.zeros_like(w), torch.zeros_like(w, dtype=torch.bool)
    h = gram.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    scale = h.diagonal().sqrt()
    h = h / scale[:, None] / scale[None, :]  # unit diagonal: the diagonal (Jacobi) preconditioning
    ws = w * scale
    fraction = min(sparsity / ((m - n) / m), 1.0) if m else 1.0
    target = ws @ h
    eigvals, eigvecs = torch.linalg.eigh(h)
    keep = _project(ws, zeros, n, m, fraction)
    d = ws * keep  # the magnitude solution of the scaled problem (Wanda's scores, per layer)
    v = torch.zeros_like(ws)
    penalty = float(rho)
    last_keep, stable, done = keep, 0, 0
    for done in range(1, iterations + 1):
        wt = ((target - v + penalty * d) @ eigvecs / (eigvals + penalty)) @ eigvecs.T
        u = wt + v / penalty
        keep = _project(u, zeros, n, m, fraction)
        d = u * keep
        v = v + penalty * (wt - d)
        if done % _CHECK_EVERY == 0:
            changed = int((keep != last_keep).sum())
            share = changed / max(int(keep.sum()), 1)
            penalty *= next(factor for low, factor in _GROWTH if share >= low)
            last_keep = keep
            stable = stable + 1 if changed == 0 else 0
            if stable >= _STABLE_CHECKS:
                break
    result = _pcg(d, target, h, keep, pcg_steps) / scale
    result[:, dead] = 0
    if info is not None:
        info.update(iterations=done, rho=penalty)
    return result, keep


def _check_options(options: dict[str, Any], where: str = "") -> None:
    prefix = f"{where}: " if where else ""

    def positive_int(name: str, low: int, example: str) -> None:
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise SparsityConfigError(f"{prefix}{name} must be an int >= {low} ({example}), got {value!r}")

    positive_int("iterations", 1, "ADMM iterations at most, e.g. 50; fewer is faster")
    positive_int("pcg_steps", 0, "conjugate-gradient steps on the kept weights, e.g. 20; 0 skips the refit")
    rho = options["rho"]
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 < float(rho) < float("inf"):
        raise SparsityConfigError(f"{prefix}rho must be a number > 0 (the initial ADMM penalty, e.g. 0.1), "
                                  f"got {rho!r}")
    if not isinstance(options["compare"], bool):
        raise SparsityConfigError(f"{prefix}compare must be True or False (also run SparseGPT to report the "
                                  f"error relative to it), got {options['compare']!r}")


class ADMMSparsifier(SparseGPTSparsifier):
    """ALPS-class one-shot pruning: ADMM with a growing penalty finds the support, PCG refits the kept weights.

    Prepared and calibrated like :class:`SparseGPTSparsifier` (a ``GramObserver`` accumulating ``XᵀX``
    on the input of every sparsified linear, one product for linears that read one input); ``step()``
    then solves, for each weight, ``min ‖X Wᵀ − X Ŵᵀ‖²`` over the weights ``Ŵ`` with the required
    zeros (:func:`admm_prune`), and **rewrites the kept weights** and the mask: a one-shot step
    (calibrate, ``step()`` once, ``squash_mask()``), also under :func:`~fx_sparsity.one_shot`.

    Unstructured: exactly ``int(sparsity_level × numel)`` zeros per weight, placed anywhere in the
    matrix (rows may differ). ``semi_structured_block_size=m``: ``m/2:m`` (2:4 for 4), with
    ``sparsity_level`` 0.5. ``iterations`` caps the ADMM iterations (it stops earlier once the support
    is stable), ``rho`` is the initial penalty (on the problem scaled to a unit-diagonal ``H``),
    ``pcg_steps`` the conjugate-gradient steps of the refit, ``percdamp`` the dampening of ``H`` as a
    fraction of its mean diagonal. A config entry may override any of them.

    ``self.state[tensor_fqn]`` records ``reconstruction_error`` (``tr(ΔHΔᵀ)/tr(WHWᵀ)`` on the
    calibration inputs), ``seconds``, ``iterations`` and the final ``rho``; with ``compare=True`` also
    ``sparsegpt_error``, ``sparsegpt_seconds`` and ``relative_to_sparsegpt`` (SparseGPT run on the same
    statistics for reference: its result is not used; it costs a SparseGPT step on top).
    """

    def __init__(self, sparsity_level: float = 0.5, semi_structured_block_size: int | None = None, *,
                 iterations: int = 50, rho: float = 0.1, pcg_steps: int = 20, percdamp: float = 0.01,
                 compare: bool = False):
        m = semi_structured_block_size
        if isinstance(m, int) and not isinstance(m, bool) and m >= 2 and not m % 2 and sparsity_level != 0.5:
            raise SparsityConfigError(f"semi_structured_block_size={m} prunes exactly half of every run of {m} "
                                      f"({m // 2}:{m}): sparsity_level must be 0.5, got {sparsity_level!r}; leave "
                                      f"it out or pass semi_structured_block_size=None for unstructured sparsity")
        super().__init__(sparsity_level, semi_structured_block_size, percdamp=percdamp)
        options = {"iterations": iterations, "rho": rho, "pcg_steps": pcg_steps, "compare": compare}
        _check_options(options)
        del self.defaults["block_size"]  # SparseGPT's; ADMM has no column blocks
        self.defaults.update(iterations=int(iterations), rho=float(rho), pcg_steps=int(pcg_steps), compare=compare)

    def validate_group(self, group, tensor):
        super().validate_group(group, tensor)
        _check_options(group, where=f"group '{group['tensor_fqn']}'")
        percdamp = group["percdamp"]
        if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not percdamp > 0:
            raise SparsityConfigError(f"group '{group['tensor_fqn']}': percdamp must be a number > 0 (e.g. 0.01), "
                                      f"got {percdamp!r}")

    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor,  # type: ignore[override]
                    sparsity_level: float, semi_structured_block_size: int | None = None, tensor_fqn: str = "",
                    iterations: int = 50, rho: float = 0.1, pcg_steps: int = 20, percdamp: float = 0.01,
                    compare: bool = False, **kwargs) -> None:
        m = semi_structured_block_size
        n = m // 2 if m else 0
        level = check_level(sparsity_level, high=0.5 if m else 1.0, where=f"group '{tensor_fqn}'")
        weight = getattr(module, tensor_name)
        gram = self._take_gram(tensor_fqn, weight.device)
        dense = (weight * mask).float()
        info: dict[str, Any] = {}
        start = time.perf_counter()
        new_weight, keep = admm_prune(dense, gram, level, n=n, m=m or 0, iterations=iterations, rho=rho,
                                      pcg_steps=pcg_steps, percdamp=percdamp, info=info)
        state: dict[str, Any] = {"seconds": time.perf_counter() - start, **info,
                                 "reconstruction_error": reconstruction_error(dense, new_weight, gram)}
        if compare:
            start = time.perf_counter()
            reference, _ = sparsegpt_prune(dense, gram, level, n=n, m=m or 0, percdamp=percdamp)
            state["sparsegpt_seconds"] = time.perf_counter() - start
            state["sparsegpt_error"] = reconstruction_error(dense, reference, gram)
            state["relative_to_sparsegpt"] = (state["reconstruction_error"] / state["sparsegpt_error"]
                                              if state["sparsegpt_error"] > 0 else float("nan"))
        self.state[tensor_fqn].update(state)
        weight.copy_(new_weight.to(weight.dtype))
        mask.copy_(keep)
