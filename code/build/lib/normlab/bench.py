"""Timing harness: medians of repeated runs, so one slow call does not decide a comparison."""

from __future__ import annotations

import statistics
import time

__all__ = ["median_time"]


def median_time(fn, *args, repeat: int = 7, number: int = 1, warmup: int = 1, **kwargs) -> float:
    """Return the median over ``repeat`` rounds of the seconds one call of ``fn(*args, **kwargs)`` takes.

    Each round times ``number`` calls and divides; ``warmup`` calls run first and are not timed.
    """
    if repeat < 1 or number < 1 or warmup < 0:
        raise ValueError(f"need repeat >= 1, number >= 1, warmup >= 0; got {repeat}, {number}, {warmup}")
    for _ in range(warmup):
        fn(*args, **kwargs)
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args, **kwargs)
        rounds.append((time.perf_counter() - t0) / number)
    return statistics.median(rounds)
