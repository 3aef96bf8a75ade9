"""Self-checks for the exercises: run a student's function against the reference on several inputs.

Each ``check_*`` prints one line when every case passes. Otherwise it raises ``AssertionError``
naming the case, the output, the first element that is off, and the expected and actual values.
"""

from __future__ import annotations

import numpy as np

from normlab import scratch

__all__ = [
    "assert_close",
    "check_forward",
    "check_backward",
    "check_running_stats",
    "check_bn_backward",
    "check_cumulative_average",
    "check_fold",
    "check_drift_ratio",
    "check_noise",
    "check_predicted_noise",
    "check_ghost_forward",
    "check_variance_shift",
    "check_batch_renorm",
    "check_grad_accumulation",
]


def assert_close(name, got, expected, rtol=1e-7, atol=1e-9):
    """Raise AssertionError naming the worst element of ``got`` when it is not close to ``expected``."""
    expected = np.asarray(expected)
    if got is None:
        raise AssertionError(f"{name}: got None (did the function forget to return it?)")
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {got.shape}, expected {expected.shape}")
    bad = ~np.isclose(got, expected, rtol=rtol, atol=atol)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements differ; first at index {idx}: "
            f"expected {expected[idx]:.10g}, got {got[idx]:.10g} (rtol={rtol}, atol={atol})"
        )


def _cases(seed=0):
    """Yield (description, x, gamma, beta) test inputs in float64: 2-D and 4-D, odd shapes."""
    rng = np.random.default_rng(seed)
    for shape in [(4, 3), (16, 5), (2, 3, 4, 5), (3, 2, 1, 7)]:
        C = shape[1]
        x = rng.normal(2.0, 3.0, size=shape)
        gamma = rng.normal(1.0, 0.5, size=C)
        beta = rng.normal(0.0, 0.5, size=C)
        yield f"x of shape {shape}", x, gamma, beta


def _pass(what, n):
    print(f"PASS {what}: matches the reference on {n} inputs.")


def check_forward(fn, eps=1e-5):
    """Check ``fn(x, gamma, beta, eps) -> out``: training-mode batch norm, (N, D) or (N, C, H, W)."""
    n = 0
    for desc, x, gamma, beta in _cases():
        expected, _ = scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)
        got = fn(x.copy(), gamma.copy(), beta.copy(), eps)
        assert_close(f"forward, {desc}: out", got, expected)
        n += 1
    _pass("forward", n)


def check_backward(fn, eps=1e-5):
    """Check ``fn(dout, x, gamma, eps) -> (dx, dgamma, dbeta)`` for training-mode batch norm."""
    rng = np.random.default_rng(1)
    n = 0
    for desc, x, gamma, beta in _cases():
        out, cache = scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)
        dout = rng.normal(size=out.shape)
        expected = scratch.batch_norm_backward_fast(dout, cache)
        got = fn(dout.copy(), x.copy(), gamma.copy(), eps)
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError(f"backward, {desc}: expected a tuple (dx, dgamma, dbeta), got {type(got).__name__}")
        for name, g, e in zip(("dx", "dgamma", "dbeta"), got, expected, strict=True):
            assert_close(f"backward, {desc}: {name}", g, e)
        n += 1
    _pass("backward", n)


def check_running_stats(fn, momentum=0.1):
    """Check ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)`` (PyTorch's rule)."""
    rng = np.random.default_rng(2)
    n = 0
    for desc, x, gamma, beta in _cases():
        C = x.shape[1]
        rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, size=C)
        exp_m, exp_v = rm.copy(), rv.copy()
        scratch.batch_norm_forward(x, gamma, beta, exp_m, exp_v, momentum=momentum)
        got = fn(rm.copy(), rv.copy(), x.copy(), momentum)
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError(f"running stats, {desc}: expected a tuple (new_mean, new_var)")
        assert_close(f"running stats, {desc}: new_mean", got[0], exp_m)
        assert_close(f"running stats, {desc}: new_var", got[1], exp_v)
        n += 1
    _pass("running statistics", n)


def _torch_cases(seed=0):
    """Yield (description, x) float64 tensors: 2-D and 4-D, odd shapes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for shape in [(5, 3), (16, 4), (2, 3, 4, 5), (4, 2, 1, 3)]:
        yield f"x of shape {shape}", torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1


def check_bn_backward(fn):
    """Check ``fn(grad_out, x_hat, invstd, weight) -> (grad_input, grad_weight, grad_bias)`` (training mode)."""
    import torch

    from normlab.functional import batch_norm

    n = 0
    for desc, x in _torch_cases():
        C = x.shape[1]
        gen = torch.Generator().manual_seed(n)
        weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        bias = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()
        x = x.requires_grad_()
        out = batch_norm(x, None, None, weight, bias, training=True)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        expected = torch.autograd.grad(out, (x, weight, bias), grad_out)
        dims = [0] + list(range(2, x.dim()))
        shape = (1, C) + (1,) * (x.dim() - 2)
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            invstd = torch.rsqrt(var + 1e-5)
            x_hat = (x - mean.view(shape)) * invstd.view(shape)
            got = fn(grad_out.clone(), x_hat.clone(), invstd.clone(), weight.detach().clone())
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError(f"backward, {desc}: expected a tuple (grad_input, grad_weight, grad_bias)")
        for name, g, e in zip(("grad_input", "grad_weight", "grad_bias"), got, expected, strict=True):
            assert_close(f"backward, {desc}: {name}", None if g is None else g.detach().numpy(), e.numpy())
        n += 1
    _pass("autograd backward", n)


def check_cumulative_average(fn):
    """Check ``fn(running, batch_stat, k) -> new running``: the momentum=None update after batch k."""
    import torch

    from normlab.nn import BatchNorm1d

    gen = torch.Generator().manual_seed(3)
    bn = BatchNorm1d(4, momentum=None, dtype=torch.float64)
    running = bn.running_mean.clone()
    for k in range(1, 8):
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64) * k + k
        bn(x)
        running = fn(running.clone(), x.mean(0), k)
        assert_close(f"cumulative average after batch {k}", None if running is None else running.numpy(),
                     bn.running_mean.numpy())
    _pass("cumulative average (momentum=None)", 7)


def check_fold(fn):
    """Check ``fn(layer, bn) -> new layer`` computing bn(layer(x)) for Linear / Conv2d, with and without bias."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    cases = [
        ("Linear with bias", nn.Linear(5, 3), nn.BatchNorm1d(3), (8, 5)),
        ("Linear without bias", nn.Linear(5, 3, bias=False), nn.BatchNorm1d(3), (8, 5)),
        ("Conv2d with bias", nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), (3, 2, 6, 6)),
        ("Conv2d without bias", nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), (3, 2, 6, 6)),
    ]
    for desc, layer, bn, shape in cases:
        layer, bn = layer.double(), bn.double()
        with torch.no_grad():  # non-trivial statistics and affine parameters
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
        bn.eval()
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            expected = bn(layer(x))
            folded = fn(layer, bn)
            if not isinstance(folded, nn.Module):
                raise AssertionError(f"{desc}: expected an nn.Module, got {type(folded).__name__}")
            got = folded(x)
        assert_close(f"fold, {desc}: output", got.numpy(), expected.numpy())
    _pass("folding", len(cases))


def check_drift_ratio(fn):
    """Check ``fn(p15, p50, p85) -> ratio`` against ``drift_ratio`` on several percentile traces."""
    from normlab.experiments.covariate_shift import drift_ratio

    rng = np.random.default_rng(0)
    cases = [
        ("a constant distribution", np.full(5, -1.0), np.zeros(5), np.ones(5)),
        ("a median that climbs", -np.ones(4), np.array([0.0, 1.0, 3.0, 2.0]), np.array([1.0, 2, 4, 3])),
    ]
    p50 = rng.normal(size=(20, 3)).cumsum(0)
    spread = rng.uniform(0.5, 2.0, size=(20, 3))
    cases.append(("random walks of 3 units over 20 steps", p50 - spread, p50, p50 + spread))
    for desc, p15, p50, p85 in cases:
        assert_close(f"drift ratio for {desc}", fn(p15, p50, p85), drift_ratio(p15, p50, p85), rtol=1e-9)
    print(f"PASS drift ratio: matches the reference on {len(cases)} inputs.")


def check_noise(fn):
    """Check ``fn(a, mu_t, sigma_t, generator) -> s * a + m`` by the statistics of its noise."""
    import math

    import torch

    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for mu_t, sigma_t in [(0.3, 1.1), (-0.45, 1.0)]:
        zero = fn(torch.zeros(n, 2), mu_t, sigma_t, gen)
        if zero is None or tuple(zero.shape) != (n, 2):
            got = getattr(zero, "shape", None)
            raise AssertionError(f"noise on a ({n}, 2) input: got shape {got}, expected ({n}, 2)")
        case = f"mu_t={mu_t}, sigma_t={sigma_t}"
        assert_close(f"{case}, a = 0: min of m", zero.min().item(), mu_t - 0.1, atol=2e-3)
        assert_close(f"{case}, a = 0: max of m", zero.max().item(), mu_t + 0.1, atol=2e-3)
        assert_close(f"{case}, a = 0: mean of m", zero.mean().item(), mu_t, atol=2e-3)
        one = fn(torch.ones(n, 2), mu_t, sigma_t, gen)
        assert_close(f"{case}, a = 1: mean of s + m", one.mean().item(), sigma_t + mu_t, atol=3e-3)
        std = math.sqrt(0.1**2 + 0.2**2 / 12)  # s and m independent: N(., 0.1) plus U(width 0.2)
        assert_close(f"{case}, a = 1: std of s + m", one.std().item(), std, rtol=0.02)
        if torch.equal(zero[:, 0], zero[:, 1]):
            raise AssertionError(f"{case}: both columns got the same noise; m must be drawn per element")
    print("PASS noise: m and s have the right ranges, means and spreads on 2 settings.")


def check_predicted_noise(fn):
    """Check ``fn(h, batch_sizes, examples) -> (len(B), U)``, the delta method's std of a normalized value."""
    from normlab.experiments.regularization import predicted_noise

    rng = np.random.default_rng(3)
    cases = [
        ("Gaussian units", rng.normal(size=(500, 3)), [4, 16], [0, 1, 2]),
        ("skewed units", rng.exponential(size=(300, 2)), [8, 32, 128], [5, 7]),
        ("one heavy-tailed unit", rng.standard_t(5, size=(400, 1)) * 3 + 1, [2, 64], [10]),
    ]
    for desc, h, sizes, examples in cases:
        assert_close(f"predicted noise for {desc}", fn(h, sizes, examples), predicted_noise(h, sizes, examples),
                     rtol=1e-9)
    _pass("predicted noise", len(cases))


def check_ghost_forward(fn):
    """Check ``fn(x, gamma, beta, virtual_batch_size, eps) -> out``: ghost batch norm in training mode.

    x is (N, D); consecutive groups of ``virtual_batch_size`` rows (the last takes the remainder)
    are each normalized with their own mean and biased variance, then scaled and shifted.
    """
    rng = np.random.default_rng(1)
    cases = [(12, 3, 4), (10, 2, 4), (8, 5, 8), (6, 3, 100)]
    for n, d, v in cases:
        x = rng.normal(1.0, 2.0, size=(n, d))
        gamma, beta = rng.normal(1.0, 0.5, size=d), rng.normal(0.0, 0.5, size=d)
        expected = np.concatenate(
            [
                scratch.batch_norm_forward(x[i : i + v], gamma, beta, np.zeros(d), np.ones(d), eps=1e-5)[0]
                for i in range(0, n, v)
            ]
        )
        got = fn(x, gamma, beta, v, 1e-5)
        assert_close(f"ghost BN of x ({n}, {d}) with virtual batches of {v}", got, expected)
    _pass("ghost batch norm forward", len(cases))


def check_variance_shift(fn):
    """Check ``fn(a, weight, p) -> ratio``, the predicted variance shift per output channel."""
    from normlab.experiments.regularization import predicted_variance_ratio

    rng = np.random.default_rng(2)
    cases = [(200, 5, 3, 0.5), (50, 8, 4, 0.2), (100, 1, 2, 0.5), (100, 6, 6, 0.0)]
    for n, d, c, p in cases:
        a = np.maximum(rng.normal(0.3, 1.0, size=(n, d)), 0)  # ReLU outputs
        w = rng.normal(size=(c, d))
        assert_close(f"ratio for a ({n}, {d}), weight ({c}, {d}), p={p}", fn(a, w, p),
                     predicted_variance_ratio(a, w, p), rtol=1e-9)
    _pass("variance shift", len(cases))


def check_batch_renorm(fn):
    """Check ``fn(x, gamma, beta, running_mean, running_var, r_max, d_max, eps) -> out`` (renorm, training).

    x: (N, C) or (N, C, H, W) float64 tensors; the reference is ``normlab.nn.BatchRenorm1d/2d``.
    The cases include limits that clip r and d and limits that do not.
    """
    import math

    import torch

    from normlab.nn import BatchRenorm1d, BatchRenorm2d

    gen = torch.Generator().manual_seed(5)
    cases = [((16, 4), 3.0, 5.0), ((4, 3), 1.5, 0.5), ((3, 2, 4, 5), 3.0, 5.0), ((8, 5), 1.0, 0.0),
             ((6, 3), math.inf, math.inf)]
    for shape, r_max, d_max in cases:
        C = shape[1]
        layer = (BatchRenorm1d if len(shape) == 2 else BatchRenorm2d)(C, r_max=r_max, d_max=d_max,
                                                                       dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) * 4 + 0.1)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
        args = [t.detach().clone() for t in (x, layer.weight, layer.bias, layer.running_mean, layer.running_var)]
        with torch.no_grad():
            got = fn(*args, r_max, d_max, layer.eps)
            expected = layer(x)
        if got is None:
            raise AssertionError(f"batch renorm, x of shape {shape}: got None (did the function forget to return?)")
        got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
        assert_close(f"batch renorm, x of shape {shape}, r_max={r_max}, d_max={d_max}: out", got,
                     expected.numpy(), rtol=1e-9, atol=1e-9)
    _pass("batch renormalization", len(cases))


def check_grad_accumulation(fn):
    """Check ``fn(model, x, y, k) -> relative difference`` against ``experiments.small_batches.grad_accumulation``.

    Cases: an MLP without normalization, with LayerNorm, with BN in train mode and with BN in eval
    mode, float64, k = 1, 2, 4.
    """
    import torch
    from torch import nn

    from normlab.experiments.small_batches import grad_accumulation
    from normlab.nn import BatchNorm1d

    torch.manual_seed(0)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    n = 0
    for name, norm, train in [("no norm", nn.Identity(), True), ("LayerNorm", nn.LayerNorm(8), True),
                              ("BN, train mode", BatchNorm1d(8), True), ("BN, eval mode", BatchNorm1d(8), False)]:
        model = nn.Sequential(nn.Linear(6, 8), norm, nn.ReLU(), nn.Linear(8, 3)).double()
        if not train:
            with torch.no_grad():
                model(x)  # give the eval-mode BN running statistics that are not (0, 1)
        model.train(train)
        for k in (1, 2, 4):
            expected = grad_accumulation(model, x, y, k)
            got = fn(model, x, y, k)
            if got is None:
                raise AssertionError(f"gradient accumulation, {name}, k={k}: got None")
            assert_close(f"gradient accumulation, {name}, k={k}: relative difference", float(got), expected,
                         rtol=1e-6, atol=1e-9)
            n += 1
    _pass("gradient accumulation", n)
