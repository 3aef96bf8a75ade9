"""Training diagnostics through hooks: what each layer's activations, gradients and updates look like.

Karpathy's "makemore" lectures and the UvA deep learning tutorials teach a deep network's health
from three pictures: the histogram of each layer's activations (are they collapsing to zero, or
saturating?), the histogram of the gradients flowing back into them (vanishing, exploding?), and
the ratio of each weight update to the weight itself (about 1e-3 is healthy for SGD). This module
records all three without touching the model's code:

    with Diagnostics(model) as diag:          # hooks on every Tanh / ReLU (or the kinds you name)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    diag.stats()                               # one LayerStats per recorded layer, in forward order
    diag.outputs["3"], diag.grads["3"]         # the tensors behind the histograms

    ratios = UpdateRatios(model)               # a callback for normlab.runtime.train.train
    train(model, data, steps=500, lr=0.1, callback=ratios)
    ratios.history["0.weight"]                 # std(update) / std(weight) at every step

A layer's *saturated* fraction counts the values in a flat region of its nonlinearity, where
almost no gradient passes: |tanh| above 0.97 (Karpathy's threshold), a sigmoid within 0.03 of 0 or
1, a ReLU at zero. A unit is *dead* when it is flat for every example of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SATURATION", "LayerStats", "Diagnostics", "saturated", "UpdateRatios"]

SATURATION = 0.97  # |tanh| above this passes less than 6% of the gradient (1 - 0.97**2)
KINDS = (nn.Tanh, nn.ReLU, nn.Sigmoid)
FLAT_KINDS = ("Tanh", "ReLU", "Sigmoid")  # the kinds whose saturated fraction is defined


@dataclass(frozen=True)
class LayerStats:
    """One layer's summary after a forward and (if run) a backward pass; floats, NaN where not recorded."""

    name: str  # the module's name in the model (e.g. "3" in an nn.Sequential)
    kind: str  # "Tanh", "ReLU", ...
    mean: float  # of the layer's outputs
    std: float
    saturated: float  # fraction of output values in the flat region (module docstring); NaN for other layers
    dead: float  # fraction of units flat on every example; NaN for layers that are not Tanh, ReLU or Sigmoid
    grad_mean: float  # of the loss's gradient with respect to the outputs
    grad_std: float


def saturated(output: torch.Tensor, kind: str, threshold: float = SATURATION) -> torch.Tensor:
    """Return a bool tensor like ``output``: where the nonlinearity ``kind`` is flat (module docstring)."""
    if kind == "Tanh":
        return output.abs() > threshold
    if kind == "Sigmoid":
        return (output < 1 - threshold) | (output > threshold)
    if kind == "ReLU":
        return output <= 0
    raise ValueError(f"kind must be 'Tanh', 'Sigmoid' or 'ReLU', got {kind!r}")


class Diagnostics:
    """Record the outputs of every layer of the given kinds, and the gradients that reach them.

    model: any ``nn.Module``; kinds: the module classes to record (default Tanh, ReLU, Sigmoid).
    After a forward pass ``outputs[name]`` holds each recorded layer's output (detached, on the
    CPU); after a backward pass ``grads[name]`` holds the loss's gradient with respect to it. A
    new forward pass replaces both. Use it as a context manager, or call ``remove()``, so that the
    hooks do not outlive the measurement.
    """

    def __init__(self, model: nn.Module, kinds=KINDS, threshold: float = SATURATION):
        kinds = tuple(kinds)
        if not kinds or not all(isinstance(k, type) and issubclass(k, nn.Module) for k in kinds):
            raise ValueError(f"kinds must be a non-empty tuple of nn.Module classes, got {kinds!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        self.threshold = threshold
        self.kinds = {}  # name -> kind, in forward (registration) order
        self.outputs, self.grads = {}, {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, kinds):
                self.kinds[name] = type(module).__name__
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        if not self.kinds:
            raise ValueError(f"the model has no layer of the kinds {[k.__name__ for k in kinds]}")

    @property
    def names(self) -> list:
        return list(self.kinds)

    def _forward_hook(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output.detach().cpu()
            self.grads.pop(name, None)
            if output.requires_grad:
                output.register_hook(lambda g: self.grads.__setitem__(name, g.detach().cpu()))

        return hook

    def remove(self) -> None:
        """Remove the hooks (the recorded tensors stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def stats(self) -> list:
        """Return one ``LayerStats`` per recorded layer that has run, in forward order."""
        if not self.outputs:
            raise ValueError("nothing recorded yet: run a forward pass through the model first")
        out = []
        nan = float("nan")
        for name, kind in self.kinds.items():
            if name not in self.outputs:
                continue
            a = self.outputs[name].double()
            sat = dead = nan  # a layer that is not a nonlinearity (a BN, a Linear) has no flat region
            if kind in FLAT_KINDS:
                flat = saturated(a, kind, self.threshold)
                per_unit = flat.reshape(a.shape[0], -1) if a.dim() > 1 else flat.reshape(-1, 1)
                sat, dead = flat.double().mean().item(), per_unit.all(dim=0).double().mean().item()
            g = self.grads.get(name)
            out.append(LayerStats(
                name=name, kind=kind, mean=a.mean().item(), std=a.std().item(),
                saturated=sat, dead=dead,  # dead: flat for every example
                grad_mean=nan if g is None else g.double().mean().item(),
                grad_std=nan if g is None else g.double().std().item(),
            ))
        return out


class UpdateRatios:
    """A training callback that records std(update) / std(weight) for every weight matrix at every step.

    The update is what the optimizer actually did (the weight after the step minus before it), so
    momentum and Adam are measured as they act, not estimated as lr times the gradient. Call it as
    ``callback(step, model)`` after each optimizer step (``normlab.runtime.train.train`` does);
    ``history[name]`` is the list of ratios, ``steps`` the steps they were taken at. For an
    ensemble (``normlab.runtime.ensemble``), whose weights carry the member axis first, pass
    ``members=K``: each entry of the history is then a (K,) array, one ratio per member.
    """

    def __init__(self, model: nn.Module, every: int = 1, members: int | None = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if members is not None and (not isinstance(members, int) or isinstance(members, bool) or members < 1):
            raise ValueError(f"members must be a positive int or None, got {members!r}")
        self.every, self.members = every, members
        least = 2 if members is None else 3  # a member axis comes on top of the weight's own two
        # weights, not biases (an ensemble's are (K, 1, out)) or the gains of norm layers
        self.names = [n for n, p in model.named_parameters() if p.dim() >= least and n.rsplit(".", 1)[-1] == "weight"]
        if not self.names:
            raise ValueError("the model has no weight matrix to follow")
        if members is not None:
            wrong = [n for n, p in model.named_parameters() if n in self.names and p.shape[0] != members]
            if wrong:
                raise ValueError(f"members={members}, but these weights have another leading size: {wrong}")
        self._last = self._snapshot(model)
        self.steps = []
        self.history = {n: [] for n in self.names}

    def _snapshot(self, model):
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    @torch.no_grad()
    def __call__(self, step: int, model: nn.Module) -> None:
        now = self._snapshot(model)
        if step % self.every == 0:
            self.steps.append(step)
            for n in self.names:
                delta, w = now[n] - self._last[n], now[n]
                if self.members is None:
                    self.history[n].append((delta.std() / w.std()).item())
                else:  # (K, ...) -> one ratio per member
                    K = self.members
                    self.history[n].append((delta.reshape(K, -1).std(1) / w.reshape(K, -1).std(1)).cpu().numpy())
        self._last = now
