"""OWL (Yin et al. 2023): non-uniform per-layer levels from each layer's share of outlier weights."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import SparsityConfigError
from .wanda_sparsifier import WandaSparsifier

__all__ = ["owl_levels"]


@torch.no_grad()
def owl_levels(sparsifier: WandaSparsifier, *, layer_of: Callable[[str], str] | None = None, lam: float = 0.08,
               outlier_threshold: float = 5.0) -> dict[str, float]:
    """Set each group's ``sparsity_level`` by OWL's outlier-weighted allocation; returns ``{tensor_fqn: level}``.

    For a prepared and calibrated :class:`~fx_sparsity.WandaSparsifier` (or SparseGPT): a
    weight is an outlier when its Wanda score ``|W_ij|·‖X_j‖`` exceeds ``outlier_threshold`` times
    the mean score of its layer. Layers (``layer_of(tensor_fqn)``, default: each tensor alone;
    the paper groups a transformer block's weights) with more outliers get a lower level: the
    levels span ``target ± lam`` linearly in the outlier share, shifted so that the overall
    sparsity (weights-weighted) stays the target, the current common level. Call it after
    calibration and before ``step()``.
    """
    model = sparsifier._require_prepared("owl_levels")
    levels = {g["sparsity_level"] for g in sparsifier.groups}
    if len(levels) != 1:
        raise SparsityConfigError(f"owl_levels spreads one target level over the layers; the groups have "
                                  f"{sorted(levels)}")
    if any(g.get("semi_structured_block_size") for g in sparsifier.groups):
        raise SparsityConfigError("owl_levels sets unstructured levels; an m/2:m pattern has one level (0.5)")
    if not 0 < lam:
        raise SparsityConfigError(f"lam must be > 0 (the half-width of the level range), got {lam!r}")
    target = float(levels.pop())
    layer_of = layer_of or (lambda fqn: fqn)
    outliers: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    for group in sparsifier.groups:
        fqn = group["tensor_fqn"]
        weight = getattr(model.get_submodule(group["module_fqn"]), group["tensor_name"])
        scores = weight.abs().float() * sparsifier._observer(fqn).channel_norms().to(weight.device)
        layer = layer_of(fqn)
        total = outliers.setdefault(layer, [0.0, 0.0])
        total[0] += float((scores > outlier_threshold * scores.mean()).sum())
        total[1] += scores.numel()
        sizes[layer] = sizes.get(layer, 0) + scores.numel()
    share = {layer: count / n for layer, (count, n) in outliers.items()}
    low, high = min(share.values()), max(share.values())
    spread = {layer: (0.0 if high == low else (s - low) / (high - low)) for layer, s in share.items()}
    raw = {layer: target + lam - 2 * lam * v for layer, v in spread.items()}  # more outliers: fewer zeros
    shift = target - sum(raw[layer] * sizes[layer] for layer in raw) / sum(sizes.values())
    level_of = {layer: min(max(level + shift, 0.0), 1.0) for layer, level in raw.items()}
    result = {}
    for group in sparsifier.groups:
        group["sparsity_level"] = level_of[layer_of(group["tensor_fqn"])]
        result[group["tensor_fqn"]] = group["sparsity_level"]
    return result
