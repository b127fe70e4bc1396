"""Wall-clock timing shared by ``mapping="auto"`` and the benchmarks.

On an accelerator a call returns once its kernels are queued, not done: pass
``synchronize=device_synchronizer(device)`` so every sample waits for its kernels, or the
clock measures launches.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["median_ms", "interleaved_median_ms", "interleaved_times_ms", "device_synchronizer"]


def median_ms(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 20, number: int = 1) -> float:
    """Median over ``repeat`` runs of the time of ``number`` calls of ``fn``, in ms per call.

    ``warmup`` calls run first (kernel caches, lazy packing, allocator). Runs under
    ``torch.inference_mode`` so autograd bookkeeping is not timed.
    """
    return interleaved_median_ms({"fn": fn}, warmup=warmup, repeat=repeat, number=number)["fn"]


def device_synchronizer(device: torch.device | str) -> Callable[[], None] | None:
    """What waits for ``device``'s queued kernels (None on the CPU and meta, where calls are synchronous)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return None
    return functools.partial(torch.accelerator.synchronize, device)


def _no_wait() -> None:
    pass


def _calls_for(fn: Callable[[], object], min_sample_s: float, synchronize: Callable[[], None]) -> int:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    once = time.perf_counter() - start
    return max(1, min(1000, int(min_sample_s / max(once, 1e-9))))


def interleaved_median_ms(fns: Mapping[str, Callable[[], object]], *, warmup: int = 3, repeat: int = 20,
                          number: int | None = 1, min_sample_ms: float = 1.0,
                          synchronize: Callable[[], None] | None = None) -> dict[str, float]:
    """Like :func:`median_ms` for several functions, timed in turn within each repeat.

    Interleaving makes a change in machine load (other processes on a shared machine)
    hit every candidate alike, so their ratios stay meaningful. ``number=None`` picks,
    per function, enough calls per sample to last ``min_sample_ms``.
    """
    times = interleaved_times_ms(fns, warmup=warmup, repeat=repeat, number=number, min_sample_ms=min_sample_ms,
                                 synchronize=synchronize)
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_times_ms(fns: Mapping[str, Callable[[], object]], *, warmup: int = 3, repeat: int = 20,
                         number: int | None = 1, min_sample_ms: float = 1.0, budget_s: float = 0.0,
                         max_rounds: int | None = None, inference: bool = True,
                         synchronize: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Every sample of :func:`interleaved_median_ms` (ms per call), for other statistics.

    At least ``repeat`` rounds, and more while the whole run is within ``budget_s`` (up to
    ``max_rounds``). Each round starts with the next function in turn, so no function
    always runs right after the same other one. The calls run under ``torch.inference_mode``
    unless ``inference=False`` (timing training steps). ``synchronize`` (see
    :func:`device_synchronizer`) is called before each sample starts and before it stops.
    """
    wait = synchronize or _no_wait
    if repeat < 1 or (number is not None and number < 1):
        raise ValueError(f"repeat and number must be >= 1, got repeat={repeat}, number={number}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    with torch.inference_mode(inference):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        calls = {name: number or _calls_for(fn, min_sample_ms / 1e3, wait) for name, fn in fns.items()}
        rounds, begin = 0, time.perf_counter()
        while rounds < repeat or ((max_rounds is None or rounds < max_rounds)
                                  and time.perf_counter() - begin < budget_s):
            for name in names[rounds % len(names):] + names[:rounds % len(names)]:
                fn, n = fns[name], calls[name]
                wait()
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                wait()
                times[name].append((time.perf_counter() - start) / n * 1e3)
            rounds += 1
    return times
