"""Self-checks of "Batch norm and transfer learning" (``chapters/transfer``).

- ``lab_adapt.ipynb``: ``check_adabn``, ``check_prior_mix``;
- ``lab_finetune.ipynb``: ``check_freeze_bn``, ``check_set_mode``;
- ``lab_baselines.ipynb``: ``check_blur``;
- ``lab_bn_only.ipynb``: ``check_bn_only``, ``check_beta_for_fraction``.
"""

from __future__ import annotations

import numpy as np

from normlab.checks._common import _pass, _self_check, assert_close


def _adapt_models():
    """Yield (description, model, batches): small float64 BN models and target batches of unequal sizes."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
    cnn = nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU(),
                        nn.Conv1d(3, 3, 3), nn.BatchNorm1d(3)).double()
    for desc, model, shape in (("MLP with two BN layers", mlp, (5,)), ("1-D CNN with two BN layers", cnn, (2, 9))):
        batches = [torch.randn((n, *shape), generator=gen, dtype=torch.float64) * 3 + 2 for n in (7, 4, 12)]
        yield desc, model, batches


@_self_check
def check_adabn(fn):
    """Check ``fn(model, batches) -> model``: every BN layer gets the exact mean and unbiased variance
    of its input over all the target batches (unequal sizes), with the earlier layers adapted first."""
    import copy

    from normlab.adapt import adabn
    from normlab.stats import batch_norm_layers

    n = 0
    for desc, model, batches in _adapt_models():
        expected = adabn(copy.deepcopy(model), batches)
        got = fn(copy.deepcopy(model), [b.clone() for b in batches])
        if got is None:
            raise AssertionError(f"AdaBN, {desc}: got None (did the function forget to return the model?)")
        for i, (g, e) in enumerate(zip(batch_norm_layers(got), batch_norm_layers(expected))):
            for stat in ("running_mean", "running_var"):
                assert_close(f"AdaBN, {desc}, BN layer {i}: {stat}", getattr(g, stat).detach().numpy(),
                             getattr(e, stat).numpy(), rtol=1e-9, atol=1e-9)
        if got.training:
            raise AssertionError(f"AdaBN, {desc}: the model is in training mode; return it in eval mode")
        n += 1
    _pass("AdaBN", n)


@_self_check
def check_prior_mix(fn):
    """Check ``fn(source_mean, source_var, x, n_prior) -> (mean, var)``: Schneider et al.'s mixture
    with weight n_prior / (n_prior + N) on the source, N the batch size, and the batch's biased variance."""
    import math

    import torch

    from normlab.adapt import mix_statistics

    gen = torch.Generator().manual_seed(3)
    n = 0
    for shape in ((8, 3), (2, 4), (5, 3, 6)):
        C = shape[1]
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
        mu_s = torch.randn(C, generator=gen, dtype=torch.float64)
        var_s = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
        for n_prior in (0, 8, 32, math.inf):
            expected = mix_statistics(mu_s, var_s, x, n_prior)
            got = fn(mu_s.clone(), var_s.clone(), x.clone(), n_prior)
            if got is None or len(got) != 2:
                raise AssertionError(f"prior mixing, x of shape {shape}, n_prior={n_prior}: expected (mean, var), "
                                     f"got {got!r}")
            for name, g, e in zip(("mean", "var"), got, expected):
                g = g.detach().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
                assert_close(f"prior mixing, x of shape {shape}, n_prior={n_prior}: {name}", g, e.numpy(),
                             rtol=1e-9, atol=1e-12)
            n += 1
    _pass("prior mixing", n)


@_self_check
def check_blur(fn):
    """Check ``fn(x, sigma) -> y``: each row of x (N, L) smoothed by a normalized Gaussian kernel of
    half-width max(1, ceil(3 sigma)), the ends padded by repeating the end values (``data.blur``)."""
    import torch

    from normlab.runtime.data import blur_signals

    gen = torch.Generator().manual_seed(6)
    cases = [("random rows", torch.randn(4, 40, generator=gen, dtype=torch.float64), 1.0),
             ("a constant row", torch.full((1, 20), 2.5, dtype=torch.float64), 2.0),
             ("a spike near the end", torch.eye(15, dtype=torch.float64)[13:14], 1.5),
             ("a narrow kernel", torch.randn(3, 12, generator=gen, dtype=torch.float64), 0.3)]
    for desc, x, sigma in cases:
        got = fn(x.clone(), sigma)
        assert_close(f"blur, {desc} (sigma {sigma})", got, blur_signals(x, sigma).numpy(), rtol=1e-9, atol=1e-12)
    _pass("blur", len(cases))


def _bn_models():
    """Small models with BN layers, fresh on each call: an MLP (BatchNorm1d) and a CNN (BatchNorm2d)."""
    import torch
    from torch import nn

    from normlab.experiments.regularization import make_mlp

    with torch.random.fork_rng():  # the lab's random state stays as it was
        mlp = make_mlp(12, 3, width=8, seed=0)
        torch.manual_seed(1)
        cnn = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 2 * 2, 3))
    return [("an MLP with BatchNorm1d", mlp, lambda g: torch.randn(16, 12, generator=g)),
            ("a CNN with BatchNorm2d", cnn, lambda g: torch.randn(8, 1, 6, 6, generator=g))]


def _same_requires_grad(model, ref, what):
    """Raise naming the first parameter of model whose requires_grad differs from ref's."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad != q.requires_grad:
            raise AssertionError(f"{what}: {name} has requires_grad={p.requires_grad}, expected {q.requires_grad}")


@_self_check
def check_bn_only(fn):
    """Check ``fn(model) -> count``: every parameter frozen (``requires_grad`` False) except the BN
    layers' gamma and beta; returns the number of values left to train. The reference is
    ``transfer.set_mode(model, "bn_only")``."""
    from normlab.experiments import transfer as tr

    models = _bn_models()
    for (desc, model, _), (_, ref, _) in zip(models, _bn_models()):
        tr.set_mode(ref, "bn_only")
        count = fn(model)
        _same_requires_grad(model, ref, f"BN only, {desc}")
        expected = sum(q.numel() for q in ref.parameters() if q.requires_grad)
        if count != expected:
            raise AssertionError(f"BN only, {desc}: returned {count} trainable values, expected {expected}")
    _pass("BN-only freezing", len(models))


@_self_check
def check_beta_for_fraction(fn):
    """Check ``fn(q) -> beta``: the shift after which ReLU(x_hat + beta) is positive for a fraction q
    of standard normal x_hat, i.e. the normal quantile at q."""
    from statistics import NormalDist

    qs = [0.5, 0.1, 0.9, 0.01, 0.75]
    for q in qs:
        assert_close(f"beta for a fraction {q}", float(fn(q)), NormalDist().inv_cdf(q), rtol=1e-6, atol=1e-8)
    _pass("beta for a fraction of active units", len(qs))


def _train_steps(model, make_batch, steps=3):
    """A few SGD steps in ``model.train()`` mode on the parameters that require grad."""
    import torch

    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for _ in range(steps):
        model.train()  # what every training loop does
        loss = model(make_batch(gen)).logsumexp(dim=1).mean()
        if opt:
            opt.zero_grad()
            loss.backward()
            opt.step()


@_self_check
def check_freeze_bn(fn):
    """Check ``fn(model) -> model``: every BN layer frozen, and still frozen after ``model.train()``.

    After fn, a few SGD steps in training mode (``model.train()`` before each, as training loops do)
    must leave every BN layer's running statistics, gamma and beta as they were, normalize with the
    running statistics, and still train the other layers.
    """
    import torch

    from normlab.stats import batch_norm_layers

    models = _bn_models()
    for desc, model, make_batch in models:
        got = fn(model)
        if got is not model:
            raise AssertionError(f"freeze_bn, {desc}: return the model it was given")
        layers = batch_norm_layers(model)
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
        others = {n: p.detach().clone() for n, p in model.named_parameters()
                  if not any(p is q for m in layers for q in m.parameters())}
        _train_steps(model, make_batch)
        for i, (m, saved) in enumerate(zip(layers, before)):
            for key, value in m.state_dict().items():
                if not torch.equal(value, saved[key]):
                    raise AssertionError(f"freeze_bn, {desc}: BN layer {i}'s {key} changed during training "
                                         f"(model.train() must not undo the freeze)")
        model.train()
        x = make_batch(torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = model(x)
            model.eval()
            expected = model(x)
        assert_close(f"freeze_bn, {desc}: output in train mode (BN must use its running statistics)", out, expected,
                     rtol=1e-6, atol=1e-7)
        if not any(not torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others):
            raise AssertionError(f"freeze_bn, {desc}: the other layers did not train (freeze only the BN layers)")
    _pass("freeze_bn", len(models))


@_self_check
def check_set_mode(fn):
    """Check ``fn(model, mode) -> model`` for the four fine-tuning modes of ``transfer.MODES``.

    Compared with ``transfer.set_mode`` on the same model: which parameters require grad, and,
    after ``model.train()`` and a forward, which BN layers normalize with batch statistics.
    """
    import torch

    from normlab.experiments import transfer as tr
    from normlab.stats import batch_norm_layers

    n = 0
    for mode in tr.MODES:
        for (desc, model, make_batch), (_, ref, _) in zip(_bn_models(), _bn_models()):
            fn(model, mode)
            tr.set_mode(ref, mode)
            _same_requires_grad(model, ref, f"mode {mode!r}, {desc}")
            x = make_batch(torch.Generator().manual_seed(2))
            for m in (model, ref):
                m.train()
                with torch.no_grad():
                    m(x)
            for i, (a, b) in enumerate(zip(batch_norm_layers(model), batch_norm_layers(ref))):
                if a.training != b.training or not torch.equal(a.running_mean, b.running_mean):
                    state = "frozen (running statistics)" if not b.training else "in train mode (batch statistics)"
                    raise AssertionError(f"mode {mode!r}, {desc}: after model.train(), BN layer {i} should be {state}")
            n += 1
    _pass("fine-tuning modes", n)
