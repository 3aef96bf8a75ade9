"""normlab.experiments.alternatives: the layers, the style statistics and small runs of each experiment."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.data import Split, load_digits
from normlab.experiments import alternatives as alt


@pytest.fixture(scope="module")
def digits():
    d = load_digits(seed=0)
    return Split(d.x_train[:200], d.y_train[:200], d.x_test[:100], d.y_test[:100], "digits")


def test_make_norm_gives_the_layers_the_chapter_names():
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    ln = alt.make_norm("ln", 8).double()
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8, 4, 4)))  # affine starts at (1, 0)
    inn = alt.make_norm("in", 8).double()
    torch.testing.assert_close(inn(x), F.instance_norm(x))
    assert isinstance(alt.make_norm("none", 8), torch.nn.Identity)
    with pytest.raises(ValueError, match="kind must be"):
        alt.make_norm("batch", 8)
    with pytest.raises(ValueError, match="does not divide"):
        alt.make_norm("gn", 6, groups=4)


def test_channel_rms_norm_is_rms_norm_over_c_h_w():
    torch.manual_seed(0)
    layer = alt.ChannelRMSNorm(4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(4) + 0.5)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64) + 1
    ms = x.pow(2).mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(layer(x), x / torch.sqrt(ms + 1e-5) * layer.weight[:, None, None], rtol=0, atol=1e-12)


def test_adain_gives_the_content_the_style_statistics_exactly():
    torch.manual_seed(0)
    content = torch.randn(2, 5, 6, 6, dtype=torch.float64) * 3 + 1
    style = torch.randn(2, 5, 4, 4, dtype=torch.float64) * 0.5 - 2
    out = alt.adain(content, style, eps=0.0)
    for a, b in zip(alt.channel_stats(out, eps=0.0), alt.channel_stats(style, eps=0.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="alike"):
        alt.adain(content, style[:, :3])


def test_style_transfer_lowers_the_style_loss():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    content = (((xx - 8) ** 2 + (yy - 8) ** 2) < 20).float().reshape(1, 1, 16, 16)
    style = (0.5 + 0.5 * torch.sin(xx * 1.2)).reshape(1, 1, 16, 16)
    r = alt.style_transfer(content, style, steps=10)
    assert r["image"].shape == (1, 1, 16, 16)
    assert r["style_loss_after"] < r["style_loss_before"]
    with pytest.raises(ValueError, match="one grey image"):
        alt.style_transfer(content[0], style)


def test_cnn_table_shapes(digits):
    images = alt.as_images(digits)
    assert images.x_train.shape == (200, 1, 8, 8)
    table = alt.cnn_table(images, kinds=("bn", "ln"), batch_sizes=(32,), seeds=(0, 1), epochs=1)
    assert set(table) == {("bn", 32), ("ln", 32)}
    assert all(v.shape == (2,) and ((0 <= v) & (v <= 1)).all() for v in table.values())


def test_cnn_table_trains_each_seed_as_train_cnn_does(digits):
    images = alt.as_images(digits)
    table = alt.cnn_table(images, kinds=("rms", "in"), batch_sizes=(32, 4), seeds=(0, 1), epochs=1, lr=0.1)
    for (kind, b), accs in table.items():
        alone = [alt.train_cnn(kind, images, b, epochs=1, lr=0.1, seed=s) for s in (0, 1)]
        np.testing.assert_allclose(accs, alone, atol=1.5 / len(images.y_test))  # at most one test example apart


def test_cnn_table_equal_steps(digits):
    images = alt.as_images(digits)
    # one epoch at batch 4 is 200 // 4 = 50 steps: the same runs either way
    by_epochs = alt.cnn_table(images, kinds=("bn",), batch_sizes=(4,), seeds=(0, 1), epochs=1, lr=0.1)
    by_steps = alt.cnn_table(images, kinds=("bn",), batch_sizes=(4, 32), seeds=(0, 1), steps=50, lr=0.1)
    np.testing.assert_array_equal(by_steps["bn", 4], by_epochs["bn", 4])
    # at batch 32, 50 steps are 8 epochs (1600 // 32)
    alone = [alt.train_cnn("bn", images, 32, epochs=8, lr=0.1, seed=s) for s in (0, 1)]
    np.testing.assert_allclose(by_steps["bn", 32], alone, atol=1.5 / len(images.y_test))
    with pytest.raises(ValueError, match="steps"):
        alt.cnn_table(images, kinds=("bn",), batch_sizes=(4,), seeds=(0,), steps=0)


def test_time_norms_returns_positive_times():
    t = alt.time_norms(rows=64, features=32, repeat=3)
    assert set(t) == {"torch_ln", "torch_rms", "numpy_ln", "numpy_rms"} and min(t.values()) > 0


def test_sequences_and_padding(digits):
    seqs = alt.as_sequences(digits)
    assert seqs.x_train.shape == (200, 8, 8)
    torch.testing.assert_close(seqs.x_train[0, 1], digits.x_train[0, 8:16])  # row 1 = pixels 8..15
    long = alt.pad_front(seqs.x_test, 3)
    assert long.shape == (100, 11, 8) and (long[:, :3] == 0).all()
    torch.testing.assert_close(long[:, 3:], seqs.x_test)
    with pytest.raises(ValueError, match="steps"):
        alt.pad_front(seqs.x_test, -1)


def test_rnn_experiment_records_every_measurement(digits):
    seqs = alt.as_sequences(digits)
    seqs = Split(seqs.x_train[:64], seqs.y_train[:64], seqs.x_test[:20], seqs.y_test[:20])
    r = alt.rnn_experiment(seqs, seeds=[0], steps=4, eval_every=2, pad=2)
    assert list(r["eval_step"]) == [2, 4]
    for norm in alt.RNN_NORMS:
        assert r[norm]["curve"].shape == (1, 2) and r[norm]["full"].shape == (1,)
        assert (r[norm]["b1_max_diff"] < 1e-5).all()  # eval mode never looks across examples
    assert r["batch"]["batch2"].shape == (1,) and "batch2" not in r["layer"]


def test_budget_and_seeds():
    assert alt.budget("quick")["seeds"] >= 3
    assert alt.seeds_for(2, 3) == [200, 201, 202]
    with pytest.raises(ValueError, match="scale"):
        alt.budget("huge")
