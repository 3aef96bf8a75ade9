"""Chapter 3's experiments: internal covariate shift, the 2015 evidence and the 2018 rebuttal.

Every experiment trains a small *ensemble* of MLPs at once with the course's ensemble trainer,
``normlab.runtime.ensemble``: K independent networks (members) that share an architecture but differ in
seed, learning rate, initial weight scale, whether they use batch norm (BN) and whether they add
Santurkar et al.'s time-varying noise after it. One batched matrix product runs all of them; no
operation mixes members, so a member that diverges never touches the others. This is what makes
eight seeds and whole learning-rate sweeps fit in the quick budget on two CPU cores.

BN is ``torch.nn.BatchNorm1d`` folded into channels by ``normlab.runtime.ensemble.Folded`` (Chapter 2
showed that ``normlab.nn.BatchNorm1d`` computes the same, and torch's fused kernel is faster on a
CPU). The lab notebook ``chapters/covariate_shift/lab.ipynb`` calls these functions and asserts
what the chapter claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab._validate import check_positive_int, is_int
from normlab.experiments import BATCH_ORDER, NOISE_STREAM, seeds_for
from normlab.runtime import ensemble
from normlab.runtime.data import Split
from normlab.stats import batch_norm_layers

__all__ = [
    "seeds_for",
    "NOISE",
    "block_growth",
    "ACTIVATIONS",
    "Run",
    "time_varying_noise",
    "train_ensemble",
    "ics",
    "smoothness",
    "drift_ratio",
    "run_drift",
    "steps_to_target",
    "budget",
    "fig1_experiment",
    "lr_sweep",
    "init_sweep",
    "largest_rate",
    "fastest_steps",
    "lr_sweep_variants",
    "noisy_bn_experiment",
    "residual_signal",
]

# Santurkar et al.'s noise: per step mu_t ~ U(-0.5, 0.5), sigma_t ~ U(1, 1.25); per element
# m ~ U(mu_t - 0.1, mu_t + 0.1) and s ~ N(sigma_t, 0.1); the activation a becomes s * a + m.
NOISE = {"mu": (-0.5, 0.5), "sigma": (1.0, 1.25), "m_halfwidth": 0.1, "s_std": 0.1}
ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}


def _check_scale(scale):
    if scale not in ("quick", "full"):
        raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")


# --------------------------------------------------------------------------------------------
# Noise and BN
# --------------------------------------------------------------------------------------------


def time_varying_noise(a, mu_t, sigma_t, generator=None):
    """Return s * a + m with per-element m ~ U(mu_t - 0.1, mu_t + 0.1) and s ~ N(sigma_t, 0.1).

    a: (..., N, D). mu_t, sigma_t: floats or tensors that broadcast against a (one draw per step,
    and per member in an ensemble). The output has the shape of a.
    """
    h, s_std = NOISE["m_halfwidth"], NOISE["s_std"]
    # drawn on the CPU (the generator's device), then moved to a's
    m = mu_t + (h * (2 * torch.rand(a.shape, generator=generator, dtype=a.dtype) - 1)).to(a.device)
    s = sigma_t + (s_std * torch.randn(a.shape, generator=generator, dtype=a.dtype)).to(a.device)
    return s * a + m


def _draw_step_noise(shape, generator=None, dtype=torch.float32):
    """Draw this step's (mu_t, sigma_t), each of ``shape``."""
    (mu_lo, mu_hi), (s_lo, s_hi) = NOISE["mu"], NOISE["sigma"]
    mu_t = mu_lo + (mu_hi - mu_lo) * torch.rand(shape, generator=generator, dtype=dtype)
    sigma_t = s_lo + (s_hi - s_lo) * torch.rand(shape, generator=generator, dtype=dtype)
    return mu_t, sigma_t


class _StepNoise(nn.Module):
    """Santurkar et al.'s noise on (K, N, D), in training mode: per member a new (mu_t, sigma_t) each call."""

    def __init__(self, generator):
        super().__init__()
        self.generator, self.enabled = generator, True

    def forward(self, z):
        if not (self.training and self.enabled):
            return z
        mu_t, sigma_t = (t.to(z.device) for t in _draw_step_noise((z.shape[0], 1, 1), self.generator))
        return time_varying_noise(z, mu_t, sigma_t, self.generator)


class _Probe(nn.Module):
    """Identity; when ``record`` is a list, appends the first ``units`` features of its input."""

    def __init__(self):
        super().__init__()
        self.record, self.units = None, 0

    def forward(self, z):
        if self.record is not None:
            self.record.append(z.detach()[:, :, : self.units])
        return z


# --------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What ``train_ensemble`` recorded for its K members.

    eval_step: (E,) steps at which test accuracy was measured; test_acc: (K, E).
    train_loss: (K, T) per-step training loss. probe_step: (P,); pct: (K, P, 3, U) the 15/50/85th
    percentiles of U units' pre-activations in the probed layer over the probe batch.
    ics: {step: {"rel": (K, L-1), "cos": (K, L-1)}} for layers 2..L. smooth: {step: {"loss_var":
    (K,), "grad_change": (K,)}}.
    """

    eval_step: np.ndarray
    test_acc: np.ndarray
    train_loss: np.ndarray
    probe_step: np.ndarray
    pct: np.ndarray
    ics: dict = field(default_factory=dict)
    smooth: dict = field(default_factory=dict)


def _members(values, name, k):
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(k).clone()
    if t.numel() != k:
        raise ValueError(f"{name} has {t.numel()} entries, expected 1 or {k} (one per member)")
    return t


def _linear(gens, d_in, d_out, scales):
    """An ensemble Linear: member k's weights ~ N(0, scales[k]^2 / d_in) from gens[k], zero biases."""
    W = torch.stack([torch.randn(d_in, d_out, generator=g) * float(scales[k]) / math.sqrt(d_in)
                     for k, g in enumerate(gens)])  # (K, d_in, d_out)
    return ensemble.Linear(W, torch.zeros(len(gens), 1, d_out))


def _build(sizes, act, use_bn, use_noise, init_scale, seeds, noise_gen, scale_output=True):
    """The stacked MLP: Linear -> (BN) -> (noise) -> probe -> activation per hidden layer, Linear on top.

    Each member's weights ~ N(0, init_scale^2 / fan_in), drawn layer by layer from its own seed;
    with ``scale_output=False`` the output layer's are ~ N(0, 1 / fan_in) whatever init_scale says.
    """
    K = len(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(_linear(gens, d_in, d_out, [1.0] * K if last and not scale_output else init_scale))
        if last:
            break
        if use_bn:
            layers.append(ensemble.Folded(nn.BatchNorm1d(K * d_out), K))
        if use_noise:
            layers.append(_StepNoise(noise_gen))  # after BN, or where BN would be
        layers += [_Probe(), {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[act]()]
    return ensemble.Ensemble(*layers, members=K)


class _Residual(nn.Module):
    """x + body(x) on (K, N, D): the skip connection of a residual block."""

    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


def _build_residual(sizes, use_bn, init_scale, seeds, blocks):
    """A pre-activation residual MLP (He et al. 2016) of ``blocks`` blocks, width sizes[1].

    Linear(D, w), then per block x + Linear((BN) ReLU Linear((BN) ReLU x)), then (BN) ReLU and
    Linear(w, C). Weights as in ``_build``: ~ N(0, init_scale^2 / fan_in), the output layer's at
    scale 1, drawn layer by layer from each member's seed.
    """
    (d_in, width, classes), K = sizes, len(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def linear(a, b, last=False):
        return _linear(gens, a, b, [1.0] * K if last else init_scale)

    def act():
        bn = [ensemble.Folded(nn.BatchNorm1d(K * width), K)] if use_bn else []
        return [*bn, nn.ReLU()]

    layers = [linear(d_in, width)]
    for _ in range(blocks):
        layers.append(_Residual(*act(), linear(width, width), *act(), linear(width, width)))
    return ensemble.Ensemble(*layers, *act(), linear(width, classes, last=True), members=K)


def _blocks(net):
    """Map each parameter name to its layer's index (a layer: a Linear and the BN that follows it)."""
    out, block = {}, -1
    for name, module in net.named_children():
        if isinstance(module, ensemble.Linear):
            block += 1
        for pname, _ in module.named_parameters():
            out[f"{name}.{pname}"] = block
    return out


class _Clean:
    """Within this context the net runs with batch statistics (training mode) but no noise, and keeps its
    running statistics: how the ICS and smoothness measurements see it."""

    def __init__(self, net, noise=False):
        self.net, self.noise = net, noise

    def __enter__(self):
        self.norms = batch_norm_layers(self.net)
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.norms]
        self.was = self.net.training
        self.net.train()
        for m in self.net.modules():
            if isinstance(m, _StepNoise):
                m.enabled = self.noise
        return self.net

    def __exit__(self, *exc):
        for m, (mean, var, count) in zip(self.norms, self.saved):
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
        for m in self.net.modules():
            if isinstance(m, _StepNoise):
                m.enabled = True
        self.net.train(self.was)


def _grads(net, params, x, y):
    """Per-member loss (K,) and the gradient of each parameter, at ``params`` (a name -> tensor dict)."""
    with _Clean(net):  # backward inside too: restoring the running statistics is an in-place change
        loss = ensemble.member_loss(torch.func.functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss.sum(), list(params.values()), materialize_grads=True)
    return loss.detach(), dict(zip(params, grads))


def _step(t, g, lr):
    """t - lr * g with one rate per member: lr (K,), t and g with the members on the leading axis."""
    K = lr.shape[0]
    return (t.view(K, -1) - lr.view(K, 1) * g.view(K, -1)).view_as(t)


def _leaves(params):
    return {k: t.detach().requires_grad_() for k, t in params.items()}


def ics(net, x, y, lr, step_norm=None):
    """Return {"rel": (K, L-1), "cos": (K, L-1)}: G vs G' for the weights of layers 2..L.

    For every member of the ensemble ``net`` at once (x (K, N, D), y (K, N), lr (K,)). The lab
    writes the same measurement for one ``nn.Sequential`` and checks that the two agree.

    G' is layer i's gradient after layers 1..i-1 take their SGD step, -lr * g. With ``step_norm``
    also "rel_eq" and "cos_eq": the same after a step along -g of l2 norm ``step_norm`` (over all
    parameters of layers 1..i-1, per member), so every network's earlier layers move equally far.
    """
    params = _leaves(dict(net.named_parameters()))
    blocks = _blocks(net)
    _, grads = _grads(net, params, x, y)
    weights = [k for k in params if isinstance(net.get_submodule(k.rsplit(".", 1)[0]), ensemble.Linear)
               and k.endswith("weight")]
    K = lr.shape[0]
    rates = {"": lambda i: lr}
    if step_norm is not None:
        def equal(i):  # the rate at which layers < i move step_norm
            norm = torch.sqrt(sum((grads[k].reshape(K, -1) ** 2).sum(1) for k in params if blocks[k] < i))
            return step_norm / norm
        rates["_eq"] = equal
    out = {}
    for suffix, rate in rates.items():
        rel, cos = [], []
        for i in range(1, len(weights)):
            G = grads[weights[i]].flatten(1)  # (K, d_in * d_out): layer i's weight gradient
            r = rate(i)
            moved = {k: _step(t, grads[k], r) if blocks[k] < i else t for k, t in params.items()}  # layers < i
            _, grads2 = _grads(net, _leaves(moved), x, y)
            G2 = grads2[weights[i]].flatten(1)
            rel.append((G - G2).norm(dim=1) / G.norm(dim=1))
            cos.append(F.cosine_similarity(G, G2, dim=1))
        out["rel" + suffix] = torch.stack(rel, 1).cpu().numpy()
        out["cos" + suffix] = torch.stack(cos, 1).cpu().numpy()
    return out


def smoothness(net, x, y, lr, multipliers):
    """Santurkar et al.'s three measures along the gradient g, at steps lr * multipliers from the weights.

    For every member of the ensemble ``net`` at once; the lab writes them for one ``nn.Sequential``
    and checks that the two agree.

    loss_var: the largest minus the smallest loss seen, the start included (variation of the loss);
    grad_change: the largest l2 distance of a moved point's gradient from g (gradient
    predictiveness); beta: the largest such distance divided by the distance moved,
    lr * multiplier * ||g|| (effective beta-smoothness). Each is (K,).
    """
    params = _leaves(dict(net.named_parameters()))
    loss0, g0 = _grads(net, params, x, y)
    losses, changes = [loss0], []
    K = lr.shape[0]
    g_norm = torch.sqrt(sum((g.reshape(K, -1) ** 2).sum(1) for g in g0.values()))  # (K,)
    betas = []
    for mult in multipliers:
        moved = _leaves({k: _step(t, g0[k], lr * mult) for k, t in params.items()})
        loss, g = _grads(net, moved, x, y)
        losses.append(loss)
        diff = torch.sqrt(sum(((g[k] - g0[k]).reshape(K, -1) ** 2).sum(1) for k in g0))
        changes.append(diff)
        betas.append(diff / (lr * mult * g_norm))
    losses = torch.stack(losses, 1)  # (K, 1 + len(multipliers))
    loss_var = torch.nan_to_num(losses.max(1).values - losses.min(1).values, nan=float("inf"))
    grad_change = torch.nan_to_num(torch.stack(changes, 1).max(1).values, nan=float("inf"))
    beta = torch.nan_to_num(torch.stack(betas, 1).max(1).values, nan=float("inf"))
    return {"loss_var": loss_var.cpu().numpy(), "grad_change": grad_change.cpu().numpy(), "beta": beta.cpu().numpy()}


def train_ensemble(
    data: Split,
    *,
    seeds,
    use_bn,
    lr,
    steps: int,
    hidden=(100, 100, 100),
    act: str = "sigmoid",
    use_noise=False,
    init_scale=1.0,
    scale_output: bool = True,
    batch_size: int = 60,
    eval_every: int = 25,
    probe_layer: int | None = None,
    probe_units: int = 10,
    check_every: int | None = None,
    smooth_multipliers=(0.5, 1.0, 2.0, 4.0),
    ics_step_norm: float | None = None,
    residual: int = 0,
    progress: bool | None = None,
    device="cpu",
) -> Run:
    """Train K MLPs at once with plain SGD on ``data``; return what they recorded (see ``Run``).

    seeds: K ints (each fixes a member's initial weights and mini-batch order). use_bn, use_noise,
    lr, init_scale: one value for all members or one per member. scale_output: whether init_scale
    applies to the output layer too (False: it starts at scale 1 in every member). probe_layer: index of the hidden
    layer whose pre-activations (after BN and noise) are recorded, on the test inputs, at each
    evaluation. check_every: measure ICS and smoothness every that many steps (None: never).
    ics_step_norm: also measure ICS after a step of that l2 norm (see ``ics``; None: do not).
    residual: that many pre-activation residual blocks of width hidden[0] (see
    ``_build_residual``; hidden then names one width, act must be "relu", and there is no probe,
    noise or ICS); 0: the plain stack of ``hidden`` layers.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one member")
    K = len(seeds)
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("eval_every", eval_every)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if not hidden or any(not is_int(h) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty tuple of positive ints, got {hidden!r}")
    if ics_step_norm is not None and not ics_step_norm > 0:
        raise ValueError(f"ics_step_norm must be positive or None, got {ics_step_norm!r}")
    if probe_layer is not None and not 0 <= probe_layer < len(hidden):
        raise ValueError(f"probe_layer must be in [0, {len(hidden)}) or None, got {probe_layer!r}")
    if not is_int(residual) or residual < 0:
        raise ValueError(f"residual must be a non-negative int (blocks), got {residual!r}")
    if residual and (len(hidden) != 1 or act != "relu" or probe_layer is not None or check_every):
        raise ValueError("a residual network takes one width in hidden, act='relu', no probe_layer and no "
                         f"check_every; got hidden={hidden!r}, act={act!r}, probe_layer={probe_layer!r}, "
                         f"check_every={check_every!r}")
    n = len(data.x_train)
    if batch_size > n:
        raise ValueError(f"batch_size must be <= {n} (the training set size), got {batch_size}")
    lr = _members(lr, "lr", K)
    if not (lr > 0).all():
        raise ValueError(f"every lr must be positive, got {lr.tolist()}")
    init_scale = _members(init_scale, "init_scale", K)
    if not (init_scale > 0).all():
        raise ValueError(f"every init_scale must be positive, got {init_scale.tolist()}")
    use_bn = _members(use_bn, "use_bn", K).bool()
    use_noise = _members(use_noise, "use_noise", K).bool()
    if residual and use_noise.any():
        raise ValueError("a residual network takes no noise (use_noise must be False)")

    data = data.to(device)

    # Saturated sigmoids and vanishing gradients make subnormal floats, which slow CPU arithmetic
    # by up to 100x; flushing them to zero changes no result that matters and keeps runs in budget.
    torch.set_flush_denormal(True)
    try:
        # Members with and without BN (or noise) train as separate stacks: one stack computing both
        # branches and keeping one would do, and differentiate, twice the work.
        kinds = sorted({(bool(b), bool(z)) for b, z in zip(use_bn, use_noise)})
        same_for_all = dict(scale_output=scale_output, steps=steps, hidden=hidden, act=act, batch_size=batch_size,
                            eval_every=eval_every, probe_layer=probe_layer, probe_units=probe_units,
                            check_every=check_every, smooth_multipliers=smooth_multipliers,
                            ics_step_norm=ics_step_norm, residual=residual, progress=progress, device=device)
        runs, order = [], []
        for b, z in kinds:
            idx = [k for k in range(K) if (bool(use_bn[k]), bool(use_noise[k])) == (b, z)]
            runs.append(_train_ensemble(data, [seeds[k] for k in idx], use_bn=b, use_noise=z, lr=lr[idx],
                                        init_scale=init_scale[idx], **same_for_all))
            order += idx
        return _merge_runs(runs, np.argsort(order))
    finally:
        torch.set_flush_denormal(False)  # torch's default


def _merge_runs(runs, index):
    """Stack the members of several Runs (same steps) and put them in the order ``index`` gives."""
    def cat(arrays):
        return np.concatenate(arrays, 0)[index]

    first = runs[0]
    return Run(
        eval_step=first.eval_step,
        test_acc=cat([r.test_acc for r in runs]),
        train_loss=cat([r.train_loss for r in runs]),
        probe_step=first.probe_step,
        pct=cat([r.pct for r in runs]),
        ics={s: {k: cat([r.ics[s][k] for r in runs]) for k in d} for s, d in first.ics.items()},
        smooth={s: {k: cat([r.smooth[s][k] for r in runs]) for k in d} for s, d in first.smooth.items()},
    )


def _train_ensemble(data, seeds, *, use_bn, use_noise, lr, init_scale, scale_output, steps, hidden, act,
                    batch_size, eval_every, probe_layer, probe_units, check_every, smooth_multipliers,
                    ics_step_norm, residual, progress, device):
    """Train one stack of members that agree on BN and noise (use_bn, use_noise: bools) on ``device``,
    where ``data`` already is. lr, init_scale: (K,) per member; the rest as ``train_ensemble``'s."""
    K, n = len(seeds), len(data.x_train)
    sizes = [data.num_features, *hidden, data.num_classes]
    noise_gen = torch.Generator().manual_seed(seeds[0] + NOISE_STREAM)
    if residual:
        net = _build_residual(sizes, use_bn, init_scale, seeds, residual)
    else:
        net = _build(sizes, act, use_bn, use_noise, init_scale, seeds, noise_gen, scale_output)
    net = net.to(device)
    lr_on_device = lr.to(device)  # the ICS and smoothness measurements' steps
    probes = [m for m in net if isinstance(m, _Probe)]
    gens = [torch.Generator().manual_seed(s + BATCH_ORDER) for s in seeds]  # mini-batch order per member
    batches = [torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in gens]) for _ in range(steps)]
    eval_step, accs, probe_step, pcts = [], [], [], []
    ics_at, smooth_at = {}, {}  # {step: measures}
    q = torch.tensor([0.15, 0.5, 0.85], device=device)

    @torch.no_grad()
    def evaluate(step):
        net.eval()
        logits = ensemble.eval_logits(net, data.x_test)  # (K, N_test, C)
        accs.append((logits.argmax(-1) == data.y_test).float().mean(1).cpu().numpy())
        eval_step.append(step)
        if probe_layer is not None:
            probe = probes[probe_layer]
            probe.record, probe.units = [], probe_units
            with _Clean(net, noise=True):  # batch statistics and noise, the running statistics kept
                net(data.x_test)
            pcts.append(torch.quantile(probe.record[0], q, dim=1).permute(1, 0, 2).cpu().numpy())  # (K, 3, U)
            probe.record = None
            probe_step.append(step)
        net.train()

    def before_step(step):
        if check_every and (step == 1 or step % check_every == 0):
            idx = batches[step - 1]
            x, y = data.x_train[idx], data.y_train[idx]  # (K, B, D), (K, B)
            ics_at[step] = ics(net, x, y, lr_on_device, ics_step_norm)
            smooth_at[step] = smoothness(net, x, y, lr_on_device, smooth_multipliers)

    def after_step(step, loss):
        if step % eval_every == 0 or step == steps:
            evaluate(step)

    evaluate(0)
    losses = ensemble.fit(net, data, lr=lr, batches=batches, momentum=0.0, before_step=before_step,
                          after_step=after_step, progress=progress)
    return Run(
        eval_step=np.array(eval_step),
        test_acc=np.stack(accs, 1),
        train_loss=losses,
        probe_step=np.array(probe_step),
        pct=np.stack(pcts, 1) if pcts else np.zeros((K, 0, 3, 0)),
        ics=ics_at,
        smooth=smooth_at,
    )


# --------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------


def drift_ratio(p15, p50, p85):
    """Return the drift of the median relative to the spread: (max p50 - min p50) / mean(p85 - p15).

    p15, p50, p85: (T, ...) percentiles over T recorded steps; the ratio is taken over axis 0.
    """
    p15, p50, p85 = (np.asarray(p, dtype=np.float64) for p in (p15, p50, p85))
    if not p15.shape == p50.shape == p85.shape:
        raise ValueError(f"percentiles have shapes {p15.shape}, {p50.shape}, {p85.shape}; expected equal")
    if p50.ndim < 1 or p50.shape[0] < 2:
        raise ValueError(f"need at least 2 recorded steps along axis 0, got shape {p50.shape}")
    return (p50.max(0) - p50.min(0)) / (p85 - p15).mean(0)


def run_drift(run):
    """Return each member's drift ratio, the median over the probed units: (K,)."""
    if run.pct.shape[1] < 2:
        raise ValueError("the run recorded fewer than 2 probes; pass probe_layer to train_ensemble")
    p15, p50, p85 = np.moveaxis(run.pct, 2, 0)  # each (K, P, U)
    ratios = drift_ratio(*(np.swapaxes(p, 0, 1) for p in (p15, p50, p85)))  # (K, U)
    return np.median(ratios, axis=1)


def largest_rate(lrs, steps):
    """Per seed, the largest rate whose run reached the target; the smallest rate where none did.

    lrs: (rates,); steps: (rates, seeds) from ``steps_to_target`` (inf: never reached). Counting a
    seed that never got there as the smallest rate makes a ratio against it a lower bound.
    """
    lrs, steps = np.asarray(lrs, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    if steps.ndim != 2 or steps.shape[0] != lrs.shape[0]:
        raise ValueError(f"steps must be (rates, seeds) with {lrs.shape[0]} rates, got {steps.shape}")
    reached = np.isfinite(steps)
    return np.where(reached.any(0), np.where(reached, lrs[:, None], -np.inf).max(0), lrs.min())


def fastest_steps(steps, budget):
    """Per seed, the steps to the target at the fastest rate; ``budget`` where no rate reached it.

    steps: (rates, seeds) from ``steps_to_target`` (inf: never reached). Counting a seed that
    never got there as the budget makes a ratio against it a lower bound.
    """
    steps = np.asarray(steps, dtype=np.float64)
    if steps.ndim != 2:
        raise ValueError(f"steps must be (rates, seeds), got shape {steps.shape}")
    return np.where(np.isfinite(steps).any(0), steps.min(0), float(budget))


def steps_to_target(eval_step, test_acc, target):
    """Return the first step at which test_acc reaches target, per member (inf where never).

    eval_step: (E,); test_acc: (..., E).
    """
    eval_step = np.asarray(eval_step, dtype=np.float64)
    test_acc = np.asarray(test_acc)
    if test_acc.shape[-1] != eval_step.shape[0]:
        raise ValueError(f"test_acc has {test_acc.shape[-1]} evaluations, eval_step {eval_step.shape[0]}")
    hit = test_acc >= target
    first = np.where(hit.any(-1), eval_step[hit.argmax(-1)], np.inf)
    return first


def budget(scale="quick"):
    """Return the step counts and seeds per experiment for a scale ('quick' or 'full')."""
    _check_scale(scale)
    # 8 seeds: the fewest on which a paired comparison's interval means something (t = 2.36).
    if scale == "quick":
        return {"seeds": 8, "fig1": 600, "lr": 300, "init": 300, "noisy": 400, "check_every": 100}
    return {"seeds": 12, "fig1": 3000, "lr": 1000, "init": 1000, "noisy": 2000, "check_every": 250}


# --------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------


def _positive_values(values, name, what):
    """Return ``values`` as a list of floats; raise unless there is one at least and all are positive."""
    values = [float(v) for v in values]
    if not values or min(values) <= 0:
        raise ValueError(f"{name} must be a non-empty list of positive {what}, got {values!r}")
    return values


def _bn_and_plain(values, seeds):
    """The members of a sweep: each value with each seed, first with BN, then the same without.

    Returns (seeds, use_bn, values), one entry per member, for ``train_ensemble``.
    """
    per_value = [v for v in values for _ in seeds]
    n = len(per_value)
    return seeds * len(values) * 2, [1] * n + [0] * n, per_value * 2


def fig1_experiment(data, *, seed=0, n_seeds=3, steps=1500, lr=0.5, eval_every=25, progress=None, device="cpu"):
    """Train the sigmoid MLP of Fig. 1 with and without BN at one learning rate; return (bn, plain).

    Each is a ``Run`` of n_seeds members; the probe records 10 units of the last hidden layer.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    seeds = seeds_for(seed, n_seeds)
    common = dict(steps=steps, lr=lr, act="sigmoid", batch_size=60, eval_every=eval_every, probe_layer=2,
                  progress=progress, device=device)
    run = train_ensemble(data, seeds=seeds * 2, use_bn=[1] * n_seeds + [0] * n_seeds, **common)
    return _split_run(run, 2)


def _split_run(run, groups):
    """Split a Run whose members are ``groups`` consecutive equal blocks into one Run per block."""
    K = run.test_acc.shape[0]
    size = K // groups
    out = []
    for g in range(groups):
        sl = slice(g * size, (g + 1) * size)
        out.append(
            Run(
                eval_step=run.eval_step,
                test_acc=run.test_acc[sl],
                train_loss=run.train_loss[sl],
                probe_step=run.probe_step,
                pct=run.pct[sl],
                ics={s: {k: v[sl] for k, v in d.items()} for s, d in run.ics.items()},
                smooth={s: {k: v[sl] for k, v in d.items()} for s, d in run.smooth.items()},
            )
        )
    return out


def lr_sweep(data, lrs, *, seed=0, n_seeds=3, steps=400, hidden=(100, 100, 100), act="relu", eval_every=10,
             progress=None, device="cpu"):
    """Train with and without BN at each learning rate; return (bn, plain) test accuracy curves.

    Each is an array (len(lrs), n_seeds, E) of test accuracies, plus the eval steps: (acc_bn,
    acc_plain, eval_step).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    lrs = _positive_values(lrs, "lrs", "rates")
    members, use_bn, members_lr = _bn_and_plain(lrs, seeds_for(seed, n_seeds))
    run = train_ensemble(data, seeds=members, use_bn=use_bn, lr=members_lr, steps=steps, hidden=hidden,
                         act=act, eval_every=eval_every, progress=progress, device=device)
    acc = np.nan_to_num(run.test_acc).reshape(2, len(lrs), n_seeds, -1)
    return acc[0], acc[1], run.eval_step


def lr_sweep_variants(data, lrs, variants, *, seed=0, n_seeds=3, steps=400, hidden=(100, 100, 100), act="relu",
                      eval_every=10, residual=0, progress=None, device="cpu"):
    """Train every variant at each learning rate; return ({name: test accuracy curves}, eval steps).

    variants: name -> (use_bn, init_scale), the scale of the hidden layers' initial weights (the
    output layer starts at scale 1), e.g. {"plain_he": (False, 2 ** 0.5)} for He initialization of
    a ReLU network. Each curve array is (len(lrs), n_seeds, E); every variant gets the same seeds.
    residual: that many residual blocks of width hidden[0] instead of the plain stack (see
    ``train_ensemble``).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    lrs = _positive_values(lrs, "lrs", "rates")
    if not variants:
        raise ValueError("variants must name at least one (use_bn, init_scale) pair")
    seeds = seeds_for(seed, n_seeds)
    L, V = len(lrs), len(variants)
    cells = [(b, s, v) for b, s in variants.values() for v in lrs for _ in seeds]  # variant, rate, seed
    run = train_ensemble(data, seeds=seeds * L * V, use_bn=[c[0] for c in cells], init_scale=[c[1] for c in cells],
                         scale_output=False, lr=[c[2] for c in cells], steps=steps, hidden=hidden, act=act,
                         eval_every=eval_every, residual=residual, progress=progress, device=device)
    acc = np.nan_to_num(run.test_acc).reshape(V, L, n_seeds, -1)
    return dict(zip(variants, acc)), run.eval_step


def init_sweep(data, scales, *, seed=0, n_seeds=3, steps=400, lr=0.1, hidden=(100, 100, 100), act="relu",
               scale_output=False, progress=None, device="cpu"):
    """Train with and without BN from each initial weight scale; return final accuracies (bn, plain).

    The hidden layers' weights start ~ N(0, scale^2 / fan_in); the output layer's, which no BN
    follows, at scale 1 unless ``scale_output`` (then a large scale also inflates the logits and
    saturates the softmax, with or without BN). Each result is (len(scales), n_seeds).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    scales = _positive_values(scales, "scales", "numbers")
    members, use_bn, init = _bn_and_plain(scales, seeds_for(seed, n_seeds))
    run = train_ensemble(data, seeds=members, use_bn=use_bn, lr=lr, init_scale=init,
                         scale_output=scale_output, steps=steps, hidden=hidden, act=act, eval_every=steps,
                         progress=progress, device=device)
    acc = np.nan_to_num(run.test_acc[:, -1]).reshape(2, len(scales), n_seeds)
    return acc[0], acc[1]


def block_growth(scale):
    """The factor g(s) = 1 + s**4 / 4 by which a plain pre-activation residual block
    x + W2 relu(W1 relu(x)) multiplies the mean square of x at initialization (weights of
    variance s**2 / fan_in): the reference for lab_residual's exercise."""
    return 1 + scale**4 / 4


@torch.no_grad()
def residual_signal(data, init_scales, *, seed=0, n_seeds=3, blocks=3, width=100, device="cpu"):
    """The mean square of a residual MLP's signal at initialization, without BN.

    For each initial scale (see ``_build_residual``) and seed: the mean square over the training
    inputs and the units of x after the first Linear and after each residual block. Returns an
    array (len(init_scales), n_seeds, blocks + 1).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    scales = [float(v) for v in init_scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"init_scales must be a non-empty list of positive numbers, got {init_scales!r}")
    check_positive_int("blocks", blocks)
    check_positive_int("width", width)
    seeds = seeds_for(seed, n_seeds)
    init = torch.tensor([v for v in scales for _ in seeds])
    data = data.to(device)
    net = _build_residual([data.num_features, width, data.num_classes], False, init, seeds * len(scales), blocks)
    net = net.to(device)
    z = net[0](data.x_train.expand(len(init), *data.x_train.shape))
    out = [(z**2).mean((1, 2))]
    for block in list(net)[1 : blocks + 1]:
        z = block(z)
        out.append((z**2).mean((1, 2)))
    return torch.stack(out, 1).reshape(len(scales), n_seeds, blocks + 1).cpu().numpy()


VARIANTS = ("bn", "noisy_bn", "plain", "noisy_plain")
# name -> (BN, noise after each BN or where it would be, scale of the hidden layers' initial weights)
NOISY_NETS = {
    "bn": (True, False, 1.0),
    "noisy_bn": (True, True, 1.0),
    "plain": (False, False, 1.0),
    "noisy_plain": (False, True, 1.0),
    "plain_he": (False, False, 2**0.5),  # He et al.'s init for ReLU: the signal keeps its scale per layer
}


def noisy_bn_experiment(data, *, seed=0, n_seeds=3, steps=600, lr=0.1, hidden=(64,) * 6, batch_size=128,
                        eval_every=20, check_every=None, ics_step_norm=None, variants=VARIANTS, progress=None,
                        device="cpu"):
    """Train standard, BN, noisy-BN and noisy-standard ReLU MLPs; return {variant: Run}.

    variants: names from ``NOISY_NETS`` ("plain_he" adds a He-initialized standard network; every
    other network starts at LeCun's scale, N(0, 1 / fan_in)). The probe records the last hidden
    layer (after BN and noise). check_every: also measure ICS and smoothness every that many
    steps; ics_step_norm: the l2 norm of the equal-length step for ICS (see ``ics``).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    unknown = [v for v in variants if v not in NOISY_NETS]
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty list from {sorted(NOISY_NETS)}, got {list(variants)!r}")
    seeds = seeds_for(seed, n_seeds)
    nets = [NOISY_NETS[v] for v in variants for _ in seeds]
    run = train_ensemble(
        data, seeds=seeds * len(variants), use_bn=[n[0] for n in nets], use_noise=[n[1] for n in nets],
        init_scale=[n[2] for n in nets], scale_output=False, lr=lr, steps=steps, hidden=hidden, act="relu",
        batch_size=batch_size, eval_every=eval_every, probe_layer=len(hidden) - 1, check_every=check_every,
        ics_step_norm=ics_step_norm, progress=progress, device=device,
    )
    return dict(zip(variants, _split_run(run, len(variants))))
