"""What the pipeline reads from a sparsifier: the whole contract between the two rungs of the ladder."""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["SparsifierLike"]


class SparsifierLike(Protocol):
    """What the pipeline reads from a sparsifier (BaseSparsifier and the structured pruners have it all)."""

    defaults: dict[str, Any]
    model: nn.Module | None
    groups: list[dict[str, Any]]
    config: list[dict] | None
    masks: str  # "elements" (one mask per tensor element) or "channels" (one entry per channel class)
    observer_type: type[nn.Module] | None

    def validate_group(self, group: dict[str, Any], tensor: torch.Tensor) -> None: ...

    def make_observer(self, num_channels: int) -> nn.Module: ...

    def on_prepared(self, model: nn.Module) -> None: ...
