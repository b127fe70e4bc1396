"""Wall-clock timing shared by the benchmarks in ``tools/``."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 20, number: int = 1) -> float:
    """Median over ``repeat`` runs of the time of ``number`` calls of ``fn``, in ms per call.

    ``warmup`` calls run first (kernel caches, lazy packing, allocator). Runs under
    ``torch.inference_mode`` so autograd bookkeeping is not timed.
    """
    if repeat < 1 or number < 1:
        raise ValueError(f"repeat and number must be >= 1, got repeat={repeat}, number={number}")
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - start) / number)
    return statistics.median(times) * 1e3
