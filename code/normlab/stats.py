"""Population statistics for batch norm layers: ``precise_bn`` (Wu & Johnson 2021).

A BN layer's running statistics are an exponential moving average (EMA) over training: they mix
statistics measured under many past weights. ``precise_bn`` replaces them with the statistics of
the current model: it runs the given batches through the model once, with every BN layer in
training mode (batch statistics, as in training) and every other layer in eval mode (dropout off),
records each BN layer's input, and stores the exact mean and unbiased variance over all the
examples seen. Per-batch summaries (count, mean, sum of squared deviations) are merged with Chan
et al.'s pairwise formula, in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab import nn as normlab_nn
from normlab._validate import is_int
from normlab.distributed import chan_merge

__all__ = ["batch_norm_layers", "ema_weights", "is_batch_norm", "precise_bn"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, normlab_nn._BatchNorm)


def is_batch_norm(module) -> bool:
    """Return True for a batch norm layer: ``torch.nn``'s (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy
    ones) or ``normlab.nn``'s (BatchNorm1d/2d/3d, ghost, population, renormalization, SyncBatchNorm)."""
    return isinstance(module, _BATCH_NORMS)


def batch_norm_layers(model: nn.Module) -> list:
    """Return the model's batch norm layers (``is_batch_norm``), in the order of ``model.modules()``."""
    return [m for m in model.modules() if is_batch_norm(m)]


def ema_weights(momentum: float, steps: int):
    """Return the weights with which an EMA's final value mixes its start and each batch, (steps + 1,).

    After ``steps`` updates ``running = (1 - momentum) * running + momentum * batch_k``, the running
    value is ``w[0] * start + sum_k w[k] * batch_k``: w[0] = (1 - momentum)**steps, and batch k
    (k = 1..steps) weighs momentum * (1 - momentum)**(steps - k). The weights sum to 1.
    """
    if not 0 < momentum <= 1:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    if not is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    start = torch.tensor([(1 - momentum) ** steps], dtype=torch.float64)
    return torch.cat([start, momentum * (1 - momentum) ** (steps - k)]).numpy()


class _Moments:
    """Per-channel count, mean and M2 (sum of squared deviations), merged batch by batch."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x):
        x = x.detach().to(torch.float64)  # (N, C, *positions)
        count = x.numel() // x.shape[1]  # values per channel
        # each channel's mean and biased variance over every axis but 1, one call, no transposed copy
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)  # (C,) each
        summary = (count, mean, var * count)  # M2 = count * biased variance
        if self.mean is not None:  # merge with the batches so far
            summary = chan_merge((self.count, self.mean, self.m2), summary)
        self.count, self.mean, self.m2 = summary


def _inputs(batch):
    """A batch is a tensor, or a tuple/list whose first element is the input (like (x, y))."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def precise_bn(model: nn.Module, batches) -> nn.Module:
    """Recompute every BN layer's running statistics from ``batches`` with the current weights.

    batches: an iterable of input tensors, or of (input, target) pairs (a DataLoader works). The
    pass runs BN layers in training mode and the rest of the model in eval mode; each layer's
    ``running_mean`` and ``running_var`` become the exact mean and unbiased variance of its input
    over every example (and position) seen, not an EMA. ``num_batches_tracked`` is left as it was.
    Returns the model, in eval mode.
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError("the model has no batch norm layers: nothing to recompute")
    untracked = [type(m).__name__ for m in layers if not m.track_running_stats]
    if untracked:
        raise ValueError(f"these layers keep no running statistics (track_running_stats=False): {untracked}")
    moments = {m: _Moments() for m in layers}
    saved = [m.num_batches_tracked.clone() for m in layers]
    hooks = [m.register_forward_pre_hook(lambda m, args: moments[m].add(args[0])) for m in layers]
    model.eval()
    populations = [m for m in layers if isinstance(m, normlab_nn._PopulationNorm)]
    for m in layers:
        m.train()
    for m in populations:
        m.measuring = True  # normalize with, and measure, the statistics of these batches
    seen = 0
    try:
        for batch in batches:
            model(_inputs(batch))
            seen += 1
    finally:
        for hook in hooks:
            hook.remove()
        for m in populations:
            m.measuring = False
        for m, count in zip(layers, saved):
            m.num_batches_tracked.copy_(count)
        model.eval()
    if seen == 0:
        raise ValueError("batches is empty: precise_bn needs at least one batch")
    for m in layers:
        stats = moments[m]
        if stats.count < 2:
            raise ValueError(f"{type(m).__name__} saw {stats.count} value per channel; it needs at least 2")
        m.running_mean.copy_(stats.mean.to(m.running_mean.dtype))
        m.running_var.copy_((stats.m2 / (stats.count - 1)).to(m.running_var.dtype))
    return model
