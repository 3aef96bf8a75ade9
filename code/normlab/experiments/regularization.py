"""Chapter 4's experiments: batch norm as a regularizer, its noise, dropout, ghost batches, statistics.

Every experiment trains small MLPs (``make_mlp``), all seeds of one setting at once with the
course's ensemble trainer (``normlab.runtime.ensemble``: member k is exactly the model ``fit`` would train
alone from seed k), and returns plain numbers (numpy arrays, dicts) that the lab notebooks plot
and assert. The BN layers are
``torch.nn.BatchNorm1d``: Chapter 2 showed that ``normlab.nn.BatchNorm1d`` computes the same thing,
and torch's fused kernel is faster on a CPU. The chapter's own layers (``GhostBatchNorm1d``,
``PopulationNorm1d``) and ``normlab.precise_bn`` come from the library.

Seeds: every function takes a list of seeds; a seed fixes the initial weights, the mini-batches,
the dropout masks and the training subset, so each run is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from normlab._validate import check_positive_int
from normlab.experiments import seeds_for
from normlab.nn import GhostBatchNorm1d, PopulationNorm1d
from normlab.runtime import ensemble
from normlab.runtime.data import Split
from normlab.runtime.train import device_of, show_progress, train
from normlab.stats import batch_norm_layers, precise_bn

__all__ = [
    "NORMS",
    "DROPOUT_PLACES",
    "budget",
    "seeds_for",
    "make_mlp",
    "subset",
    "fit",
    "fit_seeds",
    "evaluate",
    "normalized_value_noise",
    "predicted_noise",
    "loglog_slope",
    "gap_vs_batch_size",
    "dropout_table",
    "variance_ratio",
    "predicted_variance_ratio",
    "variance_shift",
    "ghost_batches",
    "ghost_size_sweep",
    "ema_vs_precise",
]

NORMS = ("bn", "ghost", "population", "none")
DROPOUT_PLACES = ("every", "after_last")




def budget(scale: str = "quick") -> dict:
    """Seeds and training lengths per experiment at a scale ('quick': the 60 s notebooks; 'full')."""
    if scale == "quick":
        # 8 seeds, trained together (normlab.runtime.ensemble). With 3 seeds one after another, the quick
        # scale trained longer (gap_epochs 10, table_steps 1000, shift_steps 1000, ghost_epochs 5,
        # ghost sizes 4 and 64); more seeds in the same minute cost those steps.
        return {"seeds": 8, "table_seeds": 8, "gap_epochs": 6, "table_steps": 600, "shift_steps": 600,
                "ghost_epochs": 3, "ema_steps": 600, "ghost_sizes": (4,)}
    if scale == "full":
        return {"seeds": 10, "table_seeds": 16, "gap_epochs": 30, "table_steps": 2000, "shift_steps": 3000,
                "ghost_epochs": 15, "ema_steps": 2000, "ghost_sizes": (4, 64)}
    raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")


# --------------------------------------------------------------------------------------------
# Models, data, training
# --------------------------------------------------------------------------------------------


def _norm_layer(norm, width, momentum, virtual_batch_size):
    if norm == "bn":
        return nn.BatchNorm1d(width, momentum=momentum)
    if norm == "ghost":
        if virtual_batch_size is None:
            raise ValueError("norm='ghost' needs a virtual_batch_size")
        return GhostBatchNorm1d(width, virtual_batch_size, momentum=momentum)
    if norm == "population":
        return PopulationNorm1d(width)
    return nn.Identity()


def make_mlp(
    num_features: int,
    num_classes: int,
    *,
    width: int = 128,
    depth: int = 2,
    norm: str = "bn",
    dropout: float = 0.0,
    dropout_at: str = "every",
    momentum: float | None = 0.1,
    virtual_batch_size: int | None = None,
    seed: int = 0,
    device="cpu",
) -> nn.Sequential:
    """Return an MLP: ``depth`` blocks of Linear -> norm -> ReLU, then a Linear classifier.

    norm: one of ``NORMS`` ("none" leaves the norm out). dropout: the drop probability p of
    inverted dropout (``nn.Dropout``), placed after *every* block's ReLU (``dropout_at="every"``:
    each hidden dropout then feeds the next block's BN, Li et al.'s setting) or only after the last
    one (``"after_last"``: no BN sees a dropped-out input). The weights are drawn from ``seed``
    (on the CPU, then the model moves to ``device``).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    check_positive_int("width", width)
    check_positive_int("depth", depth)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if dropout_at not in DROPOUT_PLACES:
        raise ValueError(f"dropout_at must be one of {DROPOUT_PLACES}, got {dropout_at!r}")
    torch.manual_seed(seed)
    layers, d = [], num_features
    for i in range(depth):
        layers += [nn.Linear(d, width), _norm_layer(norm, width, momentum, virtual_batch_size), nn.ReLU()]
        if dropout > 0 and (dropout_at == "every" or i == depth - 1):
            layers.append(nn.Dropout(dropout))
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers).to(device)


def subset(data: Split, n: int, seed: int = 0) -> Split:
    """Return ``data`` with a random, class-balanced subset of ``n`` training examples (test set unchanged)."""
    check_positive_int("n", n)
    classes = data.y_train.unique()
    if not len(classes) <= n <= len(data.y_train):
        raise ValueError(f"n must be in [{len(classes)}, {len(data.y_train)}], got {n}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=gen)
    # Deal the shuffled examples class by class, so each class gets n / classes of them (+-1).
    rank = torch.empty_like(order)
    for c in classes:
        of_c = order[data.y_train[order] == c]
        rank[of_c] = torch.arange(len(of_c))
    keep = order[torch.argsort(rank[order] * len(classes) + data.y_train[order], stable=True)[:n]]
    return Split(data.x_train[keep], data.y_train[keep], data.x_test, data.y_test, name=f"{data.name}[{n}]")


def _population_refresher(x_train, every):
    """A ``train`` callback that recomputes population norm statistics every ``every`` steps."""

    def refresh(step, model):
        if step % every == 0:
            precise_bn(model, [x_train])

    return refresh


def fit(model, data: Split, *, steps: int, batch_size: int, lr: float, seed: int = 0, weight_decay=0.0):
    """Train ``model`` with SGD (momentum 0.9); return it. Population norm layers, if any, get the
    whole training set's statistics before the first step and after every epoch of steps. The model
    trains where it is (``make_mlp(..., device=ctx.device)``); ``data`` moves there."""
    data = data.to(device_of(model))
    refresh = None
    if any(isinstance(m, PopulationNorm1d) for m in model.modules()):
        precise_bn(model, [data.x_train])
        epoch = max(1, len(data.x_train) // batch_size)
        refresh = _population_refresher(data.x_train, epoch)
    train(
        model, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
        progress=False, callback=refresh,
    )
    model.eval()
    return model


@torch.no_grad()
def evaluate(model, data: Split) -> dict:
    """Return train and test accuracy and cross-entropy of ``model`` in eval mode, and the gaps.

    The model runs where it is; ``data`` moves there.
    """
    data = data.to(device_of(model))
    was = model.training
    model.eval()
    out = {}
    for part, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        logits = model(x)
        out[f"{part}_acc"] = (logits.argmax(1) == y).float().mean().item()
        out[f"{part}_loss"] = F.cross_entropy(logits, y).item()
    out["acc_gap"] = out["train_acc"] - out["test_acc"]
    out["loss_gap"] = out["test_loss"] - out["train_loss"]
    model.train(was)
    return out


def _bar(iterable, desc, progress):
    return tqdm(iterable, desc=desc, disable=not show_progress(progress), leave=False)


def fit_seeds(data: Split, seeds, *, steps: int, batch_size: int, lr: float, weight_decay=0.0, device="cpu",
              **model_kw):
    """Train ``make_mlp(..., seed=s, **model_kw)`` for every seed s at once, as ``fit`` trains one; return the Ensemble.

    Member k is the model ``fit(make_mlp(..., seed=seeds[k]), data, ..., seed=seeds[k])`` returns
    (dropout masks aside), in eval mode; ``normlab.runtime.ensemble.evaluate`` gives its numbers.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    seeds = [int(s) for s in seeds]
    data = data.to(device)
    models = [make_mlp(data.num_features, data.num_classes, seed=s, **model_kw) for s in seeds]
    ens = ensemble.stack(models).to(device)
    ensemble.fit(ens, data, steps=steps, batch_size=batch_size, lr=lr, seeds=seeds, weight_decay=weight_decay,
                 progress=False)
    return ens


# --------------------------------------------------------------------------------------------
# 1. Where the noise comes from
# --------------------------------------------------------------------------------------------


def normalized_value_noise(h, batch_sizes, examples, *, trials=2000, seed=0, eps=1e-5):
    """How much an example's normalized value moves when the rest of its batch changes.

    h: (n, U) pre-activations of U units over a dataset of n examples; examples: U indices, the
    example followed for each unit. For each batch size B, draw ``trials`` batches of that example
    plus B - 1 others (drawn at random) and normalize the example with each batch's mean and
    biased variance. Returns (std, values): std (len(B), U) is the spread of the normalized value
    over the batches; values maps each B to the (trials, U) draws.
    """
    h = torch.as_tensor(h, dtype=torch.float64)
    if h.dim() != 2:
        raise ValueError(f"h must be (examples, units), got shape {tuple(h.shape)}")
    n, units = h.shape
    examples = torch.as_tensor(examples, dtype=torch.long).reshape(-1)
    if len(examples) != units or not ((examples >= 0) & (examples < n)).all():
        raise ValueError(f"examples must hold {units} indices in [0, {n}), got {examples.tolist()}")
    for b in batch_sizes:
        if not 2 <= b <= n:
            raise ValueError(f"batch sizes must be in [2, {n}], got {b}")
    check_positive_int("trials", trials)
    gen = torch.Generator().manual_seed(seed)
    cols = torch.arange(units)
    own = h[examples, cols]  # (U,) each unit's followed value
    stds, values = [], {}
    for b in batch_sizes:
        # B - 1 others per trial and unit, drawn with replacement from the other n - 1 examples.
        idx = torch.randint(0, n - 1, (trials, units, b - 1), generator=gen)
        idx += (idx >= examples.view(1, -1, 1)).long()  # skip the followed example itself
        others = h.T[cols.view(1, -1, 1), idx]  # (trials, U, B - 1)
        batch = torch.cat([own.view(1, -1, 1).expand(trials, -1, 1), others], dim=2)
        var, mean = torch.var_mean(batch, dim=2, correction=0)
        z = (own - mean) / torch.sqrt(var + eps)
        values[b] = z.numpy()
        stds.append(z.std(dim=0).numpy())
    return np.array(stds), values


def predicted_noise(h, batch_sizes, examples):
    """The delta-method prediction of ``normalized_value_noise``'s std, (len(B), U).

    With z the example's normalized value under the statistics of all n examples, tau the
    skewness and kappa the kurtosis of the unit over them, the batch mean and variance each wobble
    by O(1/sqrt(B)), and to first order Var(z_B) = (1 + z tau + z^2 (kappa - 1) / 4) / B.
    """
    h = np.asarray(h, dtype=np.float64)
    u = (h - h.mean(0)) / h.std(0)
    skew, kurt = (u**3).mean(0), (u**4).mean(0)
    z = u[np.asarray(examples), np.arange(h.shape[1])]
    per_example = np.maximum(1 + z * skew + z**2 * (kurt - 1) / 4, 0)
    return np.sqrt(per_example[None, :] / np.asarray(batch_sizes, dtype=np.float64)[:, None])


def loglog_slope(x, y):
    """The least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


# --------------------------------------------------------------------------------------------
# 2. Regularization vs batch size: BN vs population normalization vs nothing
# --------------------------------------------------------------------------------------------


def gap_vs_batch_size(data, batch_sizes, seeds, *, norms=("bn", "population", "none"), epochs=10, lr=0.05,
                      base_batch=32, width=128, progress=None, device="cpu"):
    """Train one MLP per (norm, batch size, seed) for ``epochs`` epochs; evaluate each.

    The learning rate scales with the batch, ``lr * B / base_batch``, so that the noise of SGD
    itself stays about the same across batch sizes (the linear scaling rule) and every run sees
    the same number of examples. What then changes with B is the noise of BN's batch statistics;
    population norm, which normalizes with fixed statistics, isolates it.
    Returns {norm: {metric: (len(batch_sizes), len(seeds)) array}} with the metrics of ``evaluate``.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    check_positive_int("epochs", epochs)
    data = data.to(device)
    results = {norm: {} for norm in norms}
    jobs = [(norm, i) for norm in norms for i in range(len(batch_sizes))]
    for norm, i in _bar(jobs, "gap vs batch size", progress):
        b = batch_sizes[i]
        steps = max(1, epochs * len(data.x_train) // b)
        ens = fit_seeds(data, seeds, steps=steps, batch_size=b, lr=lr * b / base_batch, width=width, norm=norm,
                        device=device)
        for key, value in ensemble.evaluate(ens, data).items():
            results[norm].setdefault(key, np.zeros((len(batch_sizes), len(seeds))))[i] = value
    return results


# --------------------------------------------------------------------------------------------
# 3. BN vs dropout vs both vs neither
# --------------------------------------------------------------------------------------------

# name -> make_mlp keywords; "both" is the naive combination (dropout after every block).
DROPOUT_CONFIGS = {
    "neither": {"norm": "none"},
    "dropout": {"norm": "none", "dropout": 0.5},
    "BN": {"norm": "bn"},
    "BN + dropout": {"norm": "bn", "dropout": 0.5},
    "BN + dropout after the last BN": {"norm": "bn", "dropout": 0.5, "dropout_at": "after_last"},
}


def dropout_table(data, seeds, *, configs=None, steps=600, batch_size=32, lr=0.02, width=128, progress=None,
                  device="cpu"):
    """Train each configuration of ``DROPOUT_CONFIGS`` once per seed; return {name: {metric: (seeds,)}}.

    device: where the models and batches live, e.g. ``ctx.device``.
    """
    configs = DROPOUT_CONFIGS if configs is None else configs
    data = data.to(device)
    results = {}
    for name in _bar(configs, "BN vs dropout", progress):
        ens = fit_seeds(data, seeds, steps=steps, batch_size=batch_size, lr=lr, width=width, device=device,
                        **configs[name])
        results[name] = ensemble.evaluate(ens, data)
    return results


# --------------------------------------------------------------------------------------------
# 4. The variance shift (Li et al. 2019)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def variance_ratio(model, x):
    """Per BN layer, the ratio of its running variance to the variance of its input at test time.

    The model runs on ``x`` in eval mode (dropout off), as at test time; each BN layer's input is
    recorded and its per-channel variance compared with ``running_var``. Returns a list with one
    (C,) numpy array per BN layer; 1 means the stored statistics fit what the layer sees. The model
    runs where it is; ``x`` moves there.
    """
    x = x.to(device_of(model))
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError("the model has no batch norm layers")
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.__setitem__(m, args[0])) for m in layers]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was)
    return [(m.running_var / seen[m].var(dim=0)).cpu().numpy() for m in layers]


def _member_ratio(ens, x, layer=1):
    """Each member's median over channels of ``variance_ratio`` in one BN layer, (K,)."""
    return np.median(variance_ratio(ens, x)[layer].reshape(ens.members, -1), axis=1)


def variance_shift(data, seeds, *, p=0.5, steps=1000, batch_size=64, lr=0.05, width=128, progress=None,
                   device="cpu"):
    """Dropout before BN: the variance shift, its accuracy cost and two fixes, per seed.

    Trains three models per seed: no dropout; dropout p after every block (so the second block's
    BN sees dropped-out input in training, and full input at test); dropout only after the last
    BN. The dropout-before-BN model is evaluated twice: with its EMA statistics, and after
    ``precise_bn`` recomputes them with dropout off. Returns {name: {"acc": (seeds,), "ratio":
    (seeds,)}}, ratio being the median over channels of running var / test-time var in the
    second BN layer (the first sees no dropout).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    names = ("no dropout", "dropout before BN", "dropout before BN + precise BN", "dropout after the last BN")
    out = {name: {"acc": np.zeros(len(seeds)), "ratio": np.zeros(len(seeds))} for name in names}
    setups = {
        "no dropout": {},
        "dropout before BN": {"dropout": p},
        "dropout after the last BN": {"dropout": p, "dropout_at": "after_last"},
    }
    chunk = 500  # precise_bn sees the training set in batches of this size
    for name in _bar(setups, "variance shift", progress):
        ens = fit_seeds(data, seeds, steps=steps, batch_size=batch_size, lr=lr, width=width, device=device,
                        **setups[name])
        out[name]["acc"] = ensemble.evaluate(ens, data)["test_acc"]
        out[name]["ratio"] = _member_ratio(ens, data.x_test)
        if name == "dropout before BN":
            precise_bn(ens, data.x_train.split(chunk))
            fixed = "dropout before BN + precise BN"
            out[fixed]["acc"] = ensemble.evaluate(ens, data)["test_acc"]
            out[fixed]["ratio"] = _member_ratio(ens, data.x_test)
    return out


# --------------------------------------------------------------------------------------------
# 5. Large batches and ghost batches (Hoffer et al. 2017)
# --------------------------------------------------------------------------------------------


def ghost_batches(data, seeds, *, small=16, large=256, epochs=5, lr=0.01, width=128, progress=None,
                  device="cpu"):
    """Small vs large batches, regime adaptation and ghost batch norm; test accuracy per seed.

    Runs per seed: the small batch for ``epochs`` epochs (lr); the large batch for the same epochs
    (far fewer steps) with lr * sqrt(large / small) (Hoffer et al.'s square-root rule); the large
    batch for as many steps as the small one ("regime adaptation"); and the same with ghost batch
    norm over virtual batches of ``small``. Returns {name: (seeds,) test accuracies, and "steps"}.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    n = len(data.x_train)
    small_steps = epochs * n // small
    large_lr = lr * math.sqrt(large / small)
    runs = {
        f"B={small}": dict(batch_size=small, steps=small_steps, lr=lr, norm="bn"),
        f"B={large}, same epochs": dict(batch_size=large, steps=max(1, epochs * n // large), lr=large_lr, norm="bn"),
        f"B={large}, same steps": dict(batch_size=large, steps=small_steps, lr=large_lr, norm="bn"),
        f"B={large}, same steps, ghost BN ({small})": dict(
            batch_size=large, steps=small_steps, lr=large_lr, norm="ghost", virtual_batch_size=small
        ),
    }
    out = {}
    for name in _bar(runs, "ghost batches", progress):
        r = runs[name]
        ens = fit_seeds(data, seeds, steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], width=width,
                        norm=r["norm"], virtual_batch_size=r.get("virtual_batch_size"), device=device)
        out[name] = ensemble.evaluate(ens, data)["test_acc"]
    return out, {name: r["steps"] for name, r in runs.items()}


def ghost_size_sweep(data, seeds, virtual_sizes, *, batch_size=256, steps=1250, lr=0.04, width=128, progress=None,
                     device="cpu"):
    """Test accuracy at a fixed batch and step count, for each virtual batch size; (sizes, seeds).

    device: where the models and batches live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    out = np.zeros((len(virtual_sizes), len(seeds)))
    for i in _bar(range(len(virtual_sizes)), "ghost sizes", progress):
        ens = fit_seeds(data, seeds, steps=steps, batch_size=batch_size, lr=lr, width=width, norm="ghost",
                        virtual_batch_size=virtual_sizes[i], device=device)
        out[i] = ensemble.evaluate(ens, data)["test_acc"]
    return out


# --------------------------------------------------------------------------------------------
# 6. EMA vs precise statistics (Wu & Johnson 2021)
# --------------------------------------------------------------------------------------------


def _member_running_vars(ens):
    """Each member's running variances over all its BN layers, (K, channels)."""
    return torch.cat([m.running_var.clone().reshape(ens.members, -1) for m in batch_norm_layers(ens)], 1)


def ema_vs_precise(data, seeds, *, momenta=(0.001, 0.01, 0.1), steps=600, batch_size=64, lr=0.1, width=128,
                   precise_examples=2000, progress=None, device="cpu"):
    """Test accuracy with the EMA statistics and with ``precise_bn``'s, per BN momentum and seed.

    Returns {momentum: {"ema": (seeds,), "precise": (seeds,), "var_error": (seeds,)}}; var_error is
    the median over the BN channels of |EMA running var / precise var - 1|, how far the EMA's
    statistics are from those of the final weights. precise_bn sees the first ``precise_examples``
    training examples in batches of ``batch_size`` (the training batch size).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    out = {}
    for momentum in _bar(momenta, "EMA vs precise", progress):
        ens = fit_seeds(data, seeds, steps=steps, batch_size=batch_size, lr=lr, width=width, momentum=momentum,
                        device=device)
        ema_acc, ema = ensemble.evaluate(ens, data)["test_acc"], _member_running_vars(ens)
        precise_bn(ens, data.x_train[:precise_examples].split(batch_size))
        exact = _member_running_vars(ens)
        out[momentum] = {"ema": ema_acc, "precise": ensemble.evaluate(ens, data)["test_acc"],
                         "var_error": (ema / exact - 1).abs().median(1).values.cpu().numpy()}
    return out


def predicted_variance_ratio(a, weight, p):
    """Predict the variance shift of a Linear layer fed by inverted dropout with drop probability p.

    a: (n, d) the dropout's inputs (e.g. ReLU outputs) over n examples; weight: (c, d) the Linear
    weight. At test time the layer's output has variance w^T Cov(a) w per output channel. In
    training, each input is kept with probability 1 - p and divided by 1 - p; the independent
    masks add p / (1 - p) * sum_j w_j^2 E[a_j^2] to that variance and leave the mean alone.
    Returns the (c,) ratio of training-time to test-time variance: what BN's running variance
    over-states at test time.
    """
    a = np.asarray(a, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"a must be (n, d) and weight (c, d); got {a.shape} and {w.shape}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    test_var = (a @ w.T).var(axis=0)
    extra = p / (1 - p) * (w**2) @ (a**2).mean(axis=0)
    return (test_var + extra) / test_var
