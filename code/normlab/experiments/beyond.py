"""Chapter 10's experiments: what BN does to a deep network, and what trains one without it.

The diagnostics lab (``chapters/beyond/lab_diagnostics.ipynb``) builds deep MLPs on the 8x8
digits (``make_deep_mlp``), looks at their activations and gradients at initialization
(``propagation``), follows their update:data ratios through training (``update_ratios``), and
repeats CS231n's sweep of the initial weight scale with every layer scaled (``init_sweep``). The
measurements themselves use ``normlab.runtime.diagnostics``.

The normalizer-free lab (``chapters/beyond/lab_normfree.ipynb``) builds one deep residual MLP
kept trainable six ways (``make_resnet``, ``METHODS``), measures what each block adds at
initialization (``residual_signal``, against De & Smith's prediction ``bn_share``), and trains
every method's seeds and rates as one ensemble (``stack_resnets``, ``clip_members_``,
``fit_resnets``).

The transformer lab (``chapters/beyond/lab_transformer.ipynb``) reads the digits row by row with a
tiny transformer (``TinyTransformer``) whose per-token norm is LayerNorm, ``RMSNorm`` or DyT,
placed before each sublayer or after it (``TransformerBlock``); ``init_gradients`` measures Xiong
et al.'s gradients at initialization and ``fit_transformers`` trains the seeds as one
``StackedTransformer``.
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

__all__ = ["ACTIVATIONS", "GAINS", "INITS", "NETS", "METHODS", "NF_ALPHA", "GN_GROUPS", "budget", "seeds_for",
           "make_deep_mlp", "propagation", "update_ratios", "init_sweep", "bn_output_std", "Block", "ResidualMLP",
           "make_resnet", "stack_resnets", "clip_members_", "fit_resnets", "residual_signal", "bn_share",
           "TOKEN_NORMS", "PLACES", "RMSNorm", "make_token_norm", "SelfAttention", "TransformerBlock",
           "TinyTransformer", "StackedTransformer", "fit_transformers", "init_gradients"]

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
                "sweep_steps": 150, "res_blocks": 12, "res_width": 32, "res_steps": 150, "tr_layers": 2,
                "tr_width": 32, "tr_steps": 300, "tr_init_layers": 6}
    if scale == "full":
        return {"seeds": 20, "depth": 20, "width": 128, "train_steps": 1000, "sweep_depth": 7, "sweep_width": 100,
                "sweep_steps": 1000, "res_blocks": 24, "res_width": 64, "res_steps": 1000, "tr_layers": 4,
                "tr_width": 64, "tr_steps": 2000, "tr_init_layers": 12}
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


# The residual network of lab_normfree: one architecture, six ways to keep it trainable
# --------------------------------------------------------------------------------------------

# name -> what keeps the network trainable (the lab's legend)
METHODS = {
    "bn": "BN",
    "none": "no normalization",
    "skipinit": "SkipInit",
    "fixup": "Fixup",
    "ws_gn": "WS + GroupNorm",
    "nf": "NF + AGC",
}
NF_ALPHA = 0.2  # NF-ResNets' branch scale (Brock et al. 2021a)
GN_GROUPS = 4  # GroupNorm's groups in ws_gn (width 32: 8 units a group)


class Block(nn.Module):
    """x + scale * branch(x / beta): a pre-activation residual block.

    beta divides the branch's input only (NF-ResNets: the expected standard deviation of x), and
    scale multiplies its output (NF-ResNets' alpha); both are 1 for the other methods.
    """

    def __init__(self, branch: nn.Module, beta: float = 1.0, scale: float = 1.0):
        super().__init__()
        self.branch, self.beta, self.scale = branch, beta, scale

    def forward(self, x):
        return x + self.scale * self.branch(x / self.beta)

    def extra_repr(self):
        return f"beta={self.beta:.4g}, scale={self.scale:g}"


class ResidualMLP(nn.Module):
    """stem -> ``blocks`` residual blocks -> head: a residual MLP of 2 * blocks + 2 weight layers."""

    def __init__(self, stem: nn.Module, blocks, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_resnet(num_features: int, num_classes: int, *, method: str, blocks: int = 16, width: int = 32,
                seed: int = 0) -> ResidualMLP:
    """Return the lab's residual MLP, kept trainable by ``method`` (a key of ``METHODS``).

    Every method shares the layout stem Linear(D, width) -> ``blocks`` pre-activation blocks
    x + W2 act(norm(W1 act(norm(x)))) -> act(norm) -> Linear(width, C), and the initialization:
    weights N(0, 2 / fan-in) (He et al.), the head's N(0, 1 / fan-in), zero biases, drawn from
    ``seed``. What differs:

    - ``bn``: norm is BatchNorm1d; ``none``: no norm at all.
    - ``skipinit``: no norm, each branch times a learnable scalar that starts at 0 (De & Smith 2020).
    - ``fixup``: no norm; scalar biases before each linear layer and activation, a scalar
      multiplier (init 1) at each branch's end, the branches re-initialized by
      ``normlab.normfree.fixup_init_`` and the head at zero (Zhang et al. 2019).
    - ``ws_gn``: weight-standardized linear layers with GroupNorm (``GN_GROUPS`` groups).
    - ``nf``: NF-ResNets' block x + alpha * f(x / beta_l), beta_l^2 = 1 + l alpha^2 the expected
      variance of x_l, with scaled weight standardization (Brock et al. 2021a); train it with
      ``normlab.normfree.adaptive_grad_clip_`` (``fit_resnets`` does).
    """
    from normlab import normfree

    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    check_positive_int("blocks", blocks)
    check_positive_int("width", width)
    torch.manual_seed(seed)
    relu_gain = normfree.nonlinearity_gain("relu")

    def linear(a, b, bias=True):
        if method == "ws_gn":
            return normfree.WSLinear(a, b, bias=bias)
        if method == "nf":
            return normfree.ScaledWSLinear(a, b, bias=bias, gamma=relu_gain if a == width else 1.0)
        return nn.Linear(a, b, bias=bias)

    def norm():
        if method == "bn":
            return [nn.BatchNorm1d(width)]
        if method == "ws_gn":
            return [nn.GroupNorm(GN_GROUPS, width)]
        return []

    def branch():
        if method == "fixup":
            return nn.Sequential(normfree.Bias(), nn.ReLU(), normfree.Bias(), nn.Linear(width, width, bias=False),
                                 normfree.Bias(), nn.ReLU(), normfree.Bias(), nn.Linear(width, width, bias=False),
                                 normfree.Scale(1.0), normfree.Bias())
        layers = [*norm(), nn.ReLU(), linear(width, width), *norm(), nn.ReLU(), linear(width, width)]
        if method == "skipinit":
            layers.append(normfree.Scale(0.0))
        return nn.Sequential(*layers)

    stem = linear(num_features, width)
    if method == "nf":
        body = [Block(branch(), beta=math.sqrt(1 + i * NF_ALPHA**2), scale=NF_ALPHA) for i in range(blocks)]
    else:
        body = [Block(branch()) for _ in range(blocks)]
    head = nn.Sequential(*norm(), nn.ReLU(), nn.Linear(width, num_classes))
    net = ResidualMLP(stem, body, head)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                fan_in = m.in_features
                std = math.sqrt((1.0 if m is head[-1] else 2.0) / fan_in)
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
        if method == "fixup":
            normfree.fixup_init_([b.branch for b in net.blocks])
            head[-1].weight.zero_()
    return net


# The same networks as one ensemble (normlab.runtime.ensemble): member k runs models[k]
# --------------------------------------------------------------------------------------------


class _MemberScalar(nn.Module):
    """K stacked ``normfree.Scale`` or ``normfree.Bias`` layers on (K, N, D): one scalar per member."""

    def __init__(self, values: torch.Tensor, add: bool):
        super().__init__()
        self.value, self.add = nn.Parameter(values.reshape(-1, 1, 1).clone()), add  # (K, 1, 1)

    def forward(self, x):
        return x + self.value if self.add else x * self.value


class _StackedBlock(nn.Module):
    """K stacked ``Block`` modules: x + scale * branch(x / beta) on (K, N, D)."""

    def __init__(self, branch, beta, scale):
        super().__init__()
        self.branch, self.beta, self.scale = branch, beta, scale

    def forward(self, x):
        return x + self.scale * self.branch(x / self.beta)


def _stack_leaf(layers):
    from normlab import normfree

    first, K = layers[0], len(layers)
    if isinstance(first, (normfree.Scale, normfree.Bias)):
        name = "scale" if isinstance(first, normfree.Scale) else "bias"
        return _MemberScalar(torch.stack([getattr(m, name).detach() for m in layers]), add=name == "bias")
    if isinstance(first, nn.Linear):
        weight = torch.stack([m.weight.detach().T for m in layers]).contiguous()  # (K, in, out)
        if first.bias is None:
            bias = torch.zeros(K, 1, first.out_features)
        else:
            bias = torch.stack([m.bias.detach() for m in layers]).unsqueeze(1).clone()
        if isinstance(first, normfree.ScaledWSLinear):
            gain = torch.stack([m.gain.detach() for m in layers]).unsqueeze(1)  # (K, 1, out)
            layer = ensemble.StandardizedLinear(weight, bias, first.eps, gain, first.gamma)
        elif isinstance(first, normfree.WSLinear):
            layer = ensemble.StandardizedLinear(weight, bias, first.eps)
        else:
            layer = ensemble.Linear(weight, bias)
        layer.bias.requires_grad_(first.bias is not None)  # Fixup's layers have no bias: it stays 0
        return layer
    return ensemble._stack_layers(layers, 0)


def _stack_sequential(seqs) -> nn.Sequential:
    return nn.Sequential(*[_stack_leaf([s[i] for s in seqs]) for i in range(len(seqs[0]))])


def stack_resnets(models) -> ensemble.Ensemble:
    """Return one ``normlab.runtime.ensemble.Ensemble`` whose member k computes ``models[k]``.

    models: ``ResidualMLP`` networks of ``make_resnet`` of one method and size (different seeds).
    Every layer runs as a batched layer over the member axis, with the library's own functions
    (the weight standardizations of ``normlab.normfree``); ``tests/test_experiments_beyond.py``
    checks each member against its model.
    """
    models = list(models)
    K = len(models)
    stem = _stack_leaf([m.stem for m in models])
    blocks = [_StackedBlock(_stack_sequential([m.blocks[i].branch for m in models]), b.beta, b.scale)
              for i, b in enumerate(models[0].blocks)]
    head = _stack_sequential([m.head for m in models])
    return ensemble.Ensemble(stem, *blocks, *head, members=K)


@torch.no_grad()
def clip_members_(ens: ensemble.Ensemble, clipping: float, eps: float = 1e-3) -> None:
    """``normlab.normfree.adaptive_grad_clip_`` on every member of ``stack_resnets``' ensemble alone.

    As Brock et al. (2021b), the classifier (the ensemble's last layer) is not clipped. A stacked
    linear weight (K, in, out) holds one unit per (member, column): each is clipped alone; every
    other parameter (K, ...) is clipped as a whole per member, as the unstacked (out,) biases and
    gains are.
    """
    from normlab import normfree

    head = set(map(id, ens[-1].parameters()))
    weights = {id(m.weight) for m in ens.modules() if isinstance(m, ensemble.Linear)}
    for p in ens.parameters():
        if p.grad is None or id(p) in head or not p.requires_grad:
            continue
        columns = id(p) in weights  # (K, in, out): one unit per (member, column)
        w = p.transpose(1, 2).flatten(0, 1) if columns else p.flatten(1)  # (units, values): rows are units
        unit = w.detach().clone()
        unit.grad = (p.grad.transpose(1, 2).flatten(0, 1) if columns else p.grad.flatten(1)).clone()
        normfree.adaptive_grad_clip_([unit], clipping, eps)
        if columns:
            p.grad.copy_(unit.grad.reshape(p.shape[0], p.shape[2], p.shape[1]).transpose(1, 2))
        else:
            p.grad.copy_(unit.grad.reshape(p.shape))


def fit_resnets(data: Split, method: str, seeds, *, lrs, blocks: int, width: int, steps: int,
                batch_size: int = 64, clipping: float = 0.1, progress=None, device="cpu") -> dict:
    """Train ``make_resnet``'s network for every (rate, seed) pair as one ensemble; return its results.

    SGD with momentum 0.9, ``batch_size`` examples per step drawn by the seed (so every method
    sees the same batches at a seed: the comparisons pair), ``steps`` steps at each rate of
    ``lrs``. ``nf`` clips its gradients with ``clip_members_`` at ``clipping``. Returns
    ``test_acc`` and ``train_loss`` (the mean of the last 20 steps; NaN where a run diverged),
    each (rates, seeds).
    """
    lrs, seeds = [float(r) for r in lrs], [int(s) for s in seeds]
    data = data.to(device)
    models = [make_resnet(data.num_features, data.num_classes, method=method, blocks=blocks, width=width, seed=s)
              for _ in lrs for s in seeds]  # rate-major
    ens = stack_resnets(models).to(device)
    clip = (lambda e: clip_members_(e, clipping)) if method == "nf" else None
    member_lrs = [r for r in lrs for _ in seeds]
    losses = ensemble.fit(ens, data, lr=member_lrs, seeds=seeds * len(lrs), steps=steps, batch_size=batch_size,
                          momentum=0.9, before_update=clip, progress=progress)
    shape = (len(lrs), len(seeds))
    return {"test_acc": ensemble.accuracy(ens, data.x_test, data.y_test).reshape(shape),
            "train_loss": losses[:, -20:].mean(axis=1).reshape(shape)}


def residual_signal(data: Split, methods, seeds, *, blocks: int, width: int, batch_size: int = 256,
                    device="cpu") -> dict:
    """Measure De & Smith's picture at initialization: how much each block adds to the signal.

    For each method and seed, one forward pass in training mode (BN with the batch's statistics)
    on ``batch_size`` training examples drawn by the seed; forward hooks on every ``Block``
    record the mean square of its input x_l and of its branch's contribution (what the block
    adds: scale * branch). Returns method -> ``skip`` (seeds, blocks + 1), the mean square of x_0 ..
    x_L, and ``share`` (seeds, blocks), the branch's mean square over the block output's.
    """
    data = data.to(device)
    n = len(data.x_train)
    out = {}
    for method in methods:
        skip, share = [], []
        for seed in seeds:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:batch_size]
            net = make_resnet(data.num_features, data.num_classes, method=method, blocks=blocks, width=width,
                              seed=int(seed)).to(device).train()
            inputs, added = [], []

            def record(block, args, output, inputs=inputs, added=added):
                inputs.append(args[0].pow(2).mean().item())
                added.append((output - args[0]).pow(2).mean().item())

            handles = [b.register_forward_hook(record) for b in net.blocks]
            with torch.no_grad():
                net(data.x_train[idx])
            for h in handles:
                h.remove()
            ms = [*inputs, inputs[-1] + 0.0]  # x_0 .. x_{L-1}, then x_L below
            with torch.no_grad():
                last = net.stem(data.x_train[idx])
                for b in net.blocks:
                    last = b(last)
            ms[-1] = last.pow(2).mean().item()
            skip.append(ms)
            share.append([a / m for a, m in zip(added, ms[1:])])
        out[method] = {"skip": np.array(skip), "share": np.array(share)}
    return out


def bn_share(x0_mean_square, blocks: int) -> np.ndarray:
    """De & Smith's prediction for a BN residual network at initialization: the branch's share of block l's output.

    Each BN'd branch (BN, ReLU, a He-initialized layer, twice) adds a signal of mean square 1,
    independent of the skip path, so x_l has mean square q_0 + l and block l's branch contributes
    1 / (q_0 + l + 1) of its output, for l = 0 .. blocks - 1: the blocks tend to the identity with depth.
    """
    q0 = np.asarray(x0_mean_square, dtype=np.float64)[..., None]
    return 1.0 / (q0 + np.arange(blocks) + 1.0)


# The tiny transformer of lab_transformer: LayerNorm, RMSNorm or DyT, before or after each sublayer
# --------------------------------------------------------------------------------------------

TOKEN_NORMS = {"ln": "LayerNorm", "rms": "RMSNorm", "dyt": "DyT"}
PLACES = ("pre", "post")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (Zhang & Sennrich 2019): LayerNorm without the mean.

    ``torch.nn.RMSNorm`` computes the same from torch 2.4 on; the course keeps its own so that the
    library runs on its torch floor (2.2). weight (width,) ones.
    """

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        check_positive_int("width", width)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_token_norm(kind: str, width: int) -> nn.Module:
    """A per-token normalization of ``width`` features: ``nn.LayerNorm``, ``RMSNorm`` or ``normfree.DyT``."""
    from normlab import normfree

    if kind == "ln":
        return nn.LayerNorm(width)
    if kind == "rms":
        return RMSNorm(width)
    if kind == "dyt":
        return normfree.DyT(width, alpha_init=0.5)
    raise ValueError(f"kind must be one of {tuple(TOKEN_NORMS)}, got {kind!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention on (N, T, width), written out (no fused kernel, so vmap runs it)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        return self.out(_attend(self.qkv(x), self.heads))


def _attend(qkv, heads):
    """Scaled dot-product attention from the projections qkv (N, T, 3 D) = [q | k | v]; returns (N, T, D)."""
    N, T, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.reshape(N, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (N, h, T, d) each
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // heads), dim=-1)  # (N, h, T, T)
    return (weights @ v).transpose(1, 2).reshape(N, T, D)


def _sublayers(block, x):
    """A transformer block's two residual sublayers, its norms placed as ``block.place`` says."""
    if block.place == "pre":
        x = x + block.attn(block.norm1(x))
        return x + block.mlp(block.norm2(x))
    x = block.norm1(x + block.attn(x))
    return block.norm2(x + block.mlp(x))


class TransformerBlock(nn.Module):
    """Attention and an MLP (width -> 2 width -> width, GELU), each a residual sublayer with its norm.

    place "pre": x + f(norm(x)) for each sublayer f (pre-LN); "post": norm(x + f(x)) (post-LN, the
    original transformer's placement).
    """

    def __init__(self, width: int, heads: int, norm: str, place: str):
        super().__init__()
        if place not in PLACES:
            raise ValueError(f"place must be one of {PLACES}, got {place!r}")
        self.place = place
        self.norm1, self.attn = make_token_norm(norm, width), SelfAttention(width, heads)
        self.norm2 = make_token_norm(norm, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return _sublayers(self, x)


class TinyTransformer(nn.Module):
    """Tokens (N, T, features) -> linear embedding plus learned positions -> blocks -> mean over tokens -> classes.

    A pre-LN network normalizes once more after its last block, as pre-LN transformers do.
    """

    def __init__(self, features: int, tokens: int, classes: int, *, norm: str = "ln", place: str = "pre",
                 width: int = 32, heads: int = 2, layers: int = 3, seed: int = 0):
        super().__init__()
        check_positive_int("layers", layers)
        torch.manual_seed(seed)
        self.embed = nn.Linear(features, width)
        self.position = nn.Parameter(0.1 * torch.randn(tokens, width))
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads, norm, place) for _ in range(layers)])
        self.final = make_token_norm(norm, width) if place == "pre" else nn.Identity()
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.final(self.blocks(self.embed(x) + self.position))
        return self.head(h.mean(dim=1))


class _StackedTokenNorm(nn.Module):
    """K stacked ``make_token_norm`` layers on (K, N, T, D): each member's own gamma, beta (and DyT's alpha)."""

    def __init__(self, norms):
        super().__init__()
        from normlab import normfree

        first = norms[0]
        self.kind = "dyt" if isinstance(first, normfree.DyT) else "rms" if isinstance(first, RMSNorm) else "ln"
        self.eps = getattr(first, "eps", None)
        K = len(norms)
        self.weight = nn.Parameter(torch.stack([n.weight.detach() for n in norms]).reshape(K, 1, 1, -1).clone())
        if self.kind != "rms":
            self.bias = nn.Parameter(torch.stack([n.bias.detach() for n in norms]).reshape(K, 1, 1, -1).clone())
        if self.kind == "dyt":
            self.alpha = nn.Parameter(torch.stack([n.alpha.detach() for n in norms]).reshape(K, 1, 1, 1).clone())

    def forward(self, x):
        if self.kind == "dyt":
            return self.weight * torch.tanh(self.alpha * x) + self.bias
        if self.kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


def _tokens(layer, x):
    """A stacked linear layer (K, in, out) on (K, N, T, in)."""
    K, N, T, _ = x.shape
    return layer(x.reshape(K, N * T, -1)).reshape(K, N, T, -1)


class _StackedTransformerBlock(nn.Module):
    """K stacked ``TransformerBlock`` modules on (K, N, T, D)."""

    def __init__(self, blocks):
        super().__init__()
        self.place, self.heads = blocks[0].place, blocks[0].attn.heads
        self.norm1 = _StackedTokenNorm([b.norm1 for b in blocks])
        self.norm2 = _StackedTokenNorm([b.norm2 for b in blocks])
        self.qkv = _stack_leaf([b.attn.qkv for b in blocks])
        self.out = _stack_leaf([b.attn.out for b in blocks])
        self.fc1 = _stack_leaf([b.mlp[0] for b in blocks])
        self.fc2 = _stack_leaf([b.mlp[2] for b in blocks])

    def attn(self, x):
        K, N, T, D = x.shape
        qkv = _tokens(self.qkv, x).reshape(K * N, T, 3 * D)  # the members' examples as one batch
        return _tokens(self.out, _attend(qkv, self.heads).reshape(K, N, T, D))

    def mlp(self, x):
        return _tokens(self.fc2, F.gelu(_tokens(self.fc1, x)))

    def forward(self, x):
        return _sublayers(self, x)


class StackedTransformer(nn.Module):
    """K ``TinyTransformer`` models of one configuration as one module on (K, N, T, features).

    Every layer runs batched over the member axis; member k computes ``models[k]``
    (``tests/test_experiments_beyond.py`` checks it). An input without the member axis goes to every
    member. ``normlab.runtime.ensemble.fit`` trains it as it trains an ``Ensemble``.
    """

    def __init__(self, models):
        super().__init__()
        models = list(models)
        self.members, self.example_dims = len(models), 2  # as an Ensemble of (T, features) examples
        self.embed = _stack_leaf([m.embed for m in models])
        self.position = nn.Parameter(torch.stack([m.position.detach() for m in models]).unsqueeze(1).clone())
        self.blocks = nn.ModuleList(_StackedTransformerBlock([m.blocks[i] for m in models])
                                    for i in range(len(models[0].blocks)))
        self.final = (_StackedTokenNorm([m.final for m in models]) if not isinstance(models[0].final, nn.Identity)
                      else nn.Identity())
        self.head = _stack_leaf([m.head for m in models])

    def forward(self, x):
        if x.dim() == 3:
            x = x.expand(self.members, *x.shape)
        h = _tokens(self.embed, x) + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(self.final(h).mean(dim=2))


def fit_transformers(seqs: Split, configs, seeds, *, steps: int, lr: float, batch_size: int = 32,
                     width: int = 32, heads: int = 2, layers: int = 3, progress=None, device="cpu") -> dict:
    """Train a ``TinyTransformer`` per (norm, place) of ``configs`` and seed with Adam; return config -> results.

    seqs: sequences (N, T, features), e.g. ``normlab.experiments.alternatives.as_sequences``. The
    seeds of one configuration train as one ``StackedTransformer``, each on the batches its seed draws.
    Results: ``test_acc`` (seeds,), ``loss`` (seeds, steps), the training loss at every step.
    """
    seqs = seqs.to(device)
    seeds = [int(s) for s in seeds]
    _, tokens, features = seqs.x_train.shape
    out = {}
    for norm, place in configs:
        models = [TinyTransformer(features, tokens, seqs.num_classes, norm=norm, place=place, width=width,
                                  heads=heads, layers=layers, seed=s) for s in seeds]
        ens = StackedTransformer(models).to(device)
        loss = ensemble.fit(ens, seqs, lr=lr, seeds=seeds, steps=steps, batch_size=batch_size, optimizer="adam",
                            progress=progress)
        out[(norm, place)] = {"test_acc": ensemble.accuracy(ens, seqs.x_test, seqs.y_test), "loss": loss}
    return out


def init_gradients(seqs: Split, configs, seeds, *, layers: int, width: int = 32, heads: int = 2,
                   batch_size: int = 128, device="cpu") -> dict:
    """Xiong et al.'s measurement at initialization: the gradient norm of each block's last MLP weight.

    For each (norm, place) of ``configs`` and seed: a ``TinyTransformer`` of ``layers`` blocks, one
    forward and backward pass of the cross-entropy on ``batch_size`` training sequences drawn by
    the seed. Returns config -> (seeds, layers), the Frobenius norm of the gradient of every block's
    second MLP layer (``mlp[2].weight``), first block first.
    """
    seqs = seqs.to(device)
    _, tokens, features = seqs.x_train.shape
    n = len(seqs.x_train)
    out = {}
    for norm, place in configs:
        rows = []
        for seed in seeds:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:batch_size]
            model = TinyTransformer(features, tokens, seqs.num_classes, norm=norm, place=place, width=width,
                                    heads=heads, layers=layers, seed=int(seed)).to(device)
            F.cross_entropy(model(seqs.x_train[idx]), seqs.y_train[idx]).backward()
            rows.append([float(b.mlp[2].weight.grad.norm()) for b in model.blocks])
        out[(norm, place)] = np.array(rows)
    return out
