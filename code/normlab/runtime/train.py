"""One small, readable training loop for the whole course, with a progress bar and a history.

The progress bar shows in interactive use. It is off when ``NORMLAB_PROGRESS=0`` (the book build
and the tests set it, so pages show no stale bars) and when the caller passes ``progress=False``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from normlab.runtime.data import Split

__all__ = ["History", "accuracy", "device_of", "show_progress", "train"]


@dataclass
class History:
    """What a run recorded: the training loss at every step and the test accuracy at evaluations."""

    step: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    eval_step: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else float("nan")


def show_progress(progress=None) -> bool:
    """Return whether a loop should show a progress bar: ``progress`` if given, else ``NORMLAB_PROGRESS`` != 0."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("NORMLAB_PROGRESS", "1") != "0"


def device_of(model: torch.nn.Module) -> torch.device:
    """Return the device of ``model``'s first parameter or buffer (the CPU for a model with neither).

    The training loops move each batch there, so a model moved with ``model.to(ctx.device)`` trains
    on the GPU whether or not its data was moved too (moving the data once is faster).
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def accuracy(model, x, y, batch_size=None, train_mode=False) -> float:
    """Return the fraction of ``x`` that ``model`` classifies as ``y``.

    By default the model runs in eval mode on all of x at once. ``train_mode=True`` runs it in train
    mode on consecutive batches of ``batch_size`` (what forgetting ``model.eval()`` does); the
    running statistics are saved and restored, so the call changes nothing in the model.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train(train_mode)
    device = device_of(model)
    x, y = x.to(device), y.to(device)
    try:
        step = batch_size or len(x)
        correct = sum(
            (model(x[i : i + step]).argmax(dim=1) == y[i : i + step]).sum().item() for i in range(0, len(x), step)
        )
    finally:
        model.load_state_dict(buffers, strict=False)
        model.train(was_training)
    return correct / len(x)


def train(
    model: torch.nn.Module,
    data: Split,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_every: int | None = None,
    progress: bool | None = None,
    callback=None,
) -> History:
    """Train ``model`` on ``data`` with cross-entropy for ``steps`` mini-batch steps; return the history.

    Mini-batches are drawn at random (with replacement across steps, without within a batch) by a
    generator seeded with ``seed``, so a run is reproducible. The model is evaluated on the test set
    (in eval mode) every ``eval_every`` steps and after the last step. ``callback(step, model)``,
    if given, runs after every optimizer step (e.g. to refresh statistics); the model is put back
    in training mode after it.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    n = len(data.x_train)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")

    gen = torch.Generator().manual_seed(seed)
    device = device_of(model)
    history = History()
    model.train()
    bar = tqdm(range(1, steps + 1), desc="train", disable=not show_progress(progress), leave=False)
    for step in bar:
        idx = torch.randperm(n, generator=gen)[:batch_size]
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step, model)
            model.train()
        history.step.append(step)
        history.train_loss.append(loss.item())
        if (eval_every and step % eval_every == 0) or step == steps:
            history.eval_step.append(step)
            history.test_acc.append(accuracy(model, data.x_test, data.y_test))
            bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{history.test_acc[-1]:.3f}")
    return history
