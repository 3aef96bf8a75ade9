"""Chapter 2's experiments: batch norm as a PyTorch module, its pitfalls, its placement, folding.

The lab notebook ``chapters/pytorch/lab.ipynb`` calls these functions, shows their results and
asserts the claims the chapter makes about them. The loops live here so that the notebook's cells
stay short; each function is small enough to read next to the notebook.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

from normlab import ensemble
from normlab import nn as normlab_nn
from normlab.data import Split
from normlab.evidence import paired
from normlab.experiments import _check_positive_int
from normlab.fold import fold_model
from normlab.train import accuracy

__all__ = [
    "PLACEMENTS",
    "PlacementResult",
    "make_cnn",
    "placement_experiment",
    "recompute_bn_statistics",
    "eval_pitfall",
    "momentum_none_vs_ema",
    "fold_speedup",
]

PLACEMENTS = ("before", "after")  # BN before the ReLU (the paper's choice) or after it


def make_cnn(placement="before", bias=False, channels=(16, 32), norm=nn.BatchNorm2d, num_classes=10):
    """Build a small CNN for 8x8 digits stored as (N, 64), with batch norm before or after each ReLU.

    Each block is a 3x3 convolution (padding 1, so the maps stay 8x8), then BN and ReLU in the order
    ``placement`` names. Global average pooling and a linear layer make the logits (N, num_classes).
    ``norm`` is the BN class: torch's ``nn.BatchNorm2d`` or ``normlab.nn.BatchNorm2d``.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be a bool, got {bias!r}")
    if not isinstance(channels, (tuple, list)) or not channels:
        raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels!r}")
    for c in channels:
        _check_positive_int("each entry of channels", c)
    _check_positive_int("num_classes", num_classes)
    layers = [nn.Unflatten(1, (1, 8, 8))]  # (N, 64) -> (N, 1, 8, 8)
    c_in = 1
    for c in channels:
        conv = nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=bias)  # (N, c, 8, 8)
        pair = [norm(c), nn.ReLU()] if placement == "before" else [nn.ReLU(), norm(c)]
        layers += [conv, *pair]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]  # (N, c_in) -> logits
    return nn.Sequential(*layers)


@dataclass
class PlacementResult:
    """Final test accuracies (one per seed) and the trained models, for each placement.

    ``acc`` holds the accuracies in eval mode with the running statistics that training left
    (PyTorch's default EMA); ``acc_precise`` the same models' accuracies after
    ``recompute_bn_statistics`` over the training set. Every summary takes ``precise`` to choose;
    ``paired`` compares the placements seed by seed (the only comparison the chapter draws on).
    """

    seeds: list
    acc: dict = field(default_factory=dict)  # placement -> [accuracy per seed], EMA statistics
    acc_precise: dict = field(default_factory=dict)  # placement -> [accuracy per seed], recomputed
    models: dict = field(default_factory=dict)  # placement -> [trained model per seed]

    def _acc(self, placement, precise):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        return (self.acc_precise if precise else self.acc)[placement]

    def mean(self, placement, precise=False) -> float:
        return float(np.mean(self._acc(placement, precise)))

    def std(self, placement, precise=False) -> float:
        return float(np.std(self._acc(placement, precise), ddof=1))  # sample standard deviation over seeds

    def paired(self, precise=False):
        """Return the paired comparison before minus after, in points (same seed: same init and batches)."""
        return paired(self._acc("before", precise), self._acc("after", precise), scale=100, unit="points")


def placement_experiment(data, seeds, *, steps, lr, batch_size=64, channels=(16, 32), progress=None):
    """Train the CNN with BN before and after the ReLU, once per seed; return a ``PlacementResult``.

    A seed fixes the initial weights (the same for both placements: the layers are created in the
    same order) and the order of the mini-batches, so the two placements are compared in pairs.
    The seeds of one placement train together as one ``normlab.ensemble`` (each member exactly
    the run ``normlab.train.train(model, data, seed=seed)`` would give). Each trained model is
    tested twice: with the running statistics training left, and with statistics recomputed over
    the training set (``recompute_bn_statistics``).
    """
    if not isinstance(data, Split):
        raise ValueError(f"data must be a normlab.data.Split, got {type(data).__name__}")
    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"need at least 2 seeds to measure a spread, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    result = PlacementResult(seeds=seeds)
    for placement in PLACEMENTS:
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(make_cnn(placement, channels=channels))
        ens = ensemble.stack(models)
        ensemble.fit(ens, data, lr=lr, seeds=seeds, steps=steps, batch_size=batch_size, progress=progress)
        precise = recompute_bn_statistics(ens, data.x_train, batch_size=batch_size)
        result.acc[placement] = ensemble.accuracy(ens, data.x_test, data.y_test).tolist()
        result.acc_precise[placement] = ensemble.accuracy(precise, data.x_test, data.y_test).tolist()
        result.models[placement] = [ensemble.member(ens, k).eval() for k in range(len(seeds))]
    return result


def _batch_norms(model):
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, normlab_nn._BatchNorm))]


def recompute_bn_statistics(model, x, batch_size=64):
    """Return an eval-mode copy of ``model`` whose BN layers hold the average statistics of ``x``'s batches.

    Every BN layer's running statistics are reset and, with ``momentum=None``, averaged over one
    pass through ``x`` in consecutive batches of ``batch_size`` (a trailing batch of one is
    skipped), with every other layer in eval mode and no weight changed ("precise" statistics).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if len(x) < 2:
        raise ValueError(f"x must hold at least 2 examples, got {len(x)}")
    model = copy.deepcopy(model).eval()
    bns = [bn for bn in _batch_norms(model) if bn.track_running_stats]
    if not bns:
        raise ValueError("model has no batch norm layer with running statistics")
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # the k-th batch gets weight 1/k: a plain average
        bn.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            if len(x[i : i + batch_size]) > 1:
                model(x[i : i + batch_size])
    for bn, m in zip(bns, momenta):
        bn.momentum = m
        bn.eval()
    return model


def eval_pitfall(models, x, y, batch_sizes):
    """Return the accuracy of each model in eval mode, and in train mode with each batch size.

    Returns ``(eval_acc, train_acc)``: arrays of shape (models,) and (models, batch sizes). Train mode
    normalizes every batch with its own statistics; the models' running statistics are not changed.
    """
    models, batch_sizes = list(models), list(batch_sizes)
    if not models:
        raise ValueError("models is empty")
    if not batch_sizes:
        raise ValueError("batch_sizes is empty")
    for b in batch_sizes:
        _check_positive_int("each batch size", b)
    eval_acc = np.array([accuracy(m, x, y) for m in models])
    train_acc = np.array([[accuracy(m, x, y, batch_size=b, train_mode=True) for b in batch_sizes] for m in models])
    return eval_acc, train_acc


def momentum_none_vs_ema(num_batches, *, batch_size=16, num_features=64, momentum=0.1, drift=0.0, seed=0):
    """Feed the same batches to BN with ``momentum=None`` and with ``momentum``; return their errors.

    Feature j is Gaussian with mean mu_j + drift * k / num_batches at batch k (drift = 0: a fixed
    population) and a fixed standard deviation sigma_j. Returns a dict of arrays of length
    ``num_batches``: ``k`` (1, 2, ...), and for ``"cumulative"`` and ``"ema"`` the root-mean-square
    over features of the running mean's error in units of sigma (``mean_err``) and of the running
    variance's relative error (``var_err``), after each batch.
    """
    _check_positive_int("num_batches", num_batches)
    _check_positive_int("num_features", num_features)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (a variance needs two values), got {batch_size!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
        raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
    if not math.isfinite(drift):
        raise ValueError(f"drift must be finite, got {drift!r}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    mu = torch.randn(num_features, generator=gen, dtype=f64) * 2  # (D,) true means
    sigma = torch.rand(num_features, generator=gen, dtype=f64) * 2 + 0.5  # (D,) true standard deviations
    bns = {
        "cumulative": normlab_nn.BatchNorm1d(num_features, momentum=None, affine=False, dtype=f64),
        "ema": normlab_nn.BatchNorm1d(num_features, momentum=momentum, affine=False, dtype=f64),
    }
    out = {"k": np.arange(1, num_batches + 1)}
    errs = {name: {"mean_err": [], "var_err": []} for name in bns}
    with torch.no_grad():
        for k in range(1, num_batches + 1):
            mean_k = mu + drift * k / num_batches  # (D,) the population mean at batch k
            x = mean_k + sigma * torch.randn(batch_size, num_features, generator=gen, dtype=f64)  # (B, D)
            for name, bn in bns.items():
                bn(x)  # training mode: updates the running statistics
                mean_err = (bn.running_mean - mean_k) / sigma
                var_err = bn.running_var / sigma**2 - 1
                errs[name]["mean_err"].append(float(mean_err.pow(2).mean().sqrt()))
                errs[name]["var_err"].append(float(var_err.pow(2).mean().sqrt()))
    for name in bns:
        out[name] = {key: np.array(v) for key, v in errs[name].items()}
    return out


def fold_speedup(model, x, *, rounds=5, min_run_time=0.05, num_threads=1):
    """Time ``model`` and its folded copy on ``x`` in alternating rounds; return both times per round.

    Each round measures each model with ``torch.utils.benchmark.Timer.blocked_autorange`` (the median
    over blocks of calls) on ``num_threads`` threads, under ``torch.no_grad()``. Alternating the two
    spreads a slow spell of the machine over both. Returns a dict of arrays of length ``rounds``:
    ``"unfolded"`` and ``"folded"`` seconds per call, and ``"ratio"`` (unfolded / folded); and
    ``"best_ratio"``, the ratio of the two best rounds: a busy machine only ever adds time, so the
    fastest round of each is the least disturbed estimate of its cost.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_positive_int("rounds", rounds)
    _check_positive_int("num_threads", num_threads)
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be positive, got {min_run_time!r}")
    unfolded = copy.deepcopy(model).eval()
    folded = fold_model(model)
    times = {"unfolded": [], "folded": []}
    for _ in range(rounds):
        for name, m in (("unfolded", unfolded), ("folded", folded)):
            timer = benchmark.Timer(
                stmt="with torch.no_grad(): m(x)",
                globals={"torch": torch, "m": m, "x": x},
                num_threads=num_threads,
            )
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    out = {name: np.array(t) for name, t in times.items()}
    out["ratio"] = out["unfolded"] / out["folded"]
    out["best_ratio"] = float(out["unfolded"].min() / out["folded"].min())
    return out
