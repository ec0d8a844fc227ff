"""Timing helpers shared by ``mnet_ext.profile`` and the benchmarks in ``bench/``.

Wall-clock medians with the device synchronised around each call (``time.perf_counter``): right for the CPU and
for whole-model steps on a GPU, where a call lasts far longer than the synchronisation. Kernel-sized GPU timings
belong to ``triton.testing.do_bench`` (see ``bench/common.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(fn: Callable[[], object], device: torch.device, min_time: float = 0.2, max_reps: int = 200,
                 min_reps: int = 3, warmup: int = 1) -> list[float]:
    """Wall times of ``fn`` in ms after ``warmup`` calls, synchronising the device around each call; at least
    ``min_reps`` calls, then more until ``min_time`` seconds have passed or ``max_reps`` calls were made."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantiles(times: list[float], qs: tuple[float, ...] = (0.5, 0.2, 0.8)) -> list[float]:
    """The given quantiles of ``times`` (linear interpolation, as ``torch.quantile``)."""
    ordered = sorted(times)
    out = []
    for q in qs:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def time_ms(fn: Callable[[], object], device: torch.device, min_time: float = 0.2, max_reps: int = 200) -> float:
    """Median wall time of ``fn`` in ms after a warm-up, synchronising the device around each call."""
    return statistics.median(time_samples(fn, device, min_time, max_reps))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth in GB/s (read + write) for a buffer larger than the caches."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6
