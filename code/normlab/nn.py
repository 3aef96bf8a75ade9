"""Drop-in batch norm modules built on ``normlab.functional``.

The math lives in ``normlab.functional.batch_norm``; a module adds the bookkeeping: the learned
``weight`` (gamma) and ``bias`` (beta), the ``running_mean`` / ``running_var`` buffers with their
``num_batches_tracked`` counter, and the switch between training and eval mode. Constructor,
parameters, buffers and state_dict keys match ``torch.nn.BatchNorm1d/2d/3d``, so state dicts load
in both directions.

The name "momentum" is a misnomer kept for compatibility: it is the weight of the *new* batch in
the running average, ``running = (1 - momentum) * running + momentum * batch``.
``momentum=None`` gives every batch so far the same weight (a cumulative moving average).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from normlab._validate import is_int, is_number
from normlab.functional import (
    _stat_dtype,
    affine_grads,
    batch_norm,
    batch_norm_input_grad,
    channel_grad_sums,
    momentum_factor,
    scale_shift,
    update_running_stats,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "PopulationNorm1d",
    "PopulationNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "renorm_schedule",
    "NormLSTMCell",
    "NormLSTM",
    "LastHidden",
    "SyncBatchNorm",
    "SyncBatchNormFunction",
]

# torch 2.13 added a keyword-only `bias` switch (gamma without beta); older versions lack it.
_TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


class _BatchNorm(nn.Module):
    """Shared bookkeeping of the 1d/2d/3d modules; subclasses only say which input ranks they take."""

    _version = 2  # torch's BN state-dict version: num_batches_tracked is always present
    _ranks: tuple = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))  # gamma
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))  # beta
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Forget the running statistics: mean 0, variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set gamma = 1, beta = 0 (the identity after normalizing)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input):
        if input.dim() not in self._ranks:
            wanted = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")

    def _count_batch(self) -> float:
        """Count one more training batch; return its weight in the running average (``momentum_factor``)."""
        self.num_batches_tracked.add_(1)
        return momentum_factor(self.momentum, self.num_batches_tracked)

    def forward(self, input):
        self._check_input_dim(input)
        # The weight of this batch in the running average (unused when they are not updated).
        factor = self._count_batch() if self.training and self.track_running_stats else 0.0
        # Batch statistics in training mode, and in eval mode when there are no running ones.
        use_batch_stats = self.training or self.running_mean is None
        # Running statistics are updated only in training mode with tracking on.
        update = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        bias = f"bias={self.bias is not None}, " if _TORCH_HAS_BIAS_ARG else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"{bias}track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # State dicts saved before num_batches_tracked existed (torch's version 1) lack the counter.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict and (local_metadata.get("version") or 1) < 2:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input: statistics per channel C."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input: statistics per channel over (N, H, W)."""

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input: statistics per channel over (N, D, H, W)."""

    _ranks = (5,)


# --------------------------------------------------------------------------------------------
# Chapter 4: ghost batches and population normalization
# --------------------------------------------------------------------------------------------


def _ghost_normalize(x, virtual_batch_size, eps):
    """Normalize each run of ``virtual_batch_size`` consecutive examples with its own statistics.

    x: (N, C, *). The last group holds the remainder when N is not a multiple. Returns (x_hat,
    means, unbiased variances, counts): one (C,) row of statistics per group, and the number of
    values per channel that each group averaged over.

    The trick: G groups of v examples with C channels are one batch of v examples with G * C
    channels, (v, G * C, *), so PyTorch's own fused batch norm normalizes them all in one call.
    With momentum 1 it also leaves each (group, channel)'s mean and unbiased variance in the
    buffers it is given.
    """
    n, v = x.shape[0], virtual_batch_size
    full = n // v * v
    chunks = [x[:full].reshape(n // v, v, *x.shape[1:])] if full else []
    if full < n:
        chunks.append(x[full:].unsqueeze(0))  # the remainder, as one more group
    outs, means, variances, counts = [], [], [], []
    for chunk in chunks:  # (groups, examples, C, *)
        g, m, c = chunk.shape[:3]
        count = chunk[0].numel() // c  # values per channel in one group
        if count < 2:
            raise ValueError(
                f"expected more than 1 value per channel when training, but a ghost batch of "
                f"{m} example(s) of shape {tuple(x.shape[1:])} has {count}"
            )
        folded = chunk.transpose(0, 1).reshape(m, g * c, *chunk.shape[3:])  # (examples, groups * C, *)
        mean = torch.zeros(g * c, dtype=x.dtype, device=x.device)
        var = torch.ones(g * c, dtype=x.dtype, device=x.device)
        out = F.batch_norm(folded, mean, var, training=True, momentum=1.0, eps=eps)
        outs.append(out.reshape(m, g, c, *chunk.shape[3:]).transpose(0, 1).reshape(g * m, *x.shape[1:]))
        means.append(mean.view(g, c))
        variances.append(var.view(g, c))
        counts += [count] * g
    return torch.cat(outs), torch.cat(means), torch.cat(variances), counts


class _GhostBatchNorm(_BatchNorm):
    """Batch norm whose training statistics come from virtual ("ghost") batches (Hoffer et al. 2017).

    In training mode the batch is cut into consecutive groups of ``virtual_batch_size`` examples
    (the last group takes the remainder) and each group is normalized with its own mean and
    variance, as if it were a batch of its own. A large batch then carries the noise of small ones.
    The running statistics are updated once per call, from the count-weighted average of the
    groups' means and of their unbiased variances. With ``virtual_batch_size`` >= the batch size
    the layer is exactly ``BatchNorm``; in eval mode it always is.
    """

    def __init__(self, num_features: int, virtual_batch_size: int, *args, **kwargs):
        if not is_int(virtual_batch_size) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training or input.shape[0] <= self.virtual_batch_size:
            return super().forward(input)
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"running_mean should contain {input.shape[1]} elements not {self.num_features}"
            )
        x = input.to(_stat_dtype(input))
        x_hat, means, variances, counts = _ghost_normalize(x, self.virtual_batch_size, self.eps)
        out = scale_shift(x_hat, self.weight, self.bias)
        if self.track_running_stats:
            factor = self._count_batch()
            # lerp_ (running + factor * (batch - running)) rounds otherwise than update_running_stats: kept
            with torch.no_grad():
                w = torch.tensor(counts, dtype=x.dtype, device=x.device).unsqueeze(1) / sum(counts)
                self.running_mean.lerp_((w * means).sum(0).to(self.running_mean.dtype), factor)
                self.running_var.lerp_((w * variances).sum(0).to(self.running_var.dtype), factor)
        return out.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input; see ``_GhostBatchNorm``."""

    _ranks = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input; see ``_GhostBatchNorm``."""

    _ranks = (4,)


class _PopulationNorm(_BatchNorm):
    """Normalization with fixed statistics of the whole training set, in training as in eval.

    The layer normalizes with its ``running_mean`` / ``running_var`` buffers in *both* modes, so
    no example's output depends on the other examples in its batch: the normalization stays, the
    batch noise goes. Gradients flow through the input and gamma/beta, not through the
    statistics. Refresh the statistics (say, once an epoch) with
    ``normlab.precise_bn(model, [x_train])``, which sets ``measuring`` during its pass so that
    the layer then normalizes with, and measures, the statistics of what it is given.
    """

    def __init__(self, num_features: int, *args, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        if not self.track_running_stats:
            raise ValueError("a population norm layer keeps its statistics: track_running_stats must be True")
        self.measuring = False

    def forward(self, input):
        if self.training and not self.measuring:
            self._check_input_dim(input)
            return batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(input)


class PopulationNorm1d(_PopulationNorm):
    """Population normalization over (N, C) or (N, C, L) input; see ``_PopulationNorm``."""

    _ranks = (2, 3)


class PopulationNorm2d(_PopulationNorm):
    """Population normalization over (N, C, H, W) input; see ``_PopulationNorm``."""

    _ranks = (4,)


# --------------------------------------------------------------------------------------------
# Batch renormalization (Ioffe 2017), Chapter 5
# --------------------------------------------------------------------------------------------


def _check_r_max(r_max):
    if not is_number(r_max) or not r_max >= 1:
        raise ValueError(f"r_max must be a number >= 1 (float('inf') allowed), got {r_max!r}")
    return float(r_max)


def _check_d_max(d_max):
    if not is_number(d_max) or not d_max >= 0:
        raise ValueError(f"d_max must be a number >= 0 (float('inf') allowed), got {d_max!r}")
    return float(d_max)


class _BatchRenorm(_BatchNorm):
    """Batch renormalization: batch statistics, corrected towards the running ones by r and d.

    Training mode, per channel, with the running statistics as they were *before* this step:

        sigma_B = sqrt(var_B + eps)                  (biased batch variance)
        sigma   = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1 / r_max, r_max)  (no gradient)
        d = clip((mu_B - running_mean) / sigma, -d_max, d_max)   (no gradient)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    then the running statistics update exactly as BatchNorm's. Eval mode is BatchNorm's eval.
    With r_max = 1 and d_max = 0 this is BatchNorm; with r_max = d_max = inf the training output
    is the eval output computed with the pre-step running statistics. ``r_max`` and ``d_max`` are
    attributes a training loop may change (see ``renorm_schedule``). After each training step,
    ``last_r`` and ``last_d`` hold that step's (C,) correction factors, before clipping in
    ``last_r_raw`` / ``last_d_raw``, for inspection.

    ``virtual_batch_size`` (default None: the whole batch) computes the batch statistics, r and d
    per group of that many consecutive examples, as ``GhostBatchNorm`` does (the batch must then
    be a multiple of it): the small "per-device" batches of Wu and He's experiment inside one
    optimizer batch. The running statistics take in the groups' average mean and average
    unbiased variance, once per call, and ``last_r`` etc. are then (groups, C).

    ``bias=False`` (keyword-only, as in torch's BatchNorm) keeps gamma and drops beta. An empty
    batch in training mode is BatchNorm's: an empty output, the running statistics unchanged.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        r_max: float = 3.0,
        d_max: float = 5.0,
        affine: bool = True,
        device=None,
        dtype=None,
        virtual_batch_size: int | None = None,
        *,
        bias: bool = True,
    ):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        if virtual_batch_size is not None and (
            not is_int(virtual_batch_size) or virtual_batch_size < 1
        ):
            raise ValueError(f"virtual_batch_size must be None or a positive int, got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size
        self.r_max = r_max
        self.d_max = d_max
        self.last_r = self.last_d = self.last_r_raw = self.last_d_raw = None

    @property
    def r_max(self) -> float:
        return self._r_max

    @r_max.setter
    def r_max(self, value):
        self._r_max = _check_r_max(value)

    @property
    def d_max(self) -> float:
        return self._d_max

    @d_max.setter
    def d_max(self, value):
        self._d_max = _check_d_max(value)

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training and input.numel() and input.shape[1] != self.num_features:
            raise self._channel_error(input)  # (an empty input is not checked, as in torch)
        if not self.training or input.numel() == 0:
            # Eval: BatchNorm's, with the running statistics. An empty batch has no statistics to
            # correct: BatchNorm's empty output, the step counted, the running statistics unchanged.
            return super().forward(input)
        # The step counts before the batch is checked, as in BatchNorm (and torch's): a call that
        # raises below has counted it.
        factor = self._count_batch()
        if input.shape[1] != self.num_features:
            raise self._channel_error(input)
        C, N = self.num_features, input.shape[0]
        v = self.virtual_batch_size
        v = N if v is None or N <= v else v  # examples per group
        if N % v:
            raise ValueError(f"a batch of {N} does not split into groups of virtual_batch_size={v}: "
                             f"pass a multiple of {v} (or at most {v} examples)")
        if input.numel() // (C * N // v) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        x = input.to(torch.float32) if input.dtype in (torch.float16, torch.bfloat16) else input
        # (x - mu_B) / sigma_B per group, with its gradient through mu_B and sigma_B, by torch's fused
        # batch norm (GhostBatchNorm's trick); the groups' means and unbiased variances come with it.
        x_hat, mu_b, unbiased, counts = _ghost_normalize(x, v, self.eps)  # (N, C, *), (G, C), (G, C)
        G, n = mu_b.shape[0], counts[0]  # groups, values per channel in one group
        shape = (G, 1, C) + (1,) * (x.dim() - 2)  # broadcasts a (G, C) statistic against the groups
        with torch.no_grad():  # r and d are constants for autograd
            sigma_b = torch.sqrt(unbiased * (n - 1) / n + self.eps)  # from the biased variance
            sigma = torch.sqrt(self.running_var.to(x.dtype) + self.eps)
            r_raw = sigma_b / sigma
            d_raw = (mu_b - self.running_mean.to(x.dtype)) / sigma
            r = r_raw.clamp(1.0 / self.r_max, self.r_max)
            d = d_raw.clamp(-self.d_max, self.d_max)
        x_hat = x_hat.reshape(G, N // G, *x.shape[1:]) * r.view(shape) + d.view(shape)
        out = scale_shift(x_hat.reshape(input.shape), self.weight, self.bias)
        # Now, and only now, the running statistics take this batch in, as in BatchNorm: the groups'
        # average mean and unbiased variance (equal sizes).
        update_running_stats(self.running_mean, self.running_var, mu_b.mean(0), unbiased.mean(0), factor)
        if G == 1:  # one group: (C,) vectors, as for a plain batch
            r, d, r_raw, d_raw = r[0], d[0], r_raw[0], d_raw[0]
        self.last_r, self.last_d, self.last_r_raw, self.last_d_raw = r, d, r_raw, d_raw
        return out.to(input.dtype)

    def _channel_error(self, input):
        # A RuntimeError, as BatchNorm's (torch's) for this mistake.
        return RuntimeError(
            f"running_mean should contain {input.shape[1]} elements not {self.num_features}: expected "
            f"{self.num_features} channels (dim 1), got input of shape {tuple(input.shape)}"
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
            f"d_max={self.d_max}, affine={self.affine}"
            + ("" if self.virtual_batch_size is None else f", virtual_batch_size={self.virtual_batch_size}")
        )


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over (N, C) or (N, C, L) input: statistics per channel C."""

    _ranks = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over (N, C, H, W) input: statistics per channel over (N, H, W)."""

    _ranks = (4,)


def renorm_schedule(step, warmup_steps, relax_steps, r_max=3.0, d_max=5.0):
    """Return (r_max, d_max) for a training step: plain BN, then a linear relaxation to the targets.

    For ``step < warmup_steps`` it is (1, 0), batch norm, while the running statistics settle.
    Over the next ``relax_steps`` steps both limits move linearly to ``r_max`` and ``d_max``, and
    stay there. Ioffe (2017) kept BN for about 5k steps, then relaxed to r_max = 3, d_max = 5.
    """
    for name, v in (("step", step), ("warmup_steps", warmup_steps), ("relax_steps", relax_steps)):
        if not is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    r_max, d_max = _check_r_max(r_max), _check_d_max(d_max)
    if step < warmup_steps:
        return 1.0, 0.0
    if relax_steps == 0 or step >= warmup_steps + relax_steps:
        return r_max, d_max
    frac = (step - warmup_steps) / relax_steps

    def lerp(start, target):  # an infinite target is reached as soon as the relaxation starts
        return start if frac == 0 else target if math.isinf(target) else start + frac * (target - start)

    return lerp(1.0, r_max), lerp(0.0, d_max)


# --------------------------------------------------------------------------------------------
# Chapter 6: normalized LSTMs
# --------------------------------------------------------------------------------------------

LSTM_NORMS = ("none", "layer", "batch")


class NormLSTMCell(nn.Module):
    """One LSTM step with the gate pre-activations and the cell normalized (or not).

    Gates (i, f, g, o order, as ``torch.nn.LSTMCell``) are
    ``norm_ih(W_ih x) + norm_hh(W_hh h) + bias`` and ``h' = o * tanh(norm_c(c'))``.

    norm='none': no normalization (with ``bias`` as the sum of torch's two biases, the same
    function as ``torch.nn.LSTMCell``). norm='layer': each of the three is layer norm over its
    features, per example and per step (Ba et al. 2016); it never looks at other examples.
    norm='batch': each is batch norm over the examples, with separate running statistics for
    each time step t < ``max_steps`` (Cooijmans et al. 2016, recurrent batch normalization). Rule
    beyond the steps seen in training: in eval mode a step t >= max_steps uses the statistics of
    step max_steps - 1, the last one estimated; in training mode it is an error.

    The normalizations have gains (initialized to 1 for 'layer', to 0.1 for 'batch' as
    Cooijmans et al. recommend) and the cell's norm a shift; the gates' shift is ``bias``, whose
    forget-gate part starts at 1. Inputs: x (N, input_size); state (h, c), each (N, hidden_size),
    or None for zeros; t, the step index. Returns (h, c).
    """

    def __init__(self, input_size, hidden_size, norm="none", max_steps=64, eps=1e-5, momentum=0.1):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("max_steps", max_steps)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if norm not in LSTM_NORMS:
            raise ValueError(f"norm must be one of {LSTM_NORMS}, got {norm!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
            raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
        self.input_size, self.hidden_size, self.norm = input_size, hidden_size, norm
        self.max_steps, self.eps, self.momentum = max_steps, eps, momentum
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias = nn.Parameter(torch.empty(4 * H))
        if norm != "none":
            g0 = 1.0 if norm == "layer" else 0.1
            self.gain_ih = nn.Parameter(torch.full((4 * H,), g0))
            self.gain_hh = nn.Parameter(torch.full((4 * H,), g0))
            self.gain_c = nn.Parameter(torch.full((H,), g0))
            self.shift_c = nn.Parameter(torch.zeros(H))
        if norm == "batch":
            for site, width in (("ih", 4 * H), ("hh", 4 * H), ("c", H)):
                self.register_buffer(f"running_mean_{site}", torch.zeros(max_steps, width))  # (T_max, width)
                self.register_buffer(f"running_var_{site}", torch.ones(max_steps, width))
        self.reset_parameters()

    def reset_parameters(self):
        """Uniform(-1/sqrt(H), 1/sqrt(H)) weights as torch's LSTM; forget-gate bias 1, other biases 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.weight_ih.uniform_(-bound, bound)
            self.weight_hh.uniform_(-bound, bound)
            self.bias.zero_()
            self.bias[self.hidden_size : 2 * self.hidden_size] = 1.0  # remember by default

    def _norm(self, site, z, gain, shift, t):
        """Normalize z (N, width) at one site and step; or (K, N, width) for K stacked cells.

        The arithmetic reads the example axis as -2 and the feature axis as -1, so that
        ``normlab.runtime.ensemble`` runs K cells as one, with parameters stacked on a leading member axis
        and running statistics (max_steps, K, width).
        """
        if self.norm == "layer":
            var, mean = torch.var_mean(z, -1, correction=0, keepdim=True)  # per example, over features
            z_hat = (z - mean) / torch.sqrt(var + self.eps)
        else:
            rm, rv = getattr(self, f"running_mean_{site}"), getattr(self, f"running_var_{site}")
            if self.training:
                if t >= self.max_steps:
                    raise ValueError(
                        f"step t={t} in training, but statistics exist for max_steps={self.max_steps} steps"
                    )
                n = z.shape[-2]
                if n < 2:
                    raise ValueError("batch norm in training mode needs more than 1 example per batch")
                var, mean = torch.var_mean(z, -2, correction=0)  # per feature, over the batch: (width,)
                with torch.no_grad():
                    rm[t].mul_(1 - self.momentum).add_(self.momentum * mean)
                    rv[t].mul_(1 - self.momentum).add_(self.momentum * var * n / (n - 1))  # unbiased
            else:
                s = min(t, self.max_steps - 1)  # beyond the steps seen in training: the last one
                mean, var = rm[s], rv[s]
            z_hat = (z - mean.unsqueeze(-2)) / torch.sqrt(var.unsqueeze(-2) + self.eps)
        out = z_hat * gain
        return out if shift is None else out + shift

    def forward(self, x, state=None, t=0):
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (N, {self.input_size})")
        if not is_int(t) or t < 0:
            raise ValueError(f"t must be an int >= 0, got {t!r}")
        N, H = x.shape[0], self.hidden_size
        if state is None:
            state = (x.new_zeros(N, H), x.new_zeros(N, H))
        for name, v in zip("hc", state):
            if tuple(v.shape) != (N, H):
                raise ValueError(f"{name} has shape {tuple(v.shape)}, expected ({N}, {H})")
        return self.step(x, *state, t)

    def step(self, x, h, c, t):
        """One step without the checks of ``forward``: x (..., N, input_size), h and c (..., N, H).

        Returns (h, c). A leading axis is K stacked cells (``normlab.runtime.ensemble``), whose weights are
        then (K, 4H, input_size) and (K, 4H, H), and gains and shifts (K, 1, width).
        """
        zx, zh = x @ self.weight_ih.transpose(-1, -2), h @ self.weight_hh.transpose(-1, -2)  # (..., N, 4H) each
        if self.norm != "none":
            zx = self._norm("ih", zx, self.gain_ih, None, t)
            zh = self._norm("hh", zh, self.gain_hh, None, t)
        i, f, g, o = (zx + zh + self.bias).chunk(4, dim=-1)  # (..., N, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c if self.norm == "none" else self._norm("c", c, self.gain_c, self.shift_c, t)
        h = torch.sigmoid(o) * torch.tanh(c_out)
        return h, c

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}, max_steps={self.max_steps}"


class NormLSTM(nn.Module):
    """Run a ``NormLSTMCell`` over a sequence x (N, T, input_size), batch first.

    Returns (outputs (N, T, hidden_size), (h, c)) with the final state. Arguments as the cell's.
    """

    def __init__(self, input_size, hidden_size, norm="none", max_steps=64, eps=1e-5, momentum=0.1):
        super().__init__()
        self.cell = NormLSTMCell(input_size, hidden_size, norm, max_steps, eps, momentum)

    def forward(self, x, state=None):
        if x.dim() != 3:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (N, T, {self.cell.input_size})")
        outputs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state, t)
            outputs.append(state[0])
        if not outputs:
            raise ValueError("x has no time steps (T = 0)")
        return torch.stack(outputs, 1), state  # (N, T, H)


class LastHidden(nn.Module):
    """A ``NormLSTM`` as a layer: (N, T, input_size) -> its final hidden state (N, hidden_size).

    For sequence classifiers written as ``nn.Sequential`` (``LastHidden`` then a Linear head),
    which ``normlab.runtime.ensemble`` can stack. Arguments as ``NormLSTMCell``'s.
    """

    def __init__(self, input_size, hidden_size, norm="none", max_steps=64, eps=1e-5, momentum=0.1):
        super().__init__()
        self.lstm = NormLSTM(input_size, hidden_size, norm, max_steps, eps, momentum)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return h


# --------------------------------------------------------------------------------------------
# Chapter 9: synchronized batch norm across processes
# --------------------------------------------------------------------------------------------


def _group_size(group) -> int:
    """World size of ``group`` (None: the default group), or 1 outside an initialized process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the statistics of the batch on all ranks of a process group.

    Forward: each rank summarizes its slice per channel as (count, mean, M2), 2C + 1 values; one
    ``all_gather`` gives every rank every summary; each rank merges them with Chan's formula
    (``normlab.distributed.merge_moments``) into the global mean and biased variance and
    normalizes its own slice with them. Backward: one ``all_reduce`` of the 2C per-channel sums
    (sum dy, sum dy * x_hat), then the closed form of ``BatchNormFunction`` with the global count.
    The weight and bias gradients are the *local* sums: summed over ranks (or averaged, as DDP
    does, with the loss averaged the same way) they are those of the whole batch.

    forward returns (out, mean, var, count): the global statistics and the global number of
    values per channel, without gradients, for the running-statistics update.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, eps, group):
        import torch.distributed as dist

        from normlab.distributed import merge_moments

        C = input.shape[1]
        dims = [0] + list(range(2, input.dim()))  # every axis but the channel
        shape = (1, C) + (1,) * (input.dim() - 2)  # broadcasts a (C,) vector against x
        x = input.to(_stat_dtype(input))
        n = x.numel() // C  # values per channel on this rank; 0 is allowed
        if n > 0:
            var, mean = torch.var_mean(x, dim=dims, correction=0)  # (C,), biased
            m2 = var * n  # sum of squared deviations from the local mean
        else:
            mean = m2 = x.new_zeros(C)
        local = torch.cat([x.new_tensor([float(n)]), mean, m2])  # (2C + 1,)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (W, 2C + 1): every rank's summary, identical on every rank
        count, mean, m2 = merge_moments(stats[:, 0], stats[:, 1 : C + 1], stats[:, C + 1 :])
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(count)} over all ranks "
                f"(this rank's input size {input.size()})"
            )
        var = m2 / count  # (C,), biased: the variance that normalizes
        invstd = torch.rsqrt(var + eps)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)  # like input
        out = scale_shift(x_hat, weight, bias)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.has_bias = bias is not None
        ctx.count = float(count)
        ctx.group = group
        ctx.mark_non_differentiable(mean, var, count)
        return out.to(input.dtype), mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_count):
        import torch.distributed as dist

        x_hat, invstd, weight = ctx.saved_tensors
        C = x_hat.shape[1]
        dy = grad_out.to(x_hat.dtype)
        sum_dy, sum_dy_xhat = channel_grad_sums(dy, x_hat)  # (C,) each: this rank's sums
        grad_input = None
        if ctx.needs_input_grad[0]:
            total = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(total, group=ctx.group)  # (2C,) the sums over the whole batch
            # BatchNormFunction's closed form with the sums and the count (ctx.count) over all ranks
            grad_input = batch_norm_input_grad(dy, x_hat, invstd, weight, total[:C], total[C:], ctx.count)
            grad_input = grad_input.to(grad_out.dtype)
        return grad_input, *affine_grads(ctx, weight, grad_out, sum_dy, sum_dy_xhat), None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the whole batch across processes.

    Under data parallelism each process (rank) holds a slice of the global batch. A plain BN layer
    normalizes each slice with its own statistics; this one, in training mode, normalizes every
    slice with the mean and variance of the union of the slices in ``process_group`` (None: all
    ranks), and updates the running statistics from those global values (the unbiased variance
    with the global count), identically on every rank. Ranks may hold different numbers of
    examples, even none, as long as the group holds more than one value per channel. See
    ``SyncBatchNormFunction`` for the two collectives per layer and pass.

    Same semantics as ``torch.nn.SyncBatchNorm`` (input (N, C, *)), built here on
    ``torch.distributed``, with its constructor (``bias=False``, keyword-only, drops beta). In eval
    mode, outside an initialized process group, or in a group of one process it is exactly
    ``BatchNorm1d/2d/3d``. Every rank of the group must call it the same number of times, as with
    any collective.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] == 0:  # torch's SyncBatchNorm refuses this before anything else
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training or _group_size(self.process_group) == 1:
            return super().forward(input)  # nothing to synchronize: BatchNorm
        if input.shape[1] != self.num_features:
            raise RuntimeError(f"running_mean should contain {input.shape[1]} elements not {self.num_features}")
        factor = self._count_batch() if self.track_running_stats else None
        out, mean, var, count = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group
        )
        if self.track_running_stats:  # the running estimate stores the unbiased variance, global count
            update_running_stats(self.running_mean, self.running_var, mean, var * (count / (count - 1)), factor)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Return ``module`` with every BatchNorm1d/2d/3d (``torch.nn`` or ``normlab.nn``) replaced by ours.

        The new layers keep the old ones' parameters (the same ``Parameter`` objects, so an
        optimizer built before still updates them), buffers and train/eval mode. Layers with other
        semantics (ghost, population, renormalization) are left alone. A BN ``module`` itself is
        returned converted; any other module is changed in place and returned.
        """
        kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                 BatchNorm1d, BatchNorm2d, BatchNorm3d)
        converted = module
        if type(module) in kinds:
            ref = module.weight if module.affine else module.running_mean
            factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
            converted = cls(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                process_group, **factory,
            )
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias
            if module.track_running_stats:
                converted.running_mean = module.running_mean
                converted.running_var = module.running_var
                converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
