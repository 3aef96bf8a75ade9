"""normlab.functional.batch_norm: torch's semantics, and a hand-written backward that is right."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab.functional import BatchNormFunction, batch_norm


def inputs(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1
    w = torch.rand(C, generator=gen, dtype=dtype) + 0.5
    b = torch.randn(C, generator=gen, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("shape", [(4, 3), (2, 1), (3, 2, 4), (2, 3, 2, 2), (2, 2, 1, 2, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_hand_written_backward_passes_gradcheck(shape, affine):
    x, w, b = inputs(shape)
    args = (x.requires_grad_(), w.requires_grad_() if affine else None, b.requires_grad_() if affine else None)
    assert torch.autograd.gradcheck(lambda *a: batch_norm(a[0], None, None, *a[1:], training=True), args)


def test_training_gradient_comes_from_the_autograd_function():
    x, w, b = inputs((4, 3))
    out = batch_norm(x.requires_grad_(), None, None, w, b, training=True)
    assert "BatchNormFunction" in out.grad_fn.name()
    _, mean, var = BatchNormFunction.apply(x, w, b, 1e-5)
    assert not mean.requires_grad and not var.requires_grad
    torch.testing.assert_close(var, x.var(0, unbiased=False))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=5).filter(lambda s: s[0] * max(1, _prod(s[2:])) > 1),
    training=st.booleans(),
    momentum=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_on_any_shape(shape, training, momentum, seed):
    x, w, b = inputs(tuple(shape), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rm, rv = torch.randn(shape[1], generator=gen, dtype=torch.float64), torch.rand(shape[1], generator=gen) + 0.5
    rv = rv.double()
    results = []
    for fn in (batch_norm, F.batch_norm):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        rms, rvs = rm.clone(), rv.clone()
        out = fn(xs, rms, rvs, ws, bs, training=training, momentum=momentum, eps=1e-5)
        out.backward(torch.ones_like(out) + xs.detach())
        results.append((out, rms, rvs, xs.grad, ws.grad, bs.grad))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def _prod(values):
    out = 1
    for v in values:
        out *= v
    return out


def test_constant_channel_gives_beta_and_a_zero_variance_estimate():
    x = torch.full((4, 2), 3.0, dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    w, b = torch.ones(2, dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)
    out = batch_norm(x, rm, rv, w, b, True, 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.5, -1.0]] * 4, dtype=torch.float64))
    assert torch.all(rv == 0)


def test_tiny_float32_variances_reach_the_running_estimate_like_torch():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 1e-6  # variance ~1e-12
    ours, ref = torch.ones(3), torch.ones(3)
    batch_norm(x, torch.zeros(3), ours, training=True, momentum=1.0)
    F.batch_norm(x, torch.zeros(3), ref, training=True, momentum=1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((torch.randn(1, 3), None, None), {"training": True}, ValueError, "more than 1 value per channel"),
        # torch's types: IndexError for an input without a channel axis, RuntimeError for eval without statistics
        ((torch.randn(4), None, None), {"training": True}, IndexError, "at least 2 dimensions"),
        ((torch.randn(4, 3), torch.zeros(2), torch.ones(2)), {}, RuntimeError, "running_mean should contain 3"),
        ((torch.randn(4, 3), None, None), {"training": False}, RuntimeError, "eval mode"),
        ((torch.ones(4, 3, dtype=torch.long), None, None), {"training": True}, ValueError, "floating-point"),
    ],
)
def test_bad_input_raises_a_clear_error(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        batch_norm(*args, **kwargs)
