"""normlab.scratch against PyTorch in float64, plus its conventions and its errors."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import scratch

TOL = 1e-10  # float64 agreement with torch and between our two backwards


def make(shape, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.normal(1.5, 2.0, size=shape)
    gamma = rng.normal(1.0, 0.3, size=C)
    beta = rng.normal(0.0, 0.3, size=C)
    rm = rng.normal(size=C)
    rv = rng.uniform(0.5, 2.0, size=C)
    return x, gamma, beta, rm, rv


def torch_reference(x, gamma, beta, rm, rv, dout, training, momentum=0.1, eps=1e-5):
    """Run torch's batch norm and autograd on copies; return out, running stats and grads."""
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    rmt, rvt = torch.tensor(rm), torch.tensor(rv)
    out = F.batch_norm(xt, rmt, rvt, gt, bt, training=training, momentum=momentum, eps=eps)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), rmt.numpy(), rvt.numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("shape", [(8, 5), (2, 3), (4, 3, 5, 6), (1, 2, 3, 3)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backward", [scratch.batch_norm_backward, scratch.batch_norm_backward_fast])
def test_matches_torch_forward_backward_and_running_stats(shape, training, backward):
    x, gamma, beta, rm, rv = make(shape)
    dout = np.random.default_rng(1).normal(size=shape)
    ref = torch_reference(x, gamma, beta, rm, rv, dout, training, momentum=0.3)
    out, cache = scratch.batch_norm_forward(x, gamma, beta, rm, rv, training=training, momentum=0.3)
    dx, dgamma, dbeta = backward(dout, cache)
    for got, expected in zip((out, rm, rv, dx, dgamma, dbeta), ref):
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    c=st.integers(1, 4),
    spatial=st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))),
    seed=st.integers(0, 2**16),
)
def test_staged_and_fast_backward_agree_on_any_shape(n, c, spatial, seed):
    shape = (n, c) if spatial is None else (n, c, *spatial)
    x, gamma, beta, _, _ = make(shape, seed)
    dout = np.random.default_rng(seed + 1).normal(size=shape)
    _, cache = scratch.batch_norm_forward(x, gamma, beta, None, None)
    for a, b in zip(scratch.batch_norm_backward(dout, cache), scratch.batch_norm_backward_fast(dout, cache)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


def test_training_output_has_zero_mean_unit_variance_per_channel():
    x, _, _, _, _ = make((6, 3, 4, 4))
    C = x.shape[1]
    out, _ = scratch.batch_norm_forward(x, np.ones(C), np.zeros(C), None, None, eps=1e-12)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1.0, atol=1e-9)


def test_running_stats_use_pytorch_momentum_and_unbiased_variance():
    x = np.array([[1.0], [2.0], [6.0]])  # mean 3, biased var 14/3, unbiased var 7
    rm, rv = np.array([10.0]), np.array([1.0])
    scratch.batch_norm_forward(x, np.ones(1), np.zeros(1), rm, rv, momentum=0.1)
    np.testing.assert_allclose(rm, [0.9 * 10.0 + 0.1 * 3.0])
    np.testing.assert_allclose(rv, [0.9 * 1.0 + 0.1 * 7.0])


def test_eval_mode_uses_running_stats_and_leaves_them_alone():
    x, gamma, beta, rm, rv = make((1, 4))  # a batch of one is fine at inference
    rm0, rv0 = rm.copy(), rv.copy()
    out, _ = scratch.batch_norm_forward(x, gamma, beta, rm, rv, training=False)
    np.testing.assert_allclose(out, gamma * (x - rm0) / np.sqrt(rv0 + 1e-5) + beta, atol=TOL)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


def test_numerical_gradient_agrees_with_backward():
    x, gamma, beta, _, _ = make((4, 3))
    dout = np.random.default_rng(3).normal(size=x.shape)
    _, cache = scratch.batch_norm_forward(x, gamma, beta, None, None)
    dx, _, _ = scratch.batch_norm_backward(dout, cache)
    num = scratch.numerical_gradient(lambda v: scratch.batch_norm_forward(v, gamma, beta, None, None)[0], x, dout)
    assert np.max(np.abs(num - dx)) / np.max(np.abs(num) + np.abs(dx)) < 1e-7


def test_numerical_gradient_notices_a_wrong_gradient():
    x = np.array([1.0, 2.0, 3.0])
    num = scratch.numerical_gradient(lambda v: v**2, x, np.ones(3))
    np.testing.assert_allclose(num, 2 * x, rtol=1e-8)
    assert not np.allclose(num, 3 * x)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": a["x"][0]}, "dimensions"),
        (lambda a: {**a, "x": a["x"].reshape(2, 3, 4)}, "dimensions"),
        (lambda a: {**a, "gamma": np.ones(4)}, "gamma has shape (4,), expected (3,)"),
        (lambda a: {**a, "beta": np.ones((3, 1))}, "beta has shape"),
        (lambda a: {**a, "running_mean": np.zeros(2)}, "running_mean has shape"),
        (lambda a: {**a, "running_var": np.zeros(5)}, "running_var has shape"),
        (lambda a: {**a, "x": a["x"][:1]}, "more than 1 value per channel"),
        (lambda a: {**a, "x": np.where(np.arange(24).reshape(8, 3) == 5, np.nan, a["x"])}, "non-finite"),
        (lambda a: {**a, "x": a["x"].astype(np.int64)}, "floating-point"),
        (lambda a: {**a, "gamma": [1.0, 1.0, 1.0]}, "numpy array"),
        (lambda a: {**a, "eps": 0.0}, "eps"),
        (lambda a: {**a, "momentum": 1.5}, "momentum"),
        (lambda a: {**a, "momentum": True}, "momentum"),
        (lambda a: {**a, "eps": True}, "eps"),
        (lambda a: {**a, "running_mean": np.zeros(3, dtype=np.int64)}, "running_mean has dtype int64"),
        (lambda a: {**a, "running_var": -np.ones(3), "training": False}, "running_var has a negative value"),
        (lambda a: {**a, "running_mean": np.full(3, np.inf)}, "running_mean has a non-finite value"),
        (lambda a: {**a, "running_var": None}, "both be arrays or both be None"),
        (lambda a: {**a, "training": False, "running_mean": None, "running_var": None}, "running_mean is None"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_problem(change, message):
    x, gamma, beta, rm, rv = make((8, 3))
    args = dict(x=x, gamma=gamma, beta=beta, running_mean=rm, running_var=rv)
    with pytest.raises(ValueError, match=re.escape(message)):
        scratch.batch_norm_forward(**change(args))


def test_numpy_scalars_are_accepted_as_momentum_and_eps():
    x, gamma, beta, rm, rv = make((8, 3))
    scratch.batch_norm_forward(x, gamma, beta, rm, rv, momentum=np.float32(0.1), eps=np.float32(1e-5))


def test_single_value_per_channel_is_fine_in_eval_mode():
    x, gamma, beta, rm, rv = make((1, 3, 1, 1))
    out, _ = scratch.batch_norm_forward(x, gamma, beta, rm, rv, training=False)
    assert out.shape == x.shape


def test_backward_rejects_a_dout_of_the_wrong_shape():
    x, gamma, beta, _, _ = make((4, 3))
    _, cache = scratch.batch_norm_forward(x, gamma, beta, None, None)
    with pytest.raises(ValueError, match=r"dout has shape \(4, 2\), expected \(4, 3\)"):
        scratch.batch_norm_backward(np.zeros((4, 2)), cache)
    with pytest.raises(ValueError, match="cache must be"):
        scratch.batch_norm_backward_fast(np.zeros((4, 3)), {"wrong": 1})


def _digits():
    from normlab.runtime.data import load_digits

    d = load_digits(seed=0)
    return [t.numpy() for t in (d.x_train, d.y_train, d.x_test, d.y_test)]


def test_the_mlp_trains_with_batch_norm_and_a_block_written_another_way_gives_the_same_run():
    data = _digits()
    ref = scratch.train_mlp(*data, seed=3, steps=150)

    def forward(x, w, gamma, beta, eps):  # the same block, through the staged backward
        a = x @ w
        h, cache = scratch.batch_norm_forward(a, gamma, beta, None, None, eps=eps)
        return np.maximum(h, 0), (x, w, h, cache)

    def backward(dout, cache):
        x, w, h, bn_cache = cache
        da, dgamma, dbeta = scratch.batch_norm_backward(dout * (h > 0), bn_cache)
        return da @ w.T, x.T @ da, dgamma, dbeta

    other = scratch.train_mlp(*data, seed=3, steps=150, forward=forward, backward=backward)
    assert np.abs(other["loss"] - ref["loss"]).max() < 1e-9 and other["test_acc"] == ref["test_acc"]
    assert ref["test_acc"] > 0.9 and ref["loss"][-20:].mean() < ref["loss"][:5].mean() / 3
    plain = scratch.train_mlp(*data, seed=3, steps=150, batch_norm=False)
    assert plain["test_acc"] > 0.9 and not np.array_equal(plain["loss"], ref["loss"])


def test_the_mlp_uses_the_given_running_update_for_its_test_accuracy():
    data = _digits()
    frozen = scratch.train_mlp(*data, seed=0, steps=100, update=lambda rm, rv, a, m: (np.full_like(rm, 3.0), rv))
    ref = scratch.train_mlp(*data, seed=0, steps=100)
    assert np.array_equal(frozen["loss"], ref["loss"])  # training uses batch statistics
    assert frozen["test_acc"] < ref["test_acc"] - 0.2  # eval mode centred on 3: the update is used


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps"), ({"batch_size": 1}, "batch_size"), ({"y_train": np.zeros(3, int)}, "same number"),
])
def test_train_mlp_refuses_bad_arguments(change, message):
    x_tr, y_tr, x_te, y_te = _digits()
    kwargs = {"seed": 0} | {k: v for k, v in change.items() if k != "y_train"}
    with pytest.raises(ValueError, match=message):
        scratch.train_mlp(x_tr, change.get("y_train", y_tr), x_te, y_te, **kwargs)


def test_running_update_leaves_its_inputs_alone_and_matches_the_forward():
    rng = np.random.default_rng(0)
    x, rm, rv = rng.normal(size=(6, 3)), rng.normal(size=3), rng.uniform(1, 2, size=3)
    new_m, new_v = scratch.running_update(rm.copy(), rv.copy(), x, 0.1)
    assert np.allclose(new_m, 0.9 * rm + 0.1 * x.mean(0)) and np.allclose(new_v, 0.9 * rv + 0.1 * x.var(0, ddof=1))
    r2m, r2v = rm.copy(), rv.copy()
    scratch.running_update(r2m, r2v, x, 0.1)
    assert np.array_equal(r2m, rm) and np.array_equal(r2v, rv)
