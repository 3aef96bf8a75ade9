"""Self-checks for the exercises: run a student's function against the reference on several inputs.

Each ``check_*`` prints one line when every case passes. Otherwise it raises ``AssertionError``
naming the case, the output, the first element that is off, and the expected and actual values.
"""

from __future__ import annotations

import numpy as np

from normlab import scratch

__all__ = [
    "assert_close",
    "check_forward",
    "check_backward",
    "check_running_stats",
]


def assert_close(name, got, expected, rtol=1e-7, atol=1e-9):
    """Raise AssertionError naming the worst element of ``got`` when it is not close to ``expected``."""
    expected = np.asarray(expected)
    if got is None:
        raise AssertionError(f"{name}: got None (did the function forget to return it?)")
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {got.shape}, expected {expected.shape}")
    bad = ~np.isclose(got, expected, rtol=rtol, atol=atol)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements differ; first at index {idx}: "
            f"expected {expected[idx]:.10g}, got {got[idx]:.10g} (rtol={rtol}, atol={atol})"
        )


def _cases(seed=0):
    """Yield (description, x, gamma, beta) test inputs in float64: 2-D and 4-D, odd shapes."""
    rng = np.random.default_rng(seed)
    for shape in [(4, 3), (16, 5), (2, 3, 4, 5), (3, 2, 1, 7)]:
        C = shape[1]
        x = rng.normal(2.0, 3.0, size=shape)
        gamma = rng.normal(1.0, 0.5, size=C)
        beta = rng.normal(0.0, 0.5, size=C)
        yield f"x of shape {shape}", x, gamma, beta


def _pass(what, n):
    print(f"PASS {what}: matches the reference on {n} inputs.")


def check_forward(fn, eps=1e-5):
    """Check ``fn(x, gamma, beta, eps) -> out``: training-mode batch norm, (N, D) or (N, C, H, W)."""
    n = 0
    for desc, x, gamma, beta in _cases():
        expected, _ = scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)
        got = fn(x.copy(), gamma.copy(), beta.copy(), eps)
        assert_close(f"forward, {desc}: out", got, expected)
        n += 1
    _pass("forward", n)


def check_backward(fn, eps=1e-5):
    """Check ``fn(dout, x, gamma, eps) -> (dx, dgamma, dbeta)`` for training-mode batch norm."""
    rng = np.random.default_rng(1)
    n = 0
    for desc, x, gamma, beta in _cases():
        out, cache = scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)
        dout = rng.normal(size=out.shape)
        expected = scratch.batch_norm_backward_fast(dout, cache)
        got = fn(dout.copy(), x.copy(), gamma.copy(), eps)
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError(f"backward, {desc}: expected a tuple (dx, dgamma, dbeta), got {type(got).__name__}")
        for name, g, e in zip(("dx", "dgamma", "dbeta"), got, expected, strict=True):
            assert_close(f"backward, {desc}: {name}", g, e)
        n += 1
    _pass("backward", n)


def check_running_stats(fn, momentum=0.1):
    """Check ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)`` (PyTorch's rule)."""
    rng = np.random.default_rng(2)
    n = 0
    for desc, x, gamma, beta in _cases():
        C = x.shape[1]
        rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)
        exp_m, exp_v = rm.copy(), rv.copy()
        scratch.batch_norm_forward(x, gamma, beta, exp_m, exp_v, momentum=momentum)
        got = fn(rm.copy(), rv.copy(), x.copy(), momentum)
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError(f"running stats, {desc}: expected a tuple (new_mean, new_var)")
        assert_close(f"running stats, {desc}: new_mean", got[0], exp_m)
        assert_close(f"running stats, {desc}: new_var", got[1], exp_v)
        n += 1
    _pass("running statistics", n)
