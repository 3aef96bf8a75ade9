"""normlab.runtime.bench: the median of rounds, the best of interleaved rounds, and their argument checks."""

import functools
import time

import pytest

from normlab.runtime.bench import best_times, median_time


def test_median_time_measures_a_known_sleep():
    t = median_time(time.sleep, 0.01, repeat=3, warmup=0)
    assert 0.009 < t < 0.2


def test_median_time_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeat >= 1"):
        median_time(lambda: None, repeat=0)


def test_best_times_interleaves_the_functions_and_keeps_each_ones_best_round():
    calls = []

    def sleeper(name, seconds):
        calls.append(name)
        time.sleep(seconds)

    fns = {"short": functools.partial(sleeper, "short", 0.002), "long": functools.partial(sleeper, "long", 0.02)}
    t = best_times(fns, repeat=3, warmup=1)
    assert calls == ["short", "long"] + ["short", "long"] * 3  # warm-up, then the two take turns
    assert 0.0019 < t["short"] < 0.015 and 0.019 < t["long"] < 0.2
    assert t["long"] / t["short"] > 2


def test_best_times_is_the_minimum_so_one_slow_round_does_not_count():
    durations = iter([0.05, 0.001, 0.001])  # the first timed round is slowed down, as by a busy machine

    t = best_times({"f": lambda: time.sleep(next(durations))}, repeat=3, warmup=0)
    assert t["f"] < 0.02


@pytest.mark.parametrize("kwargs, match", [({"repeat": 0}, "repeat >= 1"), ({"number": 0}, "number >= 1"),
                                           ({"warmup": -1}, "warmup >= 0")])
def test_best_times_rejects_bad_rounds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        best_times({"f": lambda: None}, **kwargs)


def test_best_times_needs_functions():
    with pytest.raises(ValueError, match="empty"):
        best_times({})
