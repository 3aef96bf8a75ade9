"""normlab.data: offline datasets as tensors, reproducible splits, no side effects."""

import math

import numpy as np
import pytest
import torch

from normlab import data


def test_digits_are_real_8x8_images_split_and_standardized_on_train():
    d = data.load_digits()
    assert d.x_train.shape[1] == 64 and d.num_classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    means = d.x_train.mean(0)
    assert torch.allclose(means, torch.zeros(64), atol=1e-5)
    assert set(d.y_test.tolist()) == set(range(10))  # stratified: every class in the test set


def test_digits_split_depends_on_the_seed_only():
    a, b, c = data.load_digits(seed=1), data.load_digits(seed=1), data.load_digits(seed=2)
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_test, c.x_test)


def test_mnist1d_has_the_standard_shape_and_keeps_global_rng_state():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    d = data.load_mnist1d()
    assert np.random.rand() == expected
    assert tuple(d.x_train.shape) == (4000, 40) and tuple(d.x_test.shape) == (1000, 40)
    assert d.num_classes == 10


@pytest.mark.parametrize("bad", [0.0, 1.0, 1, "0.2"])
def test_bad_test_fraction_is_rejected(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=bad)


def test_too_few_mnist1d_samples_are_rejected():
    with pytest.raises(ValueError, match="num_samples"):
        data.load_mnist1d(num_samples=5)


def _split(x):
    return data.Split(x, torch.zeros(len(x), dtype=torch.int64), x.clone(), torch.zeros(len(x), dtype=torch.int64))


def test_blur_keeps_constants_and_mass_and_spreads_a_spike():
    x = torch.zeros(3, 41)
    x[0] = 2.5  # a constant stays constant, the replicated ends included
    x[1, 20] = 1.0  # a spike in the middle becomes the Gaussian kernel itself
    x[2] = torch.randn(41, generator=torch.Generator().manual_seed(0))
    out = data.blur(_split(x), 2.0)
    assert out.x_train.shape == x.shape and torch.equal(out.x_train, out.x_test)
    assert torch.allclose(out.x_train[0], torch.full((41,), 2.5))
    t = torch.arange(-6, 7, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / 2.0) ** 2)
    assert torch.allclose(out.x_train[1, 14:27], kernel / kernel.sum(), atol=1e-7)
    assert out.x_train[1].sum().item() == pytest.approx(1.0, abs=1e-6) and out.x_train[1, 20] < 0.25
    assert out.x_train[2].std() < x[2].std()  # smoothing lowers the spread of white noise
    assert torch.equal(data.blur(_split(x), 0).x_train, x)
    for bad in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="sigma"):
            data.blur(_split(x), bad)


def test_contrast_scales_each_example_about_its_own_mean():
    x = torch.tensor([[1.0, 3.0, 5.0], [-2.0, 0.0, 8.0]])
    out = data.contrast(_split(x), 0.25).x_train
    assert torch.allclose(out, torch.tensor([[2.5, 3.0, 3.5], [1.0, 1.5, 3.5]]))
    assert torch.allclose(out.mean(1), x.mean(1))
    assert torch.equal(data.contrast(_split(x), 1.0).x_train, x)
    for bad in (0, -0.5, float("inf")):
        with pytest.raises(ValueError, match="factor"):
            data.contrast(_split(x), bad)


def test_check_blur_passes_blur_signals_and_catches_zero_padding_and_an_unnormalized_kernel(capsys):
    from normlab import checks

    checks.check_blur(data.blur_signals)
    assert "PASS" in capsys.readouterr().out

    def zero_padded(x, sigma):
        half = max(1, math.ceil(3 * sigma))
        t = torch.arange(-half, half + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        return torch.nn.functional.conv1d(x.unsqueeze(1), (k / k.sum()).view(1, 1, -1), padding=half).squeeze(1)

    def unnormalized(x, sigma):
        half = max(1, math.ceil(3 * sigma))
        t = torch.arange(-half, half + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        padded = torch.nn.functional.pad(x.unsqueeze(1), (half, half), mode="replicate")
        return torch.nn.functional.conv1d(padded, k.view(1, 1, -1)).squeeze(1)

    for wrong in (zero_padded, unnormalized):
        with pytest.raises(AssertionError, match="blur"):
            checks.check_blur(wrong)
