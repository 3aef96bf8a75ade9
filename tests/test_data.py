"""normlab.runtime.data: offline datasets as tensors, reproducible splits, no side effects."""

import math

import numpy as np
import pytest
import torch

from normlab.runtime import data


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


# load_images: small files written here in torchvision's on-disk formats (IDX for MNIST-like
# sets, pickled batches for CIFAR-10), so the readers are tested without a network or torchvision.

def _write_idx(path, values):
    """An IDX file as MNIST ships it: 0x00 0x00, type 0x08 (unsigned byte), the number of
    dimensions, the dimensions as big-endian int32, then the bytes."""
    values = np.asarray(values, dtype=np.uint8)
    header = bytes([0, 0, 8, values.ndim]) + np.asarray(values.shape, dtype=">i4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + values.tobytes())


def _fake_mnist(root, folder="MNIST/raw", n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    sets = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = rng.integers(0, 10, n)
        _write_idx(root / folder / f"{stem}-images-idx3-ubyte", images)
        _write_idx(root / folder / f"{stem}-labels-idx1-ubyte", labels)
        sets[stem] = (images, labels)
    return sets


def _fake_cifar(root, per_batch=3, seed=0):
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    meta = {"label_names": [f"class {i}" for i in range(10)]}  # torchvision reads the class names
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_load_images_reads_mnist_idx_files_in_torchvisions_layout(tmp_path, name, folder):
    sets = _fake_mnist(tmp_path, folder)
    d = data.load_images(name, tmp_path, download=False)
    images, labels = sets["train"]
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.y_train.tolist() == labels.tolist() and d.y_test.tolist() == sets["t10k"][1].tolist()
    # scaled to [0, 1], then standardized with the training set's statistics
    pixels = images.astype(np.float32) / 255
    expected = (pixels - pixels.mean()) / pixels.std()
    assert np.allclose(d.x_train[:, 0].numpy(), expected, atol=1e-5)
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std(unbiased=False)) - 1) < 1e-4
    flat = data.load_images(name, tmp_path, download=False, flatten=True, limit=4)
    assert flat.x_train.shape == (4, 784) and flat.x_test.shape == (4, 784)
    assert flat.y_train.tolist() == labels[:4].tolist()


def test_load_images_reads_cifar10_batches_channel_by_channel(tmp_path):
    batches = _fake_cifar(tmp_path)
    d = data.load_images("cifar10", tmp_path, download=False)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    train = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert d.y_train.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    pixels = train.astype(np.float32) / 255
    for c in range(3):  # each channel with its own mean and standard deviation
        expected = (pixels[:, c] - pixels[:, c].mean()) / pixels[:, c].std()
        assert np.allclose(d.x_train[:, c].numpy(), expected, atol=1e-5)
    assert data.load_images("cifar10", tmp_path, download=False, flatten=True).x_test.shape == (3, 3072)


def test_torchvision_reads_the_files_these_tests_write_as_load_images_does(tmp_path, monkeypatch):
    """Where torchvision is installed (Colab; not this course's CPU toolchain, where PyPI's build
    does not import beside the CPU torch), its own dataset classes read the fake files, so they are
    in torchvision's layout and format, and they see the pixels and labels that load_images sees."""
    tv = pytest.importorskip("torchvision")
    _fake_mnist(tmp_path)
    _fake_cifar(tmp_path)
    mnist = tv.datasets.MNIST(str(tmp_path), train=True, download=False)
    ours = data.load_images("mnist", tmp_path, download=False)
    pixels = mnist.data.numpy().astype(np.float32) / 255
    assert np.allclose(ours.x_train[:, 0].numpy(), (pixels - pixels.mean()) / pixels.std(), atol=1e-5)
    assert mnist.targets.tolist() == ours.y_train.tolist()
    # CIFAR10 checks the real files' MD5 sums, which fake files cannot match: skip that check only
    monkeypatch.setattr(tv.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    cifar = tv.datasets.CIFAR10(str(tmp_path), train=True, download=False)
    ours = data.load_images("cifar10", tmp_path, download=False)
    pixels = cifar.data.transpose(0, 3, 1, 2).astype(np.float32) / 255  # torchvision keeps (N, H, W, C)
    mean, std = pixels.mean(axis=(0, 2, 3), keepdims=True), pixels.std(axis=(0, 2, 3), keepdims=True)
    assert np.allclose(ours.x_train.numpy(), (pixels - mean) / std, atol=1e-5)
    assert list(cifar.targets) == ours.y_train.tolist()


def test_load_images_refuses_a_pickle_that_calls_a_function(tmp_path):
    import pickle

    _fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(print))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        data.load_images("cifar10", tmp_path, download=False)


def test_load_images_says_in_one_line_why_it_falls_back(tmp_path, capsys, monkeypatch):
    assert data.load_images("mnist", tmp_path, download=False) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "mnist" in out and "offline data" in out
    # without a usable torchvision (as on this course's CPU machines), the download says so
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision":
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    assert data.load_images("cifar10", tmp_path) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "torchvision is not usable here" in out


def test_load_images_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_images("imagenet", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        data.load_images("mnist", tmp_path, limit=0)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / "MNIST" / "raw" / stem).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="header says"):
        data.load_images("mnist", tmp_path, download=False)


def test_split_to_moves_every_tensor_and_keeps_the_name():
    d = data.load_digits()
    moved = d.to("cpu:0")
    assert moved.name == d.name and torch.equal(moved.x_test, d.x_test) and torch.equal(moved.y_train, d.y_train)
