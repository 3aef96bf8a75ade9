"""normlab.runtime.evidence: paired differences over seeds, their t interval, the three criteria, the summary."""

import math

import numpy as np
import pytest
from scipy import stats

from normlab.runtime.evidence import paired, t_quantile


def test_interval_is_the_t_interval_of_the_mean_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 9), rng.normal(0.0, 1.0, 9)
    p = paired(a, b)
    d = a - b
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert p.interval == pytest.approx((lo, hi), rel=1e-12)
    assert (p.mean, p.median, p.n) == (pytest.approx(d.mean()), pytest.approx(np.median(d)), 9)
    assert p.n_positive == int((d > 0).sum())


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(4000):
        lo, hi = paired(rng.normal(0.3, 1.0, 8), 0.0).interval
        hits += lo < 0.3 < hi
    assert 0.935 < hits / 4000 < 0.965  # binomial sd at 4000 trials is 0.0035


def test_pairing_removes_what_the_seed_does_to_both():
    seed_effect = np.array([0.0, 5.0, -5.0, 10.0, -10.0, 3.0, -3.0, 7.0])
    a = seed_effect + 1.0 + np.array([0.1, -0.1, 0.05, -0.05, 0.0, 0.1, -0.1, 0.0])
    p = paired(a, seed_effect)
    assert p.above(0.5) and p.n_positive == 8  # unpaired, the seed effect would swamp a 1-point gain


def test_above_below_within_read_the_interval():
    p = paired(np.array([2.0, 2.5, 3.0, 3.5, 2.2, 2.8, 3.1, 2.9]), 0.0)
    lo, hi = p.interval
    assert p.above() and p.above(lo - 1e-9) and not p.above(lo + 1e-9)
    assert p.below(hi + 1e-9) and not p.below(hi - 1e-9) and not p.below()
    assert p.within(hi + 1e-9) and not p.within(hi - 1e-9)


def test_ratio_compares_logs_and_prints_ratios():
    a = np.array([800.0, 400.0, 400.0, 800.0, 600.0, 500.0, 700.0, 400.0])
    b = a / 8.0
    p = paired(a, b, ratio=True)
    assert p.interval == pytest.approx((math.log(8), math.log(8)))  # every seed: exactly 8x
    assert p.above(7.9) and not p.above(8.1) and p.within(8.1) and not p.within(7.9)
    assert p.summary() == "8.0x, 95% CI [8.0, 8.0], larger at 8/8 seeds"


def test_summary_says_difference_interval_and_sign_count():
    p = paired(np.array([0.05, 0.03, 0.04, 0.02]), np.zeros(4), scale=100, unit="points")
    lo, hi = p.interval
    assert p.summary() == f"+3.5 points, 95% CI [{lo:+.1f}, {hi:+.1f}], 4/4 seeds"


def test_one_seed_bounds_nothing():
    p = paired([1.0], [0.0])
    assert p.interval == (-math.inf, math.inf) and not p.above() and not p.below()


@pytest.mark.parametrize("a, b, kw, match", [
    ([1.0, 2.0], [1.0], {}, "same length"),
    ([[1.0, 2.0]], [[1.0, 2.0]], {}, "1-d"),
    ([], [], {}, "1-d|empty"),
    ([1.0, math.inf], [1.0, 2.0], {}, "finite"),
    ([1.0, math.nan], 0.0, {}, "finite"),
    ([1.0, -2.0], [1.0, 2.0], {"ratio": True}, "positive"),
    ([1.0, 2.0], [1.0, 2.0], {"confidence": 95}, "confidence"),
])
def test_paired_rejects_bad_input(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        paired(a, b, **kw)


def test_margins_are_checked():
    p = paired([1.0, 2.0, 3.0], 0.0)
    for bad in (math.nan, "1", True):
        with pytest.raises(ValueError, match="finite number"):
            p.above(bad)
    with pytest.raises(ValueError, match="wider than 0"):
        p.within(0.0)
    with pytest.raises(ValueError, match="positive"):
        paired([2.0, 3.0], [1.0, 1.0], ratio=True).above(0.0)


def test_t_quantile_matches_tables_and_rejects_bad_input():
    assert t_quantile(0.975, 7) == pytest.approx(2.364624, abs=1e-6)  # the table value for 8 seeds
    assert t_quantile(0.975, 1000) == pytest.approx(1.962339, abs=1e-6)
    for p, df in [(1.0, 3), (0.5, 0), (0.9, 2.0), (0.9, True)]:
        with pytest.raises(ValueError):
            t_quantile(p, df)
