"""Self-checks for the exercises: run a student's function against the reference on several inputs.

Each ``check_*`` prints one line when every case passes. Otherwise it raises ``AssertionError``
naming the case, the output, the first element that is off, and the expected and actual values.

A function that is still the student edition's stub (it raises ``NotImplementedError``) is not an
error: the check prints ``NOT ATTEMPTED`` and returns, so "Run All" goes on to the end. A later
cell that needs the student's function asks ``solution_or_reference(fn, reference)``: the
student's function once its check has passed, the course's reference (said in one line) until then.
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref

import numpy as np

from normlab import scratch

__all__ = [
    "assert_close",
    "passed",
    "solution_or_reference",
    "check_forward",
    "check_backward",
    "check_running_stats",
    "check_block_forward",
    "check_block_backward",
    "check_bn_backward",
    "check_cumulative_average",
    "check_fold",
    "check_drift_ratio",
    "check_noise",
    "check_block_growth",
    "check_predicted_noise",
    "check_ghost_forward",
    "check_variance_shift",
    "check_batch_renorm",
    "check_grad_accumulation",
    "check_group_norm",
    "check_adain",
    "check_steps_to_target",
    "check_layer_norm_backward",
    "check_adabn",
    "check_prior_mix",
    "check_blur",
    "check_chan_merge",
    "check_channel_sums",
    "check_triton_sums",
    "check_merge_moments",
    "check_sync_backward",
    "check_bn_module",
    "check_largest_rate",
    "check_ghost_running",
    "check_measured_noise",
    "check_ema_weights",
    "check_sequence_norm",
    "check_style_loss",
    "check_bn_only",
    "check_beta_for_fraction",
    "check_freeze_bn",
    "check_set_mode",
]

NOT_ATTEMPTED = "NOT ATTEMPTED"  # normlab.grade reads this marker in a self-check's output
_passed = weakref.WeakSet()  # the functions whose self-check passed in this session


def _self_check(check):
    """Make ``check(fn, ...)`` tolerate the stub: print NOT ATTEMPTED and return instead of raising;
    remember ``fn`` when the check passes (``passed``)."""

    @functools.wraps(check)
    def run(fn, *args, **kwargs):
        _passed.discard(fn)
        try:
            checked = check(fn, *args, **kwargs)  # False: the check could not run here (it said why)
        except NotImplementedError as exc:
            what = str(exc).removesuffix(" (write your solution here)") or fn.__name__
            print(f"{NOT_ATTEMPTED} {what}: nothing to check yet. The notebook goes on; cells that "
                  "need this function use the course's reference until its check passes.")
            return
        if checked is not False:
            _passed.add(fn)

    return run


_STUB = re.compile(r"raise NotImplementedError\((['\"])(.*?)\1\)")


def _raise_if_stub(fn):
    """Raise the stub's NotImplementedError if ``fn``'s source is the student edition's stub.

    For a Triton kernel, which cannot raise once compiled: its source says whether it is a stub.
    """
    try:
        source = inspect.getsource(getattr(fn, "fn", fn))  # a triton kernel keeps its function in .fn
    except (OSError, TypeError):
        return
    stub = _STUB.search(source)
    if stub:
        raise NotImplementedError(stub.group(2))


def passed(fn) -> bool:
    """Return True when ``fn`` passed its self-check in this session (and was not redefined since)."""
    return fn in _passed


def solution_or_reference(fn, reference):
    """Return ``fn`` if it passed its self-check, else ``reference``, saying which one is used.

    ``reference`` None stands for the course's own code where the caller treats None so (for
    instance ``kernels.channel_sums(..., kernel=None)`` runs the course's kernel).
    """
    if passed(fn):
        return fn
    which = "own code" if reference is None else f"reference ({reference.__module__}.{reference.__qualname__})"
    print(f"{fn.__name__} has not passed its self-check yet: this cell uses the course's {which} instead.")
    return reference



def assert_close(name, got, expected, rtol=1e-7, atol=1e-9):
    """Raise AssertionError naming the worst element of ``got`` when it is not close to ``expected``."""
    expected = np.asarray(expected)
    if got is None:
        raise AssertionError(f"{name}: got None (did the function forget to return it?)")
    got = got.detach().cpu().numpy() if hasattr(got, "detach") else np.asarray(got)  # a torch tensor, or not
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


@_self_check
def check_forward(fn, eps=1e-5):
    """Check ``fn(x, gamma, beta, eps) -> out``: training-mode batch norm, (N, D) or (N, C, H, W)."""
    n = 0
    for desc, x, gamma, beta in _cases():
        expected, _ = scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)
        got = fn(x.copy(), gamma.copy(), beta.copy(), eps)
        assert_close(f"forward, {desc}: out", got, expected)
        n += 1
    _pass("forward", n)


@_self_check
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


@_self_check
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


def _block_cases(seed=4):
    """Yield (description, x, w, gamma, beta) float64 inputs of one MLP block."""
    rng = np.random.default_rng(seed)
    for n, d_in, d_out in [(4, 3, 2), (16, 5, 7), (32, 64, 10)]:
        x = rng.normal(0.5, 1.5, size=(n, d_in))
        w = rng.normal(0.0, 1.0, size=(d_in, d_out))
        gamma, beta = rng.normal(1.0, 0.5, size=d_out), rng.normal(0.2, 0.5, size=d_out)
        yield f"x {x.shape} @ w {w.shape}", x, w, gamma, beta


@_self_check
def check_block_forward(fn, eps=1e-5):
    """Check ``fn(x, w, gamma, beta, eps) -> (out, cache)``: out = relu(batch_norm(x @ w))."""
    n = 0
    for desc, x, w, gamma, beta in _block_cases():
        expected, _ = scratch.block_forward(x, w, gamma, beta, eps)
        got = fn(x.copy(), w.copy(), gamma.copy(), beta.copy(), eps)
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError(f"block forward, {desc}: expected a tuple (out, cache)")
        assert_close(f"block forward, {desc}: out", got[0], expected)
        n += 1
    _pass("block forward", n)


@_self_check
def check_block_backward(fn, forward=None, eps=1e-5):
    """Check ``fn(dout, cache) -> (dx, dw, dgamma, dbeta)``, with the cache from ``forward`` (the
    student's block forward; default ``scratch.block_forward``)."""
    forward = forward or scratch.block_forward
    rng = np.random.default_rng(5)
    n = 0
    for desc, x, w, gamma, beta in _block_cases():
        out, cache = scratch.block_forward(x, w, gamma, beta, eps)
        dout = rng.normal(size=out.shape)
        expected = scratch.block_backward(dout, cache)
        _, cache = forward(x.copy(), w.copy(), gamma.copy(), beta.copy(), eps)
        got = fn(dout.copy(), cache)
        if not isinstance(got, tuple) or len(got) != 4:
            raise AssertionError(f"block backward, {desc}: expected a tuple (dx, dw, dgamma, dbeta)")
        for name, g, e in zip(("dx", "dw", "dgamma", "dbeta"), got, expected, strict=True):
            assert_close(f"block backward, {desc}: {name}", g, e)
        n += 1
    _pass("block backward", n)


def _torch_cases(seed=0):
    """Yield (description, x) float64 tensors: 2-D and 4-D, odd shapes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for shape in [(5, 3), (16, 4), (2, 3, 4, 5), (4, 2, 1, 3)]:
        yield f"x of shape {shape}", torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1


@_self_check
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


@_self_check
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


@_self_check
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


@_self_check
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


@_self_check
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


@_self_check
def check_block_growth(fn):
    """Check ``fn(scale) -> g``, the factor by which a plain pre-activation residual block
    x + W2 relu(W1 relu(x)) multiplies the mean square of x at initialization (weights
    ~ N(0, scale^2 / fan_in)), against a simulation of wide random blocks."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n, width, draws = 2048, 256, 32  # the simulation's own error is about 1%
    x = torch.randn(n, width, generator=gen)
    for scale in (0.5, 1.0, 2**0.5, 1.7):
        got = fn(scale)
        ratios = []
        for _ in range(draws):
            W1, W2 = (torch.randn(width, width, generator=gen) * scale / width**0.5 for _ in range(2))
            y = x + torch.relu(torch.relu(x) @ W1) @ W2
            ratios.append(((y**2).mean() / (x**2).mean()).item())
        assert_close(f"growth of the mean square at scale {scale:.3g}", got, float(np.mean(ratios)), rtol=0.05)
    print(f"PASS block growth: matches {draws} random blocks at each of 4 scales (within 5%).")


@_self_check
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


@_self_check
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


@_self_check
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


@_self_check
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


@_self_check
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


def _norm_cases(seed=0):
    """Yield (description, x) float64 inputs (N, C, *) with channel counts that several group counts divide."""
    rng = np.random.default_rng(seed)
    for shape in [(2, 6, 5), (3, 4, 2, 3), (1, 8, 4), (4, 6)]:
        yield f"x of shape {shape}", rng.normal(1.0, 2.0, size=shape)


@_self_check
def check_group_norm(fn, eps=1e-5):
    """Check ``fn(x, num_groups, weight, bias, eps) -> out`` against ``scratch.group_norm`` (float64).

    Cases include num_groups = 1 (layer norm) and num_groups = C (instance norm).
    """
    rng = np.random.default_rng(3)
    n = 0
    for desc, x in _norm_cases():
        C = x.shape[1]
        for G in sorted({1, 2, C}):
            w, b = rng.normal(1.0, 0.3, size=C), rng.normal(0.0, 0.3, size=C)
            expected, _ = scratch.group_norm(x, G, w, b, eps)
            got = fn(x.copy(), G, w.copy(), b.copy(), eps)
            assert_close(f"group norm, {desc}, num_groups={G}: out", got, expected)
            n += 1
    _pass("group norm", n)


@_self_check
def check_layer_norm_backward(fn, eps=1e-5):
    """Check ``fn(dout, x, weight, eps) -> (dx, dweight, dbias)`` for layer norm over the last dim of x (N, D)."""
    rng = np.random.default_rng(4)
    cases = [(4, 5), (2, 8), (6, 3), (1, 7)]
    for shape in cases:
        x = rng.normal(0.5, 2.0, size=shape)
        w, b = rng.normal(1.0, 0.3, size=shape[1]), rng.normal(size=shape[1])
        dout = rng.normal(size=shape)
        _, cache = scratch.layer_norm(x, shape[1], w, b, eps)
        expected = scratch.layer_norm_backward(dout, cache)
        got = fn(dout.copy(), x.copy(), w.copy(), eps)
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError(f"layer norm backward, x of shape {shape}: expected a tuple (dx, dweight, dbias)")
        for name, g, e in zip(("dx", "dweight", "dbias"), got, expected):
            assert_close(f"layer norm backward, x of shape {shape}: {name}", g, e)
    _pass("layer norm backward", len(cases))


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
def check_adain(fn):
    """Check ``fn(content, style, eps) -> out``: adaptive instance normalization of (N, C, H, W)
    features, statistics per example and channel over space (biased variance, eps inside the root);
    the style may have another H, W. The reference is ``experiments.alternatives.adain``."""
    import torch

    from normlab.experiments.alternatives import adain

    gen = torch.Generator().manual_seed(8)
    cases = [("same sizes", (2, 3, 6, 6), (2, 3, 6, 6), 1e-5),
             ("a smaller style", (1, 4, 7, 5), (1, 4, 3, 3), 1e-5),
             ("eps 0.1 (inside the square root)", (2, 2, 4, 4), (2, 2, 5, 5), 0.1),
             ("one channel", (3, 1, 5, 5), (3, 1, 2, 6), 1e-5)]
    for desc, c_shape, s_shape, eps in cases:
        content = torch.randn(c_shape, generator=gen, dtype=torch.float64) * 3 + 1
        style = torch.randn(s_shape, generator=gen, dtype=torch.float64) * 0.5 - 2
        got = fn(content.clone(), style.clone(), eps)
        assert_close(f"AdaIN, {desc}", got, adain(content, style, eps).numpy(), rtol=1e-9, atol=1e-12)
    _pass("AdaIN", len(cases))


@_self_check
def check_steps_to_target(fn):
    """Check ``fn(eval_step, curve, target) -> steps``: per run (row of curve), the first evaluation
    step whose accuracy is at least target, inf where it never is. The reference is
    ``experiments.covariate_shift.steps_to_target``."""
    from normlab.experiments.covariate_shift import steps_to_target

    steps = np.array([25, 50, 75, 100])
    cases = [("three runs", steps, np.array([[0.2, 0.6, 0.85, 0.9], [0.5, 0.81, 0.7, 0.95], [0.1, 0.2, 0.3, 0.4]]),
              0.8),
             ("a run at the target exactly", steps, np.array([[0.3, 0.8, 0.9, 0.9]]), 0.8),
             ("reached at the first evaluation", steps, np.array([[0.9, 0.95, 0.97, 0.99]]), 0.8),
             ("one run as a 1-D curve", np.array([10, 20, 30]), np.array([0.1, 0.5, 0.7]), 0.6)]
    for desc, eval_step, curve, target in cases:
        got = fn(eval_step, curve, target)
        assert_close(f"steps to {target:g}, {desc}", got, steps_to_target(eval_step, curve, target))
    _pass("steps to target", len(cases))


@_self_check
def check_adabn(fn):
    """Check ``fn(model, batches) -> model``: every BN layer gets the exact mean and unbiased variance
    of its input over all the target batches (unequal sizes), with the earlier layers adapted first."""
    import copy

    from normlab.adapt import adabn

    n = 0
    for desc, model, batches in _adapt_models():
        expected = adabn(copy.deepcopy(model), batches)
        got = fn(copy.deepcopy(model), [b.clone() for b in batches])
        if got is None:
            raise AssertionError(f"AdaBN, {desc}: got None (did the function forget to return the model?)")
        layers = [m for m in got.modules() if "BatchNorm" in type(m).__name__]
        ref = [m for m in expected.modules() if "BatchNorm" in type(m).__name__]
        for i, (g, e) in enumerate(zip(layers, ref)):
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

    from normlab.data import blur_signals

    gen = torch.Generator().manual_seed(6)
    cases = [("random rows", torch.randn(4, 40, generator=gen, dtype=torch.float64), 1.0),
             ("a constant row", torch.full((1, 20), 2.5, dtype=torch.float64), 2.0),
             ("a spike near the end", torch.eye(15, dtype=torch.float64)[13:14], 1.5),
             ("a narrow kernel", torch.randn(3, 12, generator=gen, dtype=torch.float64), 0.3)]
    for desc, x, sigma in cases:
        got = fn(x.clone(), sigma)
        assert_close(f"blur, {desc} (sigma {sigma})", got, blur_signals(x, sigma).numpy(), rtol=1e-9, atol=1e-12)
    _pass("blur", len(cases))


@_self_check
def check_chan_merge(fn):
    """Check ``fn(a, b) -> (n, mean, M2)``: Chan's merge of two (n, mean, M2) summaries, float64.

    Cases: equal and unequal halves, a large offset, one side empty (n = 0), and a merge of many chunks.
    """
    rng = np.random.default_rng(4)

    def summary(x):
        if len(x) == 0:
            return (0.0, 0.0, 0.0)
        return (float(len(x)), float(x.mean()), float(((x - x.mean()) ** 2).sum()))

    cases = [("equal halves", rng.normal(2, 3, 100), 50), ("unequal parts", rng.normal(-1, 0.5, 37), 5),
             ("a large offset", 1e4 + rng.normal(size=64), 20), ("an empty first part", rng.normal(size=9), 0),
             ("an empty second part", rng.normal(size=9), 9)]
    for desc, x, k in cases:
        got = fn(summary(x[:k]), summary(x[k:]))
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError(f"Chan merge, {desc}: expected a tuple (n, mean, M2), got {type(got).__name__}")
        for name, g, e in zip(("n", "mean", "M2"), got, summary(x)):
            assert_close(f"Chan merge, {desc}: {name}", float(g), e, rtol=1e-9, atol=1e-9)
    x = rng.normal(5, 2, 1000)
    acc = (0.0, 0.0, 0.0)
    for part in np.array_split(x, 16):
        acc = fn(acc, summary(part))
    assert_close("Chan merge of 16 chunks, left to right: M2", float(acc[2]), summary(x)[2], rtol=1e-9)
    _pass("Chan merge", len(cases) + 1)


def _sums_case(shape, gen, channels_last=False):
    """x and dy of ``shape`` (float64, drawn from gen), x's per-channel mean and invstd, and the
    backward's two per-channel sums (sum dy, sum dy * x_hat) they give."""
    import torch

    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    invstd = torch.rsqrt(x.var(dims, correction=0) + 1e-5)
    cshape = (1, shape[1]) + (1,) * (x.dim() - 2)
    expected = (dy.sum(dims), (dy * (x - mean.view(cshape)) * invstd.view(cshape)).sum(dims))
    return x, dy, mean, invstd, expected


@_self_check
def check_channel_sums(fn):
    """Check ``fn(dy, x, mean, invstd) -> (sum_dy, sum_dy_xhat)``: the backward's two (C,) per-channel sums.

    x and dy are (N, C), (N, C, L) or (N, C, H, W) float64 tensors (one of them channels_last);
    x_hat = (x - mean) * invstd per channel, and both sums run over every axis but the channel axis.
    """
    import torch

    gen = torch.Generator().manual_seed(6)
    cases = [((8, 3), False), ((4, 2, 5), False), ((3, 4, 5, 6), False), ((2, 3, 7, 7), True), ((5, 1, 1, 1), False)]
    for shape, channels_last in cases:
        x, dy, mean, invstd, expected = _sums_case(shape, gen, channels_last)
        got = fn(dy.clone(), x.clone(), mean.clone(), invstd.clone())
        desc = f"x of shape {shape}" + (" (channels_last)" if channels_last else "")
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError(f"channel sums, {desc}: expected a tuple (sum_dy, sum_dy_xhat)")
        for name, g, e in zip(("sum_dy", "sum_dy_xhat"), got, expected):
            g = g.detach().numpy() if isinstance(g, torch.Tensor) else g
            assert_close(f"channel sums, {desc}: {name}", g, e.numpy(), rtol=1e-9, atol=1e-9)
    _pass("per-channel sums", len(cases))


@_self_check
def check_triton_sums(kernel):
    """Check a Triton kernel for the backward's two per-channel sums, one program per channel.

    The kernel's signature is ``(x_ptr, dy_ptr, mean_ptr, invstd_ptr, sum_dy_ptr, sum_dyxh_ptr, N,
    C, M, BLOCK)``; ``normlab.kernels.channel_sums`` launches it on float32 data of shapes (N, C),
    (N, C, L) and (N, C, H, W), some with more positions per channel than one block of 32, some with
    a partial last block, and compares with the float64 sums. Compiled on a CUDA GPU, interpreted
    without one. Without triton installed it says so and returns (the kernel is not marked passed).
    """
    import torch

    from normlab import kernels as K

    _raise_if_stub(kernel)
    if not K.available():
        print(f"SKIPPED the Triton kernel's check: triton is not installed ({K.INSTALL_HINT}).")
        return False
    device = "cuda" if torch.cuda.is_available() and not K.interpreted() else "cpu"
    gen = torch.Generator().manual_seed(8)
    shapes = [(8, 3), (4, 2, 5), (3, 4, 6, 6), (2, 3, 70), (5, 1, 1, 1), (1, 2, 64)]
    for shape in shapes:
        x, dy, mean, invstd, expected = _sums_case(shape, gen)
        args = (t.float().to(device) for t in (dy, x, mean, invstd))
        got = K.channel_sums(*args, kernel=kernel, block=32)
        for name, g, e in zip(("sum_dy", "sum_dy_xhat"), got, expected):
            assert_close(f"Triton channel sums, x of shape {shape}: {name}", g, e.numpy(), rtol=1e-5, atol=1e-4)
    _pass(f"Triton per-channel sums ({'compiled' if device == 'cuda' else 'interpreted'})", len(shapes))


def _rank_slices(seed, sizes, C, trailing=()):
    """A float64 global batch (N, C, *trailing) with a large offset, and its split into per-rank slices."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((sum(sizes), C, *trailing), generator=gen, dtype=torch.float64) * 2 + 1000
    return x, list(x.split(sizes))


@_self_check
def check_merge_moments(fn):
    """Check ``fn(counts, means, m2s) -> (mean, var)``: per-rank (count, mean, M2) merged into the global ones.

    counts: (R,) float64 values per channel on each rank; means, m2s: (R, C). Expected: the mean and
    the biased variance (C,) of all ranks' values together. Cases include a rank with one example,
    an empty rank (count 0, mean and M2 zeros) and values around 1000 (a one-pass formula loses digits).
    """
    import torch

    cases = [[4, 4], [7, 1, 3], [5, 0, 2], [1, 1], [3, 9, 2, 6]]
    for i, sizes in enumerate(cases):
        x, parts = _rank_slices(i, sizes, 5, (2,))
        counts = torch.tensor([p.numel() / 5 for p in parts], dtype=torch.float64)
        zero = torch.zeros(5, dtype=torch.float64)
        means = torch.stack([p.transpose(0, 1).reshape(5, -1).mean(1) if len(p) else zero for p in parts])
        m2s = torch.stack([((p.transpose(0, 1).reshape(5, -1) - m.unsqueeze(1)) ** 2).sum(1) if len(p) else zero
                           for p, m in zip(parts, means)])
        got = fn(counts.clone(), means.clone(), m2s.clone())
        if got is None or len(got) != 2:
            raise AssertionError(f"merge, ranks of {sizes}: expected (mean, var), got {got!r}")
        var, mean = torch.var_mean(x.transpose(0, 1).reshape(5, -1), dim=1, correction=0)
        for name, g, e in (("mean", got[0], mean), ("biased variance", got[1], var)):
            g = g.detach().numpy() if isinstance(g, torch.Tensor) else g
            assert_close(f"merge, ranks holding {sizes} examples: {name}", g, e.numpy(), rtol=1e-9, atol=1e-9)
    _pass("merge of per-rank moments", len(cases))


@_self_check
def check_sync_backward(fn):
    """Check ``fn(dy, x_hat, invstd, weight, sum_dy, sum_dy_xhat, n) -> dx`` for one rank's slice.

    dy, x_hat: this rank's (N_r, C, *) slices; invstd, weight: (C,); sum_dy, sum_dy_xhat: (C,) sums
    over *all* ranks (what the backward's all-reduce returns); n: values per channel over all ranks.
    Expected: the rank's slice of the input gradient of BN over the whole batch (torch autograd).
    """
    import torch

    cases = [([4, 4], ()), ([5, 1, 2], ()), ([2, 3], (3, 2)), ([1, 6], (4,))]
    for i, (sizes, trailing) in enumerate(cases):
        C = 3
        x, _ = _rank_slices(10 + i, sizes, C, trailing)
        gen = torch.Generator().manual_seed(20 + i)
        weight = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        torch.nn.functional.batch_norm(xr, None, None, weight, None, training=True).backward(dy)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        invstd = torch.rsqrt(var + 1e-5)
        shape = (1, C) + (1,) * (x.dim() - 2)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        n = x.numel() // C
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * x_hat).sum(dims)
        lo = 0
        for rank, size in enumerate(sizes):
            part = slice(lo, lo + size)
            lo += size
            got = fn(dy[part].clone(), x_hat[part].clone(), invstd.clone(), weight.clone(), sum_dy.clone(),
                     sum_dy_xhat.clone(), n)
            if got is None:
                raise AssertionError(f"sync backward, ranks of {sizes}, rank {rank}: got None")
            got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
            assert_close(f"sync backward, ranks holding {sizes} examples of shape {(C, *trailing)}, rank {rank}: dx",
                         got, xr.grad[part].numpy(), rtol=1e-7, atol=1e-9)
    _pass("synchronized backward", len(cases))


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _bn_module_step(module, x, dy):
    """Run module on x and backpropagate sum(out * dy); return {quantity: tensor}: output, gradients, buffers."""
    import torch

    x = x.clone().requires_grad_()
    module.weight.grad = module.bias.grad = None
    out = module(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise AssertionError(f"expected an output of shape {tuple(x.shape)}, got {getattr(out, 'shape', out)!r}")
    if not out.requires_grad:
        raise AssertionError("the output has no gradient (was it computed under torch.no_grad()?)")
    (out * dy).sum().backward()
    got = {"output": out, "input gradient": x.grad, "weight gradient": module.weight.grad,
           "bias gradient": module.bias.grad}
    return got | {name: getattr(module, name).clone() for name in _BN_BUFFERS}


@_self_check
def check_bn_module(cls):
    """Check ``cls(num_features, eps=1e-5, momentum=0.1)``, a BatchNorm2d module, against torch.nn.BatchNorm2d.

    With momentum 0.1 and None, in float64: the parameters, the state_dict keys and a new module's values;
    state dicts that load both ways; five training batches of different means and scales (the output, the
    gradients of input, weight and bias, and the three buffers after each batch); then eval mode (the same
    quantities, and buffers left as they were).
    """
    import torch
    from torch import nn

    C, n = 3, 0
    gen = torch.Generator().manual_seed(8)
    for momentum in (0.1, None):
        case = f"momentum={momentum}"
        ours = cls(C) if momentum == 0.1 else cls(C, momentum=None)
        ref = nn.BatchNorm2d(C, momentum=momentum)
        if not isinstance(ours, nn.Module):
            raise AssertionError(f"{case}: expected an nn.Module, got {type(ours).__name__}")
        params = sorted(name for name, _ in ours.named_parameters())
        if params != ["bias", "weight"]:
            raise AssertionError(f"{case}: parameters {params}, expected ['bias', 'weight'] (the running "
                                 "statistics and the counter are buffers: register_buffer)")
        if list(ours.state_dict()) != list(ref.state_dict()):
            raise AssertionError(f"{case}: state_dict keys {list(ours.state_dict())}, "
                                 f"expected {list(ref.state_dict())}")
        for key, expected in ref.state_dict().items():  # a new module: gamma 1, beta 0, mean 0, var 1, count 0
            got = ours.state_dict()[key]
            if got.dtype != expected.dtype:
                raise AssertionError(f"{case}, a new module: {key} has dtype {got.dtype}, expected {expected.dtype}")
            assert_close(f"{case}, a new module: {key}", got, expected.numpy())
        ours, ref = ours.double(), ref.double()
        with torch.no_grad():  # a random gamma and beta; running statistics away from 0 and 1
            for t, low in ((ref.weight, 0.5), (ref.bias, -1.0), (ref.running_mean, -1.0), (ref.running_var, 0.5)):
                t.copy_(low + torch.rand(C, generator=gen, dtype=torch.float64))
        for src, dst, what in ((ref, ours, "torch's state dict into your module"),
                               (ours, ref, "your state dict into torch's module")):
            try:
                dst.load_state_dict(src.state_dict())
            except RuntimeError as err:
                raise AssertionError(f"{case}: loading {what} failed: {err}") from None
        for batch in range(1, 7):  # five training batches, then one in eval mode
            training = batch <= 5
            where = f"{case}, training batch {batch}" if training else f"{case}, eval mode"
            if not training:
                before = {name: getattr(ours, name).clone() for name in _BN_BUFFERS}
                ours.eval()
                ref.eval()
            x = torch.randn(4, C, 3, 2, generator=gen, dtype=torch.float64) * (0.5 + batch) + 2 * batch - 5
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            try:
                got = _bn_module_step(ours, x, dy)
            except AssertionError as err:
                raise AssertionError(f"{where}: {err}") from None
            if not training:
                for name in _BN_BUFFERS:
                    assert_close(f"{where}: {name} changed (eval mode must leave the buffers as they are)",
                                 got[name], before[name].numpy())
            for name, expected in _bn_module_step(ref, x, dy).items():
                assert_close(f"{where}: {name}", got[name], expected.detach().numpy())
            n += 1
    _pass("BatchNorm2d module", n)


# --------------------------------------------------------------------------------------------
# The second exercises of Chapters 3 to 7's labs
# --------------------------------------------------------------------------------------------


@_self_check
def check_largest_rate(fn):
    """Check ``fn(lrs, steps) -> (seeds,)``: per seed, the largest rate whose run reached the target
    (steps finite), and the smallest rate where no run did (``covariate_shift.largest_rate``)."""
    from normlab.experiments.covariate_shift import largest_rate

    inf = np.inf
    lrs = np.array([0.03, 0.1, 0.3, 1.0, 3.0])
    cases = [("a typical sweep", lrs, np.array([[300, 400, inf], [120, 150, 200], [60, 80, 90], [40, inf, 70],
                                                  [inf, inf, inf]])),
             ("a seed that never reaches it", lrs[:3], np.array([[200.0, inf], [100, inf], [inf, inf]])),
             ("a gap in the middle", lrs[:4], np.array([[100.0], [inf], [50], [inf]])),
             ("rates not in order", lrs[[2, 0, 1]], np.array([[50.0, inf], [200, 300], [100, 150]]))]
    for desc, rates, steps in cases:
        got = fn(rates, steps)
        assert_close(f"largest rate, {desc}", got, largest_rate(rates, steps))
    _pass("largest workable rate", len(cases))


@_self_check
def check_ghost_running(fn):
    """Check ``fn(running_mean, running_var, x, virtual_batch_size, momentum) -> (mean, var)``.

    x is (N, D). The ghost layer's running statistics move once per batch, towards the average of
    the virtual batches' means and of their unbiased variances, each weighted by its number of
    rows (the last virtual batch takes the remainder). The reference is
    ``normlab.nn.GhostBatchNorm1d`` in float64.
    """
    import torch

    from normlab.nn import GhostBatchNorm1d

    rng = np.random.default_rng(2)
    cases = [(12, 3, 4, 0.1), (10, 2, 4, 0.1), (9, 4, 3, 0.5), (8, 2, 8, 1.0), (11, 3, 4, 0.2)]
    for n, d, v, momentum in cases:
        x = rng.normal(1.0, 2.0, size=(n, d))
        rm, rv = rng.normal(size=d), rng.uniform(0.5, 2.0, size=d)
        layer = GhostBatchNorm1d(d, v, momentum=momentum).double()
        with torch.no_grad():
            layer.running_mean.copy_(torch.from_numpy(rm))
            layer.running_var.copy_(torch.from_numpy(rv))
        layer(torch.from_numpy(x))
        got = fn(rm.copy(), rv.copy(), x, v, momentum)
        if not isinstance(got, tuple) or len(got) != 2:
            raise AssertionError("ghost running statistics: expected a tuple (new_mean, new_var)")
        desc = f"x ({n}, {d}), virtual batches of {v}, momentum {momentum}"
        assert_close(f"ghost running statistics, {desc}: new_mean", got[0], layer.running_mean.numpy())
        assert_close(f"ghost running statistics, {desc}: new_var", got[1], layer.running_var.numpy())
    _pass("ghost running statistics", len(cases))


@_self_check
def check_measured_noise(fn):
    """Check ``fn(h, example, batch_size, trials, rng) -> float``: the spread of one example's
    normalized value over ``trials`` random batches.

    h: (n,) one unit's values. Each batch holds the example and batch_size - 1 others drawn with
    replacement from the other n - 1 examples; the example is normalized with the batch's mean and
    biased variance (eps 1e-5). Returned: the standard deviation of the normalized value over the
    trials. The draws are random, so the comparison with ``regularization.normalized_value_noise``
    (4,000 draws each) allows 8%, about five standard errors.
    """
    import torch

    from normlab.experiments.regularization import normalized_value_noise

    rng = np.random.default_rng(5)
    cases = [("a Gaussian unit", rng.normal(size=600), 4), ("a Gaussian unit", rng.normal(size=600), 32),
             ("a skewed unit", rng.exponential(size=800), 8),
             ("a skewed unit, far example", rng.exponential(size=800), 16)]
    for k, (desc, h, b) in enumerate(cases):
        z = (h - h.mean()) / h.std()
        example = int(np.abs(z - (2.5 if "far" in desc else 1.0)).argmin())
        got = float(fn(h.copy(), example, b, 4000, np.random.default_rng(10 + k)))
        std, _ = normalized_value_noise(torch.from_numpy(h[:, None]), [b], [example], trials=4000, seed=k)
        expected = float(std[0, 0])
        if not abs(got / expected - 1) < 0.08:
            raise AssertionError(f"measured noise, {desc}, batch {b}: expected about {expected:.4f}, got {got:.4f} "
                                 f"(8% allowed for the randomness of the draws)")
    _pass("measured noise", len(cases))


@_self_check
def check_ema_weights(fn):
    """Check ``fn(momentum, steps) -> (steps + 1,)``: the weight of the EMA's start value and of
    each batch k = 1..steps in its final value (``normlab.stats.ema_weights``)."""
    from normlab.stats import ema_weights

    cases = [(0.1, 5), (0.5, 3), (0.001, 600), (1.0, 4), (0.3, 0)]
    for momentum, steps in cases:
        assert_close(f"EMA weights, momentum {momentum}, {steps} steps", fn(momentum, steps),
                     ema_weights(momentum, steps), rtol=1e-9, atol=1e-15)
    _pass("EMA weights", len(cases))


@_self_check
def check_sequence_norm(fn):
    """Check ``fn(h, kind, eps) -> (T, B, H)`` for a sequence batch h (T, B, H), training mode.

    kind "batch": each time step's features normalized over the batch (mean and biased variance
    over B, per step and feature: recurrent BN's statistics per time step). kind "layer": each
    example's features normalized over its H features (per step and example). No affine.
    """
    import torch

    gen = torch.Generator().manual_seed(9)
    cases = [(5, 4, 3), (1, 6, 8), (3, 2, 5)]
    for shape in cases:
        h = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + torch.arange(shape[0]).view(-1, 1, 1)
        for kind, dim in (("batch", 1), ("layer", 2)):
            var, mean = torch.var_mean(h, dim=dim, correction=0, keepdim=True)
            got = fn(h.clone(), kind, 1e-5)
            assert_close(f"{kind} norm of h {shape}", got, ((h - mean) / torch.sqrt(var + 1e-5)).numpy())
    _pass("sequence normalization (batch and layer)", 2 * len(cases))


@_self_check
def check_style_loss(fn):
    """Check ``fn(fa, fb) -> loss``: summed over two lists of (N, C, H, W) features, the mean squared
    difference of per-example, per-channel means plus that of standard deviations
    (``alternatives.style_loss``; the spatial sizes of a pair may differ)."""
    import torch

    from normlab.experiments.alternatives import style_loss

    gen = torch.Generator().manual_seed(11)

    def feats(*shapes, scale=1.0):
        return [torch.randn(s, generator=gen, dtype=torch.float64) * scale + 0.5 for s in shapes]

    cases = [("one layer", feats((2, 3, 4, 4)), feats((2, 3, 4, 4), scale=2.0)),
             ("two layers, other sizes", feats((1, 4, 8, 8), (1, 2, 4, 4)), feats((1, 4, 5, 5), (1, 2, 3, 3))),
             ("the same features", feats((3, 2, 6, 6)) * 1, None)]
    for desc, fa, fb in cases:
        fb = fb if fb is not None else [f.clone() for f in fa]
        got = fn([f.clone() for f in fa], [f.clone() for f in fb])
        assert_close(f"style loss, {desc}", float(got), float(style_loss(fa, fb)), rtol=1e-9, atol=1e-12)
    _pass("style loss", len(cases))


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
