"""Training deep networks without batch statistics: the tools that replace batch norm.

Batch norm does three jobs at once: it keeps the signal's scale under control with depth, it
makes each residual block close to the identity at initialization, and it smooths the loss so
that large learning rates train. The tools here take over one job each, with no statistic that
mixes the examples of a batch:

- ``standardize_weight``, ``WSLinear``, ``WSConv2d``: weight standardization, each output unit's
  weights with mean 0 and variance 1 (Qiao et al. 2019, "Micro-batch training with batch-channel
  normalization and weight standardization"), used with GroupNorm.
- ``nonlinearity_gain``, ``scaled_standardize_weight``, ``ScaledWSLinear``, ``ScaledWSConv2d``:
  scaled weight standardization, which keeps the variance of the signal through a layer and its
  nonlinearity (Brock et al. 2021a, "Characterizing signal propagation to close the performance
  gap in unnormalized ResNets": the NF-ResNets).
- ``unitwise_norm``, ``adaptive_grad_clip_``: adaptive gradient clipping, each unit's gradient
  kept small relative to its weights (Brock et al. 2021b, "High-performance large-scale image
  recognition without normalization": the NFNets).
- ``fixup_scale``, ``fixup_init_``, ``Bias``: Fixup initialization (Zhang et al. 2019, "Fixup
  initialization: residual learning without normalization").
- ``Scale``: a learnable scalar on a residual branch, 0 at initialization (SkipInit, De & Smith
  2020, "Batch normalization biases residual blocks towards the identity function in deep
  networks").
- ``FilterResponseNorm2d``: a normalization per example and channel over the spatial positions,
  with a learned threshold (Singh & Krishnan 2020, "Filter response normalization layer").
- ``DyT``: Dynamic Tanh, an elementwise ``tanh(alpha x)`` in place of LayerNorm (Zhu, Chen, He,
  LeCun & Liu 2025, "Transformers without normalization").

None of them uses the batch: each layer computes the same thing in train and eval mode, and for a
batch of one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial.legendre import leggauss
from torch import nn

from normlab._validate import check_positive_int, is_number

__all__ = [
    "Bias",
    "DyT",
    "FilterResponseNorm2d",
    "Scale",
    "ScaledWSConv2d",
    "ScaledWSLinear",
    "WSConv2d",
    "WSLinear",
    "adaptive_grad_clip_",
    "fixup_init_",
    "fixup_scale",
    "nonlinearity_gain",
    "scaled_standardize_weight",
    "standardize_weight",
    "unitwise_norm",
]


def _check_positive(name, value) -> None:
    """Raise ValueError, naming the argument, unless value is a real number > 0 (bools excluded)."""
    if not is_number(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_number(name, value) -> None:
    """Raise ValueError, naming the argument, unless value is a finite real number (bools excluded)."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# --------------------------------------------------------------------------------------------
# Weight standardization (Qiao et al. 2019)
# --------------------------------------------------------------------------------------------


def _unit_moments(weight: torch.Tensor):
    """Return the mean and biased variance of each output unit's weights, each (out, 1, ...)."""
    if weight.dim() < 2:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, expected at least 2 dims (out, *fan_in)"
        )
    dims = tuple(range(1, weight.dim()))                                   # everything but the unit
    return weight.mean(dims, keepdim=True), weight.var(dims, correction=0, keepdim=True)


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give each output unit's weights mean 0 and variance 1: (W - mean) / sqrt(var + eps).

    weight: (out, *fan_in), a Linear's (out, in) or a Conv's (out, in / groups, *kernel). The mean
    and the biased variance are taken per output unit, over all dims but 0: the normalization a
    LayerNorm would apply to each row of the weight matrix. Returns a tensor of weight's shape.
    Gradients flow through the mean and variance, so the optimizer sees the standardized layer.
    """
    mean, var = _unit_moments(weight)                                      # (out, 1, ...) each
    _check_positive("eps", eps)
    return (weight - mean) / torch.sqrt(var + eps)


class WSLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the standardized weight (``standardize_weight``).

    Takes ``nn.Linear``'s arguments, plus the keyword ``eps``. The stored ``weight`` stays raw; the
    layer's output is invariant to scaling and shifting a unit's weights (W_i -> a W_i + b, a > 0).
    Used with GroupNorm after it, as in Qiao et al. 2019: the weight standardization alone does not
    control the scale of the output.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        _check_positive("eps", eps)
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, standardize_weight(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward uses the standardized weight (``standardize_weight``).

    Takes ``nn.Conv2d``'s arguments (padding modes included), plus the keyword ``eps``; each output
    channel's (in / groups, kH, kW) weights are standardized together.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        _check_positive("eps", eps)
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # _conv_forward applies the padding mode, so every mode of nn.Conv2d keeps working.
        return self._conv_forward(input, standardize_weight(self.weight, self.eps), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


# --------------------------------------------------------------------------------------------
# Scaled weight standardization (Brock et al. 2021a, NF-ResNets)
# --------------------------------------------------------------------------------------------


def _gaussian_quadrature():
    """Return nodes z and weights w with sum(w * f(z)) = E[f(Z)], Z ~ N(0, 1), for piecewise-smooth f."""
    # Gauss-Hermite converges slowly for a kinked f (relu: 1.7e-3 off with 200 nodes), so use
    # 16-point Gauss-Legendre on panels of width 1/4 over [-12, 12] (the mass outside is 4e-33).
    # Kinks on the panel edges (0 for relu, +-1 for hardtanh, 6 for relu6...) then cost nothing.
    x, w = leggauss(16)                                                    # on [-1, 1]
    width = 0.25
    left = np.arange(-12.0, 12.0, width)                                   # (96,) panel edges
    z = (left[:, None] + width / 2 * (x + 1)).ravel()                      # (96 * 16,)
    density = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return z, np.tile(width / 2 * w, left.size) * density


def _gelu(z: np.ndarray) -> np.ndarray:
    """Apply the exact GELU, z * Phi(z), to a float64 array."""
    return F.gelu(torch.from_numpy(z)).numpy()


_NAMED = {"identity": lambda z: z, "relu": lambda z: np.maximum(z, 0.0), "tanh": np.tanh, "gelu": _gelu}


def nonlinearity_gain(fn) -> float:
    """Return gamma = 1 / sqrt(Var[fn(z)]) for z ~ N(0, 1): the gain that makes fn variance preserving.

    fn: a function of a float64 NumPy array, returning an array of its shape, or one of the names
    "identity", "relu", "tanh", "gelu". With scaled weight standardization, a layer whose input has
    unit variance per element gives pre-activations z ~ N(0, 1) (approximately, for a wide layer),
    and gamma * fn(z) then has variance 1 again: the signal keeps its scale with depth.

    For "relu" the exact formula: Var = E[relu^2] - E[relu]^2 = 1/2 - 1/(2 pi), so
    gamma = sqrt(2 / (1 - 1/pi)) = 1.71286... Otherwise a fixed quadrature, deterministic, accurate
    to about 1e-12 for smooth fn and for fn with kinks on a multiple of 1/4. The constants in the
    NFNets code (relu 1.71396, gelu 1.70150, tanh 1.59391) are 0.03% to 0.09% larger than these
    exact values (1.71286, 1.70093, 1.59254).
    """
    if isinstance(fn, str):
        if fn not in _NAMED:
            raise ValueError(f"fn is {fn!r}, expected a function or one of {sorted(_NAMED)}")
        if fn == "relu":
            return math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
        if fn == "identity":
            return 1.0
        fn = _NAMED[fn]
    if not callable(fn):
        raise ValueError(f"fn is a {type(fn).__name__}, expected a function of a NumPy array or a name")
    z, w = _gaussian_quadrature()
    y = np.asarray(fn(z), dtype=np.float64)
    if y.shape != z.shape:
        raise ValueError(f"fn returned shape {y.shape} for an input of shape {z.shape}, expected the same")
    mean = np.sum(w * y)
    var = np.sum(w * (y - mean) ** 2)  # centred first: no cancellation for a large mean
    if not math.isfinite(var):
        raise ValueError(f"fn(z) has variance {var} for z ~ N(0, 1), expected a finite one")
    # A constant fn leaves a variance of rounding error (5e-32 for fn = 1), not 0.
    if not var > 1e-14 * np.sum(w * y * y):
        raise ValueError("fn(z) is constant for z ~ N(0, 1), expected a nonconstant fn: no gain preserves variance")
    return 1.0 / math.sqrt(var)


def scaled_standardize_weight(
    weight: torch.Tensor, gain: torch.Tensor | None = None, gamma: float = 1.0, eps: float = 1e-4
) -> torch.Tensor:
    """Return gamma * gain * (W - mean) / sqrt(max(N * var, eps)): NF-ResNets' scaled WS.

    weight: (out, *fan_in); mean and biased var per output unit as in ``standardize_weight``;
    N = fan-in, the product of all dims but 0. gain: None (1), a (out,) tensor, or a tensor
    broadcastable to (out, 1, ...). gamma: ``nonlinearity_gain`` of the activation before the layer.
    Returns a tensor of weight's shape.

    Each unit's weights then sum to 0 and have squared norm gamma^2 * gain^2, so for an input of
    independent elements with a common mean (a ReLU's output has mean > 0) and variance v, the
    output has mean 0 and variance gamma^2 * gain^2 * v. With gain 1 and v = Var[fn(z)] =
    1 / gamma^2 for the activation fn before the layer, the output has variance 1 again.

    eps floors N * var, as in the NFNets code, and only guards a unit whose weights are all equal.
    Added to var instead, (var + eps) * N, it would shrink every unit: torch's default init gives
    var = 1 / (3N), so with N = 256 and eps = 1e-4 the output variance would be 7% short.
    """
    mean, var = _unit_moments(weight)                                      # (out, 1, ...) each
    _check_positive("eps", eps)
    fan_in = weight[0].numel()
    scale = gamma * torch.rsqrt(torch.clamp_min(var * fan_in, eps))        # (out, 1, ...)
    if gain is not None:
        out = weight.shape[0]
        if gain.dim() == 1:
            if gain.numel() != out:
                raise ValueError(f"gain has shape {tuple(gain.shape)}, expected ({out},)")
            gain = gain.reshape(out, *([1] * (weight.dim() - 1)))          # (out, 1, ...)
        scale = scale * gain
    return (weight - mean) * scale


class _ScaledWS:
    """What ScaledWSLinear and ScaledWSConv2d share: the gain parameter, gamma, eps, the weight."""

    def _init_scaled_ws(self, gamma, eps) -> None:
        _check_number("gamma", gamma)
        _check_positive("eps", eps)
        self.gamma = gamma
        self.eps = eps
        w = self.weight
        self.gain = nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype))  # (out,)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # torch's constructor calls this before the gain exists; later calls reset it too.
        if getattr(self, "gain", None) is not None:
            nn.init.ones_(self.gain)

    def scaled_weight(self) -> torch.Tensor:
        """Return the weight the forward uses (``scaled_standardize_weight``), of the weight's shape."""
        return scaled_standardize_weight(self.weight, self.gain, self.gamma, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, eps={self.eps}"


class ScaledWSLinear(_ScaledWS, nn.Linear):
    """``nn.Linear`` with NF-ResNets' scaled weight standardization and a learnable gain per unit.

    Takes ``nn.Linear``'s arguments, plus the keywords ``gamma`` (the ``nonlinearity_gain`` of the
    activation that feeds the layer) and ``eps``. ``gain``: (out,), ones at initialization.
    """

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_scaled_ws(gamma, eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.scaled_weight(), self.bias)


class ScaledWSConv2d(_ScaledWS, nn.Conv2d):
    """``nn.Conv2d`` with NF-ResNets' scaled weight standardization and a learnable gain per channel.

    Takes ``nn.Conv2d``'s arguments, plus the keywords ``gamma`` and ``eps``; the fan-in is
    in / groups * kH * kW. ``gain``: (out,), ones at initialization.
    """

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_scaled_ws(gamma, eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.scaled_weight(), self.bias)


# --------------------------------------------------------------------------------------------
# Adaptive gradient clipping (Brock et al. 2021b, NFNets)
# --------------------------------------------------------------------------------------------


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Return the l2 norm of each output unit of x (over all dims but 0), or of all of x if ndim <= 1.

    x: a weight or its gradient, (out, *fan_in), or a bias or gain, (out,), or a scalar. Returns a
    0-dim tensor for ndim <= 1 (a bias is clipped as a whole, as in the NFNets code), else
    (out, 1, ...), which broadcasts against x.
    """
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip_(parameters, clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Clip each unit's gradient in place to at most ``clipping`` times its weights' norm (AGC).

    parameters: a tensor or an iterable of tensors (as ``torch.nn.utils.clip_grad_norm_``); those
    whose ``.grad`` is None are skipped. For each unit i (``unitwise_norm``):
    max_i = clipping * max(||W_i||, eps), and where ||G_i|| > max_i, G_i <- G_i * max_i / ||G_i||.
    A step then changes no unit's weights by more than a fraction ``clipping`` of their norm
    (times the learning rate); eps lets a unit whose weights start at zero move at all.
    Brock et al. 2021b do not clip the final classifier layer; leave it out of ``parameters``.
    """
    _check_positive("clipping", clipping)
    _check_positive("eps", eps)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = clipping * unitwise_norm(p).clamp_min(eps)
        grad_norm = unitwise_norm(p.grad)
        # The floor only keeps the unused branch finite: where a unit is clipped, grad_norm > max_norm > 0.
        clipped = p.grad * (max_norm / grad_norm.clamp_min(1e-6))
        p.grad.copy_(torch.where(grad_norm > max_norm, clipped, p.grad))


# --------------------------------------------------------------------------------------------
# Normalization layers with no batch statistics: DyT and FRN
# --------------------------------------------------------------------------------------------


class DyT(nn.Module):
    """Dynamic Tanh over the last dim: y = weight * tanh(alpha * x) + bias (Zhu et al. 2025).

    A drop-in for ``nn.LayerNorm(num_features)`` in a transformer: x (*, num_features) -> y of the
    same shape. No statistic at all: alpha (a learned scalar, (1,)) sets the input scale at which
    tanh starts to squash, which is how LayerNorm's outputs look for a trained transformer.
    weight (num_features,) ones, bias (num_features,) zeros: LayerNorm's gamma and beta.
    """

    def __init__(self, num_features: int, alpha_init: float = 0.5):
        super().__init__()
        check_positive_int("num_features", num_features)
        _check_number("alpha_init", alpha_init)
        self.num_features = num_features
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.num_features:
            raise ValueError(f"input has shape {tuple(x.shape)}, expected (*, {self.num_features})")
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha_init={self.alpha_init}"


class FilterResponseNorm2d(nn.Module):
    """Filter response normalization with a thresholded linear unit (Singh & Krishnan 2020).

    x: (N, C, H, W). Per example and channel, nu2 = mean of x^2 over (H, W); then
    x_hat = x / sqrt(nu2 + eps), y = weight * x_hat + bias, out = max(y, tau). weight ones, bias
    and tau zeros, each (C,). No mean is subtracted, so the TLU's learned threshold tau replaces
    the ReLU that would follow: with tau = 0 the layer ends in a ReLU. Nothing depends on the
    other examples, so train and eval mode agree, and a batch of one is fine. (With H = W = 1,
    x_hat is about sign(x); the paper learns eps in that case, not done here.)
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        check_positive_int("num_features", num_features)
        _check_positive("eps", eps)
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"input has shape {tuple(x.shape)}, expected (N, {self.num_features}, H, W)")
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)                      # (N, C, 1, 1)
        x_hat = x * torch.rsqrt(nu2 + self.eps)
        shape = (1, self.num_features, 1, 1)                                # broadcasts (C,) over N, H, W
        y = self.weight.view(shape) * x_hat + self.bias.view(shape)
        return torch.maximum(y, self.tau.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


# --------------------------------------------------------------------------------------------
# Residual branches that start as the identity: SkipInit and Fixup
# --------------------------------------------------------------------------------------------


class Scale(nn.Module):
    """Multiply by a learnable scalar ``scale`` (1,), ``init`` at initialization.

    SkipInit (De & Smith 2020): x + Scale(0)(f(x)) makes every residual block the identity at
    initialization, which is what batch norm on the branch does approximately in a deep ResNet.
    """

    def __init__(self, init: float = 0.0):
        super().__init__()
        _check_number("init", init)
        self.init = init
        self.scale = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"init={self.init}"


class Bias(nn.Module):
    """Add a learnable scalar ``bias`` (1,), ``init`` at initialization (Fixup's scalar biases)."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        _check_number("init", init)
        self.init = init
        self.bias = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias

    def extra_repr(self) -> str:
        return f"init={self.init}"


def fixup_scale(num_branches: int, layers_per_branch: int) -> float:
    """Return L ** (-1 / (2m - 2)), Fixup's factor for the inner layers of L branches of m layers.

    With it, the L branches together change the output by O(1) per SGD step, whatever the depth
    (Zhang et al. 2019). m >= 2: a branch of one layer has no inner layer to rescale.
    """
    check_positive_int("num_branches", num_branches)
    check_positive_int("layers_per_branch", layers_per_branch)
    if layers_per_branch < 2:
        raise ValueError(f"layers_per_branch must be at least 2, got {layers_per_branch}")
    return num_branches ** (-1.0 / (2 * layers_per_branch - 2))


def _weight_layers(branch) -> list:
    """Return a branch's nn.Linear and nn.Conv2d layers in order, nested ones included."""
    modules = branch.modules() if isinstance(branch, nn.Module) else (m for b in branch for m in b.modules())
    return [m for m in modules if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def fixup_init_(branches, num_branches: int | None = None) -> None:
    """Re-initialize residual branches in place as Fixup prescribes (Zhang et al. 2019).

    branches: the residual branches, each an nn.Module (e.g. nn.Sequential) or an iterable of
    modules whose weight layers (nn.Linear, nn.Conv2d, found in order) number m >= 2.
    num_branches: L, the number of residual branches in the whole network (default: len(branches)).
    Every weight layer of a branch but the last gets He init (Kaiming normal, fan_in, ReLU) times
    ``fixup_scale(L, m)``; the last gets zero, so each block is the identity at initialization.
    Their biases, if any, get zero.

    The rest of Fixup is the caller's business: zero-initialize the classification layer, and add
    the scalar ``Bias`` (before each convolution, linear layer and activation) and the ``Scale``
    multiplier (after each branch's last layer, init 1) to the network.
    """
    branches = list(branches)
    if num_branches is None:
        if not branches:
            raise ValueError("branches is empty, expected at least one residual branch")
        num_branches = len(branches)
    check_positive_int("num_branches", num_branches)
    layers = [_weight_layers(b) for b in branches]
    for i, found in enumerate(layers):  # check every branch before changing any
        if len(found) < 2:
            raise ValueError(f"branch {i} has {len(found)} weight layer(s), expected at least 2 (Linear or Conv2d)")
    for found in layers:
        scale = fixup_scale(num_branches, len(found))
        for layer in found[:-1]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            layer.weight.mul_(scale)
        nn.init.zeros_(found[-1].weight)
        for layer in found:
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
