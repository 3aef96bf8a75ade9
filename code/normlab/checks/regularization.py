"""Self-checks of "Batch norm as a regularizer" (``chapters/regularization``).

- ``lab_noise.ipynb``: ``check_predicted_noise``, ``check_measured_noise``;
- ``lab_statistics.ipynb``: ``check_variance_shift``, ``check_ema_weights``;
- ``lab_ghost.ipynb``: ``check_ghost_forward``, ``check_ghost_running``.
"""

from __future__ import annotations

import numpy as np

from normlab import scratch
from normlab.checks._common import _pass, _self_check, assert_close, assert_tuple_close


@_self_check
def check_predicted_noise(fn):
    """Check ``fn(h, batch_sizes, examples) -> (len(B), U)``, the delta method's std of a normalized value."""
    from normlab.experiments.regularization import predicted_noise

    rng = np.random.default_rng(3)
    cases = [
        ("Gaussian units", rng.normal(size=(500, 3)), [4, 16], [0, 1, 2]),
        ("skewed units", rng.exponential(size=(300, 2)), [8, 32, 128], [5, 7]),
        ("one heavy-tailed unit", rng.standard_t(5, size=(400, 1)) * 3 + 1, [2, 64], [10]),
    ]
    for desc, h, sizes, examples in cases:
        assert_close(f"predicted noise for {desc}", fn(h, sizes, examples), predicted_noise(h, sizes, examples),
                     rtol=1e-9)
    _pass("predicted noise", len(cases))


@_self_check
def check_ghost_forward(fn):
    """Check ``fn(x, gamma, beta, virtual_batch_size, eps) -> out``: ghost batch norm in training mode.

    x is (N, D); consecutive groups of ``virtual_batch_size`` rows (the last takes the remainder)
    are each normalized with their own mean and biased variance, then scaled and shifted.
    """
    rng = np.random.default_rng(1)
    cases = [(12, 3, 4), (10, 2, 4), (8, 5, 8), (6, 3, 100)]
    for n, d, v in cases:
        x = rng.normal(1.0, 2.0, size=(n, d))
        gamma, beta = rng.normal(1.0, 0.5, size=d), rng.normal(0.0, 0.5, size=d)
        expected = np.concatenate(
            [
                scratch.batch_norm_forward(x[i : i + v], gamma, beta, np.zeros(d), np.ones(d), eps=1e-5)[0]
                for i in range(0, n, v)
            ]
        )
        got = fn(x, gamma, beta, v, 1e-5)
        assert_close(f"ghost BN of x ({n}, {d}) with virtual batches of {v}", got, expected)
    _pass("ghost batch norm forward", len(cases))


@_self_check
def check_variance_shift(fn):
    """Check ``fn(a, weight, p) -> ratio``, the predicted variance shift per output channel."""
    from normlab.experiments.regularization import predicted_variance_ratio

    rng = np.random.default_rng(2)
    cases = [(200, 5, 3, 0.5), (50, 8, 4, 0.2), (100, 1, 2, 0.5), (100, 6, 6, 0.0)]
    for n, d, c, p in cases:
        a = np.maximum(rng.normal(0.3, 1.0, size=(n, d)), 0)  # ReLU outputs
        w = rng.normal(size=(c, d))
        assert_close(f"ratio for a ({n}, {d}), weight ({c}, {d}), p={p}", fn(a, w, p),
                     predicted_variance_ratio(a, w, p), rtol=1e-9)
    _pass("variance shift", len(cases))


@_self_check
def check_ghost_running(fn):
    """Check ``fn(running_mean, running_var, x, virtual_batch_size, momentum) -> (mean, var)``.

    x is (N, D). The ghost layer's running statistics move once per batch, towards the average of
    the virtual batches' means and of their unbiased variances, each weighted by its number of
    rows (the last virtual batch takes the remainder). The reference is
    ``normlab.nn.GhostBatchNorm1d`` in float64.
    """
    import torch

    from normlab.nn import GhostBatchNorm1d

    rng = np.random.default_rng(2)
    cases = [(12, 3, 4, 0.1), (10, 2, 4, 0.1), (9, 4, 3, 0.5), (8, 2, 8, 1.0), (11, 3, 4, 0.2)]
    for n, d, v, momentum in cases:
        x = rng.normal(1.0, 2.0, size=(n, d))
        rm, rv = rng.normal(size=d), rng.uniform(0.5, 2.0, size=d)
        layer = GhostBatchNorm1d(d, v, momentum=momentum).double()
        with torch.no_grad():
            layer.running_mean.copy_(torch.from_numpy(rm))
            layer.running_var.copy_(torch.from_numpy(rv))
        layer(torch.from_numpy(x))
        got = fn(rm.copy(), rv.copy(), x, v, momentum)
        desc = f"x ({n}, {d}), virtual batches of {v}, momentum {momentum}"
        assert_tuple_close(f"ghost running statistics, {desc}", got,
                           (layer.running_mean.numpy(), layer.running_var.numpy()), ("new_mean", "new_var"))
    _pass("ghost running statistics", len(cases))


@_self_check
def check_measured_noise(fn):
    """Check ``fn(h, example, batch_size, trials, rng) -> float``: the spread of one example's
    normalized value over ``trials`` random batches.

    h: (n,) one unit's values. Each batch holds the example and batch_size - 1 others drawn with
    replacement from the other n - 1 examples; the example is normalized with the batch's mean and
    biased variance (eps 1e-5). Returned: the standard deviation of the normalized value over the
    trials. The draws are random, so the comparison with ``regularization.normalized_value_noise``
    (4,000 draws each) allows 8%, about five standard errors.
    """
    import torch

    from normlab.experiments.regularization import normalized_value_noise

    rng = np.random.default_rng(5)
    cases = [("a Gaussian unit", rng.normal(size=600), 4), ("a Gaussian unit", rng.normal(size=600), 32),
             ("a skewed unit", rng.exponential(size=800), 8),
             ("a skewed unit, far example", rng.exponential(size=800), 16)]
    for k, (desc, h, b) in enumerate(cases):
        z = (h - h.mean()) / h.std()
        example = int(np.abs(z - (2.5 if "far" in desc else 1.0)).argmin())
        got = float(fn(h.copy(), example, b, 4000, np.random.default_rng(10 + k)))
        std, _ = normalized_value_noise(torch.from_numpy(h[:, None]), [b], [example], trials=4000, seed=k)
        expected = float(std[0, 0])
        if not abs(got / expected - 1) < 0.08:
            raise AssertionError(f"measured noise, {desc}, batch {b}: expected about {expected:.4f}, got {got:.4f} "
                                 f"(8% allowed for the randomness of the draws)")
    _pass("measured noise", len(cases))


@_self_check
def check_ema_weights(fn):
    """Check ``fn(momentum, steps) -> (steps + 1,)``: the weight of the EMA's start value and of
    each batch k = 1..steps in its final value (``normlab.stats.ema_weights``)."""
    from normlab.stats import ema_weights

    cases = [(0.1, 5), (0.5, 3), (0.001, 600), (1.0, 4), (0.3, 0)]
    for momentum, steps in cases:
        assert_close(f"EMA weights, momentum {momentum}, {steps} steps", fn(momentum, steps),
                     ema_weights(momentum, steps), rtol=1e-9, atol=1e-15)
    _pass("EMA weights", len(cases))
