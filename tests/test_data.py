"""normlab.data: offline datasets as tensors, reproducible splits, no side effects."""

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
