"""normlab.bench: the median of rounds, and its argument checks."""

import time

import pytest

from normlab.bench import median_time


def test_median_time_measures_a_known_sleep():
    t = median_time(time.sleep, 0.01, repeat=3, warmup=0)
    assert 0.009 < t < 0.2


def test_median_time_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeat >= 1"):
        median_time(lambda: None, repeat=0)
