"""Self-checks of "Internal covariate shift, measured" (``chapters/covariate_shift``).

- ``lab.ipynb``: ``check_drift_ratio``, ``check_noise``;
- ``lab_residual.ipynb``: ``check_block_growth``, ``check_largest_rate``.
"""

from __future__ import annotations

import numpy as np

from normlab.checks._common import _pass, _self_check, assert_close


@_self_check
def check_drift_ratio(fn):
    """Check ``fn(p15, p50, p85) -> ratio`` against ``drift_ratio`` on several percentile traces."""
    from normlab.experiments.covariate_shift import drift_ratio

    rng = np.random.default_rng(0)
    cases = [
        ("a constant distribution", np.full(5, -1.0), np.zeros(5), np.ones(5)),
        ("a median that climbs", -np.ones(4), np.array([0.0, 1.0, 3.0, 2.0]), np.array([1.0, 2, 4, 3])),
    ]
    p50 = rng.normal(size=(20, 3)).cumsum(0)
    spread = rng.uniform(0.5, 2.0, size=(20, 3))
    cases.append(("random walks of 3 units over 20 steps", p50 - spread, p50, p50 + spread))
    for desc, p15, p50, p85 in cases:
        assert_close(f"drift ratio for {desc}", fn(p15, p50, p85), drift_ratio(p15, p50, p85), rtol=1e-9)
    print(f"PASS drift ratio: matches the reference on {len(cases)} inputs.")


@_self_check
def check_noise(fn):
    """Check ``fn(a, mu_t, sigma_t, generator) -> s * a + m`` by the statistics of its noise."""
    import math

    import torch

    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for mu_t, sigma_t in [(0.3, 1.1), (-0.45, 1.0)]:
        zero = fn(torch.zeros(n, 2), mu_t, sigma_t, gen)
        if zero is None or tuple(zero.shape) != (n, 2):
            got = getattr(zero, "shape", None)
            raise AssertionError(f"noise on a ({n}, 2) input: got shape {got}, expected ({n}, 2)")
        case = f"mu_t={mu_t}, sigma_t={sigma_t}"
        assert_close(f"{case}, a = 0: min of m", zero.min().item(), mu_t - 0.1, atol=2e-3)
        assert_close(f"{case}, a = 0: max of m", zero.max().item(), mu_t + 0.1, atol=2e-3)
        assert_close(f"{case}, a = 0: mean of m", zero.mean().item(), mu_t, atol=2e-3)
        one = fn(torch.ones(n, 2), mu_t, sigma_t, gen)
        assert_close(f"{case}, a = 1: mean of s + m", one.mean().item(), sigma_t + mu_t, atol=3e-3)
        std = math.sqrt(0.1**2 + 0.2**2 / 12)  # s and m independent: N(., 0.1) plus U(width 0.2)
        assert_close(f"{case}, a = 1: std of s + m", one.std().item(), std, rtol=0.02)
        if torch.equal(zero[:, 0], zero[:, 1]):
            raise AssertionError(f"{case}: both columns got the same noise; m must be drawn per element")
    print("PASS noise: m and s have the right ranges, means and spreads on 2 settings.")


@_self_check
def check_block_growth(fn):
    """Check ``fn(scale) -> g``, the factor by which a plain pre-activation residual block
    x + W2 relu(W1 relu(x)) multiplies the mean square of x at initialization (weights
    ~ N(0, scale^2 / fan_in)), against a simulation of wide random blocks."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n, width, draws = 2048, 256, 32  # the simulation's own error is about 1%
    x = torch.randn(n, width, generator=gen)
    for scale in (0.5, 1.0, 2**0.5, 1.7):
        got = fn(scale)
        ratios = []
        for _ in range(draws):
            W1, W2 = (torch.randn(width, width, generator=gen) * scale / width**0.5 for _ in range(2))
            y = x + torch.relu(torch.relu(x) @ W1) @ W2
            ratios.append(((y**2).mean() / (x**2).mean()).item())
        assert_close(f"growth of the mean square at scale {scale:.3g}", got, float(np.mean(ratios)), rtol=0.05)
    print(f"PASS block growth: matches {draws} random blocks at each of 4 scales (within 5%).")


@_self_check
def check_largest_rate(fn):
    """Check ``fn(lrs, steps) -> (seeds,)``: per seed, the largest rate whose run reached the target
    (steps finite), and the smallest rate where no run did (``covariate_shift.largest_rate``)."""
    from normlab.experiments.covariate_shift import largest_rate

    inf = np.inf
    lrs = np.array([0.03, 0.1, 0.3, 1.0, 3.0])
    cases = [("a typical sweep", lrs, np.array([[300, 400, inf], [120, 150, 200], [60, 80, 90], [40, inf, 70],
                                                  [inf, inf, inf]])),
             ("a seed that never reaches it", lrs[:3], np.array([[200.0, inf], [100, inf], [inf, inf]])),
             ("a gap in the middle", lrs[:4], np.array([[100.0], [inf], [50], [inf]])),
             ("rates not in order", lrs[[2, 0, 1]], np.array([[50.0, inf], [200, 300], [100, 150]]))]
    for desc, rates, steps in cases:
        got = fn(rates, steps)
        assert_close(f"largest rate, {desc}", got, largest_rate(rates, steps))
    _pass("largest workable rate", len(cases))
