"""Chapter 5's experiments: small and non-i.i.d. batches, and batch renormalization.

The central experiment is Wu and He's (2018) in small: the optimizer batch stays fixed at 32 and
BN (or batch renormalization) computes its statistics per group of B examples, as each GPU does
in their runs, for B = 2 to 32, against GroupNorm and LayerNorm; once on a small CNN (each
statistic averages B * H * W values, as in theirs) and once on an MLP (B values: the extreme
case). For each seed every member starts from the same weights and sees the same mini-batches,
so that the normalization is the only difference. They train as one model with the course's
ensemble trainer, ``normlab.runtime.ensemble`` (the norms are the library's own ghost batch norm and
batch renormalization, folded into channels, and torch's ``GroupNorm`` and ``LayerNorm`` per
member), which is what fits five group sizes x four normalizations x eight seeds into the quick
budget. The lab notebook
``chapters/small_batches/lab.ipynb`` calls these
functions and asserts what the chapter claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from normlab import nn as normlab_nn
from normlab._validate import check_positive_int, is_int
from normlab.experiments import BATCH_ORDER, seeds_for
from normlab.runtime import ensemble
from normlab.runtime.data import Split, grouped_batches
from normlab.runtime.train import show_progress

__all__ = [
    "NORMS",
    "LABELS",
    "budget",
    "seeds_for",
    "batch_stat_noise",
    "fit_slope",
    "make_members",
    "EnsembleRun",
    "train_norms",
    "GROUP_SIZES",
    "make_cnn",
    "group_members",
    "GroupRun",
    "group_size_sweep",
    "non_iid_experiment",
    "batch_stats_sweep",
    "grad_accumulation",
    "renorm_trace",
]

NORMS = ("bn", "brn", "gn", "ln")
LABELS = {"bn": "BatchNorm", "brn": "BatchRenorm", "gn": "GroupNorm", "ln": "LayerNorm"}


def _check_scale(scale):
    if scale not in ("quick", "full"):
        raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")


def budget(scale="quick"):
    """Return the steps, epochs, seeds and sizes per experiment for a scale ('quick' or 'full')."""
    _check_scale(scale)
    if scale == "quick":
        return {"seeds": 8, "group_steps": 200, "non_iid_epochs": 8, "noise_batches": 2000, "trace_steps": 600}
    return {"seeds": 16, "group_steps": 2000, "non_iid_epochs": 30, "noise_batches": 20000, "trace_steps": 5000}


# --------------------------------------------------------------------------------------------
# 1. How noisy are batch statistics?
# --------------------------------------------------------------------------------------------


def batch_stat_noise(x, batch_sizes, n_batches=2000, seed=0):
    """Measure how much mu_B and sigma_B vary across batches drawn from the rows of x.

    x: (N, C) values of C channels (e.g. one layer's pre-activations on a dataset). For each batch
    size B, draw ``n_batches`` batches of B rows without replacement, compute each channel's batch
    mean and batch standard deviation (biased, as BN uses), and return two arrays (len(B),): the
    median over channels of std(mu_B) / sigma and of std(sigma_B) / sigma, where sigma is the
    channel's standard deviation over all N rows.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 4:
        raise ValueError(f"x must be (N, C) with N >= 4, got shape {tuple(x.shape)}")
    check_positive_int("n_batches", n_batches)
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 2 or max(sizes) > x.shape[0]:
        raise ValueError(f"batch_sizes must lie in [2, {x.shape[0]}], got {batch_sizes!r}")
    gen = torch.Generator().manual_seed(seed)
    sigma = x.std(0, correction=0)  # (C,) the population's spread
    keep = sigma > 0
    x, sigma = x[:, keep], sigma[keep]
    mu_spread, sd_spread = [], []
    for B in sizes:
        idx = torch.rand(n_batches, x.shape[0], generator=gen).argsort(1)[:, :B]  # (n_batches, B), no repeats
        xb = x[idx]  # (n_batches, B, C)
        var, mu = torch.var_mean(xb, 1, correction=0)  # (n_batches, C)
        mu_spread.append((mu.std(0) / sigma).median().item())
        sd_spread.append((var.sqrt().std(0) / sigma).median().item())
    return np.array(mu_spread), np.array(sd_spread)


def fit_slope(batch_sizes, spread):
    """Return (slope, intercept) of a least-squares line through (log B, log spread)."""
    b, s = np.log(np.asarray(batch_sizes, dtype=float)), np.log(np.asarray(spread, dtype=float))
    if b.shape != s.shape or b.size < 2:
        raise ValueError(f"need two arrays of equal length >= 2, got {b.shape} and {s.shape}")
    slope, intercept = np.polyfit(b, s, 1)
    return float(slope), float(intercept)


# --------------------------------------------------------------------------------------------
# The ensemble: one MLP per (norm kind, seed), trained as one model (normlab.runtime.ensemble)
# --------------------------------------------------------------------------------------------


def _norm(kind, width, groups, group_size=None, image=False):
    """One norm layer of ``width`` channels (features, or image channels if ``image``).

    BN and batch renorm take their batch statistics from groups of ``group_size`` examples (None:
    the whole batch); GroupNorm has ``groups`` groups; LayerNorm normalizes every feature of an
    example (for images, GroupNorm with one group).
    """
    if kind == "bn":
        if group_size is None:
            return (normlab_nn.BatchNorm2d if image else normlab_nn.BatchNorm1d)(width)
        cls = normlab_nn.GhostBatchNorm2d if image else normlab_nn.GhostBatchNorm1d
        return cls(width, virtual_batch_size=group_size)
    if kind == "brn":
        cls = normlab_nn.BatchRenorm2d if image else normlab_nn.BatchRenorm1d
        return cls(width, r_max=1.0, d_max=0.0, virtual_batch_size=group_size)  # BN until the schedule relaxes it
    if kind == "gn":
        if width % groups:
            raise ValueError(f"{width} channels do not split into {groups} groups")
        return nn.GroupNorm(groups, width)
    if kind == "ln":
        return nn.GroupNorm(1, width) if image else nn.LayerNorm(width)
    raise ValueError(f"kind must be one of {NORMS}, got {kind!r}")


def _mlp(seed, norm, sizes=(64, 128, 128, 10)):
    """make_members' MLP for one seed (He-initialized from a generator seeded with the seed, zero biases)."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(d_in, d_out)
        with torch.no_grad():
            w = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(seed)) * math.sqrt(2.0 / d_in)
            lin.weight.copy_(w.T)
            lin.bias.zero_()
        layers.append(lin)
        if i < len(sizes) - 2:
            layers += [norm(d_out), nn.ReLU()]
    return nn.Sequential(*layers)


def make_members(sizes, kinds, seeds, groups=8):
    """Return the ensemble of one MLP per (kind, seed), kind-major: Linear -> norm -> ReLU per hidden layer.

    Members of one seed start from the same He-initialized weights, whatever their norm, so that
    the normalization is the only difference between them.
    """
    return ensemble.stack([_mlp(int(s), lambda c, kind=kind: _norm(kind, c, groups), sizes)
                           for kind in kinds for s in seeds])


def _renorm_layers(ens):
    return [m for m in ens.modules() if isinstance(m, normlab_nn._BatchRenorm)]


@dataclass
class EnsembleRun:
    """What ``train_norms`` recorded. Arrays are indexed [kind, seed].

    acc_eval: (len(kinds), S) test accuracy with running statistics (eval mode).
    acc_batch: (len(kinds), S) test accuracy with the statistics of test batches of the training
    batch size (train mode, the running statistics untouched), on i.i.d. (shuffled) test batches.
    acc_batch_grouped: the same on test batches grouped like the training batches (None unless the
    training batches were grouped). renorm: per training step, for BatchRenorm members, a dict of
    (S,) arrays: fraction of channels whose r or d was clipped, median |log r| and |d| before
    clipping, and the limits r_max and d_max in force.
    """

    kinds: list
    seeds: list
    batch_size: int
    steps: int
    acc_eval: np.ndarray
    acc_batch: np.ndarray
    acc_batch_grouped: np.ndarray | None = None
    train_loss: np.ndarray | None = None
    renorm: dict = field(default_factory=dict)


def _batch_accuracy(ens, x, y, batch_size, order):
    """Accuracy with the statistics of test batches (BN's training mode, no running update), (K,)."""
    renorms = _renorm_layers(ens)
    limits = [(m.r_max, m.d_max) for m in renorms]
    for m in renorms:  # plain batch statistics: no correction towards the running ones
        m.r_max, m.d_max = 1.0, 0.0
    try:
        return ensemble.batch_accuracy(ens, x[order], y[order], batch_size)
    finally:
        for m, (r, d) in zip(renorms, limits):
            m.r_max, m.d_max = r, d


def _epoch_batches(y, batch_size, seed, sampler, gen):
    """One epoch of full batches (index tensors) for one seed."""
    if sampler == "shuffled":
        perm = torch.randperm(len(y), generator=gen)
        n = len(y) // batch_size
        return list(perm[: n * batch_size].reshape(n, batch_size))
    return grouped_batches(y, batch_size, sampler, seed=seed, drop_last=True)


def _check_sampler(sampler):
    if sampler != "shuffled" and (not is_int(sampler) or sampler < 1):
        raise ValueError(f"sampler must be 'shuffled' or a number of classes per batch (int >= 1), got {sampler!r}")


def train_norms(
    data: Split,
    *,
    seeds,
    batch_size: int,
    epochs: int,
    lr: float,
    kinds=NORMS,
    hidden=(128, 128),
    groups: int = 8,
    sampler="shuffled",
    renorm=(0.05, 0.25, 3.0, 5.0),
    progress: bool | None = None,
    device="cpu",
) -> EnsembleRun:
    """Train one MLP per (kind, seed) with plain SGD for ``epochs`` epochs of ``batch_size``; return an EnsembleRun.

    Members of one seed share initial weights and mini-batches. sampler: 'shuffled' (i.i.d.
    batches) or k, an int: batches of k classes each from ``grouped_batches`` (short batches
    dropped). renorm: (warm-up fraction, relaxation fraction, r_max, d_max) of the total steps for
    the BatchRenorm members, passed to ``normlab.nn.renorm_schedule``.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    kinds = list(kinds)
    if not kinds or any(k not in NORMS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names from {NORMS}, got {kinds!r}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("epochs", epochs)
    _check_sampler(sampler)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    n = len(data.x_train)
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [2, {n}], got {batch_size}")
    warm_frac, relax_frac, r_target, d_target = renorm
    sizes = [data.num_features, *hidden, data.num_classes]
    y_train, y_test = data.y_train.cpu(), data.y_test.cpu()  # the batches are drawn on the CPU
    data = data.to(device)
    net = make_members(sizes, kinds, seeds, groups).to(device)
    S = len(seeds)
    gens = [torch.Generator().manual_seed(s + BATCH_ORDER) for s in seeds]
    epoch_lists = [[_epoch_batches(y_train, batch_size, s + 31 * e, sampler, g) for s, g in zip(seeds, gens)]
                   for e in range(epochs)]
    per_epoch = [min(len(b) for b in ep) for ep in epoch_lists]  # grouped epochs may differ by a batch
    batches = [torch.stack([ep[j][t] for j in range(S)]).repeat(len(kinds), 1)  # (K, B): a seed's batch, every kind
               for ep, count in zip(epoch_lists, per_epoch) for t in range(count)]
    total = len(batches)
    warmup, relax = int(round(warm_frac * total)), int(round(relax_frac * total))
    renorms = _renorm_layers(net)
    renorm_log = {k: [] for k in ("r_clipped", "d_clipped", "log_r", "abs_d", "r_max", "d_max")} if renorms else {}

    def schedule(step):
        for m in renorms:
            m.r_max, m.d_max = normlab_nn.renorm_schedule(step - 1, warmup, relax, r_target, d_target)

    def log_renorm(step, loss):
        if not renorms:
            return
        r, d, r_raw, d_raw = (torch.cat([getattr(m, name).reshape(S, -1) for m in renorms], 1)
                              for name in ("last_r", "last_d", "last_r_raw", "last_d_raw"))  # (S, layers * H)
        renorm_log["r_clipped"].append((r != r_raw).float().mean(1).cpu().numpy())
        renorm_log["d_clipped"].append((d != d_raw).float().mean(1).cpu().numpy())
        renorm_log["log_r"].append(r_raw.log().abs().median(1).values.cpu().numpy())
        renorm_log["abs_d"].append(d_raw.abs().median(1).values.cpu().numpy())
        renorm_log["r_max"].append(np.full(S, renorms[0].r_max))
        renorm_log["d_max"].append(np.full(S, renorms[0].d_max))

    losses = ensemble.fit(net, data, lr=lr, batches=batches, momentum=0.0, before_step=schedule,
                          after_step=log_renorm, progress=progress)
    losses = np.nan_to_num(losses, nan=np.inf)  # (K, steps)
    x_te, y_te = data.x_test, data.y_test
    shuffle = torch.randperm(len(y_te), generator=torch.Generator().manual_seed(seeds[0] + 1))
    acc_eval = ensemble.evaluate(net, data)["test_acc"]
    acc_batch = _batch_accuracy(net, x_te, y_te, batch_size, shuffle)
    acc_grouped = None
    if sampler != "shuffled":  # test batches grouped like the training batches
        order = torch.cat(grouped_batches(y_test, batch_size, sampler, seed=seeds[0] + 2, drop_last=True))
        acc_grouped = _batch_accuracy(net, x_te, y_te, batch_size, order).reshape(len(kinds), S)
    shape = (len(kinds), S)
    return EnsembleRun(
        kinds=kinds,
        seeds=seeds,
        batch_size=batch_size,
        steps=total,
        acc_eval=np.nan_to_num(acc_eval).reshape(shape),
        acc_batch=np.nan_to_num(acc_batch).reshape(shape),
        acc_batch_grouped=acc_grouped,
        train_loss=losses.reshape(*shape, -1),
        renorm={k: np.stack(v, 1) for k, v in renorm_log.items()},
    )


# --------------------------------------------------------------------------------------------
# 2-3. Error vs batch size in Wu and He's regime (BN per group of B examples inside a fixed
#      optimizer batch), and the train/test discrepancy
# --------------------------------------------------------------------------------------------

GROUP_SIZES = (2, 4, 8, 16, 32)
ARCHS = ("cnn", "mlp")


def group_members(arch, seeds, group_sizes=GROUP_SIZES, groups=4, channels=(8, 16), hidden=(128, 128),
                  image=(1, 8, 8)):
    """Return (ensemble, members): one model per (kind, group size, seed), and the (kind, B) of each.

    BN and batch renorm get one member per group size B; GroupNorm and LayerNorm never look at
    other examples, so they get one member per seed (B = None): at a fixed optimizer batch their
    training does not depend on B at all. arch: "cnn" (``make_cnn``) or "mlp" (``make_members``'
    MLP, ``hidden`` layers). image: the CNN's (C, H, W), e.g. (3, 32, 32) for CIFAR-10.
    GroupNorm has ``groups`` groups. Members of one seed start from the same weights whatever
    their norm.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    sizes = sorted({int(b) for b in group_sizes})
    if not sizes or sizes[0] < 2:
        raise ValueError(f"group_sizes must be ints >= 2, got {group_sizes!r}")
    members = [(k, b) for k in ("bn", "brn") for b in sizes] + [("gn", None), ("ln", None)]
    models = []
    for kind, b in members:
        for s in seeds:
            if arch == "cnn":
                torch.manual_seed(int(s))
                models.append(make_cnn(lambda c, kind=kind, b=b: _norm(kind, c, groups, b, image=True), channels,
                                       image=image))
            else:
                sizes = (64, *hidden, 10)
                models.append(_mlp(int(s), lambda c, kind=kind, b=b: _norm(kind, c, groups, b), sizes))
    return ensemble.stack(models), members


def make_cnn(norm, channels=(8, 16), num_classes=10, image=(1, 8, 8)):
    """A small CNN for the 8x8 digits stored as (N, 64): two 3x3 convolutions, each followed by ``norm(c)`` and a ReLU.

    The first keeps the 8x8 map, the second halves it (stride 2), and a linear layer reads the
    flattened (c2, 4, 4) maps, so BN averages B * 64 values per statistic in the first layer and
    B * 16 in the second. The convolutions have no bias (the norm's beta is one). image: the
    (C, H, W) of an example stored flat, e.g. (3, 32, 32) for CIFAR-10 at full scale.
    """
    c1, c2 = channels
    c0, h, w = image
    return nn.Sequential(nn.Unflatten(1, tuple(image)),
                         nn.Conv2d(c0, c1, 3, padding=1, bias=False), norm(c1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), norm(c2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(c2 * ((h + 1) // 2) * ((w + 1) // 2), num_classes))


@dataclass
class GroupRun:
    """What ``group_size_sweep`` measured, in percent, per member kind and seed.

    err_eval[(kind, B)]: (S,) test error in eval mode (running statistics). err_batch: test error
    in train mode, each test batch of the optimizer's size normalized per group of B as in
    training (running statistics untouched; batch renorm as plain BN). train_err_batch: the same on
    the training set (how well the network fits under the normalization it trained with). B is None
    for GroupNorm and LayerNorm.
    """

    arch: str
    seeds: list
    group_sizes: list
    batch_size: int
    steps: int
    members: list
    err_eval: dict
    err_batch: dict
    train_err_batch: dict

    def err(self, kind, group_size=None, which="err_eval"):
        """(S,) errors of one kind at one group size (GroupNorm / LayerNorm: any group size)."""
        key = (kind, None) if kind in ("gn", "ln") else (kind, group_size)
        if key not in self.err_eval:
            raise KeyError(f"no members {key}; kinds {NORMS}, group sizes {self.group_sizes}")
        return getattr(self, which)[key]


def group_size_sweep(data: Split, arch, *, seeds, steps, lr, batch_size=32, group_sizes=GROUP_SIZES, momentum=0.9,
                     groups=4, renorm=(0.05, 0.25, 3.0, 5.0), eval_train=448, progress=None, device="cpu",
                     **sizes) -> GroupRun:
    """Train BN and batch renorm with statistics per group of B, and GroupNorm and LayerNorm, at one optimizer batch.

    Every member takes the same ``steps`` SGD steps on batches of ``batch_size`` (a seed's batches
    are the same for every kind); BN and batch renorm normalize each group of B consecutive
    examples of a batch on its own (Wu and He's "images per GPU", with the optimizer batch fixed),
    so B changes the statistics and nothing else. renorm: the schedule's warm-up and relaxation
    fractions of ``steps`` and its targets r_max, d_max. The train-mode error on the training set
    is measured on ``eval_train`` examples (a multiple of the batch). sizes: ``channels``,
    ``hidden`` or ``image`` for ``group_members``. Returns a ``GroupRun``.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    bad = [b for b in group_sizes if batch_size % int(b)]
    if bad:
        raise ValueError(f"every group size must divide the batch of {batch_size}; {bad} do not")
    data = data.to(device)
    net, members = group_members(arch, seeds, group_sizes, groups, **sizes)
    net = net.to(device)
    S, n = len(seeds), len(data.x_train)
    draw = ensemble.member_batches([s + BATCH_ORDER for s in seeds], n, batch_size)
    batches = [next(draw).repeat(len(members), 1) for _ in range(steps)]  # (K, B): a seed's batch, every kind
    warm_frac, relax_frac, r_target, d_target = renorm
    warmup, relax = int(round(warm_frac * steps)), int(round(relax_frac * steps))
    renorms = _renorm_layers(net)

    def schedule(step):
        for m in renorms:
            m.r_max, m.d_max = normlab_nn.renorm_schedule(step - 1, warmup, relax, r_target, d_target)

    ensemble.fit(net, data, lr=lr, batches=batches, momentum=momentum, before_step=schedule, progress=progress)
    gen = torch.Generator().manual_seed(seeds[0] + 1)
    shape = (len(members), S)
    x_te, y_te = data.x_test, data.y_test
    err_eval = 100 * (1 - np.nan_to_num(ensemble.accuracy(net, x_te, y_te, batch_size=150)).reshape(shape))
    err_batch = 100 * (1 - _batch_accuracy(net, x_te, y_te, batch_size, torch.randperm(len(y_te), generator=gen)))
    some = torch.randperm(n, generator=gen)[:eval_train]
    train_err = 100 * (1 - _batch_accuracy(net, data.x_train, data.y_train, batch_size, some))
    err_batch, train_err = err_batch.reshape(shape), train_err.reshape(shape)
    return GroupRun(arch=arch, seeds=seeds, group_sizes=sorted({int(b) for b in group_sizes}),
                    batch_size=batch_size, steps=steps, members=members,
                    err_eval={m: err_eval[i] for i, m in enumerate(members)},
                    err_batch={m: err_batch[i] for i, m in enumerate(members)},
                    train_err_batch={m: train_err[i] for i, m in enumerate(members)})


# --------------------------------------------------------------------------------------------
# 4. Non-i.i.d. batches
# --------------------------------------------------------------------------------------------


def non_iid_experiment(data, *, seeds, epochs, batch_size=32, lr=0.1, samplers=("shuffled", 2, 1),
                       kinds=("bn", "brn", "gn"), progress=None, device="cpu", **kwargs):
    """Train every kind with each sampler ('shuffled' or k classes per batch); return {sampler: EnsembleRun}.

    device: where the models and batches live, e.g. ``ctx.device``.
    """
    for s in samplers:
        _check_sampler(s)
    data = data.to(device)
    return {s: train_norms(data, seeds=seeds, batch_size=batch_size, epochs=epochs, lr=lr, kinds=kinds,
                           sampler=s, progress=progress, device=device, **kwargs) for s in samplers}


def batch_stats_sweep(model, data, batch_sizes, seed=0):
    """Return the test accuracy of a trained model run in train mode on test batches of each size.

    model: an ``nn.Module`` with batch norm layers. Batches are consecutive slices of a seeded
    shuffle of the test set (a last short batch is dropped). The model's running statistics are
    left untouched. Returns an array (len(batch_sizes),).
    """
    from normlab.runtime.train import accuracy

    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    perm = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(seed))
    out = []
    for B in sizes:
        n = len(perm) // B * B
        x, y = data.x_test[perm[:n]], data.y_test[perm[:n]]
        out.append(accuracy(model, x, y, batch_size=B, train_mode=True))
    return np.array(out)


# --------------------------------------------------------------------------------------------
# 5. Gradient accumulation
# --------------------------------------------------------------------------------------------


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def grad_accumulation(model, x, y, k):
    """Return ||g_acc - g_full|| / ||g_full||: k micro-batches of len(x) / k vs one batch of len(x).

    g_full is the gradient of the mean cross-entropy over the whole batch; g_acc sums the gradients
    of the k micro-batches' mean losses, each divided by k (what a training loop that accumulates
    does). The model's mode (train/eval) is used as it is; its running statistics are restored
    afterwards, so the call changes nothing but the parameters' .grad.
    """
    check_positive_int("k", k)
    N = len(x)
    if N % k:
        raise ValueError(f"the batch of {N} does not split into k = {k} equal micro-batches")
    state = {n: b.clone() for n, b in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    g_full = _flat_grad(model)
    model.zero_grad(set_to_none=True)
    for xm, ym in zip(x.chunk(k), y.chunk(k)):
        (F.cross_entropy(model(xm), ym) / k).backward()
    g_acc = _flat_grad(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(state[n])
    return (torch.linalg.vector_norm(g_acc - g_full) / torch.linalg.vector_norm(g_full)).item()


# --------------------------------------------------------------------------------------------
# 6. Batch renormalization's schedule, with the library module
# --------------------------------------------------------------------------------------------


def renorm_trace(data, *, batch_size=4, steps=600, lr=None, warmup=0.1, relax=0.4, r_max=3.0, d_max=5.0,
                 hidden=128, seed=0, progress=None, device="cpu"):
    """Train an MLP with ``normlab.nn.BatchRenorm1d`` under ``renorm_schedule``; record r and d.

    Returns a dict of arrays over steps: 'r_max', 'd_max' (the limits in force), 'r_clipped',
    'd_clipped' (fraction of channels clipped, both layers), 'r_lo', 'r_med', 'r_hi' and 'd_lo',
    'd_med', 'd_hi' (10th, 50th, 90th percentiles over channels of r and d before clipping), and
    'loss', plus 'test_acc' (eval mode, after training).
    device: where the model and batches live, e.g. ``ctx.device``.
    """
    from torch import nn

    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for batch statistics, got {batch_size}")
    lr = 0.1 * batch_size / 32 if lr is None else lr
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(data.num_features, hidden), normlab_nn.BatchRenorm1d(hidden), nn.ReLU(),
                          nn.Linear(hidden, hidden), normlab_nn.BatchRenorm1d(hidden), nn.ReLU(),
                          nn.Linear(hidden, data.num_classes)).to(device)
    data = data.to(device)
    layers = [m for m in model if isinstance(m, normlab_nn.BatchRenorm1d)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + BATCH_ORDER)
    w, rl = int(round(warmup * steps)), int(round(relax * steps))
    rec = {k: [] for k in ("r_max", "d_max", "r_clipped", "d_clipped", "r_lo", "r_med", "r_hi", "d_lo", "d_med",
                           "d_hi", "loss")}
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float32, device=device)
    for step in tqdm(range(steps), desc="renorm", disable=not show_progress(progress), leave=False):
        limits = normlab_nn.renorm_schedule(step, w, rl, r_max, d_max)
        for layer in layers:
            layer.r_max, layer.d_max = limits
        idx = torch.randperm(len(data.y_train), generator=gen)[:batch_size]
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        r = torch.cat([m.last_r for m in layers])
        d = torch.cat([m.last_d for m in layers])
        r_raw = torch.cat([m.last_r_raw for m in layers])
        d_raw = torch.cat([m.last_d_raw for m in layers])
        rec["r_max"].append(limits[0])
        rec["d_max"].append(limits[1])
        rec["r_clipped"].append((r != r_raw).float().mean().item())
        rec["d_clipped"].append((d != d_raw).float().mean().item())
        for name, v in (("r", r_raw), ("d", d_raw)):
            lo, med, hi = torch.quantile(v.float(), q).tolist()
            rec[f"{name}_lo"].append(lo)
            rec[f"{name}_med"].append(med)
            rec[f"{name}_hi"].append(hi)
        rec["loss"].append(loss.item())
    out = {k: np.array(v) for k, v in rec.items()}
    model.eval()
    with torch.no_grad():
        out["test_acc"] = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return out
