"""Chapter 7's experiments: batch norm in transfer learning.

A small 1-D CNN with BN (``make_cnn``) is trained on MNIST-1D, the *source* domain, and tested on
*target* domains built from it (``domains``): the same signals with an affine intensity shift
(2x + 1), with Gaussian noise, and MNIST-1D drawn with other generator parameters. The functions
here adapt the trained models with ``normlab.adapt`` (AdaBN, Schneider et al.'s prior, TENT),
fine-tune them on a few labelled target examples in four modes, and train only BN's affine
parameters on top of frozen random weights. They return plain numbers (numpy arrays, dicts) that
the lab notebooks tabulate, plot and assert.

Chapter 7's baselines train the same CNN without normalization, with GroupNorm and with
InstanceNorm (``make_cnn(norm=...)``, ``NORMS``) and test all four on the same shifts and on a
small corruption suite in the spirit of CIFAR-10-C (``corruptions``: blur, noise and contrast at
three severities each), and fine-tune BN and no-BN networks on 10 to 1,000 labelled target
examples (``finetune_vs_size``).

The first convolution has no bias and no padding ("valid"), and BN follows it directly. Then
every output position of the first layer sees a full kernel, an input shift x -> a x + b moves
each channel's pre-activation to a h + b sum(w), and BN with the target's statistics undoes it
exactly (up to epsilon): AdaBN's exact recovery, which the tests check.

Seeds: a seed fixes the initial weights and the mini-batches of a run, and the choice of labelled
target examples; the datasets depend on the notebook's seed only.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from normlab._validate import check_positive_int, is_int
from normlab.adapt import adabn, bn_only_parameters, bn_statistics, freeze_bn, prior_adapt, tent
from normlab.experiments import seeds_for
from normlab.experiments.regularization import make_mlp
from normlab.runtime import ensemble
from normlab.runtime.data import Split, add_noise, affine_shift, blur, contrast, load_mnist1d, mnist1d_shifted
from normlab.runtime.train import accuracy, show_progress, train
from normlab.stats import batch_norm_layers

__all__ = [
    "DOMAINS",
    "NORMS",
    "NORM_LABELS",
    "SOURCE_LR",
    "CORRUPTIONS",
    "MODES",
    "MODE_LABELS",
    "budget",
    "seeds_for",
    "make_cnn",
    "domains",
    "corruptions",
    "train_source",
    "train_sources",
    "adaptation_results",
    "baseline_results",
    "adabn_vs_size",
    "tent_online",
    "labelled_split",
    "set_mode",
    "finetune",
    "finetune_results",
    "finetune_vs_size",
    "bn_only_vs_width",
    "summarize",
]

DOMAINS = ("clean", "affine", "noise", "generator")
# The normalization after each convolution of ``make_cnn``: BN, nothing, GroupNorm (4 groups of
# channels, as Chapter 6's CNN) and InstanceNorm (GroupNorm with one channel per group, with affine).
NORMS = ("bn", "none", "gn", "in")
NORM_LABELS = {"bn": "BatchNorm", "none": "no normalization", "gn": "GroupNorm", "in": "InstanceNorm"}
# Each network's SGD rate on the source, chosen once from (0.02, 0.05, 0.1) by clean *source* test
# accuracy (8 seeds, 600 steps; no target data): the highest, the smaller rate on a tie within 0.2
# points. BN 94.8 at 0.05; none 85.4 at 0.05 (85.3 at 0.1); GN 92.6 at 0.05; IN 82.7 at 0.1.
SOURCE_LR = {"bn": 0.05, "none": 0.05, "gn": 0.05, "in": 0.1}
# The corruption suite: kind -> severities (blur: sigma in points; noise: sd; contrast: factor).
CORRUPTIONS = {"blur": (1.0, 2.0, 3.0), "noise": (0.25, 0.5, 1.0), "contrast": (0.5, 0.25, 0.1)}
# Fine-tuning modes: what trains and what BN does while it trains.
MODES = ("all_bn_train", "all_bn_frozen", "head", "bn_only")
MODE_LABELS = {
    "all_bn_train": "all layers, BN in train mode",
    "all_bn_frozen": "all layers, BN frozen",
    "head": "only the head",
    "bn_only": "only BN's gamma and beta",
}


def budget(scale: str = "quick") -> dict:
    """Seeds, steps and sizes per experiment at a scale ('quick': the 60 s notebooks; 'full')."""
    if scale == "quick":
        return {"seeds": 8, "num_samples": 5000, "source_steps": 600, "finetune_steps": 100,
                "bn_only_steps": 800, "widths": (32, 128, 512), "labelled": (50,),
                "adabn_sizes": (10, 100, 1000), "tent_passes": 5, "ft_sizes": (10, 100, 1000)}
    if scale == "full":
        return {"seeds": 8, "num_samples": 10000, "source_steps": 2000, "finetune_steps": 300,
                "bn_only_steps": 3000, "widths": (32, 128, 512, 2048), "labelled": (50, 500),
                "adabn_sizes": (10, 30, 100, 300, 1000, 3000), "tent_passes": 20,
                "ft_sizes": (10, 30, 100, 300, 1000, 4000)}
    raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")


def _bar(iterable, desc, progress):
    return tqdm(iterable, desc=desc, disable=not show_progress(progress), leave=False)


# --------------------------------------------------------------------------------------------
# Model and domains
# --------------------------------------------------------------------------------------------


def make_cnn(length: int = 40, num_classes: int = 10, *, width: int = 32, norm="bn", seed: int = 0):
    """Return a 1-D CNN for (N, length) signals: three bias-free valid convolutions, each followed
    by a normalization and ReLU, then a Linear head (the last module).

    norm: one of ``NORMS``: 'bn' (BatchNorm1d), 'none', 'gn' (GroupNorm, 4 groups) or 'in'
    (GroupNorm with one channel per group: instance norm with a per-channel affine); True and
    False mean 'bn' and 'none'. Kernel sizes 5, 3, 3; strides 1, 2, 2; ``width`` channels throughout.
    """
    check_positive_int("width", width)
    check_positive_int("num_classes", num_classes)
    if isinstance(norm, bool):
        norm = "bn" if norm else "none"
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (or a bool), got {norm!r}")
    if norm == "gn" and width % 4:
        raise ValueError(f"GroupNorm's 4 groups must divide width={width}")
    out = ((length - 4 - 3) // 2 + 1 - 3) // 2 + 1  # positions left after the three valid convs
    if out < 1:
        raise ValueError(f"length must be at least 11 for three valid convolutions, got {length}")

    def norm_layer():
        return {"bn": lambda: nn.BatchNorm1d(width), "none": nn.Identity, "gn": lambda: nn.GroupNorm(4, width),
                "in": lambda: nn.GroupNorm(width, width)}[norm]()

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),  # (N, L) -> (N, 1, L)
        nn.Conv1d(1, width, 5, bias=False), norm_layer(), nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, bias=False), norm_layer(), nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, bias=False), norm_layer(), nn.ReLU(),
        nn.Flatten(),  # (N, width, out) -> (N, width * out)
        nn.Linear(width * out, num_classes),
    )


def domains(seed: int = 0, num_samples: int = 5000, noise_std: float = 0.5) -> dict:
    """Return the source domain and three target domains, {name: Split}, names as in ``DOMAINS``.

    clean: MNIST-1D (generator seed 42 + seed). affine: the same signals, 2x + 1. noise: the same
    plus Gaussian noise of std ``noise_std``. generator: MNIST-1D generated afresh (another seed)
    with more correlated background noise (0.6 instead of 0.25) and more shear (1.5 instead of
    0.75). A target's training part stands for unlabelled target data (or the pool that labelled
    examples are drawn from); its test part is where accuracy is measured.
    """
    clean = load_mnist1d(num_samples=num_samples, seed=42 + seed)
    return {
        "clean": clean,
        "affine": affine_shift(clean, 2.0, 1.0),
        "noise": add_noise(clean, noise_std, seed=seed),
        "generator": mnist1d_shifted(num_samples=num_samples, seed=10_000 + seed, corr_noise_scale=0.6,
                                     shear_scale=1.5),
    }


def train_source(data: Split, seed: int, *, steps: int = 600, width: int = 32, lr: float = 0.05, batch_size=64,
                 device="cpu"):
    """Train ``make_cnn`` on the source domain with SGD (momentum 0.9); return it in eval mode.

    device: where the models and batches live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    model = make_cnn(data.num_features, data.num_classes, width=width, seed=seed).to(device)
    train(model, data, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=False)
    return model.eval()


def train_sources(data: Split, seeds, *, steps: int = 600, width: int = 32, lr=None, batch_size=64, norm="bn",
                  progress=None, device="cpu") -> list:
    """``train_source(data, seed, ...)`` for every seed, the seeds trained together as one ``normlab.runtime.ensemble``.

    norm: the CNN's normalization (``make_cnn``); lr: SGD's rate, by default ``SOURCE_LR[norm]``
    (0.05 for BN). Returns one model per seed, in eval mode, each the model ``train_source`` gives
    for its seed when norm is 'bn' (up to float rounding: the ensemble's batched products sum in
    another order).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    lr = SOURCE_LR["bn" if norm is True else "none" if norm is False else norm] if lr is None else lr
    data = data.to(device)
    ens = ensemble.stack([make_cnn(data.num_features, data.num_classes, width=width, norm=norm, seed=s)
                          for s in seeds]).to(device)
    ensemble.fit(ens, data, lr=lr, seeds=seeds, steps=steps, batch_size=batch_size, progress=progress)
    return [ensemble.member(ens, k).eval() for k in range(len(seeds))]


def corruptions(clean: Split, seed: int = 0, suite=None) -> dict:
    """The corruption suite on ``clean``: {(kind, severity): Split}, in the order of ``suite``.

    suite: {kind: severities}, kinds 'blur' (``data.blur``, sigma in points), 'noise'
    (``data.add_noise``, sd; seeded with ``seed`` + the severity's index) and 'contrast'
    (``data.contrast``, the factor); default ``CORRUPTIONS``. Train and test parts are corrupted
    alike: the training part stands for unlabelled target data.
    """
    suite = CORRUPTIONS if suite is None else suite
    make = {"blur": lambda s, i: blur(clean, s), "noise": lambda s, i: add_noise(clean, s, seed=seed + 1 + i),
            "contrast": lambda s, i: contrast(clean, s)}
    unknown = set(suite) - set(make)
    if unknown:
        raise ValueError(f"unknown corruption kinds {sorted(unknown)}; the kinds are {sorted(make)}")
    return {(kind, s): make[kind](s, i) for kind, sevs in suite.items() for i, s in enumerate(sevs)}


# --------------------------------------------------------------------------------------------
# 1. Adapting statistics without labels: AdaBN, the prior, TENT
# --------------------------------------------------------------------------------------------


def adaptation_results(models, targets: dict, *, batch_sizes=(2, 64), priors=(0, 8, 32, math.inf),
                       tent_lr=1e-3, tent_batch=64, chunk=500, small_batch_examples=500, progress=None,
                       device="cpu") -> dict:
    """Target test accuracy of source-trained models under each unsupervised adaptation.

    models: one trained model per seed (left unchanged). targets: {domain: Split}. Methods:
    "source" (the source statistics); "adabn" (statistics of the target's training inputs, in
    chunks of ``chunk``); ("prior", N, B): test batches of B normalized with the source mixed with
    the batch at pseudo sample size N (N = 0: the test batch's own statistics); "tent" (one online
    pass of TENT over the test set in batches of ``tent_batch``, then evaluated with test-batch
    statistics at that batch size). Batch sizes below 16 are evaluated on the first
    ``small_batch_examples`` test examples only (hundreds of forward passes of two examples are
    slow); ("prior", math.inf, B) is the source model by construction and is copied from "source".
    The models run together as one ``normlab.runtime.ensemble`` (the adaptations act on each member's own
    BN channels, and TENT's loss is each member's own). Returns {method: {domain: (seeds,) array}}.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    out = {}
    stacked = ensemble.stack(models).to(device)  # every seed's model as one: each step below runs all of them
    for name in _bar(list(targets), "adaptation", progress):
        data = targets[name].to(device)
        ens = copy.deepcopy(stacked).eval()
        source = bn_statistics(ens)

        def put(method, value, name=name):
            out.setdefault(method, {})[name] = value

        put("source", ensemble.accuracy(ens, data.x_test, data.y_test))
        for n_prior in priors:
            prior_adapt(ens, source, n_prior)
            for b in batch_sizes:
                if math.isinf(n_prior):
                    put(("prior", n_prior, b), out["source"][name].copy())
                    continue
                k = small_batch_examples if b < 16 else len(data.y_test)
                put(("prior", n_prior, b), ensemble.accuracy(ens, data.x_test[:k], data.y_test[:k], batch_size=b))
        prior_adapt(ens, source, math.inf)  # back to the source models
        put("adabn", ensemble.accuracy(adabn(copy.deepcopy(ens), data.x_train.split(chunk)), data.x_test,
                                       data.y_test))
        tent(ens, data.x_test.split(tent_batch), lr=tent_lr)
        put("tent", ensemble.accuracy(ens, data.x_test, data.y_test, batch_size=tent_batch, train_mode=True))
    return out


def tent_online(models, targets: dict, *, batch_size=64, passes=10, lr=1e-3, order_seed=0, device="cpu") -> dict:
    """TENT as Wang et al. run it: online, each test batch predicted *before* the model adapts to it.

    models: one trained model per seed (left unchanged), run together as one ``normlab.runtime.ensemble``.
    The target's test set is streamed ``passes`` times in batches of ``batch_size``, in a new
    random order each pass (from ``order_seed``; the same stream for every seed and domain size);
    on each batch TENT predicts with the batch's own statistics, then takes one Adam step
    (learning rate ``lr``) on the entropy of those predictions, updating only BN's gamma and beta
    (``adapt.tent`` with ``on_batch``). The baseline is the same stream normalized with each test
    batch's statistics and never updated (BN-statistics adaptation, online). Returns {domain:
    {'tent': (passes, seeds) online accuracy in each pass, 'norm': (passes, seeds) the baseline's}}.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    check_positive_int("passes", passes)
    if not is_int(batch_size) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    stacked = ensemble.stack(models).to(device)
    out = {}
    for name, data in targets.items():
        data = data.to(device)
        n = len(data.y_test)
        gen = torch.Generator().manual_seed(order_seed)
        orders = [torch.randperm(n, generator=gen) for _ in range(passes)]
        # a last batch of one cannot be normalized with its own statistics: fold it into the one before
        chunks = [idx.split(batch_size) for idx in orders]
        chunks = [c[:-2] + (torch.cat(c[-2:]),) if len(c[-1]) < 2 else c for c in chunks]
        now = {}

        def stream(chunks=chunks, data=data, now=now):
            for p, pass_chunks in enumerate(chunks):
                for idx in pass_chunks:
                    now["pass"], now["y"] = p, data.y_test[idx]
                    yield data.x_test[idx]

        hits = np.zeros((passes, len(models)))

        def count(logits, hits=hits, now=now):
            hits[now["pass"]] += (logits.argmax(-1) == now["y"]).sum(-1).cpu().numpy()

        tent(copy.deepcopy(stacked), stream(), lr=lr, on_batch=count)
        norm = np.stack([  # each batch with its own statistics (train mode), running statistics untouched
            sum(len(idx) * ensemble.accuracy(stacked, data.x_test[idx], data.y_test[idx], train_mode=True)
                for idx in pass_chunks)
            for pass_chunks in chunks])
        out[name] = {"tent": hits / n, "norm": norm / n}
    return out


def baseline_results(sources: dict, targets: dict, *, chunk=500, device="cpu") -> dict:
    """Target test accuracy of every network as trained, and of the BN network after AdaBN.

    sources: {norm: one trained model per seed} (norms from ``NORMS``; models left unchanged);
    targets: {name: Split}. Each norm's models run together as one ``normlab.runtime.ensemble`` in eval
    mode: BN with its source statistics, GroupNorm and InstanceNorm with each example's own (they
    keep no statistics to adapt). 'bn_adabn' is BN with every layer's statistics replaced by those
    of the target's training inputs (``adabn``, in chunks of ``chunk``). Returns {method: {target:
    (seeds,) array}}, methods the norms and, if 'bn' is among them, 'bn_adabn'.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    out = {}
    targets = {name: d.to(device) for name, d in targets.items()}
    for norm, models in sources.items():
        ens = ensemble.stack(models).to(device).eval()
        out[norm] = {name: ensemble.accuracy(ens, d.x_test, d.y_test) for name, d in targets.items()}
        if norm == "bn":
            out["bn_adabn"] = {
                name: ensemble.accuracy(adabn(copy.deepcopy(ens), d.x_train.split(chunk)), d.x_test, d.y_test)
                for name, d in targets.items()}
    return out


def adabn_vs_size(models, targets: dict, sizes, *, chunk=500, device="cpu") -> dict:
    """AdaBN's target test accuracy when it sees only the first n unlabelled target inputs, per size n.

    models: one trained model per seed (left unchanged), run together as one ``normlab.runtime.ensemble``.
    For each domain and n in ``sizes``, every BN layer's statistics become those of
    ``target.x_train[:n]`` (``adabn``, in chunks of ``chunk``; the same n inputs for every seed).
    Returns {domain: (len(sizes), seeds) array}.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    sizes = [int(n) for n in sizes]
    stacked = ensemble.stack(models).to(device)
    out = {}
    for name, data in targets.items():
        data = data.to(device)
        if max(sizes) > len(data.x_train) or min(sizes) < 2:
            raise ValueError(f"sizes must lie in [2, {len(data.x_train)}] for {name!r}, got {sizes}")
        out[name] = np.stack([
            ensemble.accuracy(adabn(copy.deepcopy(stacked), data.x_train[:n].split(chunk)), data.x_test, data.y_test)
            for n in sizes])
    return out


# --------------------------------------------------------------------------------------------
# 2. Fine-tuning on a few labelled target examples
# --------------------------------------------------------------------------------------------


def labelled_split(data: Split, n: int, n_val: int, seed: int = 0):
    """Draw ``n`` labelled target examples (class-balanced) and ``n_val`` others for validation.

    Both come from ``data``'s training part, disjoint. Returns (train Split: the n examples, with
    data's test part; validation (x, y)). The draw is made on the CPU; the examples stay on
    ``data``'s device.
    """
    check_positive_int("n", n)
    check_positive_int("n_val", n_val)
    classes = data.y_train.unique()
    if n < len(classes) or n + n_val > len(data.y_train):
        raise ValueError(f"need {len(classes)} <= n and n + n_val <= {len(data.y_train)}, got n={n}, n_val={n_val}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=gen).to(data.y_train.device)
    y = data.y_train[order]
    # Round-robin over classes: the k-th example of every class before the (k+1)-th of any.
    rank = torch.zeros_like(order)
    for c in classes:
        rank[y == c] = torch.arange(int((y == c).sum()), device=rank.device)
    picked = order[torch.argsort(rank * len(classes) + y, stable=True)[:n]]
    rest = order[~torch.isin(order, picked)][:n_val]
    train_split = Split(data.x_train[picked], data.y_train[picked], data.x_test, data.y_test,
                        name=f"{data.name}[{n} labelled]")
    return train_split, (data.x_train[rest], data.y_train[rest])


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Prepare ``model`` for fine-tuning in ``mode`` (one of ``MODES``); return it.

    all_bn_train: everything trains, BN normalizes with the fine-tuning batches and updates its
    running statistics. all_bn_frozen: everything but BN trains; BN keeps the source statistics
    and affine parameters (``freeze_bn``). head: only the last module (the Linear head) trains;
    BN frozen. bn_only: only BN's gamma and beta train; BN in train mode, so its statistics follow
    the target too.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("all_bn_frozen", "head"):
        freeze_bn(model)
    if mode in ("head", "bn_only"):
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = list(model[-1].parameters()) if mode == "head" else bn_only_parameters(model)
        for p in trainable:
            p.requires_grad_(True)
    return model


def _check_select(n: int, n_select) -> int:
    """The number of the n labelled examples held out to choose the rate (default n // 5)."""
    h = n // 5 if n_select is None else n_select
    if not is_int(h) or not 1 <= h < n:
        raise ValueError(f"n_select must be an int in [1, {n}), got {n_select!r}")
    return h


def finetune(model, data: Split, mode: str, *, lrs=(0.001, 0.01, 0.1), steps=100, batch_size=10, seed=0,
             n_select=None, device="cpu"):
    """Fine-tune ``model`` on the labelled examples of ``data`` in ``mode``, choosing the rate on them alone.

    data: the labelled target examples (as ``labelled_split`` orders them, the last ``n_select`` are
    class-balanced when it is a multiple of the classes; default n // 5) and the target's test part.
    Selection: a copy per learning rate trains on the first n - n_select examples (SGD, momentum
    0.9, ``steps`` steps of ``batch_size``); the rate with the lowest cross-entropy on the last
    n_select wins (ties: the earlier rate). Then a fresh copy trains on all n at that rate.
    No example outside the n is used. Returns (test accuracy of the final model, its rate).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    n = len(data.y_train)
    h = _check_select(n, n_select)
    fit = Split(data.x_train[: n - h], data.y_train[: n - h], data.x_test, data.y_test, name=data.name)
    best = (math.inf, None)
    for lr in lrs:
        tuned = set_mode(copy.deepcopy(model).to(device), mode)
        train(tuned, fit, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=False)
        tuned.eval()
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(tuned(data.x_train[n - h :]), data.y_train[n - h :]))
        if loss < best[0]:
            best = (loss, lr)
    final = set_mode(copy.deepcopy(model).to(device), mode)
    train(final, data, steps=steps, lr=best[1], batch_size=batch_size, seed=seed, progress=False)
    return accuracy(final, data.x_test, data.y_test), best[1]


def finetune_results(models, targets: dict, seeds, *, labelled=(50,), modes=MODES, lrs=(0.001, 0.01, 0.1),
                     steps=100, batch_size=10, n_select=None, progress=None, device="cpu") -> dict:
    """Fine-tune every model on every target, for each number of labelled examples and mode.

    Returns {"acc": {(n, mode): {domain: (seeds,) array}}, "lr": the same with the chosen learning
    rates}, plus "source" and "adabn" ({domain: (seeds,)}): the accuracies without labels, for
    comparison. The labelled examples of seed j are ``labelled_split(target, n, 1, seeds[j])[0]``;
    each model's fine-tuning is ``finetune``'s (the rate chosen on the last ``n_select`` of the n,
    then the model retrained on all n), with nothing outside the n labelled examples. The
    selection runs of one mode (every rate and seed) train together as one ``normlab.runtime.ensemble``
    whose member (rate l, seed j) draws seed j's batches from seed j's examples; the final runs
    (every seed at its chosen rate) as another.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    K, R = len(models), len(lrs)
    acc, lr_chosen, base = {}, {}, {"source": {}, "adabn": {}}
    targets = {name: d.to(device) for name, d in targets.items()}
    stacked = ensemble.stack(models).to(device)
    jobs = [(d, n, mode) for d in targets for n in labelled for mode in modes]
    for name, n, mode in _bar(jobs, "fine-tuning", progress):
        data = targets[name]
        h = _check_select(n, n_select)
        parts = [labelled_split(data, n, 1, seed=seeds[j])[0] for j in range(K)]
        offset = torch.arange(K).unsqueeze(1)
        # 1. choose the rate: train on the first n - h of each seed's examples, score on the last h
        fit = Split(torch.cat([p.x_train[: n - h] for p in parts]), torch.cat([p.y_train[: n - h] for p in parts]),
                    data.x_test, data.y_test, name=f"{data.name}[{K} x {n - h} labelled]")
        draw = ensemble.member_batches(seeds, n - h, min(batch_size, n - h))  # row j: as train(seed=seeds[j])
        batches = [(next(draw) + (n - h) * offset).repeat(R, 1) for _ in range(steps)]  # rate-major, then seed
        ens = ensemble.stack([set_mode(copy.deepcopy(models[j]), mode) for _ in lrs for j in range(K)]).to(device)
        ensemble.fit(ens, fit, lr=[lr for lr in lrs for _ in range(K)], batches=batches)
        x_hold = torch.stack([p.x_train[n - h :] for p in parts]).repeat(R, *[1] * parts[0].x_train.dim())
        y_hold = torch.stack([p.y_train[n - h :] for p in parts]).repeat(R, 1)
        with torch.no_grad():
            loss = ensemble.member_loss(ens(x_hold), y_hold).reshape(R, K).double().cpu().numpy()
        best = loss.argmin(0)  # (K,): the first of equal minima, the earlier rate
        chosen = [lrs[int(b)] for b in best]
        # 2. retrain on all n at the chosen rate
        full = Split(torch.cat([p.x_train for p in parts]), torch.cat([p.y_train for p in parts]),
                     data.x_test, data.y_test, name=f"{data.name}[{K} x {n} labelled]")
        draw = ensemble.member_batches(seeds, n, min(batch_size, n))
        batches = [next(draw) + n * offset for _ in range(steps)]
        ens = ensemble.stack([set_mode(copy.deepcopy(models[j]), mode) for j in range(K)]).to(device)
        ensemble.fit(ens, full, lr=chosen, batches=batches)
        acc.setdefault((n, mode), {})[name] = ensemble.accuracy(ens, data.x_test, data.y_test)
        lr_chosen.setdefault((n, mode), {})[name] = np.array(chosen, dtype=np.float64)
        if n == labelled[0] and mode == modes[0]:
            base["source"][name] = ensemble.accuracy(stacked, data.x_test, data.y_test)
            if batch_norm_layers(stacked):  # a network without BN has no statistics to adapt
                adapted = adabn(copy.deepcopy(stacked), data.x_train.split(500))
                base["adabn"][name] = ensemble.accuracy(adapted, data.x_test, data.y_test)
    return {"acc": acc, "lr": lr_chosen, **base}


def finetune_vs_size(sources: dict, targets: dict, seeds, sizes, *, lrs=(0.001, 0.01, 0.1), steps=100,
                     batch_size=10, progress=None, device="cpu") -> dict:
    """Fine-tune every layer of each network on n labelled target examples, for each n in ``sizes``.

    sources: {norm: one trained model per seed} (e.g. BN and no normalization); BN fine-tunes in
    train mode (the 'all_bn_train' mode of ``finetune_results``, whose rate selection on the n
    examples alone, steps and batches it uses; every norm gets the same examples, batches and rate
    grid). Returns {norm: {target: (len(sizes), seeds) test accuracies}}.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    sizes = tuple(int(n) for n in sizes)
    out = {}
    for norm, models in sources.items():
        res = finetune_results(models, targets, seeds, labelled=sizes, modes=("all_bn_train",), lrs=lrs,
                               steps=steps, batch_size=batch_size, progress=progress, device=device)
        out[norm] = {name: np.stack([res["acc"][(n, "all_bn_train")][name] for n in sizes]) for name in targets}
    return out


# --------------------------------------------------------------------------------------------
# 3. Training only BN (Frankle et al. 2021)
# --------------------------------------------------------------------------------------------


def bn_only_vs_width(data: Split, widths, seeds, *, steps=800, lr=0.5, batch_size=64, full_width=None,
                     full_lr=0.05, progress=None, device="cpu") -> dict:
    """Train only BN's gamma and beta of MLPs whose other weights stay at their random initialization.

    The MLP is ``regularization.make_mlp`` (two blocks of Linear -> BN -> ReLU, then a Linear
    classifier), all its weights frozen at initialization except BN's affine parameters, trained
    with SGD (momentum 0.9). Returns {"bn_only": (widths, seeds) test accuracies, "params":
    trainable parameter counts per width, "gamma_small": (widths, seeds) fraction of |gamma| < 0.1
    after training}; with ``full_width``, also "full": (seeds,) accuracies of the same MLP at that
    width with every weight trained (lr ``full_lr``), for reference. The seeds of one width train
    together as one ``normlab.runtime.ensemble``.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    data = data.to(device)
    out = {"bn_only": np.zeros((len(widths), len(seeds))), "gamma_small": np.zeros((len(widths), len(seeds))),
           "params": []}
    for i, w in enumerate(_bar(widths, "BN only", progress)):
        models = [set_mode(make_mlp(data.num_features, data.num_classes, width=w, seed=s), "bn_only") for s in seeds]
        out["params"].append(sum(p.numel() for p in bn_only_parameters(models[0])))
        # the seeds train together; only the folded BN layers' gamma and beta train
        ens = ensemble.stack(models).to(device)
        ensemble.fit(ens, data, lr=lr, seeds=seeds, steps=steps, batch_size=batch_size, progress=progress)
        out["bn_only"][i] = ensemble.accuracy(ens, data.x_test, data.y_test)
        gammas = torch.cat([m.weight.detach().reshape(len(seeds), -1) for m in batch_norm_layers(ens)], 1)
        out["gamma_small"][i] = (gammas.abs() < 0.1).double().mean(1).cpu().numpy()  # (seeds,)
    if full_width is not None:
        ens = ensemble.stack([make_mlp(data.num_features, data.num_classes, width=full_width, seed=s)
                              for s in seeds]).to(device)
        ensemble.fit(ens, data, lr=full_lr, seeds=seeds, steps=steps, batch_size=batch_size, progress=progress)
        out["full"] = ensemble.accuracy(ens, data.x_test, data.y_test)
    return out


def summarize(values) -> str:
    """Format accuracies over seeds (fractions) as 'mean ± sd' in percent, e.g. '95.3 ± 0.4'."""
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.1f}"
