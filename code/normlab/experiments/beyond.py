"""Chapter 10's experiments: what BN does to a deep network, and what trains one without it.

The diagnostics lab (``chapters/beyond/lab_diagnostics.ipynb``) builds deep MLPs on the 8x8
digits (``make_deep_mlp``), looks at their activations and gradients at initialization
(``propagation``), follows their update:data ratios through training (``update_ratios``), and
repeats CS231n's sweep of the initial weight scale with every layer scaled (``init_sweep``). The
measurements themselves use ``normlab.runtime.diagnostics``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab._validate import check_positive_int, is_number
from normlab.experiments import seeds_for
from normlab.runtime import ensemble
from normlab.runtime.data import Split
from normlab.runtime.diagnostics import Diagnostics, UpdateRatios

__all__ = ["ACTIVATIONS", "GAINS", "INITS", "NETS", "budget", "seeds_for", "make_deep_mlp", "propagation",
           "update_ratios", "init_sweep", "bn_output_std"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
# the gain that keeps a layer's output variance at its input's (torch.nn.init.calculate_gain)
GAINS = {"tanh": 5 / 3, "relu": math.sqrt(2)}
INITS = ("default", "gain")  # torch's default init, or N(0, gain^2 / fan_in) (Kaiming's scale)
# the three networks the lab compares at each activation: name -> (BN?, init)
NETS = {"default": (False, "default"), "gain": (False, "gain"), "bn": (True, "default")}


def budget(scale: str) -> dict:
    """Return the lab's sizes at ``scale`` ("quick" or "full")."""
    if scale == "quick":
        return {"seeds": 8, "depth": 10, "width": 64, "train_steps": 150, "sweep_depth": 7, "sweep_width": 50,
                "sweep_steps": 150}
    if scale == "full":
        return {"seeds": 20, "depth": 20, "width": 128, "train_steps": 1000, "sweep_depth": 7, "sweep_width": 100,
                "sweep_steps": 1000}
    raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")


def make_deep_mlp(num_features: int, num_classes: int, *, depth: int = 10, width: int = 64,
                  activation: str = "tanh", bn: bool = False, init="default", seed: int = 0) -> nn.Sequential:
    """Return ``depth`` blocks of Linear -> (BN) -> activation, then a Linear classifier.

    init: "default" keeps torch's initialization (weights uniform with variance 1 / (3 fan-in),
    biases uniform too); "gain" draws every weight from N(0, gain^2 / fan-in) with the
    activation's gain (``GAINS``) and zero biases; a positive number s draws every weight, the
    classifier's included, from N(0, s^2) with zero biases (CS231n's ``weight_scale``). The
    weights come from ``seed``.
    """
    check_positive_int("depth", depth)
    check_positive_int("width", width)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(bn, bool):
        raise ValueError(f"bn must be a bool, got {bn!r}")
    if not (init in INITS or (is_number(init) and init > 0)):
        raise ValueError(f"init must be one of {INITS} or a positive weight scale, got {init!r}")
    torch.manual_seed(seed)
    layers, d_in = [], num_features
    for _ in range(depth):
        layers.append(nn.Linear(d_in, width))
        if bn:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[activation]())
        d_in = width
    layers.append(nn.Linear(d_in, num_classes))
    if init != "default":
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    std = GAINS[activation] / math.sqrt(layer.in_features) if init == "gain" else float(init)
                    layer.weight.normal_(0.0, std)
                    layer.bias.zero_()
    return nn.Sequential(*layers)


def propagation(data: Split, seeds, *, depth: int, width: int, activation: str, batch_size: int = 256,
                device="cpu") -> dict:
    """Measure each network of ``NETS`` at initialization on one batch; return name -> arrays (seeds, depth).

    Every seed's networks see the same ``batch_size`` training examples (drawn by the seed). One
    forward and backward pass of the cross-entropy; the arrays hold, per activation layer, the
    outputs' standard deviation (``std``), their saturated fraction (``saturated``) and the
    standard deviation of the loss's gradient with respect to them (``grad_std``), as
    ``normlab.runtime.diagnostics.Diagnostics`` records them. ``outputs``: the last seed's
    recorded outputs, name -> [(N, width) per layer], for histograms.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    result = {}
    data = data.to(device)
    n = len(data.x_train)
    for name, (bn, init) in NETS.items():
        rows = {"std": [], "saturated": [], "grad_std": []}
        for seed in seeds:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]
            model = make_deep_mlp(data.num_features, data.num_classes, depth=depth, width=width,
                                  activation=activation, bn=bn, init=init, seed=seed).to(device)
            model.train()  # BN normalizes with the batch's statistics, as in training
            with Diagnostics(model) as diag:
                F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            stats = diag.stats()
            for key in rows:
                rows[key].append([getattr(s, key) for s in stats])
        result[name] = {key: np.array(v) for key, v in rows.items()}
        result[name]["outputs"] = [diag.outputs[k].numpy() for k in diag.names]  # Diagnostics keeps them on the CPU
    return result


def update_ratios(data: Split, seeds, *, depth: int, width: int, activation: str, steps: int, lr: float,
                  batch_size: int = 64, progress=None, device="cpu") -> dict:
    """Train each network of ``NETS`` with SGD (momentum 0.9), its seeds as one ensemble; return name -> results.

    Results: ``ratios`` (steps, layers, seeds), std(update) / std(weight) of each Linear layer at
    every step (``normlab.runtime.diagnostics.UpdateRatios``); ``test_acc`` (seeds,).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    out = {}
    data = data.to(device)
    for name, (bn, init) in NETS.items():
        models = [make_deep_mlp(data.num_features, data.num_classes, depth=depth, width=width,
                                activation=activation, bn=bn, init=init, seed=s) for s in seeds]
        ens = ensemble.stack(models).to(device)
        rec = UpdateRatios(ens, members=len(seeds))
        ensemble.fit(ens, data, lr=lr, seeds=seeds, steps=steps, batch_size=batch_size, momentum=0.9,
                     after_step=lambda step, loss, rec=rec, ens=ens: rec(step, ens), progress=progress)
        ratios = np.stack([np.stack(rec.history[k]) for k in rec.names], axis=1)  # (steps, layers, seeds)
        out[name] = {"ratios": ratios, "test_acc": ensemble.accuracy(ens, data.x_test, data.y_test)}
    return out


def init_sweep(data: Split, scales, seeds, *, bn: bool, depth: int, width: int, steps: int, lr: float = 1e-3,
               batch_size: int = 64, activation: str = "relu", progress=None, device="cpu") -> dict:
    """Train a deep MLP from every weight scale in ``scales`` with Adam, all runs as one ensemble.

    CS231n's experiment: every layer's weights drawn from N(0, s^2) (``make_deep_mlp`` with
    ``init=s``), the same Adam rate for every scale. Returns ``test_acc`` and ``train_loss``
    (the mean over the last 20 steps), each (scales, seeds). device: where the models and batches
    live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    scales = [float(s) for s in scales]
    seeds = [int(s) for s in seeds]
    models = [make_deep_mlp(data.num_features, data.num_classes, depth=depth, width=width, activation=activation,
                            bn=bn, init=s, seed=k) for s in scales for k in seeds]  # scale-major
    ens = ensemble.stack(models).to(device)
    losses = ensemble.fit(ens, data, lr=lr, seeds=seeds * len(scales), steps=steps, batch_size=batch_size,
                          optimizer="adam", progress=progress)
    shape = (len(scales), len(seeds))
    return {"test_acc": ensemble.accuracy(ens, data.x_test, data.y_test).reshape(shape),
            "train_loss": losses[:, -20:].mean(axis=1).reshape(shape)}


def bn_output_std(scale, fan_in: int, mean_square: float, eps: float = 1e-5) -> np.ndarray:
    """Return the std of BN's output after a layer of N(0, scale^2) weights: sqrt(v / (v + eps)).

    v = scale^2 * fan_in * mean_square is the variance of the layer's outputs (zero bias) for inputs
    of the given mean square; BN divides by sqrt(v + eps), so once v falls below eps it no longer
    brings the signal back to unit variance.
    """
    v = np.asarray(scale, dtype=np.float64) ** 2 * fan_in * mean_square
    return np.sqrt(v / (v + eps))
