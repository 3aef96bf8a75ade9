"""Batch norm as a PyTorch op with a hand-written backward.

``batch_norm`` has the signature and the semantics of ``torch.nn.functional.batch_norm``. In
training mode its gradient comes from ``BatchNormFunction``, a ``torch.autograd.Function`` whose
backward is the closed form of Chapter 1: autograd never looks inside the forward. In eval mode
the op is affine in the input, and plain tensor operations carry the gradient.

Shapes: ``input`` is (N, C, *): statistics per channel C over every other axis.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

__all__ = ["BatchNormFunction", "affine_grads", "batch_norm", "batch_norm_input_grad", "channel_grad_sums",
           "check_like_torch", "empty_batch_norm", "momentum_factor", "update_running_stats"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _stat_dtype(x):
    """Accumulate statistics in float32 for half-precision inputs, as PyTorch's own kernels do."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)  # broadcasts a (C,) vector against x


def scale_shift(x_hat, weight, bias):
    """Return weight * x_hat + bias per channel (either may be None), in x_hat's dtype: BN's affine step."""
    shape = _channel_shape(x_hat)
    out = x_hat
    if weight is not None:
        out = out * weight.to(x_hat.dtype).view(shape)
    if bias is not None:
        out = out + bias.to(x_hat.dtype).view(shape)
    return out


def momentum_factor(momentum, num_batches_tracked):
    """Return the weight of the current batch in the running average.

    That is ``momentum``; or, for ``momentum=None`` (the cumulative average), 1 / k for the k-th
    batch, ``num_batches_tracked`` being k (it already counts this batch).
    """
    return 1.0 / float(num_batches_tracked) if momentum is None else momentum


def update_running_stats(running_mean, running_var, mean, var_unbiased, momentum):
    """Take one batch into the running statistics, in place: ``running = (1 - momentum) * running + momentum * batch``.

    mean, var_unbiased: the batch's (C,) mean and *unbiased* variance (what the running estimate
    stores), cast to each buffer's dtype first; momentum: the batch's weight (``momentum_factor``).
    A buffer that is None is left out. No gradient flows.
    """
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, var_unbiased)):
            if running is not None:
                running.mul_(1 - momentum).add_(batch.to(running.dtype), alpha=momentum)


def channel_grad_sums(dy, x_hat):
    """Return the backward's two per-channel sums (sum dy, sum dy * x_hat), (C,) each, over every axis but 1."""
    dims = [0] + list(range(2, x_hat.dim()))
    return dy.sum(dim=dims), (dy * x_hat).sum(dim=dims)


def batch_norm_input_grad(dy, x_hat, invstd, weight, sum_dy, sum_dy_xhat, n):
    """Return the closed-form input gradient of training-mode batch norm, in x_hat's dtype.

    dx = gamma / (n sigma) * (n dy - sum(dy) - x_hat * sum(dy x_hat)) per channel. dy, x_hat:
    (N, C, *); invstd = 1 / sigma and weight = gamma (None: 1): (C,); sum_dy, sum_dy_xhat: the
    (C,) sums over the n values per channel that the statistics came from (with several ranks,
    the sums and the count over all of them, while dy and x_hat are this rank's slice).
    """
    shape = _channel_shape(x_hat)
    scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
    return (scale / n).view(shape) * (n * dy - sum_dy.view(shape) - x_hat * sum_dy_xhat.view(shape))


def affine_grads(ctx, weight, grad_out, sum_dy, sum_dy_xhat):
    """Return (grad_weight, grad_bias) of BN's affine step: sum(dy * x_hat) and sum(dy) per channel.

    Each is None where ``ctx.needs_input_grad`` (inputs 1 and 2) or the layer (weight None,
    ``ctx.has_bias`` False) does not ask for it; the dtype is weight's (grad_out's without weight).
    """
    grad_weight = grad_bias = None
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = sum_dy_xhat.to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = sum_dy.to(grad_out.dtype if weight is None else weight.dtype)
    return grad_weight, grad_bias


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm: normalize with batch statistics, scale, shift; closed-form backward.

    forward returns (out, mean, var): the batch mean and biased variance per channel come back
    (without gradients) so that the caller can update running statistics without a second pass.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, eps):
        dims = [0] + list(range(2, input.dim()))  # every axis but the channel
        shape = _channel_shape(input)
        x = input.to(_stat_dtype(input))
        var, mean = torch.var_mean(x, dim=dims, correction=0)  # (C,), biased
        invstd = torch.rsqrt(var + eps)  # (C,)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)  # like input
        out = scale_shift(x_hat, weight, bias)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out.to(input.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x_hat, invstd, weight = ctx.saved_tensors
        dy = grad_out.to(x_hat.dtype)
        sum_dy, sum_dy_xhat = channel_grad_sums(dy, x_hat)
        grad_input = None
        if ctx.needs_input_grad[0]:
            n = x_hat.numel() // x_hat.shape[1]  # values per channel
            grad_input = batch_norm_input_grad(dy, x_hat, invstd, weight, sum_dy, sum_dy_xhat, n).to(grad_out.dtype)
        return grad_input, *affine_grads(ctx, weight, grad_out, sum_dy, sum_dy_xhat), None


def check_like_torch(input, running_mean, running_var, weight, bias, training, eps):
    """Raise where ``torch.nn.functional.batch_norm`` raises, an exception of the same type.

    Returns True when ``input`` is empty: torch then checks nothing more (see ``empty_batch_norm``).
    The checks, in torch's order:

    - training: exactly one value per channel (N times the spatial size is 1) is a ValueError;
      zero values (an empty batch) are allowed. A 0-D input is an IndexError (it has no batch axis);
    - eps > 0 in training, eps >= 0 in eval (ValueError);
    - a per-channel vector whose size is not C is a RuntimeError (C counts as 0 for 1-D input);
    - training with only one of running_mean and running_var is a ValueError; eval mode without
      them is a RuntimeError;
    - a (non-empty) input of fewer than 2 dimensions has no channel axis: IndexError.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if training:
        if input.dim() == 0:
            raise IndexError("input is 0-dimensional: batch norm needs input of shape (N, C, ...)")
        values = input.shape[0] * math.prod(input.shape[2:])  # per channel; 0 for an empty batch
        if values == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    if training and not eps > 0:
        raise ValueError(f"eps must be positive in training mode, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if input.numel() == 0:
        return True
    C = input.shape[1] if input.dim() > 1 else 0
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != C:
            # torch raises RuntimeError here; a drop-in raises the same.
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("eval mode (training=False) needs running_mean and running_var")
    if input.dim() < 2:
        raise IndexError(f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    return False


def empty_batch_norm(input, weight, bias):
    """Return batch norm of an empty input as torch does: a copy of it, still connected to the graph.

    There are no statistics to compute or to update. torch multiplies the copy by weight[0] and
    adds bias[0] (so weight and bias get gradients, of zeros, and a present but empty weight is an
    IndexError); so does this.
    """
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    """Apply batch norm to input (N, C, *) like ``torch.nn.functional.batch_norm``.

    training=True normalizes with the batch statistics and, when running_mean / running_var are
    given, updates them in place: ``running = (1 - momentum) * running + momentum * batch``, with
    the unbiased batch variance. training=False normalizes with the running statistics.
    Degenerate inputs behave as torch's: an empty input (N = 0, or any other size 0) gives an empty
    output and leaves the running statistics alone; bad arguments raise torch's exception types
    (``check_like_torch``).
    """
    if check_like_torch(input, running_mean, running_var, weight, bias, training, eps):
        return empty_batch_norm(input, weight, bias)
    if not input.is_floating_point():
        raise ValueError(f"input has dtype {input.dtype}, expected a floating-point dtype")
    shape = _channel_shape(input)
    if training:
        out, mean, var = BatchNormFunction.apply(input, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            n = input.numel() // input.shape[1]
            update_running_stats(running_mean, running_var, mean, var * n / (n - 1), momentum)
        return out
    # Eval mode: an affine map of the input with fixed statistics; autograd handles it.
    dtype = _stat_dtype(input)
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return (input.to(dtype) * scale.view(shape) + shift.view(shape)).to(input.dtype)
