"""Batch norm in transfer learning: adapt a trained model's BN layers to a new domain.

A BN layer's running mean and variance describe the distribution its input had on the data the
model was trained on (the *source* domain). On another domain (the *target*) the same layer sees
other statistics, and normalizing with the source ones no longer gives zero-mean, unit-variance
features. The tools here use that on purpose:

- ``adabn``: replace every layer's statistics with the target's (Li et al. 2016), no labels needed.
- ``prior_adapt``: normalize each test batch with a mixture of source and batch statistics
  (Schneider et al. 2020), for test batches too small to be trusted alone.
- ``tent``: also train BN's affine parameters to minimize the entropy of the predictions on
  test batches (Wang et al. 2021).
- ``freeze_bn`` and ``bn_only_parameters``: fine-tuning with BN's statistics and affine parameters
  fixed, or training only the affine parameters (Frankle et al. 2021).
- ``bn_statistics`` and ``load_bn_statistics``: take and restore a snapshot of the statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normlab._validate import check_positive_int, is_number
from normlab.stats import _inputs, batch_norm_layers, precise_bn

__all__ = [
    "adabn",
    "bn_only_parameters",
    "bn_statistics",
    "entropy",
    "freeze_bn",
    "load_bn_statistics",
    "mix_statistics",
    "prior_adapt",
    "tent",
    "unfreeze_bn",
]


def _layers(model, what):
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"the model has no batch norm layers: nothing to {what}")
    return layers


def _tracking_layers(model, what):
    layers = _layers(model, what)
    untracked = [type(m).__name__ for m in layers if not m.track_running_stats or m.running_mean is None]
    if untracked:
        raise ValueError(f"these layers keep no running statistics (track_running_stats=False): {untracked}")
    return layers


# --------------------------------------------------------------------------------------------
# Statistics: snapshot, restore, AdaBN
# --------------------------------------------------------------------------------------------


def bn_statistics(model: nn.Module) -> list:
    """Return a copy of every BN layer's (running_mean, running_var), in the order of ``model.modules()``."""
    return [(m.running_mean.detach().clone(), m.running_var.detach().clone())
            for m in _tracking_layers(model, "read")]


def _check_stats(layers, stats):
    if not isinstance(stats, (list, tuple)) or len(stats) != len(layers):
        n = len(stats) if isinstance(stats, (list, tuple)) else type(stats).__name__
        raise ValueError(f"statistics must be a list of {len(layers)} (mean, var) pairs, one per BN layer; got {n}")
    for i, (m, pair) in enumerate(zip(layers, stats)):
        if len(pair) != 2:
            raise ValueError(f"statistics[{i}] must be a (mean, var) pair, got {len(pair)} items")
        for name, t in zip(("mean", "var"), pair):
            if tuple(torch.as_tensor(t).shape) != tuple(m.running_mean.shape):
                raise ValueError(f"statistics[{i}] {name} has shape {tuple(torch.as_tensor(t).shape)}, "
                                 f"expected {tuple(m.running_mean.shape)} for {type(m).__name__}")
        if (torch.as_tensor(pair[1]) < 0).any():
            raise ValueError(f"statistics[{i}] var has negative entries")


@torch.no_grad()
def load_bn_statistics(model: nn.Module, stats) -> nn.Module:
    """Write ``stats`` (as returned by ``bn_statistics``) into the model's BN layers; return the model."""
    layers = _tracking_layers(model, "write")
    _check_stats(layers, stats)
    for m, (mean, var) in zip(layers, stats):
        m.running_mean.copy_(torch.as_tensor(mean))
        m.running_var.copy_(torch.as_tensor(var))
    return model


def adabn(model: nn.Module, batches) -> nn.Module:
    """AdaBN (Li et al. 2016): set every BN layer's statistics to those of the target ``batches``.

    batches: an iterable of target-domain input tensors, or of (input, target) pairs; labels, if
    present, are ignored. Each layer's running mean and variance become the exact mean and
    unbiased variance of its input over all the batches (not an EMA). During the pass every BN
    layer normalizes each batch with that batch's statistics, as in training, so batches should
    not be tiny. This is ``normlab.precise_bn`` pointed at the target domain. Returns the model,
    in eval mode.
    """
    _tracking_layers(model, "adapt")
    return precise_bn(model, batches)


# --------------------------------------------------------------------------------------------
# Fine-tuning modes
# --------------------------------------------------------------------------------------------


def _stay_in_eval(module, args):
    module.training = False  # runs before every forward: model.train() cannot switch it back


def _remove_hooks(module, tag):
    """Remove the forward (pre-)hooks that carry ``tag``; found by the function, so copies work too."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if getattr(fn, tag, False)]:
            del hooks[key]


def _has_hook(module, tag):
    return any(getattr(fn, tag, False) for fn in module._forward_pre_hooks.values())


_stay_in_eval._normlab_freeze = True


def freeze_bn(model: nn.Module) -> nn.Module:
    """Freeze every BN layer: eval-mode statistics always, affine parameters not trained.

    The rest of the model trains as before. Unlike ``model.eval()``, the freeze survives
    ``model.train()`` (a forward pre-hook puts each BN layer back in eval mode before it runs), and
    unlike setting ``requires_grad=False`` alone, the running statistics stop moving too. This is
    what Keras does for a ``BatchNormalization`` layer with ``trainable = False``. Returns the model.
    """
    for m in _layers(model, "freeze"):
        if not _has_hook(m, "_normlab_freeze"):
            m.register_forward_pre_hook(_stay_in_eval)
        m.eval()
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(False)
    return model


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Undo ``freeze_bn``: BN layers follow ``model.train()``/``eval()`` and their affine parameters train."""
    for m in _layers(model, "unfreeze"):
        _remove_hooks(m, "_normlab_freeze")
        m.train(model.training)
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(True)
    return model


def bn_only_parameters(model: nn.Module) -> list:
    """Return BN's affine parameters (every layer's gamma, then beta), for an optimizer that trains only them."""
    params = []
    for m in _layers(model, "train"):
        if m.weight is None or m.bias is None:
            raise ValueError(f"{type(m).__name__} has no affine parameters (affine=False): nothing to train")
        params += [m.weight, m.bias]
    return params


# --------------------------------------------------------------------------------------------
# Test-time adaptation: Schneider et al.'s prior, TENT
# --------------------------------------------------------------------------------------------


def mix_statistics(source_mean, source_var, x, n_prior):
    """Schneider et al.'s prior: mix source statistics with those of the batch ``x``.

    x: (N, C) or (N, C, *) inputs of a BN layer; source_mean, source_var: (C,). With n = N
    examples in the batch and the batch's per-channel mean and biased variance (over N and every
    position, as BN in training mode computes them), returns
    ``(w * source_mean + (1 - w) * batch_mean, w * source_var + (1 - w) * batch_var)`` with
    w = n_prior / (n_prior + N). n_prior = 0 gives the batch's statistics, math.inf the source's.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C) or (N, C, *), got shape {tuple(x.shape)}")
    n = x.shape[0]
    w = 1.0 if math.isinf(n_prior) else n_prior / (n_prior + n)
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
    return w * source_mean + (1 - w) * mean, w * source_var + (1 - w) * var


def _check_n_prior(n_prior):
    if not is_number(n_prior) or math.isnan(n_prior) or n_prior < 0:
        raise ValueError(f"n_prior must be a number >= 0 (math.inf for the source statistics), got {n_prior!r}")


@torch.no_grad()
def prior_adapt(model: nn.Module, source_stats, n_prior) -> nn.Module:
    """Normalize every test batch with source statistics mixed with the batch's own (Schneider et al. 2020).

    source_stats: one (mean, var) pair per BN layer, as ``bn_statistics`` returns them (the
    statistics of the source domain). n_prior: the pseudo sample size N of the source: a batch of
    n examples is normalized with ``N / (N + n)`` of the source statistics and ``n / (N + n)`` of
    its own (see ``mix_statistics``). N = 0 is pure test-batch statistics; ``math.inf`` is the
    source model. The model is put in eval mode and its running statistics set to ``source_stats``;
    in eval mode each BN layer then mixes before every forward pass and restores the source
    statistics after it, so the state dict is the source's throughout. Calling again replaces the
    previous prior; ``n_prior=math.inf`` removes it. Returns the model.
    """
    _check_n_prior(n_prior)
    layers = _tracking_layers(model, "adapt")
    _check_stats(layers, source_stats)
    for m in layers:
        _remove_hooks(m, "_normlab_prior")
    load_bn_statistics(model, source_stats)
    model.eval()
    if math.isinf(n_prior):
        return model
    for m, (mean, var) in zip(layers, source_stats):
        source = (torch.as_tensor(mean).clone(), torch.as_tensor(var).clone())

        def mix(module, args, source=source):
            if not module.training:
                mixed = mix_statistics(*source, args[0], n_prior)
                module.running_mean.copy_(mixed[0])
                module.running_var.copy_(mixed[1])

        def restore(module, args, output, source=source):
            if not module.training:
                module.running_mean.copy_(source[0])
                module.running_var.copy_(source[1])

        mix._normlab_prior = restore._normlab_prior = True
        m.register_forward_pre_hook(mix)
        m.register_forward_hook(restore)
    return model


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Return the entropy (nats) of softmax(logits) for each row of (..., N, classes) logits: (..., N)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def tent(model: nn.Module, batches, lr: float = 1e-3, steps: int = 1, on_batch=None) -> nn.Module:
    """TENT (Wang et al. 2021): adapt BN's affine parameters on test batches by entropy minimization.

    For each batch of ``batches`` (inputs, or (input, target) pairs whose labels are ignored), in
    order, take ``steps`` Adam steps (learning rate ``lr``) on the mean entropy of the model's
    predictions, updating only BN's gamma and beta; BN normalizes with each batch's own statistics,
    as in training mode, and the gradient flows through them. Everything else is left as it was:
    the other parameters (and their ``requires_grad``), and the running statistics. Evaluate the
    adapted model with test-batch statistics (e.g. ``normlab.runtime.train.accuracy(model, x, y,
    batch_size=B, train_mode=True)``), as TENT does. ``on_batch(logits)``, if given, is called
    with each batch's logits (detached) from the forward pass that the batch's first update uses:
    the predictions TENT makes online, on that batch before adapting to it. Returns the model, in
    eval mode.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    check_positive_int("steps", steps)
    layers = _tracking_layers(model, "adapt")
    params = bn_only_parameters(model)
    chosen = {id(p) for p in params}
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    saved_stats = bn_statistics(model)
    saved_tracked = [m.num_batches_tracked.clone() for m in layers]
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = torch.optim.Adam(params, lr=lr)
    model.eval()
    for m in layers:
        m.train()  # batch statistics, with gradients through them
    seen = 0
    try:
        for batch in batches:
            x = _inputs(batch)
            if x.shape[0] < 2:
                raise ValueError(f"tent needs batches of at least 2 examples, got one of {x.shape[0]}")
            for step in range(steps):
                logits = model(x)
                if step == 0 and on_batch is not None:
                    on_batch(logits.detach())
                # The mean entropy of the batch; summed over the members of a normlab.runtime.ensemble (logits
                # (K, N, classes)), so that each member gets the gradient it would get alone.
                loss = entropy(logits).mean(-1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            seen += 1
    finally:
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        load_bn_statistics(model, saved_stats)
        with torch.no_grad():
            for m, count in zip(layers, saved_tracked):
                m.num_batches_tracked.copy_(count)
        model.eval()
    if seen == 0:
        raise ValueError("batches is empty: tent needs at least one batch")
    return model
