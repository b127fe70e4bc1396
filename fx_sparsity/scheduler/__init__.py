"""Sparsity-level schedulers (counterpart of ``torch.ao.pruning.scheduler``)."""

from .base_scheduler import BaseScheduler
from .cubic_scheduler import CubicSL
from .lambda_scheduler import LambdaSL

__all__ = ["BaseScheduler", "CubicSL", "LambdaSL"]
