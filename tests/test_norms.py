"""normlab.scratch's general normalization and its wrappers against torch in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import checks, scratch

TOL = 1e-10


def rand(shape, seed=0, loc=1.0, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def torch_run(fn, x, params, dout):
    """Return torch's output and gradients (x first, then the parameters) for fn(x, *params)."""
    xt = torch.tensor(x, requires_grad=True)
    pt = [None if p is None else torch.tensor(p, requires_grad=True) for p in params]
    out = fn(xt, *pt)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [xt.grad.numpy()] + [None if p is None else p.grad.numpy() for p in pt]


def close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape,nshape", [((4, 6), (6,)), ((3, 5, 7), (7,)), ((2, 3, 4, 5), (3, 4, 5)), ((5, 1), (1,))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, nshape, affine):
    x, dout = rand(shape), rand(shape, 1)
    w, b = (rand(nshape, 2), rand(nshape, 3)) if affine else (None, None)
    out, cache = scratch.layer_norm(x, nshape, w, b)
    ref, grads = torch_run(lambda x, w, b: F.layer_norm(x, nshape, w, b, 1e-5), x, [w, b], dout)
    close(out, ref)
    for got, exp in zip(scratch.layer_norm_backward(dout, cache), grads):
        assert (got is None) == (exp is None)
        if exp is not None:
            close(got, exp)


@pytest.mark.parametrize("shape,groups",
                         [((4, 6), 3), ((2, 6, 5), 2), ((3, 8, 4, 4), 4), ((2, 4, 3, 2), 1), ((2, 4, 3), 4)])
def test_group_norm_matches_torch(shape, groups):
    C = shape[1]
    x, dout, w, b = rand(shape), rand(shape, 1), rand(C, 2), rand(C, 3)
    out, cache = scratch.group_norm(x, groups, w, b)
    ref, grads = torch_run(lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5), x, [w, b], dout)
    close(out, ref)
    for got, exp in zip(scratch.group_norm_backward(dout, cache), grads):
        close(got, exp)


@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5), (1, 2, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_matches_torch(shape, affine):
    C = shape[1]
    x, dout = rand(shape), rand(shape, 1)
    w, b = (rand(C, 2), rand(C, 3)) if affine else (None, None)
    out, cache = scratch.instance_norm(x, w, b)
    ref, grads = torch_run(lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-5), x, [w, b], dout)
    close(out, ref)
    for got, exp in zip(scratch.instance_norm_backward(dout, cache), grads):
        assert (got is None) == (exp is None)
        if exp is not None:
            close(got, exp)


def torch_rms_norm(x, nshape, w, eps):
    """F.rms_norm where it exists (torch >= 2.4), else its definition."""
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, nshape, w, eps)
    dims = tuple(range(x.dim() - len(nshape), x.dim()))
    out = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return out if w is None else out * w


@pytest.mark.parametrize("shape,nshape", [((4, 6), (6,)), ((3, 5, 7), (7,)), ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(shape, nshape, affine):
    x, dout = rand(shape), rand(shape, 1)
    w = rand(nshape, 2) if affine else None
    out, cache = scratch.rms_norm(x, nshape, w, eps=1e-6)
    ref, grads = torch_run(lambda x, w: torch_rms_norm(x, nshape, w, 1e-6), x, [w], dout)
    close(out, ref)
    for got, exp in zip(scratch.rms_norm_backward(dout, cache), grads):
        assert (got is None) == (exp is None)
        if exp is not None:
            close(got, exp)


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5, 6)])
def test_batch_norm_is_the_same_function_over_the_batch_axes(shape):
    x = rand(shape)
    C = shape[1]
    ones, zeros = np.ones(C), np.zeros(C)
    bn, _ = scratch.batch_norm_forward(x, ones, zeros, None, None)
    x_hat, cache = scratch.norm_forward(x, (0,) + tuple(range(2, x.ndim)))
    close(x_hat, bn)
    dout = rand(shape, 1)
    dx_bn, _, _ = scratch.batch_norm_backward(dout, scratch.batch_norm_forward(x, ones, zeros, None, None)[1])
    close(scratch.norm_backward(dout, cache), dx_bn)


def test_group_norm_with_one_group_is_layer_norm_and_with_c_groups_is_instance_norm():
    x = rand((3, 4, 5, 2))
    gn1, _ = scratch.group_norm(x, 1)
    ln, _ = scratch.layer_norm(x, x.shape[1:])
    close(gn1, ln)
    gnc, _ = scratch.group_norm(x, 4)
    inn, _ = scratch.instance_norm(x)
    close(gnc, inn)


def test_norm_backward_matches_a_numerical_gradient():
    x = rand((3, 4), loc=0.5)
    dout = rand((3, 4), 1)
    for rms in (False, True):
        _, cache = scratch.norm_forward(x, 1, rms=rms)
        num = scratch.numerical_gradient(lambda z, rms=rms: scratch.norm_forward(z, 1, rms=rms)[0], x.copy(), dout)
        np.testing.assert_allclose(scratch.norm_backward(dout, cache), num, rtol=1e-6, atol=1e-8)


def test_statistic_groups_counts():
    shape = (2, 6, 5)
    assert len(np.unique(scratch.statistic_groups("batch", shape))) == 6
    assert len(np.unique(scratch.statistic_groups("layer", shape))) == 2
    assert len(np.unique(scratch.statistic_groups("instance", shape))) == 12
    g = scratch.statistic_groups("group", shape, num_groups=3)
    assert len(np.unique(g)) == 6
    assert (g[0, 0] == g[0, 1]).all() and not (g[0, 1] == g[0, 2]).any()


def test_statistic_groups_agree_with_the_normalization():
    """Every group's elements have mean 0 and variance 1 after the norm (eps = 0)."""
    x = rand((3, 4, 6))
    outs = {"layer": scratch.layer_norm(x, (4, 6), eps=0)[0], "instance": scratch.instance_norm(x, eps=0)[0],
            "group": scratch.group_norm(x, 2, eps=0)[0], "batch": scratch.norm_forward(x, (0, 2), eps=0)[0]}
    for kind, out in outs.items():
        labels = scratch.statistic_groups(kind, x.shape, num_groups=2)
        for k in np.unique(labels):
            vals = out[labels == k]
            assert abs(vals.mean()) < 1e-12 and abs(vals.var() - 1) < 1e-12, kind


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), g=st.integers(1, 3), cpg=st.integers(1, 3), L=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_group_norm_matches_torch_on_any_shape(n, g, cpg, L, seed):
    C = g * cpg
    x, dout, w, b = rand((n, C, L), seed), rand((n, C, L), seed + 1), rand(C, seed + 2), rand(C, seed + 3)
    out, cache = scratch.group_norm(x, g, w, b)
    ref, grads = torch_run(lambda x, w, b: F.group_norm(x, g, w, b, 1e-5), x, [w, b], dout)
    np.testing.assert_allclose(out, ref, atol=1e-9, rtol=0)
    for got, exp in zip(scratch.group_norm_backward(dout, cache), grads):
        np.testing.assert_allclose(got, exp, atol=1e-8, rtol=0)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       trail=st.lists(st.integers(2, 4), min_size=1, max_size=2), seed=st.integers(0, 2**16))
def test_layer_and_rms_norm_match_torch_on_any_shape(lead, trail, seed):
    shape, nshape = tuple(lead + trail), tuple(trail)
    x, dout, w, b = rand(shape, seed), rand(shape, seed + 1), rand(nshape, seed + 2), rand(nshape, seed + 3)
    out, cache = scratch.layer_norm(x, nshape, w, b)
    ref, grads = torch_run(lambda x, w, b: F.layer_norm(x, nshape, w, b, 1e-5), x, [w, b], dout)
    np.testing.assert_allclose(out, ref, atol=1e-9, rtol=0)
    for got, exp in zip(scratch.layer_norm_backward(dout, cache), grads):
        np.testing.assert_allclose(got, exp, atol=1e-8, rtol=0)
    out, cache = scratch.rms_norm(x, nshape, w)
    ref, grads = torch_run(lambda x, w: torch_rms_norm(x, nshape, w, 1e-6), x, [w], dout)
    np.testing.assert_allclose(out, ref, atol=1e-9, rtol=0)
    for got, exp in zip(scratch.rms_norm_backward(dout, cache), grads):
        np.testing.assert_allclose(got, exp, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: scratch.group_norm(rand((2, 6, 3)), 4), "does not divide"),
        (lambda: scratch.layer_norm(rand((2, 6, 3)), (6,)), "does not match the trailing"),
        (lambda: scratch.rms_norm(rand((2, 6)), 5), "does not match the trailing"),
        (lambda: scratch.layer_norm(rand((2, 6)), 6, weight=np.ones(5)), "weight has shape"),
        (lambda: scratch.group_norm(rand((2, 6, 3)), 2, bias=np.ones(3)), "bias has shape"),
        (lambda: scratch.instance_norm(rand((2, 6, 3)), weight=np.ones((6, 1))), "weight has shape"),
        (lambda: scratch.layer_norm(np.array([[1.0, np.nan]]), 2), "non-finite"),
        (lambda: scratch.norm_forward(np.array([[1.0, np.inf]]), 1), "non-finite"),
        (lambda: scratch.instance_norm(rand((2, 6))), "spatial"),
        (lambda: scratch.instance_norm(rand((2, 6, 1))), "more than 1 spatial"),
        (lambda: scratch.norm_forward(rand((2, 3)), 2), "out of range"),
        (lambda: scratch.norm_forward(rand((2, 3)), (1, -1)), "twice"),
        (lambda: scratch.norm_forward(rand((2, 3)), 1, eps=-1.0), "eps"),
        (lambda: scratch.norm_forward(np.ones((2, 3)), 1, eps=0), "zero variance"),
        (lambda: scratch.norm_forward(np.ones((2, 3), dtype=int), 1), "dtype"),
        (lambda: scratch.group_norm(rand((2, 6, 3)), 0), "num_groups"),
        (lambda: scratch.norm_backward(np.ones((2, 2)), scratch.norm_forward(rand((2, 3)), 1)[1]), "dx_hat has shape"),
        (lambda: scratch.layer_norm_backward(np.ones((2, 3)), {}), "cache"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the exercises' self-checks pass a correct solution and catch a wrong one -----------------


def good_group_norm(x, G, w, b, eps):
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    x_hat = ((xg - xg.mean(2, keepdims=True)) / np.sqrt(xg.var(2, keepdims=True) + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.ndim - 2)
    return x_hat * w.reshape(shape) + b.reshape(shape)


def test_check_group_norm_passes_a_correct_solution(capsys):
    checks.check_group_norm(good_group_norm)
    assert "PASS" in capsys.readouterr().out


def test_check_group_norm_catches_groups_over_channels_only():
    def wrong(x, G, w, b, eps):  # forgets that the spatial positions share the group's statistics
        N, C = x.shape[:2]
        xs = x.reshape(N, G, C // G, -1)
        x_hat = ((xs - xs.mean(2, keepdims=True)) / np.sqrt(xs.var(2, keepdims=True) + eps)).reshape(x.shape)
        shape = (1, C) + (1,) * (x.ndim - 2)
        return x_hat * w.reshape(shape) + b.reshape(shape)

    with pytest.raises(AssertionError, match="group norm"):
        checks.check_group_norm(wrong)


def good_ln_backward(dout, x, w, eps):
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    g = dout * w
    dx = (g - g.mean(1, keepdims=True) - x_hat * (g * x_hat).mean(1, keepdims=True)) / np.sqrt(var + eps)
    return dx, (dout * x_hat).sum(0), dout.sum(0)


def test_check_layer_norm_backward_passes_a_correct_solution(capsys):
    checks.check_layer_norm_backward(good_ln_backward)
    assert "PASS" in capsys.readouterr().out


def test_check_layer_norm_backward_catches_batch_norms_axes():
    def wrong(dout, x, w, eps):  # means over the batch axis, as in batch norm
        dx, dw, db = good_ln_backward(dout, x, w, eps)
        mu, var = x.mean(0, keepdims=True), x.var(0, keepdims=True)
        x_hat = (x - mu) / np.sqrt(var + eps)
        g = dout * w
        return (g - g.mean(0, keepdims=True) - x_hat * (g * x_hat).mean(0, keepdims=True)) / np.sqrt(var + eps), dw, db

    with pytest.raises(AssertionError, match="dx"):
        checks.check_layer_norm_backward(wrong)


def test_check_layer_norm_backward_catches_a_missing_mean_term():
    def wrong(dout, x, w, eps):
        mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
        x_hat = (x - mu) / np.sqrt(var + eps)
        g = dout * w
        return (g - x_hat * (g * x_hat).mean(1, keepdims=True)) / np.sqrt(var + eps), (dout * x_hat).sum(0), dout.sum(0)

    with pytest.raises(AssertionError, match="dx"):
        checks.check_layer_norm_backward(wrong)
