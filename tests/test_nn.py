"""normlab.nn against torch.nn: the same numbers, state, state dicts and errors, step after step."""

import itertools

import pytest
import torch
from torch import nn

from normlab import nn as nl

TOL = dict(rtol=1e-10, atol=1e-12)  # float64

# (module name, input shape): N=2, C=1, 1x1 spatial, 3-d input to BatchNorm1d.
SHAPES = [
    ("BatchNorm1d", (2, 1)),
    ("BatchNorm1d", (7, 3)),
    ("BatchNorm1d", (2, 3, 5)),
    ("BatchNorm2d", (2, 1, 1, 1)),
    ("BatchNorm2d", (3, 4, 5, 6)),
    ("BatchNorm3d", (2, 2, 3, 2, 3)),
]
MOMENTA = [None, 0.1, 1.0]
MODES = ["train", "train", "eval", "train", "eval", "train"]  # train and eval alternating
MATRIX = list(itertools.product(SHAPES, MOMENTA, [True, False], [True, False]))


def pair(name, C, **kwargs):
    ours = getattr(nl, name)(C, dtype=torch.float64, **kwargs)
    ref = getattr(nn, name)(C, dtype=torch.float64, **kwargs)
    if kwargs.get("affine", True):  # non-trivial gamma and beta, the same in both
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_the_parity_matrix_is_the_advertised_size():
    assert len(MATRIX) == 72 and len(MODES) == 6


@pytest.mark.parametrize("shape_case, momentum, affine, track", MATRIX)
def test_matches_torch_step_by_step(shape_case, momentum, affine, track):
    name, shape = shape_case
    ours, ref = pair(name, shape[1], momentum=momentum, affine=affine, track_running_stats=track)
    gen = torch.Generator().manual_seed(0)
    for step, mode in enumerate(MODES):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (step + 1) + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        y, y_ref = ours(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref, **TOL)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, **TOL, msg=f"step {step} ({mode}): {key}")


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}])
def test_parameters_buffers_and_state_dict_keys_match(name, kwargs):
    ours, ref = getattr(nl, name)(5, **kwargs), getattr(nn, name)(5, **kwargs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


def test_state_dicts_load_in_both_directions():
    ref = nn.BatchNorm2d(3)
    ref.train()
    ref(torch.randn(4, 3, 2, 2) * 3 + 1)  # non-default running statistics and counter
    ours = nl.BatchNorm2d(3)
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(3)
    back.load_state_dict(ours.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)
    assert int(ours.num_batches_tracked) == 1


def test_a_state_dict_without_the_counter_loads_like_torch():
    state = nn.BatchNorm1d(2).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # as saved by torch before the counter existed
    ours = nl.BatchNorm1d(2)
    ours.load_state_dict(state)
    assert int(ours.num_batches_tracked) == 0


@pytest.mark.parametrize(
    "module, x, error, message",
    [
        (nl.BatchNorm1d(3), torch.randn(1, 3), ValueError, "Expected more than 1 value per channel"),
        (nl.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, "Expected more than 1 value per channel"),
        (nl.BatchNorm2d(3), torch.randn(4, 3, 2), ValueError, "expected 4D input (got 3D input)"),
        (nl.BatchNorm1d(3), torch.randn(4, 3, 2, 2), ValueError, "expected 2D or 3D input (got 4D input)"),
        (nl.BatchNorm2d(3), torch.randn(4, 5, 2, 2), RuntimeError, "should contain 5 elements not 3"),
    ],
)
def test_errors_match_torch(module, x, error, message):
    ref = getattr(nn, type(module).__name__)(module.num_features)
    with pytest.raises(error):
        ref(x)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        module(x)


def test_a_batch_of_one_works_in_eval_mode():
    bn = nl.BatchNorm1d(3).eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)


@pytest.mark.parametrize("bad", [dict(num_features=0), dict(num_features=3, momentum=1.5), dict(num_features=3, eps=0)])
def test_bad_constructor_arguments_raise_value_errors(bad):
    with pytest.raises(ValueError):
        nl.BatchNorm1d(**bad)


# The CUDA cases show as skipped on a machine without a GPU (they do not vanish).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA GPU on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float64, 1e-10)],
)
@pytest.mark.parametrize("layout", ["contiguous", "non-contiguous", "channels_last"])
def test_any_float_dtype_and_layout(device, dtype, tol, layout):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 4, 5, 7, generator=gen) * 2 + 3).to(device)
    if layout == "non-contiguous":
        x = x.transpose(2, 3)  # (6, 4, 7, 5), a view with swapped strides
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    # Half-precision input with float32 parameters is how mixed precision runs; float64 runs in float64.
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours = nl.BatchNorm2d(4, device=device, dtype=param_dtype)
    ref = nn.BatchNorm2d(4, device=device, dtype=param_dtype)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = ours(xa), ref(xb)
        assert y.dtype == dtype and y.shape == x.shape
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * 10)
        dy = torch.randn(y.shape, generator=gen).to(device)  # sum(y) alone has zero gradient in training
        (y.float() * dy).sum().backward()
        (y_ref.float() * dy).sum().backward()
        torch.testing.assert_close(xa.grad.float(), xb.grad.float(), rtol=tol, atol=tol * 10)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=tol, atol=tol)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_bias_false_keeps_gamma_and_drops_beta():
    bn = nl.BatchNorm1d(3, bias=False, dtype=torch.float64)
    assert bn.bias is None and "bias" not in dict(bn.named_parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.fill_(2.0)
    expected = 2.0 * (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(bn(x), expected)
