"""Paired comparisons over seeds: the statistics behind every comparative claim in the course.

Two methods compared at the same seed share the data split, the initial weights and the order of
the batches, so the difference between them at that seed removes what the seed does to both. For
n seeds the differences d_1, ..., d_n are summarized by

- their median and mean,
- a 95% t interval for the mean difference, mean +- t(n-1, 0.975) * sd / sqrt(n),
- the sign count: at how many seeds d_i > 0.

Why a t interval, not a bootstrap: with the 8 to 16 seeds a notebook can afford, the percentile
bootstrap's "95%" interval covers the truth less often than 95% (it is too narrow by about
sqrt((n-1)/n) and has no t tails), and the distribution-free interval for the median is, at n = 8,
the whole range of the data. The t interval is exact when the differences are normal and close
to it at n >= 8 when they are not; the sign count is printed beside it as the check that needs no
assumption at all.

Ratios (steps to a target, drift ratios) are compared on the log scale: the interval of the mean
log-ratio, mapped back with exp, is an interval for the geometric-mean ratio.

Every criterion is one of three tests of the interval, declared before the run:

- ``above(margin)``: the whole interval is above the margin (an ordering: A beats B by more than it);
- ``below(margin)``: the whole interval is below the margin;
- ``within(window)``: the whole interval lies in [-window, +window] (an equivalence; the 95%
  interval is stricter than the 90% one that the two one-sided tests use, so this errs towards
  "not shown").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from normlab._validate import is_int, is_number

__all__ = ["Paired", "paired", "t_quantile"]


def t_quantile(p, df):
    """Return the p-quantile of Student's t distribution with df degrees of freedom."""
    if not (isinstance(p, float) and 0.0 < p < 1.0):
        raise ValueError(f"p must be a float in (0, 1), got {p!r}")
    if not is_int(df) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    from scipy.stats import t  # scipy comes with scikit-learn, which the course needs anyway

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Paired:
    """Paired differences a - b over seeds (log(a) - log(b) when ``ratio``), and their interval."""

    diffs: np.ndarray  # (n,) one difference per seed, in the units of the summary
    confidence: float = 0.95
    unit: str = ""  # "points", "nats", ...; a ratio prints as "x"
    ratio: bool = False  # diffs are log-ratios; mean, median and the interval print as ratios

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return float(self.diffs.mean())

    @property
    def median(self) -> float:
        return float(np.median(self.diffs))

    @property
    def interval(self) -> tuple[float, float]:
        """The t interval of the mean difference, (lo, hi), on the scale of ``diffs``."""
        if self.n < 2:
            return (-math.inf, math.inf)  # one seed has no spread, so it bounds nothing
        half = t_quantile(0.5 + self.confidence / 2, self.n - 1) * self.diffs.std(ddof=1) / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)

    @property
    def n_positive(self) -> int:
        return int((self.diffs > 0).sum())

    def _on_scale(self, margin):
        if not is_number(margin) or not math.isfinite(margin):
            raise ValueError(f"a margin must be a finite number, got {margin!r}")
        if self.ratio:
            if margin <= 0:
                raise ValueError(f"a ratio's margin must be positive (1 means 'equal'), got {margin!r}")
            return math.log(margin)
        return float(margin)

    def above(self, margin=None) -> bool:
        """Whether the whole interval lies above margin (default: no difference, 0 or a ratio of 1)."""
        return self.interval[0] > self._on_scale(self._null if margin is None else margin)

    def below(self, margin=None) -> bool:
        """Whether the whole interval lies below margin (default: no difference)."""
        return self.interval[1] < self._on_scale(self._null if margin is None else margin)

    def within(self, window) -> bool:
        """Whether the whole interval lies within [-window, +window] (ratios: [1/window, window])."""
        w = self._on_scale(window)
        if w <= 0:
            raise ValueError(f"an equivalence window must be wider than 0 (a ratio's wider than 1), got {window!r}")
        lo, hi = self.interval
        return -w <= lo and hi <= w

    @property
    def _null(self):
        return 1.0 if self.ratio else 0.0

    def shown(self, value) -> float:
        """Return a value on the scale of ``diffs`` as the summary prints it (exp for a ratio)."""
        return math.exp(value) if self.ratio else value

    def summary(self, digits=1, scientific=False) -> str:
        """One line for the text, e.g. '+3.2 points, 95% CI [1.1, 5.0], 8/8 seeds' (scientific: +3.2e-07)."""
        lo, hi = (self.shown(v) for v in self.interval)
        pct = f"{100 * self.confidence:g}% CI"
        if self.ratio:
            fmt = f".{digits}f"
            return (f"{self.shown(self.mean):{fmt}}x, {pct} [{lo:{fmt}}, {hi:{fmt}}], "
                    f"larger at {self.n_positive}/{self.n} seeds")
        unit = f" {self.unit}" if self.unit else ""
        fmt = f"+.{digits}{'e' if scientific else 'f'}"
        return f"{self.mean:{fmt}}{unit}, {pct} [{lo:{fmt}}, {hi:{fmt}}], {self.n_positive}/{self.n} seeds"

    def __str__(self) -> str:
        return self.summary()


def paired(a, b, *, scale=1.0, unit="", ratio=False, confidence=0.95) -> Paired:
    """Compare a and b seed by seed: return the Paired differences scale * (a - b).

    a, b: arrays of one value per seed, the same seed at the same index; b may be a number (a
    one-sample comparison with a fixed value). With ``ratio`` the comparison is log(a) - log(b)
    and a, b must be positive (scale is then ignored). Non-finite values are refused: a run that
    never reached a target must be given a value, e.g. the budget, and the text must say so.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape) if np.ndim(b) == 0 else np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-d with one value per seed and the same length, "
                         f"got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("a and b are empty: a comparison needs at least one seed")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"a and b must be finite (replace a run that never got there by a bound), got {a} and {b}")
    if not (isinstance(confidence, float) and 0.5 <= confidence < 1.0):
        raise ValueError(f"confidence must be a float in [0.5, 1), got {confidence!r}")
    if ratio:
        if (a <= 0).any() or (b <= 0).any():
            raise ValueError(f"a ratio needs positive values, got {a} and {b}")
        diffs = np.log(a) - np.log(b)
    else:
        diffs = float(scale) * (a - b)
    return Paired(diffs, confidence=confidence, unit=unit, ratio=bool(ratio))
