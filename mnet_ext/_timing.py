"""Timing helpers shared by ``mnet_ext.profile`` and the benchmarks in ``bench/``.

Wall-clock times with the device synchronised around each call (``time.perf_counter``): right for the CPU and for
whole-model steps on a GPU, where a call lasts far longer than the synchronisation. Kernel-sized GPU timings
belong to ``triton.testing.do_bench`` (see ``bench/common.py``).

Comparisons (``time_pair``) interleave the two candidates, A B B A A B ..., so a change of machine load hits both
alike, and report the median of the per-pair ratios with its interquartile range. On a busy machine the spread can
exceed the difference being measured (a 2-core box quantises every call to the scheduler's ~8 ms slices): such a
ratio is flagged (``Ratio.meaningful``) instead of being shown as a speedup.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# A ratio whose middle half of per-pair ratios spans more than this fraction of its median is not meaningful: the
# spread is then as large as the speedups this project looks for (1.2x and up).
RATIO_SPREAD_LIMIT = 0.2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    t0 = clock()
    fn()
    sync(device)
    return (clock() - t0) * 1e3


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
        times.append(_timed_call(fn, device, time.perf_counter))
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


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of a list of samples (times in ms, or ratios)."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        if not samples:
            raise ValueError("samples: need at least one sample")
        median, q1, q3 = quantiles(samples, (0.5, 0.25, 0.75))
        return cls(median, q1, q3, len(samples))

    @property
    def rel_iqr(self) -> float:
        """(q3 - q1) / median: the relative width of the middle half (inf when the median is 0)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("inf")


@dataclass(frozen=True)
class Ratio:
    """``a / b`` from interleaved pairs: the median of the per-pair ratios, its spread, and whether it means
    anything (the spread below ``RATIO_SPREAD_LIMIT``)."""

    spread: Spread

    @property
    def value(self) -> float:
        return self.spread.median

    @property
    def meaningful(self) -> bool:
        return self.spread.rel_iqr <= RATIO_SPREAD_LIMIT

    def format(self, width: int = 7) -> str:
        """``1.52x`` or, when the spread makes it meaningless, ``1.52x!``; padded to ``width`` + 1 characters."""
        return f"{self.value:>{width - 1}.2f}x{' ' if self.meaningful else '!'}"


@dataclass(frozen=True)
class PairTiming:
    a: Spread  # times of the first candidate, ms
    b: Spread  # times of the second candidate, ms
    ratio: Ratio  # a / b per pair: with a = native, b = fused, the speedup


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], device: torch.device, min_time: float = 0.2,
              max_pairs: int = 100, min_pairs: int = 5, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> PairTiming:
    """Time ``fn_a`` against ``fn_b``, interleaved in the order A B, B A, A B, ... (each pair's first call
    alternates, so neither candidate always runs on the other's warm caches), synchronising the device around each
    call: at least ``min_pairs`` pairs, then more until ``min_time`` seconds have passed or ``max_pairs`` pairs were
    made. ``clock`` (seconds) is injectable for tests."""
    if min_pairs < 1 or max_pairs < min_pairs:
        raise ValueError(f"min_pairs/max_pairs: need 1 <= min_pairs <= max_pairs, got {min_pairs}, {max_pairs}")
    for _ in range(warmup):
        fn_a()
        fn_b()
    sync(device)
    times_a: list[float] = []
    times_b: list[float] = []
    start = clock()
    while len(times_a) < min_pairs or (clock() - start < min_time and len(times_a) < max_pairs):
        if len(times_a) % 2 == 0:
            times_a.append(_timed_call(fn_a, device, clock))
            times_b.append(_timed_call(fn_b, device, clock))
        else:
            times_b.append(_timed_call(fn_b, device, clock))
            times_a.append(_timed_call(fn_a, device, clock))
    ratios = [ta / tb if tb > 0 else float("inf") for ta, tb in zip(times_a, times_b, strict=True)]
    return PairTiming(Spread.of(times_a), Spread.of(times_b), Ratio(Spread.of(ratios)))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth in GB/s (read + write) for a buffer larger than the caches."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6
