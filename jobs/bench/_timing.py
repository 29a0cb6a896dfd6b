"""One way to time things for every benchmark: the median and spread of N measurements.

``measure(fn, repeats)`` calls ``fn`` ``repeats`` times (after ``warmup`` untimed calls; with
``seconds``, for at least that long) and returns a ``Timing``; ``median_spread(values)``
summarises figures measured elsewhere (e.g. per-epoch images/s). The spread is half the distance between the 25th and 75th
percentiles. Baselines are measured in the same run and reported as ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median: float
    spread: float
    n: int

    def __str__(self) -> str:
        return f"{self.median:.4g} ± {self.spread:.2g} (n={self.n})"


def median_spread(values: Sequence[float]) -> Timing:
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("no measurements")
    if len(vals) == 1:
        return Timing(vals[0], 0.0, 1)
    q = statistics.quantiles(vals, n=4, method="inclusive")
    return Timing(statistics.median(vals), (q[2] - q[0]) / 2, len(vals))


def measure(
    fn: Callable[[], object], repeats: int = 5, warmup: int = 1, seconds: float = 0.0
) -> Timing:
    """Seconds per call of ``fn``: median and spread over ``repeats`` timed calls, or over
    as many as fit in ``seconds`` when that is more."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < max(1, repeats) or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median_spread(times)


def per_second(n: float, t: Timing) -> Timing:
    """Seconds per pass of ``n`` items -> items per second (the spread scaled alike)."""
    r = n / t.median
    return Timing(r, r * t.spread / t.median, t.n)
