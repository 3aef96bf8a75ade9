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

import torch
from torch import nn

from normlab.functional import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

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

    def forward(self, input):
        self._check_input_dim(input)
        # The weight of this batch in the running average.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: the k-th batch gets weight 1/k
                factor = 1.0 / float(self.num_batches_tracked)
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
