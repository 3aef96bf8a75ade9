"""Chapter 9's experiments: batch norm under data parallelism, per-device or synchronized.

The workers (``*_worker``) run inside ``normlab.distributed.launch``, one per rank; everything
else runs in the calling process. The model is Chapter 5's MLP (two BN layers) on the 8x8
digits, trained in float64 so that "equal" can mean equal to 1e-6 after hundreds of steps.

Per-device BN: plain ``normlab.nn.BatchNorm1d`` layers under DistributedDataParallel (DDP), each
rank normalizing its own slice of the global batch. SyncBN: the same model after
``SyncBatchNorm.convert_sync_batchnorm``. Single process: one process, the whole global batch.
The global batches are drawn from one generator seeded the same on every rank, and rank r takes
slice r, so all three see exactly the same examples at every step.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab import nn as normlab_nn
from normlab._validate import check_positive_int
from normlab.experiments import BATCH_ORDER, seeds_for
from normlab.runtime.data import Split
from normlab.stats import batch_norm_layers

__all__ = [
    "MODES",
    "budget",
    "seeds_for",
    "make_model",
    "batch_indices",
    "train_single",
    "per_device_sweep",
    "grad_single",
    "grad_accumulated",
    "train_worker",
    "timing_worker",
    "lab_worker",
    "resnet50_bn_channels",
    "resnet50_num_parameters",
    "sync_traffic",
]

MODES = ("local", "sync")  # per-device BN, synchronized BN


def budget(scale="quick"):
    """Return the world size, per-device batch, steps of the global batch, seeds, timing sizes and the
    per-device batches of the sweep, for a scale."""
    if scale == "quick":
        return {"world": 2, "per_device": 2, "steps": 200, "seeds": 8, "timing_steps": 15, "timing_layers": 8,
                "sweep": (2, 4, 8, 16, 32)}
    if scale == "full":
        return {"world": 4, "per_device": 2, "steps": 1700, "seeds": 8, "timing_steps": 200, "timing_layers": 16,
                "sweep": (2, 4, 8, 16, 32, 64)}
    raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")


def make_model(num_features, num_classes, seed, hidden=(128, 128), sync=False):
    """Return Chapter 5's MLP in float64: (Linear -> BatchNorm1d -> ReLU) per hidden layer, then Linear.

    sync=True converts its BN layers to ``normlab.nn.SyncBatchNorm``. The weights depend on seed only.
    """
    torch.manual_seed(seed)
    sizes = [num_features, *hidden]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), normlab_nn.BatchNorm1d(b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes)).double()
    return normlab_nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def batch_indices(n, batch_size, steps, seed):
    """Return (steps, batch_size) int64 indices: each row a batch drawn without replacement."""
    gen = torch.Generator().manual_seed(seed + BATCH_ORDER)
    return torch.stack([torch.randperm(n, generator=gen)[:batch_size] for _ in range(steps)])


def _lr(batch_size):
    return 0.1 * batch_size / 32  # Chapter 5's rule: 0.1 at B = 32, scaled linearly


@torch.no_grad()
def _accuracy(model, x, y):
    model.eval()
    acc = (model(x.double()).argmax(1) == y).double().mean().item()
    model.train()
    return acc


def train_single(data: Split, seed, batch_size, steps, ghost=None, *, device="cpu"):
    """Train in this process for ``steps`` steps on batches of ``batch_size`` (plain SGD, lr 0.1 * B / 32).

    ghost: if given, BN layers are ``GhostBatchNorm1d(virtual_batch_size=ghost)``. Returns a dict
    with the training loss per step, the test accuracy (eval mode) and the final state dict (on ``device``).
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("steps", steps)
    data = data.to(device)
    model = make_model(data.num_features, data.num_classes, seed)
    if ghost is not None:
        _to_ghost(model, ghost)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=_lr(batch_size))
    x, y = data.x_train.double(), data.y_train
    losses = []
    for idx in batch_indices(len(x), batch_size, steps, seed):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"loss": np.array(losses), "acc": _accuracy(model, data.x_test, data.y_test), "state": model.state_dict()}


def _to_ghost(model, ghost):
    """Replace, in place, each BatchNorm1d of ``make_model``'s model by GhostBatchNorm1d(ghost), same state."""
    for i, m in enumerate(model):
        if isinstance(m, normlab_nn.BatchNorm1d):
            g = normlab_nn.GhostBatchNorm1d(m.num_features, ghost, dtype=m.weight.dtype)
            g.load_state_dict(m.state_dict())
            model[i] = g
    return model


def per_device_sweep(data: Split, seeds, per_device_sizes, *, world, steps, progress=None, device="cpu"):
    """Per-device BN against SyncBN at several per-device batches, trained in this one process.

    With equal slices under DDP, per-device BN computes what one process computes with BN
    statistics per group of ``per_device`` consecutive examples of the global batch
    (``GhostBatchNorm1d``), and SyncBN what plain BN computes on the whole global batch; the lab
    checks both on its DDP runs. So for each per-device batch b and seed this trains two members
    on global batches of world * b, as ``train_single`` would: BN per group of b ("local") and
    over the whole batch ("sync"), the same initial weights and batches, plain SGD at
    0.1 * world * b / 32, ``steps`` steps, in float32 (one ensemble per b). Returns
    {b: {"local": (S,), "sync": (S,)}}: test accuracy in eval mode. The running statistics differ
    from a rank's: a ghost layer averages its groups' statistics, a rank sees only its own slice.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    from normlab.runtime import ensemble

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    sizes = [int(b) for b in per_device_sizes]
    if not sizes or min(sizes) < 2:
        raise ValueError(f"per_device_sizes must be ints >= 2 (BN needs two values), got {per_device_sizes!r}")
    check_positive_int("world", world)
    check_positive_int("steps", steps)
    data = data.to(device)
    n, S = len(data.x_train), len(seeds)
    out = {}
    for b in sizes:
        B = world * b
        models = [make_model(data.num_features, data.num_classes, s).float() for _ in MODES for s in seeds]
        for m in models[:S]:  # "local" first, as MODES
            _to_ghost(m, b)
        net = ensemble.stack(models).to(device)
        idx = torch.stack([batch_indices(n, B, steps, s) for s in seeds])  # (S, steps, B)
        batches = [idx[:, t].repeat(len(MODES), 1) for t in range(steps)]
        ensemble.fit(net, data, lr=_lr(B), batches=batches, momentum=0.0, progress=progress)
        acc = ensemble.accuracy(net, data.x_test, data.y_test).reshape(len(MODES), S)
        out[b] = dict(zip(MODES, acc))
    return out


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def grad_single(data: Split, seed, idx, *, device="cpu"):
    """Return the gradient (all parameters, flat) of the mean loss on the batch ``idx``, one process.

    device: where the models and batches live, e.g. ``ctx.device``. The gradient comes back on the
    CPU, where the DDP workers' are.
    """
    data = data.to(device)
    model = make_model(data.num_features, data.num_classes, seed).to(device)
    F.cross_entropy(model(data.x_train[idx].double()), data.y_train[idx]).backward()
    return _grads(model).cpu()


def grad_accumulated(data: Split, seed, idx, k, frozen=False, *, device="cpu"):
    """Return the gradient accumulated over k equal micro-batches of ``idx`` (each loss divided by k).

    frozen=True first sets every BN layer's running statistics to those of the whole batch
    (``precise_bn``) and runs BN in eval mode: the micro-batches share one normalization.
    device: where the models and batches live, e.g. ``ctx.device``. The gradient comes back on the
    CPU, where the DDP workers' are.
    """
    from normlab.stats import precise_bn

    data = data.to(device)
    model = make_model(data.num_features, data.num_classes, seed).to(device)
    x, y = data.x_train[idx].double(), data.y_train[idx]
    if frozen:
        precise_bn(model, [x])  # leaves the model in eval mode
    for xm, ym in zip(x.chunk(k), y.chunk(k)):
        (F.cross_entropy(model(xm), ym) / k).backward()
    return _grads(model).cpu()


def _bn_stats(model):
    return [torch.cat([m.running_mean, m.running_var]).clone() for m in batch_norm_layers(model)]


def _ddp(model):
    """Wrap in DDP with broadcast_buffers=False, quietly (torch 2.13 renames it; its warning says to keep it)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(model, broadcast_buffers=False)


def train_worker(rank, world, data: Split, seeds, per_device, steps):
    """Train with DDP per seed and mode ('local' per-device BN, 'sync' SyncBN); return this rank's records.

    Per (seed, mode): the training loss of this rank's slice at every step, this rank's test
    accuracy in eval mode with its own running statistics, its BN running statistics, and (first
    seed only) the DDP-averaged gradient of the first step.
    """
    global_batch = per_device * world
    x, y = data.x_train.double(), data.y_train
    part = slice(rank * per_device, (rank + 1) * per_device)
    out = {}
    for i, seed in enumerate(seeds):
        batches = batch_indices(len(x), global_batch, steps, seed)
        for mode in MODES:
            model = make_model(data.num_features, data.num_classes, seed, sync=mode == "sync")
            # broadcast_buffers=False: each rank keeps its own running statistics (DDP's default,
            # True, overwrites them with rank 0's before every forward pass).
            ddp = _ddp(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=_lr(global_batch))
            losses, first_grad = [], None
            for t, idx in enumerate(batches):
                mine = idx[part]
                loss = F.cross_entropy(ddp(x[mine]), y[mine])
                opt.zero_grad(set_to_none=True)
                loss.backward()  # DDP averages the gradients over the ranks
                if t == 0 and i == 0:
                    first_grad = _grads(model).clone()
                opt.step()
                losses.append(loss.item())
            out[(seed, mode)] = {
                "loss": np.array(losses),
                "acc": _accuracy(model, data.x_test, data.y_test),
                "bn": _bn_stats(model),
                "first_grad": first_grad,
                "first_batch": batches[0],
            }
    return out


def timing_worker(rank, world, layers, width, per_device, steps, synced):
    """Time DDP training steps of a deep MLP (``layers`` BN layers), synchronizing the first k of them.

    synced: the k to compare, e.g. [0, layers // 2, layers]. The models take turns step by step
    (so a busy machine slows them alike). Returns {k: median seconds per step on this rank}.
    """
    torch.manual_seed(0)
    x = torch.randn(per_device, width)
    y = torch.randint(0, 10, (per_device,))
    runs = {}
    for k in synced:
        blocks = []
        for j in range(layers):
            bn = normlab_nn.SyncBatchNorm(width) if j < k else normlab_nn.BatchNorm1d(width)
            blocks += [nn.Linear(width, width), bn, nn.ReLU()]
        ddp = _ddp(nn.Sequential(*blocks, nn.Linear(width, 10)))
        runs[k] = (ddp, torch.optim.SGD(ddp.parameters(), lr=0.01), [])
    for t in range(steps + 3):  # 3 warm-up rounds
        for ddp, opt, times in runs.values():
            start = time.perf_counter()
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t >= 3:
                times.append(time.perf_counter() - start)
    return {k: float(np.median(times)) for k, (_, _, times) in runs.items()}


def lab_worker(rank, world, data: Split, seeds, per_device, steps, timing):
    """The lab's one launch: ``train_worker`` then ``timing_worker(**timing)``; returns both."""
    return {"train": train_worker(rank, world, data, seeds, per_device, steps),
            "timing": timing_worker(rank, world, **timing)}


# ---- what synchronization moves: ResNet-50 ------------------------------------------------------


def _resnet50_layout():
    """Yield ('conv', c_in, c_out, kernel) and ('bn', C) for torchvision's ResNet-50, in order."""
    yield ("conv", 3, 64, 7)
    yield ("bn", 64)
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            yield ("conv", c_in, width, 1)
            yield ("bn", width)
            yield ("conv", width, width, 3)
            yield ("bn", width)
            yield ("conv", width, 4 * width, 1)
            yield ("bn", 4 * width)
            if b == 0:  # the projection shortcut
                yield ("conv", c_in, 4 * width, 1)
                yield ("bn", 4 * width)
            c_in = 4 * width
    yield ("fc", 2048, 1000)


def resnet50_bn_channels():
    """Return the channel count of each of ResNet-50's 53 BN layers, in order."""
    return [layer[1] for layer in _resnet50_layout() if layer[0] == "bn"]


def resnet50_num_parameters():
    """Return ResNet-50's number of trainable parameters (25,557,032, as torchvision's)."""
    total = 0
    for layer in _resnet50_layout():
        if layer[0] == "conv":
            total += layer[1] * layer[2] * layer[3] ** 2  # no conv bias: BN follows
        elif layer[0] == "bn":
            total += 2 * layer[1]  # gamma, beta
        else:
            total += layer[1] * layer[2] + layer[2]
    return total


def sync_traffic(channels, num_parameters, world, bytes_per_value=4):
    """Count what SyncBN adds per training step and rank, against DDP's gradient all-reduce.

    channels: the C of each BN layer. Per BN layer, the forward all-gathers 2C + 1 values from
    each rank (each rank receives (world - 1) (2C + 1)), the backward all-reduces 2C values.
    Returns a dict: values sent per rank in the forward and the backward, the gradient values,
    bytes, the ratio, and the number of blocking collectives SyncBN adds (2 per layer).
    """
    channels = [int(c) for c in channels]
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must be a non-empty list of positive ints, got {channels!r}")
    check_positive_int("world", world)
    check_positive_int("num_parameters", num_parameters)
    forward = sum(2 * c + 1 for c in channels)
    backward = sum(2 * c for c in channels)
    return {
        "layers": len(channels),
        "forward_values": forward,
        "forward_received": (world - 1) * forward,
        "backward_values": backward,
        "grad_values": num_parameters,
        "sync_bytes": (forward + backward) * bytes_per_value,
        "grad_bytes": num_parameters * bytes_per_value,
        "ratio": (forward + backward) / num_parameters,
        "collectives": 2 * len(channels),
    }
