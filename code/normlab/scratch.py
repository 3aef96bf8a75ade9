"""Batch normalization from scratch in NumPy: forward, two backwards, a numerical gradient.

Shapes: ``x`` is (N, D), statistics per feature over N; or (N, C, H, W), statistics per channel
over (N, H, W) ("spatial" batch norm). ``gamma``, ``beta``, ``running_mean``, ``running_var`` are
(C,) with C = D or the channel count.

Conventions that trip readers, stated where they bite:

- PyTorch's ``momentum=0.1`` means ``running = (1 - 0.1) * running + 0.1 * batch``. Some texts (and
  Keras) call 0.9 the momentum of the same update.
- The variance that normalizes the batch is the biased one (divide by n); the running estimate
  stores the unbiased one (divide by n - 1), as PyTorch does.
"""

from __future__ import annotations

from numbers import Real

import numpy as np

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_backward_fast",
    "numerical_gradient",
]


def _reduce_axes(x):
    """Return the axes to reduce over and the shape that broadcasts a (C,) vector against x."""
    if x.ndim == 2:
        return (0,), (1, x.shape[1])  # (1, D)
    return (0, 2, 3), (1, x.shape[1], 1, 1)  # (1, C, 1, 1)


def _check_vector(name, v, C, allow_none=False):
    if v is None:
        if allow_none:
            return
        raise ValueError(f"{name} is None, expected an array of shape ({C},)")
    if not isinstance(v, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape ({C},), got {type(v).__name__}")
    if v.shape != (C,):
        raise ValueError(f"{name} has shape {v.shape}, expected ({C},) to match the channels of x")
    if not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"{name} has dtype {v.dtype}, expected a floating-point dtype")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has a non-finite value")


def _is_number(v):
    return isinstance(v, Real) and not isinstance(v, (bool, np.bool_))


def _check_forward_inputs(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy array, got {type(x).__name__}")
    if x.ndim not in (2, 4):
        raise ValueError(
            f"x has {x.ndim} dimensions (shape {x.shape}), expected 2 (N, D) or 4 (N, C, H, W)"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x has dtype {x.dtype}, expected a floating-point dtype")
    C = x.shape[1]
    _check_vector("gamma", gamma, C)
    _check_vector("beta", beta, C)
    # Running statistics may be absent in training mode (PyTorch's track_running_stats=False),
    # but eval mode has nothing else to normalize with.
    _check_vector("running_mean", running_mean, C, allow_none=training)
    _check_vector("running_var", running_var, C, allow_none=training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be arrays or both be None")
    if running_var is not None and np.any(running_var < 0):
        raise ValueError("running_var has a negative value; a variance cannot be negative")
    if running_mean is not None and training and not (running_mean.flags.writeable and running_var.flags.writeable):
        raise ValueError("running_mean and running_var must be writable: training mode updates them in place")
    if not (_is_number(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not (_is_number(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if training:
        n = x.size // C
        if n < 2:
            raise ValueError(
                f"expected more than 1 value per channel in training mode, got input of shape {x.shape}"
            )
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"x has a non-finite value ({x[tuple(bad)]}) at index {tuple(int(i) for i in bad)}")


def batch_norm_forward(
    x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5
):
    """Normalize each feature (or channel) of x over the batch, then scale and shift.

    x: (N, D) or (N, C, H, W). gamma, beta, running_mean, running_var: (C,).
    training=True normalizes with the batch statistics and updates running_mean / running_var in
    place (PyTorch's convention: ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased batch variance). training=False normalizes with the running statistics.
    Returns (out, cache); out has the shape of x; cache is what the backward needs.
    """
    _check_forward_inputs(x, gamma, beta, running_mean, running_var, training, momentum, eps)
    axes, pshape = _reduce_axes(x)
    n = x.size // x.shape[1]  # values per channel: N, or N * H * W
    if training:
        mu = x.mean(axis=axes, keepdims=True)  # (1, C) or (1, C, 1, 1)
        xmu = x - mu
        var = (xmu**2).mean(axis=axes, keepdims=True)  # biased: divides by n
        if running_mean is not None:
            running_mean *= 1.0 - momentum
            running_mean += momentum * mu.reshape(-1)
            running_var *= 1.0 - momentum
            running_var += momentum * var.reshape(-1) * n / (n - 1)  # unbiased estimate
    else:
        mu = running_mean.reshape(pshape)
        xmu = x - mu
        var = running_var.reshape(pshape)
    std = np.sqrt(var + eps)
    inv_std = 1.0 / std
    x_hat = xmu * inv_std
    out = gamma.reshape(pshape) * x_hat + beta.reshape(pshape)
    cache = {
        "x_hat": x_hat,
        "xmu": xmu,
        "std": std,
        "inv_std": inv_std,
        "gamma": gamma,
        "axes": axes,
        "pshape": pshape,
        "n": n,
        "training": training,
    }
    return out, cache


def _check_backward_inputs(dout, cache):
    if not isinstance(cache, dict) or "x_hat" not in cache:
        raise ValueError("cache must be the second value returned by batch_norm_forward")
    if not isinstance(dout, np.ndarray) or dout.shape != cache["x_hat"].shape:
        shape = getattr(dout, "shape", type(dout).__name__)
        raise ValueError(f"dout has shape {shape}, expected {cache['x_hat'].shape} (the shape of x)")
    if not np.all(np.isfinite(dout)):
        raise ValueError("dout has a non-finite value")


def batch_norm_backward(dout, cache):
    """Backpropagate through the forward's computational graph, one node at a time.

    dout: the upstream gradient, shaped like x. cache: from ``batch_norm_forward``.
    Returns (dx, dgamma, dbeta); dx is shaped like x, dgamma and dbeta are (C,).
    """
    _check_backward_inputs(dout, cache)
    axes, pshape, n = cache["axes"], cache["pshape"], cache["n"]
    x_hat, xmu, std, inv_std = cache["x_hat"], cache["xmu"], cache["std"], cache["inv_std"]
    gamma = cache["gamma"].reshape(pshape)

    # out = gamma * x_hat + beta
    dbeta = dout.sum(axis=axes)
    dgamma = (dout * x_hat).sum(axis=axes)
    dx_hat = dout * gamma
    if not cache["training"]:
        # Eval mode: mean and variance are constants, so the layer is affine in x.
        return dx_hat * inv_std, dgamma, dbeta

    # x_hat = xmu * inv_std: xmu feeds x_hat directly and through the variance.
    dinv_std = (dx_hat * xmu).sum(axis=axes, keepdims=True)
    dxmu = dx_hat * inv_std
    # inv_std = 1 / std, std = sqrt(var + eps)
    dstd = -dinv_std / std**2
    dvar = 0.5 * dstd / std
    # var = mean(sq), sq = xmu ** 2
    dsq = np.broadcast_to(dvar / n, xmu.shape)
    dxmu = dxmu + 2.0 * xmu * dsq
    # xmu = x - mu: x feeds xmu directly and through the mean.
    dmu = -dxmu.sum(axis=axes, keepdims=True)
    dx = dxmu + dmu / n  # mu = mean(x)
    return dx, dgamma, dbeta


def batch_norm_backward_fast(dout, cache):
    """Compute the same gradients as ``batch_norm_backward`` with the simplified closed form.

    dx = gamma / (n * sigma) * (n * dout - sum(dout) - x_hat * sum(dout * x_hat)),
    sums over the batch (and space) per channel. Same arguments and return values.
    """
    _check_backward_inputs(dout, cache)
    axes, pshape, n = cache["axes"], cache["pshape"], cache["n"]
    x_hat, inv_std = cache["x_hat"], cache["inv_std"]
    gamma = cache["gamma"].reshape(pshape)
    dbeta = dout.sum(axis=axes)
    dgamma = (dout * x_hat).sum(axis=axes)
    if not cache["training"]:
        return dout * gamma * inv_std, dgamma, dbeta
    dx = (gamma * inv_std / n) * (
        n * dout - dbeta.reshape(pshape) - x_hat * dgamma.reshape(pshape)
    )
    return dx, dgamma, dbeta


def numerical_gradient(f, x, dout, h=1e-5):
    """Estimate the gradient of sum(f(x) * dout) with respect to x by central differences.

    f: a function of x alone returning an array; x: float64 array (changed and restored in place);
    dout: the upstream gradient, shaped like f(x). Returns an array shaped like x.
    Costs two calls of f per element of x: use small arrays.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        raise ValueError("numerical_gradient needs x as a float64 numpy array (float32 is too coarse)")
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = np.sum(f(x) * dout)
        x[i] = old - h
        minus = np.sum(f(x) * dout)
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad
