"""Self-checks of "Batch normalization from scratch" (``chapters/scratch``).

``lab.ipynb``: ``check_forward``, ``check_backward``, ``check_running_stats``,
``check_block_forward``, ``check_block_backward``.
"""

from __future__ import annotations

import numpy as np

from normlab import scratch
from normlab.checks._common import _pass, _self_check, assert_close, assert_tuple_close, expect_tuple


def _cases(seed=0):
    """Yield (description, x, gamma, beta) test inputs in float64: 2-D and 4-D, odd shapes."""
    rng = np.random.default_rng(seed)
    for shape in [(4, 3), (16, 5), (2, 3, 4, 5), (3, 2, 1, 7)]:
        C = shape[1]
        x = rng.normal(2.0, 3.0, size=shape)
        gamma = rng.normal(1.0, 0.5, size=C)
        beta = rng.normal(0.0, 0.5, size=C)
        yield f"x of shape {shape}", x, gamma, beta


@_self_check
def check_forward(fn, eps=1e-5):
    """Check ``fn(x, gamma, beta, eps) -> out``: training-mode batch norm, (N, D) or (N, C, H, W)."""
    n = 0
    for desc, x, gamma, beta in _cases():
        expected, _ = scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)
        got = fn(x.copy(), gamma.copy(), beta.copy(), eps)
        assert_close(f"forward, {desc}: out", got, expected)
        n += 1
    _pass("forward", n)


@_self_check
def check_backward(fn, eps=1e-5):
    """Check ``fn(dout, x, gamma, eps) -> (dx, dgamma, dbeta)`` for training-mode batch norm."""
    rng = np.random.default_rng(1)
    n = 0
    for desc, x, gamma, beta in _cases():
        out, cache = scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)
        dout = rng.normal(size=out.shape)
        expected = scratch.batch_norm_backward_fast(dout, cache)
        got = fn(dout.copy(), x.copy(), gamma.copy(), eps)
        assert_tuple_close(f"backward, {desc}", got, expected, ("dx", "dgamma", "dbeta"))
        n += 1
    _pass("backward", n)


@_self_check
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
        assert_tuple_close(f"running stats, {desc}", got, (exp_m, exp_v), ("new_mean", "new_var"))
        n += 1
    _pass("running statistics", n)


def _block_cases(seed=4):
    """Yield (description, x, w, gamma, beta) float64 inputs of one MLP block."""
    rng = np.random.default_rng(seed)
    for n, d_in, d_out in [(4, 3, 2), (16, 5, 7), (32, 64, 10)]:
        x = rng.normal(0.5, 1.5, size=(n, d_in))
        w = rng.normal(0.0, 1.0, size=(d_in, d_out))
        gamma, beta = rng.normal(1.0, 0.5, size=d_out), rng.normal(0.2, 0.5, size=d_out)
        yield f"x {x.shape} @ w {w.shape}", x, w, gamma, beta


@_self_check
def check_block_forward(fn, eps=1e-5):
    """Check ``fn(x, w, gamma, beta, eps) -> (out, cache)``: out = relu(batch_norm(x @ w))."""
    n = 0
    for desc, x, w, gamma, beta in _block_cases():
        expected, _ = scratch.block_forward(x, w, gamma, beta, eps)
        got = fn(x.copy(), w.copy(), gamma.copy(), beta.copy(), eps)
        expect_tuple(f"block forward, {desc}", got, ("out", "cache"))
        assert_close(f"block forward, {desc}: out", got[0], expected)
        n += 1
    _pass("block forward", n)


@_self_check
def check_block_backward(fn, forward=None, eps=1e-5):
    """Check ``fn(dout, cache) -> (dx, dw, dgamma, dbeta)``, with the cache from ``forward`` (the
    student's block forward; default ``scratch.block_forward``)."""
    forward = forward or scratch.block_forward
    rng = np.random.default_rng(5)
    n = 0
    for desc, x, w, gamma, beta in _block_cases():
        out, cache = scratch.block_forward(x, w, gamma, beta, eps)
        dout = rng.normal(size=out.shape)
        expected = scratch.block_backward(dout, cache)
        _, cache = forward(x.copy(), w.copy(), gamma.copy(), beta.copy(), eps)
        got = fn(dout.copy(), cache)
        assert_tuple_close(f"block backward, {desc}", got, expected, ("dx", "dw", "dgamma", "dbeta"))
        n += 1
    _pass("block backward", n)
