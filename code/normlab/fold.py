"""Fold an eval-mode batch norm into the linear or convolutional layer before it.

In eval mode BN is a fixed affine map per channel, y = s * (z - mu) + beta with
s = gamma / sqrt(var + eps). Applied to z = W x + b it gives y = (s W) x + s (b - mu) + beta: one
layer with weight W' = s W (row / output channel scaled) and bias b' = s (b - mu) + beta. At
inference the BN then costs nothing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from normlab.stats import is_batch_norm

__all__ = ["fold_batch_norm", "fold_model"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batch_norm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a new layer computing ``bn(layer(x))`` for an eval-mode ``bn``; the inputs are unchanged.

    layer: nn.Linear or nn.ConvNd, with or without bias. bn: a BatchNorm over its output channels,
    in eval mode, with running statistics.
    """
    if not isinstance(layer, _FOLDABLE):
        raise ValueError(f"can fold into nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}")
    if not is_batch_norm(bn):
        raise ValueError(f"bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("bn is in training mode, where it uses batch statistics: call bn.eval() before folding")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): there is nothing fixed to fold")
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        raise ValueError(f"layer has {out} output channels but bn normalizes {bn.num_features}")

    folded = copy.deepcopy(layer)
    with torch.no_grad():
        w = layer.weight
        dtype = torch.promote_types(w.dtype, torch.float32)  # fold in at least float32
        scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)  # (C,)
        if bn.affine:
            scale = scale * bn.weight.to(dtype)
        bias = layer.bias.to(dtype) if layer.bias is not None else torch.zeros_like(scale)
        new_bias = (bias - bn.running_mean.to(dtype)) * scale
        if bn.affine:
            new_bias = new_bias + bn.bias.to(dtype)
        shape = (-1,) + (1,) * (w.dim() - 1)  # scale each output channel's row / filter
        folded.weight.copy_((w.to(dtype) * scale.view(shape)).to(w.dtype))
        if folded.bias is None:
            folded.bias = nn.Parameter(torch.empty(out, dtype=w.dtype, device=w.device))
        folded.bias.copy_(new_bias.to(w.dtype))
    return folded


def fold_model(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every (Linear/Conv, BatchNorm) pair folded.

    Pairs are found among consecutive children of every nn.Sequential inside the model; each BN
    is replaced by nn.Identity, so indices and state-dict keys of the other layers stay put.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            layer, bn = seq._modules[first], seq._modules[second]
            if isinstance(layer, _FOLDABLE) and is_batch_norm(bn) and bn.running_mean is not None:
                seq._modules[first] = fold_batch_norm(layer, bn)
                seq._modules[second] = nn.Identity()
    return model
