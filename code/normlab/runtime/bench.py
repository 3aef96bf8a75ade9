"""Timing harness: the median of repeated runs, or the best of interleaved rounds.

``median_time`` times one function back to back. ``best_times`` compares functions: they take
turns within each round, so a slow spell on the machine hits all of them, and each keeps its best
round. Other programs on a busy machine only ever add time, so the best round is the one they
disturbed least; a ratio of best times holds under load where a ratio of medians can swing.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["best_times", "median_time"]


def _check_rounds(repeat, number, warmup):
    if repeat < 1 or number < 1 or warmup < 0:
        raise ValueError(f"need repeat >= 1, number >= 1, warmup >= 0; got {repeat}, {number}, {warmup}")


def median_time(fn, *args, repeat: int = 7, number: int = 1, warmup: int = 1, **kwargs) -> float:
    """Return the median over ``repeat`` rounds of the seconds one call of ``fn(*args, **kwargs)`` takes.

    Each round times ``number`` calls and divides; ``warmup`` calls run first and are not timed.
    """
    _check_rounds(repeat, number, warmup)
    for _ in range(warmup):
        fn(*args, **kwargs)
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn(*args, **kwargs)
        rounds.append((time.perf_counter() - t0) / number)
    return statistics.median(rounds)


def best_times(fns: dict, repeat: int = 7, number: int = 1, warmup: int = 1) -> dict:
    """Return {name: the seconds per call of the best of ``repeat`` rounds} for ``fns`` {name: fn}.

    Each ``fn`` takes no arguments (``functools.partial`` binds them). In every round each function,
    in turn, is timed over ``number`` calls; ``warmup`` untimed calls of each run first.
    """
    if not fns:
        raise ValueError("fns is empty: pass {name: function} of the functions to compare")
    _check_rounds(repeat, number, warmup)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / number)
    return best
