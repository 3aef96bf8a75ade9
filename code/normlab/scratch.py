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
    "train_forward",
    "train_backward",
    "running_update",
    "block_forward",
    "block_backward",
    "train_mlp",
    "norm_forward",
    "norm_backward",
    "statistic_groups",
    "layer_norm",
    "layer_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "rms_norm",
    "rms_norm_backward",
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


# --------------------------------------------------------------------------------------------
# Chapter 1's exercises: the reference functions, with the signatures the exercises ask for
# --------------------------------------------------------------------------------------------


def train_forward(x, gamma, beta, eps=1e-5):
    """Return training-mode batch norm of x, without running statistics or cache (the forward
    exercise's signature)."""
    return batch_norm_forward(x, gamma, beta, None, None, eps=eps)[0]


def train_backward(dout, x, gamma, eps=1e-5):
    """Return (dx, dgamma, dbeta) of training-mode batch norm at x (the backward exercise's
    signature: it gets x, not a cache)."""
    beta = np.zeros_like(np.asarray(gamma, dtype=np.float64))
    _, cache = batch_norm_forward(x, gamma, beta, None, None, eps=eps)
    return batch_norm_backward_fast(dout, cache)


def running_update(running_mean, running_var, x, momentum=0.1):
    """Return new (running_mean, running_var) after one training batch x, PyTorch's convention;
    the inputs are left alone (the running-statistics exercise's signature)."""
    new_mean, new_var = np.array(running_mean, dtype=np.float64), np.array(running_var, dtype=np.float64)
    C = x.shape[1] if isinstance(x, np.ndarray) and x.ndim in (2, 4) else 1
    batch_norm_forward(x, np.ones(C), np.zeros(C), new_mean, new_var, momentum=momentum)
    return new_mean, new_var


def block_forward(x, w, gamma, beta, eps=1e-5):
    """One hidden block of an MLP: ``relu(batch_norm(x @ w))``. Returns (out, cache).

    x: (N, D_in); w: (D_in, D_out); gamma, beta: (D_out,). The linear layer has no bias: the
    batch norm after it would subtract any bias again.
    """
    a = x @ w
    h = train_forward(a, gamma, beta, eps)
    return np.maximum(h, 0.0), (x, w, a, h, gamma, eps)


def block_backward(dout, cache):
    """Return (dx, dw, dgamma, dbeta) of ``block_forward`` from the upstream gradient dout."""
    x, w, a, h, gamma, eps = cache
    dh = dout * (h > 0)
    da, dgamma, dbeta = train_backward(dh, a, gamma, eps)
    return da @ w.T, x.T @ da, dgamma, dbeta


def _softmax_loss(logits, y):
    """Mean cross-entropy of integer labels y and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # log-softmax, finite for any logits
    n = len(y)
    loss = -log_p[np.arange(n), y].mean()
    p = np.exp(log_p)
    p[np.arange(n), y] -= 1.0
    return float(loss), p / n


def train_mlp(x_train, y_train, x_test, y_test, *, seed, batch_norm=True, forward=None, backward=None,
              update=None, hidden=(64, 64), steps=300, batch_size=32, lr=0.1, momentum=0.1, eps=1e-5):
    """Train a NumPy MLP on (x, y) with plain SGD; return {"loss": (steps,), "test_acc": float}.

    Each hidden layer is ``relu(batch_norm(x @ w))`` (``batch_norm=True``), computed by
    ``forward(x, w, gamma, beta, eps) -> (out, cache)`` and ``backward(dout, cache) ->
    (dx, dw, dgamma, dbeta)`` (default: ``block_forward`` and ``block_backward``), with running
    statistics from ``update(running_mean, running_var, a, momentum)`` (default
    ``running_update``) that the test accuracy uses in eval mode. With ``batch_norm=False`` a
    hidden layer is ``relu(x @ w + b)``. The output layer is linear, the loss cross-entropy.
    ``seed`` fixes the initial weights (He's) and the order of the mini-batches; with the same seed
    the two kinds of network start from the same weights.
    """
    for name, arr in (("x_train", x_train), ("x_test", x_test)):
        _check_array(name, np.asarray(arr))
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("x and y must have the same number of examples")
    if not (isinstance(steps, int) and steps > 0 and isinstance(batch_size, int) and 1 < batch_size <= len(x_train)):
        raise ValueError(f"need steps >= 1 and 2 <= batch_size <= {len(x_train)}, got {steps}, {batch_size}")
    forward, backward = forward or block_forward, backward or block_backward
    update = update or running_update
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    rng = np.random.default_rng(seed)
    sizes = [x_train.shape[1], *hidden]
    ws = [rng.normal(0.0, np.sqrt(2.0 / m), size=(m, k)) for m, k in zip(sizes[:-1], sizes[1:])]
    gammas, betas = [np.ones(k) for k in hidden], [np.zeros(k) for k in hidden]  # or biases
    running = [(np.zeros(k), np.ones(k)) for k in hidden]
    w_out = rng.normal(0.0, np.sqrt(1.0 / sizes[-1]), size=(sizes[-1], n_classes))
    b_out = np.zeros(n_classes)
    losses = np.empty(steps)
    order, pos = rng.permutation(len(x_train)), 0
    for t in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(x_train)), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        h, caches = x_train[idx], []
        for i, w in enumerate(ws):
            if batch_norm:
                running[i] = update(*running[i], h @ w, momentum)
                h, cache = forward(h, w, gammas[i], betas[i], eps)
            else:
                a = h @ w + betas[i]
                h, cache = np.maximum(a, 0.0), (h, a)
            caches.append(cache)
        losses[t], dlogits = _softmax_loss(h @ w_out + b_out, y_train[idx])
        dh = dlogits @ w_out.T
        w_out -= lr * (h.T @ dlogits)
        b_out -= lr * dlogits.sum(axis=0)
        for i in reversed(range(len(ws))):
            if batch_norm:
                dh, dw, dgamma, dbeta = backward(dh, caches[i])
                gammas[i] -= lr * dgamma
            else:
                h_in, a = caches[i]
                da = dh * (a > 0)
                dh, dw, dbeta = da @ ws[i].T, h_in.T @ da, da.sum(axis=0)
            ws[i] -= lr * dw
            betas[i] -= lr * dbeta
    h = x_test
    for i, w in enumerate(ws):  # eval mode: the running statistics
        if batch_norm:
            a, _ = batch_norm_forward(h @ w, gammas[i], betas[i], *running[i], training=False, eps=eps)
        else:
            a = h @ w + betas[i]
        h = np.maximum(a, 0.0)
    test_acc = float(((h @ w_out + b_out).argmax(axis=1) == y_test).mean())
    return {"loss": losses, "test_acc": test_acc}


# --------------------------------------------------------------------------------------------
# Chapter 6: one normalization over different axes
# --------------------------------------------------------------------------------------------
#
# Batch, layer, instance and group norm differ only in the set of elements that share one mean
# and one variance. ``norm_forward`` normalizes over any set of axes; the wrappers below choose
# the axes (after a reshape, for group norm) and add torch's affine parameters. Batch norm in
# training mode is ``norm_forward(x, (0,))`` for (N, D) and ``norm_forward(x, (0, 2, 3))`` for
# (N, C, H, W); RMSNorm (rms=True) divides by the root mean square and subtracts no mean.


def _check_array(name, x):
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} has dtype {x.dtype}, expected a floating-point dtype")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name} has a non-finite value ({x[tuple(bad)]}) at index {tuple(int(i) for i in bad)}")


def _check_eps(eps):
    if not (_is_number(eps) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def _normalize_axes(axes, ndim):
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
        axes = (axes,)
    try:
        axes = tuple(int(a) for a in axes)
    except TypeError:
        raise ValueError(f"axes must be an int or a tuple of ints, got {axes!r}") from None
    if not axes:
        raise ValueError("axes is empty: name at least one axis to normalize over")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array with {ndim} dimensions")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axes {axes} name an axis twice")
    return tuple(sorted(out))


def norm_forward(x, axes, eps=1e-5, rms=False):
    """Normalize x over ``axes``: every slice along the other axes gets its own statistics.

    x: any float array. axes: an int or tuple of ints (the elements that share one mean and one
    variance). rms=False: x_hat = (x - mean) / sqrt(var + eps), var biased (divide by n).
    rms=True: x_hat = x / sqrt(mean(x**2) + eps), no mean subtracted (RMSNorm).
    Returns (x_hat, cache); x_hat has the shape of x.
    """
    _check_array("x", x)
    _check_eps(eps)
    axes = _normalize_axes(axes, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes]))
    if n == 0:
        raise ValueError(f"x of shape {x.shape} has no elements along axes {axes}")
    xc = x if rms else x - x.mean(axis=axes, keepdims=True)  # keepdims: statistics broadcast back
    var = (xc**2).mean(axis=axes, keepdims=True)  # the mean square for RMSNorm
    if eps == 0 and np.any(var == 0):
        raise ValueError("a slice has zero variance and eps = 0: its normalized value is undefined")
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = xc * inv_std
    return x_hat, {"x_hat": x_hat, "inv_std": inv_std, "axes": axes, "n": n, "rms": rms}


def norm_backward(dx_hat, cache):
    """Return dx from dx_hat for ``norm_forward``'s x_hat (the closed form; cache from the forward).

    Mean-subtracting: dx = inv_std * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)).
    RMSNorm: dx = inv_std * (dx_hat - x_hat * mean(dx_hat * x_hat)). Means over the same axes.
    """
    if not isinstance(cache, dict) or "rms" not in cache:
        raise ValueError("cache must be the second value returned by norm_forward")
    x_hat, axes = cache["x_hat"], cache["axes"]
    if not isinstance(dx_hat, np.ndarray) or dx_hat.shape != x_hat.shape:
        shape = getattr(dx_hat, "shape", type(dx_hat).__name__)
        raise ValueError(f"dx_hat has shape {shape}, expected {x_hat.shape} (the shape of x)")
    _check_array("dx_hat", dx_hat)
    proj = (dx_hat * x_hat).mean(axis=axes, keepdims=True)  # the part along x_hat
    centred = dx_hat if cache["rms"] else dx_hat - dx_hat.mean(axis=axes, keepdims=True)
    return cache["inv_std"] * (centred - x_hat * proj)


def _check_param(name, v, shape):
    if v is None:
        return
    if not isinstance(v, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape {shape} or None, got {type(v).__name__}")
    if v.shape != tuple(shape):
        raise ValueError(f"{name} has shape {v.shape}, expected {tuple(shape)}")
    _check_array(name, v)


def _affine(x_hat, weight, bias, pshape):
    out = x_hat
    if weight is not None:
        out = out * weight.reshape(pshape)
    if bias is not None:
        out = out + bias.reshape(pshape)
    return out


def _affine_backward(dout, cache):
    """Return (dx_hat, dweight, dbias) for out = weight * x_hat + bias; None for absent parameters."""
    x_hat, pshape, red = cache["x_hat_full"], cache["pshape"], cache["param_axes"]
    weight, has_bias = cache["weight"], cache["has_bias"]
    if not isinstance(dout, np.ndarray) or dout.shape != x_hat.shape:
        shape = getattr(dout, "shape", type(dout).__name__)
        raise ValueError(f"dout has shape {shape}, expected {x_hat.shape} (the shape of x)")
    _check_array("dout", dout)
    pdims = tuple(pshape[a] for a in range(len(pshape)) if a not in red)  # the parameters' shape
    dweight = None if weight is None else (dout * x_hat).sum(axis=red).reshape(pdims)
    dbias = dout.sum(axis=red).reshape(pdims) if has_bias else None
    dx_hat = dout if weight is None else dout * weight.reshape(pshape)
    return dx_hat, dweight, dbias


def _trailing_shape(x, normalized_shape):
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        normalized_shape = tuple(int(d) for d in normalized_shape)
    except TypeError:
        raise ValueError(f"normalized_shape must be an int or a tuple of ints, got {normalized_shape!r}") from None
    k = len(normalized_shape)
    if k == 0 or k > x.ndim or x.shape[x.ndim - k :] != normalized_shape:
        raise ValueError(
            f"normalized_shape {normalized_shape} does not match the trailing dimensions of x {x.shape}"
        )
    return normalized_shape


def _layout(kind, shape, normalized_shape=None, num_groups=None):
    """Return (work_shape, axes): reshape x to work_shape, then normalize over axes.

    The single place that says which elements share statistics; ``statistic_groups`` draws it.
    """
    ndim = len(shape)
    if kind == "batch":
        return shape, (0,) + tuple(range(2, ndim))  # per channel, over the batch and space
    if kind in ("layer", "rms"):
        k = len(normalized_shape)
        return shape, tuple(range(ndim - k, ndim))  # per sample, over the trailing dims
    if kind == "instance":
        return shape, tuple(range(2, ndim))  # per sample and channel, over space
    if kind == "group":
        N, C = shape[:2]
        per_group = C // num_groups * int(np.prod(shape[2:]))  # not -1: an empty batch (N = 0) reshapes too
        return (N, num_groups, per_group), (2,)  # per sample and group of C / G channels (and space)
    raise ValueError(f"kind must be 'batch', 'layer', 'instance', 'group' or 'rms', got {kind!r}")


def statistic_groups(kind, shape, num_groups=None, normalized_shape=None):
    """Return an int array of ``shape``: elements with the same number share one mean and variance.

    kind: 'batch', 'layer', 'instance', 'group' or 'rms'. For 'layer' and 'rms' the default
    normalized_shape is shape[1:] (everything but the batch); 'group' needs num_groups.
    Computed from the same layout the wrappers use.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dimensions (N, C, ...), got {shape}")
    if kind in ("layer", "rms") and normalized_shape is None:
        normalized_shape = shape[1:]
    if kind == "group":
        _check_groups(shape, num_groups)
    work, axes = _layout(kind, shape, normalized_shape, num_groups)
    idx = np.zeros(shape).reshape(work)  # (work shape)
    keep = [a for a in range(idx.ndim) if a not in axes]
    grid = np.indices([idx.shape[a] for a in keep])  # one coordinate array per kept axis
    labels = np.ravel_multi_index(tuple(grid), [idx.shape[a] for a in keep]) if keep else np.zeros((), int)
    full = np.expand_dims(labels, axes) if keep else labels
    return np.broadcast_to(full, idx.shape).reshape(shape).copy()


def _check_groups(shape, num_groups):
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    C = shape[1]
    if C % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {C} channels of x")


def _normalize(kind, x, weight, bias, eps, normalized_shape=None, num_groups=None, rms=False):
    """Reshape, normalize, reshape back, apply the affine; return (out, cache)."""
    work, axes = _layout(kind, x.shape, normalized_shape, num_groups)
    x_hat, ncache = norm_forward(x.reshape(work), axes, eps=eps, rms=rms)
    x_hat = x_hat.reshape(x.shape)
    if kind in ("layer", "rms"):
        lead = x.ndim - len(normalized_shape)
        pshape = (1,) * lead + tuple(normalized_shape)  # elementwise over the normalized dims
        param_axes = tuple(range(lead))  # the parameters' gradients sum over the leading dims
    else:
        pshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)  # per channel
        param_axes = (0,) + tuple(range(2, x.ndim))
    out = _affine(x_hat, weight, bias, pshape)
    cache = {"norm": ncache, "x_hat_full": x_hat, "pshape": pshape, "param_axes": param_axes,
             "weight": weight, "has_bias": bias is not None, "work": work}
    return out, cache


def _backward(dout, cache):
    if not isinstance(cache, dict) or "norm" not in cache:
        raise ValueError("cache must be the second value returned by the matching forward")
    dx_hat, dweight, dbias = _affine_backward(dout, cache)
    dx = norm_backward(dx_hat.reshape(cache["norm"]["x_hat"].shape), cache["norm"])
    return dx.reshape(dout.shape), dweight, dbias


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalize each sample over its trailing ``normalized_shape`` dims (torch's ``F.layer_norm``).

    x: (*, *normalized_shape). weight, bias: ``normalized_shape`` or None (elementwise affine).
    Returns (out, cache); out has the shape of x.
    """
    _check_array("x", x)
    normalized_shape = _trailing_shape(x, normalized_shape)
    _check_param("weight", weight, normalized_shape)
    _check_param("bias", bias, normalized_shape)
    return _normalize("layer", x, weight, bias, eps, normalized_shape=normalized_shape)


def layer_norm_backward(dout, cache):
    """Return (dx, dweight, dbias) for ``layer_norm``; dweight / dbias are None where absent."""
    return _backward(dout, cache)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Normalize each sample over groups of C / num_groups channels and all space (``F.group_norm``).

    x: (N, C, *). weight, bias: (C,) or None. num_groups = 1 is layer norm over (C, *) with a
    per-channel affine; num_groups = C is instance norm. Returns (out, cache).
    """
    _check_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be (N, C, *), got shape {x.shape}")
    _check_groups(x.shape, num_groups)
    C = x.shape[1]
    _check_param("weight", weight, (C,))
    _check_param("bias", bias, (C,))
    return _normalize("group", x, weight, bias, eps, num_groups=int(num_groups))


def group_norm_backward(dout, cache):
    """Return (dx, dweight, dbias) for ``group_norm``; dweight / dbias are None where absent."""
    return _backward(dout, cache)


def instance_norm(x, weight=None, bias=None, eps=1e-5):
    """Normalize each sample and channel over space (``F.instance_norm`` with input statistics).

    x: (N, C, L) or (N, C, H, W) (any number of spatial dims >= 1, more than one spatial element).
    weight, bias: (C,) or None. No running statistics: every input is normalized with its own.
    Returns (out, cache).
    """
    _check_array("x", x)
    if x.ndim < 3:
        raise ValueError(f"x must be (N, C, *spatial) with at least one spatial dim, got shape {x.shape}")
    if int(np.prod(x.shape[2:])) < 2:
        raise ValueError(f"instance norm needs more than 1 spatial element per channel, got shape {x.shape}")
    C = x.shape[1]
    _check_param("weight", weight, (C,))
    _check_param("bias", bias, (C,))
    return _normalize("instance", x, weight, bias, eps)


def instance_norm_backward(dout, cache):
    """Return (dx, dweight, dbias) for ``instance_norm``; dweight / dbias are None where absent."""
    return _backward(dout, cache)


def rms_norm(x, normalized_shape, weight=None, eps=1e-6):
    """Divide each sample by its root mean square over the trailing dims (``F.rms_norm``); no mean, no bias.

    x: (*, *normalized_shape). weight: ``normalized_shape`` or None. Returns (out, cache).
    torch's ``F.rms_norm`` defaults to eps=None (the dtype's machine epsilon); pass eps explicitly.
    """
    _check_array("x", x)
    normalized_shape = _trailing_shape(x, normalized_shape)
    _check_param("weight", weight, normalized_shape)
    return _normalize("rms", x, weight, None, eps, normalized_shape=normalized_shape, rms=True)


def rms_norm_backward(dout, cache):
    """Return (dx, dweight) for ``rms_norm``; dweight is None when there was no weight."""
    dx, dweight, _ = _backward(dout, cache)
    return dx, dweight
