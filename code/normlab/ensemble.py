"""Many small models trained as one: the course's ensemble trainer.

A claim about training ("BN trains faster", "dropout hurts with BN") needs many seeds, and on a
2-core CPU a small MLP spends most of its time in Python and the dispatcher, not in arithmetic.
So the course trains K copies of a model (members: same architecture, different seeds or
settings) as one model whose tensors carry a leading member axis: activations are (K, N, D), one
batched matrix product runs every member's Linear layer, and each member draws its own
mini-batches. No operation mixes members, so member k follows exactly the path it would follow
alone (``tests/test_ensemble.py`` checks this against ``normlab.train.train``, step by step).

The normalization layers are the library's own modules, used unchanged: K members with D
features each are one layer with K * D channels. ``Folded`` moves the member axis into the
channels, (K, N, D) -> (N, K * D), calls the wrapped module and moves it back, so a
``normlab.nn.BatchNorm1d(K * D)`` normalizes every member's features over that member's batch,
keeps every member's running statistics, and works with ``precise_bn`` as it is. Ghost batch
norm, population norm and batch renormalization fold the same way (the trick is the one
``GhostBatchNorm`` uses for its virtual batches).

    models = [make_mlp(40, 10, seed=s) for s in seeds]   # ordinary nn.Sequential models
    ens = stack(models)                                  # one Ensemble of len(seeds) members
    fit(ens, data, steps=600, batch_size=32, lr=0.05, seeds=seeds)
    evaluate(ens, data)["test_acc"]                      # (K,) one accuracy per member
    member(ens, 0)                                       # member 0 as a plain nn.Sequential again
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from normlab import nn as normlab_nn
from normlab.data import Split
from normlab.stats import precise_bn
from normlab.train import show_progress

__all__ = ["Linear", "Folded", "Ensemble", "stack", "member", "fit", "evaluate", "member_batches"]

# Layers that act on each value (or each example's last axis) alone: they run on (K, N, D) as is.
_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Identity, nn.Dropout)
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, normlab_nn._BatchNorm)


class Linear(nn.Module):
    """K stacked ``nn.Linear`` layers: (K, N, in) -> (K, N, out), one batched matrix product.

    weight: (K, in, out), member k's ``nn.Linear`` weight transposed (so that the batched product
    reads it contiguously, forward and backward); bias: (K, 1, out).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        if weight.dim() != 3 or bias.shape != (weight.shape[0], 1, weight.shape[2]):
            raise ValueError(f"weight must be (K, in, out) and bias (K, 1, out); got {tuple(weight.shape)}, "
                             f"{tuple(bias.shape)}")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)  # (K, N, out)

    def extra_repr(self):
        K, d_in, out = self.weight.shape
        return f"members={K}, in_features={d_in}, out_features={out}"


class Folded(nn.Module):
    """Run a per-channel layer of K * D channels on (K, N, D) input: member k owns channels kD..(k+1)D-1."""

    def __init__(self, module: nn.Module, members: int):
        super().__init__()
        self.module, self.members = module, members

    def forward(self, x):
        K, N, D = x.shape
        if K != self.members:
            raise ValueError(f"expected {self.members} members on axis 0, got input of shape {tuple(x.shape)}")
        folded = x.transpose(0, 1).reshape(N, K * D)  # (N, K * D): each member's features are channels
        return self.module(folded).reshape(N, K, D).transpose(0, 1)  # back to (K, N, D)


class Ensemble(nn.Sequential):
    """A sequence of ensemble layers on (K, N, D) tensors; ``members`` is K."""

    def __init__(self, *layers, members: int):
        super().__init__(*layers)
        self.members = members

    def forward(self, x):
        if x.dim() == 2:  # one input for every member: a view, no copy
            x = x.expand(self.members, *x.shape)
        if x.shape[0] != self.members:
            raise ValueError(f"expected ({self.members}, N, D) or (N, D) input, got shape {tuple(x.shape)}")
        return super().forward(x)


def _stack_norm(layers):
    """One norm module of K * D channels from K norm modules of D channels (weights and buffers concatenated)."""
    first = layers[0]
    fused = copy.deepcopy(first)
    fused.num_features = first.num_features * len(layers)
    for name, t in list(first.named_parameters(recurse=False)) + list(first.named_buffers(recurse=False)):
        if t is None:
            continue
        if t.dim() == 0:  # num_batches_tracked: one counter, as every member counts the same steps
            continue
        joined = torch.cat([getattr(m, name).detach() for m in layers])
        if isinstance(t, nn.Parameter):
            setattr(fused, name, nn.Parameter(joined.clone()))
        else:
            setattr(fused, name, joined.clone())
    return fused


def stack(models) -> Ensemble:
    """Return one ``Ensemble`` whose member k starts exactly as ``models[k]`` (an ``nn.Sequential``).

    The models must share an architecture: the same layer types and sizes in the same order.
    Supported layers: ``nn.Linear``; batch norm modules of ``torch.nn`` and ``normlab.nn`` (1d:
    BatchNorm, GhostBatchNorm, PopulationNorm, BatchRenorm), folded into channels; element-wise
    layers (ReLU, Sigmoid, Tanh, GELU, Identity, Dropout).
    """
    models = list(models)
    if not models:
        raise ValueError("stack needs at least one model")
    if any(not isinstance(m, nn.Sequential) for m in models):
        raise TypeError(f"stack takes nn.Sequential models, got {sorted({type(m).__name__ for m in models})}")
    K = len(models)
    depth = len(models[0])
    if any(len(m) != depth for m in models):
        raise ValueError(f"models differ in depth: {[len(m) for m in models]}")
    out = []
    for i in range(depth):
        layers = [m[i] for m in models]
        kind = type(layers[0])
        if any(type(layer) is not kind for layer in layers):
            raise ValueError(f"layer {i} differs between models: {sorted({type(layer).__name__ for layer in layers})}")
        first = layers[0]
        if isinstance(first, nn.Linear):
            if any(layer.weight.shape != first.weight.shape for layer in layers):
                raise ValueError(f"layer {i}: Linear sizes differ between models")
            weight = torch.stack([layer.weight.detach().T for layer in layers]).contiguous()  # (K, in, out)
            if first.bias is None:
                raise ValueError(f"layer {i}: a Linear layer without bias is not supported")
            bias = torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1).clone()  # (K, 1, out)
            out.append(Linear(weight, bias))
        elif isinstance(first, _CHANNEL_NORMS):
            if any(layer.num_features != first.num_features for layer in layers):
                raise ValueError(f"layer {i}: norm sizes differ between models")
            out.append(Folded(_stack_norm(layers), K))
        elif isinstance(first, _ELEMENTWISE):
            out.append(copy.deepcopy(first))
        else:
            raise TypeError(f"layer {i} ({kind.__name__}) has no ensemble version; supported: Linear, batch norm "
                            f"modules, {', '.join(t.__name__ for t in _ELEMENTWISE)}")
    return Ensemble(*out, members=K)


def member(ens: Ensemble, k: int) -> nn.Sequential:
    """Return member k of ``ens`` as an ordinary ``nn.Sequential`` (a copy: training it leaves ``ens`` alone)."""
    if not 0 <= k < ens.members:
        raise IndexError(f"member {k} out of range for an ensemble of {ens.members}")
    layers = []
    for layer in ens:
        if isinstance(layer, Linear):
            K, d_in, d_out = layer.weight.shape
            lin = nn.Linear(d_in, d_out)
            with torch.no_grad():
                lin.weight.copy_(layer.weight[k].T)
                lin.bias.copy_(layer.bias[k, 0])
            layers.append(lin)
        elif isinstance(layer, Folded):
            norm = copy.deepcopy(layer.module)
            D = norm.num_features // ens.members
            norm.num_features = D
            for name, t in list(norm.named_parameters(recurse=False)) + list(norm.named_buffers(recurse=False)):
                if t is not None and t.dim() == 1:
                    part = t.detach()[k * D : (k + 1) * D].clone()
                    setattr(norm, name, nn.Parameter(part) if isinstance(t, nn.Parameter) else part)
            layers.append(norm)
        else:
            layers.append(copy.deepcopy(layer))
    return nn.Sequential(*layers)


def member_batches(seeds, n: int, batch_size: int):
    """Yield (K, batch_size) index tensors forever: row k as ``normlab.train.train(seed=seeds[k])`` draws them."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    while True:
        yield torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in gens])


def _member_loss(logits, y):
    """Per-member mean cross-entropy, (K,): logits (K, B, C), y (K, B)."""
    K, B, C = logits.shape
    return F.cross_entropy(logits.reshape(K * B, C), y.reshape(K * B), reduction="none").reshape(K, B).mean(1)


def fit(
    ens: Ensemble,
    data: Split,
    *,
    steps: int,
    lr: float,
    seeds,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    refresh_every: int | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Train every member with SGD on its own mini-batches; return the (K, steps) training losses.

    Member k draws its batches as ``normlab.train.train(..., seed=seeds[k])`` does, and SGD with
    momentum and weight decay acts on each value alone, so member k's run is the one it would have
    alone (dropout masks aside: they come from torch's global generator, seeded from ``seeds[0]``).
    refresh_every: recompute the statistics of population norm layers with ``precise_bn`` on the
    whole training set before the first step and every that many steps (``regularization.fit``'s
    schedule). Leaves the ensemble in eval mode.
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) != ens.members:
        raise ValueError(f"need one seed per member: {ens.members} members, {len(seeds)} seeds")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    n = len(data.x_train)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
    populations = [m for m in ens.modules() if isinstance(m, normlab_nn._PopulationNorm)]
    x_all = data.x_train.expand(ens.members, *data.x_train.shape)  # (K, n, D), a view

    def refresh():
        precise_bn(ens, [x_all])
        ens.train()

    if populations:
        refresh()
        refresh_every = refresh_every or max(1, n // batch_size)
    params = [p for p in ens.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    torch.manual_seed(seeds[0])  # dropout masks
    batches = member_batches(seeds, n, batch_size)
    losses = []
    ens.train()
    bar = tqdm(range(1, steps + 1), desc=f"{ens.members} members", disable=not show_progress(progress), leave=False)
    for step in bar:
        idx = next(batches)  # (K, B)
        loss = _member_loss(ens(data.x_train[idx]), data.y_train[idx])  # (K,)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # members share no weights: each gets the gradient of its own loss
        opt.step()
        if populations and step % refresh_every == 0:
            refresh()
        losses.append(loss.detach())
    ens.eval()
    return torch.stack(losses, 1).numpy()


@torch.no_grad()
def evaluate(ens: Ensemble, data: Split) -> dict:
    """Return each member's train and test accuracy and cross-entropy in eval mode, and the gaps: (K,) arrays."""
    was = ens.training
    ens.eval()
    out = {}
    for part, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        logits = ens(x)  # (K, N, C)
        out[f"{part}_acc"] = (logits.argmax(-1) == y).double().mean(1).numpy()
        out[f"{part}_loss"] = _member_loss(logits, y.expand(ens.members, -1)).double().numpy()
    out["acc_gap"] = out["train_acc"] - out["test_acc"]
    out["loss_gap"] = out["test_loss"] - out["train_loss"]
    ens.train(was)
    return out
