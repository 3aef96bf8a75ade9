"""Chapter 2's experiments: batch norm as a PyTorch module, its pitfalls, its placement, folding.

The lab notebook ``chapters/pytorch/lab.ipynb`` calls these functions, shows their results and
asserts the claims the chapter makes about them. The loops live here so that the notebook's cells
stay short; each function is small enough to read next to the notebook.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from normlab import nn as normlab_nn
from normlab._validate import check_positive_int, is_int, is_number
from normlab.experiments import seeds_for
from normlab.fold import fold_model
from normlab.runtime import ensemble
from normlab.runtime.data import Split
from normlab.runtime.evidence import paired
from normlab.runtime.train import accuracy
from normlab.stats import batch_norm_layers

__all__ = [
    "seeds_for",
    "HEADS",
    "NATURAL_HEAD",
    "PLACEMENTS",
    "PlacementResult",
    "make_cnn",
    "placement_experiment",
    "validation_split",
    "recompute_bn_statistics",
    "eval_pitfall",
    "momentum_none_vs_ema",
    "fold_speedup",
]

PLACEMENTS = ("before", "after")  # BN before the ReLU (the paper's choice) or after it


HEADS = ("plain", "bn")  # what the global pool sees: ReLU outputs, or a BN's normalized maps
NATURAL_HEAD = {"before": "plain", "after": "bn"}  # the head each placement gets when nothing is said


def make_cnn(placement="before", bias=False, channels=(16, 32), norm=nn.BatchNorm2d, num_classes=10, head=None):
    """Build a small CNN for 8x8 digits stored as (N, 64), with batch norm before or after each ReLU.

    Each block is a 3x3 convolution (padding 1, so the maps stay 8x8), then BN and ReLU in the order
    ``placement`` names. A head of global average pooling and a linear layer makes the logits
    (N, num_classes). ``head`` says what the pool sees: ``"plain"`` the last ReLU's outputs,
    ``"bn"`` a BN of them. BN after the ReLU ends every block with a BN, so with the plain head its
    last block has none; BN before the ReLU gets one extra BN for the bn head. ``head=None`` takes
    the placement's natural ending (``NATURAL_HEAD``: "before" plain, "after" bn). The layers are
    created in the same order whatever the arguments, so one seed gives every variant the same
    initial weights. ``norm`` is the BN class: torch's ``nn.BatchNorm2d`` or ``normlab.nn.BatchNorm2d``.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    head = NATURAL_HEAD[placement] if head is None else head
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS} or None, got {head!r}")
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be a bool, got {bias!r}")
    if not isinstance(channels, (tuple, list)) or not channels:
        raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels!r}")
    for c in channels:
        check_positive_int("each entry of channels", c)
    check_positive_int("num_classes", num_classes)
    if placement == "after" and head == "plain" and len(channels) == 1:
        raise ValueError("BN after the ReLU with the plain head needs at least 2 blocks: with 1 it has no BN")
    layers = [nn.Unflatten(1, (1, 8, 8))]  # (N, 64) -> (N, 1, 8, 8)
    c_in = 1
    for i, c in enumerate(channels):
        conv = nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=bias)  # (N, c, 8, 8)
        last = i == len(channels) - 1
        if placement == "before":
            pair = [norm(c), nn.ReLU()]
        else:  # the last block's BN after the ReLU is the bn head's BN
            pair = [nn.ReLU()] if last else [nn.ReLU(), norm(c)]
        layers += [conv, *pair]
        c_in = c
    if head == "bn":
        layers.append(norm(c_in))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]  # (N, c_in) -> logits
    return nn.Sequential(*layers)


@dataclass
class PlacementResult:
    """The placement study: per network (placement, head), the tuned learning rate and the test results.

    Every dict is keyed by ``(placement, head)``. ``lr`` holds the learning rate the tuning chose and
    ``val_acc`` the mean validation accuracy of each rate in ``lrs``; ``acc`` the final test accuracy
    per seed in eval mode with the running statistics training left (PyTorch's default EMA),
    ``acc_precise`` the same models' accuracy after ``recompute_bn_statistics`` over the training
    set, ``models`` the trained models. Every summary takes ``precise`` to choose; ``paired``
    compares the placements seed by seed at one head (the comparison the chapter draws on).
    """

    seeds: list
    lrs: list
    lr: dict = field(default_factory=dict)  # (placement, head) -> the chosen learning rate
    val_acc: dict = field(default_factory=dict)  # (placement, head) -> [mean validation accuracy per rate]
    acc: dict = field(default_factory=dict)  # (placement, head) -> [accuracy per seed], EMA statistics
    acc_precise: dict = field(default_factory=dict)  # (placement, head) -> [accuracy per seed], recomputed
    models: dict = field(default_factory=dict)  # (placement, head) -> [trained model per seed]

    @property
    def nets(self):
        """The (placement, head) pairs that were trained, in training order."""
        return list(self.acc)

    def _acc(self, placement, head, precise):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if (placement, head) not in self.acc:
            raise ValueError(f"no network ({placement!r}, {head!r}) was trained; trained: {self.nets}")
        return (self.acc_precise if precise else self.acc)[placement, head]

    def mean(self, placement, head, precise=False) -> float:
        return float(np.mean(self._acc(placement, head, precise)))

    def std(self, placement, head, precise=False) -> float:
        return float(np.std(self._acc(placement, head, precise), ddof=1))  # sample standard deviation over seeds

    def paired(self, head, precise=False):
        """Return before minus after at one head, in points, paired by seed (same init and batches)."""
        return paired(self._acc("before", head, precise), self._acc("after", head, precise), scale=100,
                      unit="points")

    def paired_head(self, placement, precise=False):
        """Return the bn head minus the plain head at one placement, in points, paired by seed."""
        return paired(self._acc(placement, "bn", precise), self._acc(placement, "plain", precise), scale=100,
                      unit="points")


def validation_split(data, val_size, seed):
    """Split ``data``'s training set at random into a smaller training set and ``val_size`` held-out examples.

    Returns a ``Split`` whose "test" part is the validation examples; ``data``'s test set is not
    used, so a choice made on this split never sees the test set.
    """
    if not isinstance(data, Split):
        raise ValueError(f"data must be a normlab.runtime.data.Split, got {type(data).__name__}")
    check_positive_int("val_size", val_size)
    n = len(data.x_train)
    if val_size > n - 2:
        raise ValueError(f"val_size must leave at least 2 training examples of {n}, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, val = order[val_size:], order[:val_size]
    return Split(data.x_train[fit], data.y_train[fit], data.x_train[val], data.y_train[val],
                 name=f"{data.name}[train minus {val_size} held out]")


def _check_seeds(name, seeds, fewest):
    seeds = list(seeds)
    if len(seeds) < fewest:
        raise ValueError(f"need at least {fewest} {name}, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{name} must be distinct, got {seeds}")
    return seeds


def _cnns(placement, head, seeds, channels):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)  # the same initial weights for every (placement, head) at one seed
        models.append(make_cnn(placement, channels=channels, head=head))
    return models


def placement_experiment(data, seeds, *, steps, lrs, tune_seeds, val_size=300, nets=None, batch_size=64,
                         channels=(16, 32), progress=None, device="cpu"):
    """Tune and train the CNN with BN before and after the ReLU, at each head; return a ``PlacementResult``.

    nets: the (placement, head) pairs to run (default: all four). Each net is tuned the same way:
    one run per learning rate in ``lrs`` and seed in ``tune_seeds``, trained on the training set
    minus ``val_size`` held-out examples (``validation_split``, seeded by ``tune_seeds[0]``); the rate
    with the highest mean validation accuracy, with recomputed statistics, wins (ties: the smaller
    rate). Then every seed in ``seeds`` trains the net at its rate on the whole training set; the
    runs of one net train together as one ``normlab.runtime.ensemble`` (each member exactly the run
    ``normlab.runtime.train.train(model, data, seed=seed, lr=lr)`` would give). A seed fixes the initial
    weights (the same for every net: the layers are created in the same order) and the order of
    the mini-batches, so the nets are compared in pairs. Each trained model is tested twice: with
    the running statistics training left, and with statistics recomputed over the training set.
    device: where the models and batches live, e.g. ``ctx.device`` (the returned models stay there).
    """
    if not isinstance(data, Split):
        raise ValueError(f"data must be a normlab.runtime.data.Split, got {type(data).__name__}")
    seeds = _check_seeds("seeds", seeds, 2)
    tune_seeds = _check_seeds("tune_seeds", tune_seeds, 1)
    lrs = sorted(float(lr) for lr in lrs)
    if not lrs or lrs[0] <= 0 or len(set(lrs)) != len(lrs):
        raise ValueError(f"lrs must be distinct positive learning rates, got {lrs}")
    nets = [(p, h) for p in PLACEMENTS for h in HEADS] if nets is None else [tuple(n) for n in nets]
    for p, h in nets:
        if p not in PLACEMENTS or h not in HEADS:
            raise ValueError(f"each net must be (placement, head) from {PLACEMENTS} x {HEADS}, got {(p, h)}")
    data = data.to(device)
    tune = validation_split(data, val_size, tune_seeds[0])
    result = PlacementResult(seeds=seeds, lrs=lrs)
    for p, h in nets:
        # tuning: members rate-major, then seed
        ens = ensemble.stack([m for _ in lrs for m in _cnns(p, h, tune_seeds, channels)]).to(device)
        ensemble.fit(ens, tune, lr=[lr for lr in lrs for _ in tune_seeds], seeds=tune_seeds * len(lrs),
                     steps=steps, batch_size=batch_size, progress=progress)
        precise = recompute_bn_statistics(ens, tune.x_train, batch_size=batch_size)
        val = ensemble.accuracy(precise, tune.x_test, tune.y_test).reshape(len(lrs), len(tune_seeds)).mean(axis=1)
        result.val_acc[p, h] = val.tolist()
        result.lr[p, h] = lr = lrs[int(np.argmax(val))]  # the first of equal maxima: the smaller rate
        # the paired runs, at the chosen rate
        ens = ensemble.stack(_cnns(p, h, seeds, channels)).to(device)
        ensemble.fit(ens, data, lr=lr, seeds=seeds, steps=steps, batch_size=batch_size, progress=progress)
        precise = recompute_bn_statistics(ens, data.x_train, batch_size=batch_size)
        result.acc[p, h] = ensemble.accuracy(ens, data.x_test, data.y_test).tolist()
        result.acc_precise[p, h] = ensemble.accuracy(precise, data.x_test, data.y_test).tolist()
        result.models[p, h] = [ensemble.member(ens, k).eval() for k in range(len(seeds))]
    return result


def recompute_bn_statistics(model, x, batch_size=64):
    """Return an eval-mode copy of ``model`` whose BN layers hold the average statistics of ``x``'s batches.

    Every BN layer's running statistics are reset and, with ``momentum=None``, averaged over one
    pass through ``x`` in consecutive batches of ``batch_size`` (a trailing batch of one is
    skipped), with every other layer in eval mode and no weight changed ("precise" statistics).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not is_int(batch_size) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if len(x) < 2:
        raise ValueError(f"x must hold at least 2 examples, got {len(x)}")
    model = copy.deepcopy(model).eval()
    bns = [bn for bn in batch_norm_layers(model) if bn.track_running_stats]
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
        check_positive_int("each batch size", b)
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
    check_positive_int("num_batches", num_batches)
    check_positive_int("num_features", num_features)
    if not is_int(batch_size) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (a variance needs two values), got {batch_size!r}")
    if not is_number(momentum) or not 0 < momentum <= 1:
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


def _cpu_seconds_per_call(fn, min_run_time):
    """Return the CPU seconds of this process per call of ``fn``, over calls that use ``min_run_time`` of it."""
    fn()  # warm-up: first-call allocations are not the steady cost
    calls, start = 0, time.process_time()
    while True:
        fn()
        calls += 1
        used = time.process_time() - start
        if used >= min_run_time:
            return used / calls


def fold_speedup(model, x, *, rounds=5, min_run_time=0.05, num_threads=1):
    """Time ``model`` and its folded copy on ``x`` in alternating rounds; return both times per round.

    Each round measures each model's CPU time per call (``time.process_time``: the processor time
    this process uses, over enough calls to use ``min_run_time`` of it) on ``num_threads`` threads,
    under ``torch.no_grad()``. CPU time leaves out the time the process waits while other programs
    run, which wall-clock time counts: on a 2-core machine shared with two busy processes, the
    fastest wall-clock round of a 100-microsecond forward pass was still off by 30%. Alternating
    the two spreads what is left (caches shared with the other programs) over both. Returns a dict
    of arrays of length ``rounds``: ``"unfolded"`` and ``"folded"`` seconds per call, and
    ``"ratio"`` (unfolded / folded); and ``"best_ratio"``, the ratio of the two best rounds.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    check_positive_int("rounds", rounds)
    check_positive_int("num_threads", num_threads)
    if not min_run_time > 0:
        raise ValueError(f"min_run_time must be positive, got {min_run_time!r}")
    unfolded = copy.deepcopy(model).eval()
    folded = fold_model(model)
    times = {"unfolded": [], "folded": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for name, m in (("unfolded", unfolded), ("folded", folded)):
                    times[name].append(_cpu_seconds_per_call(lambda m=m: m(x), min_run_time))
    finally:
        torch.set_num_threads(threads)
    out = {name: np.array(t) for name, t in times.items()}
    out["ratio"] = out["unfolded"] / out["folded"]
    out["best_ratio"] = float(out["unfolded"].min() / out["folded"].min())
    return out
