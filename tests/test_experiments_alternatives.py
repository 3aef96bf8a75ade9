"""normlab.experiments.alternatives: the layers, the style statistics and small runs of each experiment."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from normlab.experiments import alternatives as alt
from normlab.runtime.data import Split, load_digits


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


@pytest.fixture(scope="module")
def small_contents(digits):
    up = lambda x: F.interpolate(x.reshape(-1, 1, 8, 8), size=12, mode="bilinear")  # noqa: E731
    return Split(up(digits.x_train[:64]), digits.y_train[:64], up(digits.x_test[:20]), digits.y_test[:20], "up")


def _stripes(size):
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    return (0.5 + 0.5 * torch.sin(0.9 * xx + 0.45 * yy)).reshape(1, 1, size, size)


def test_stylization_losses_are_the_style_loss_per_image(small_contents):
    net = alt.FeatureNet(channels=(4, 8, 8), seed=3)
    style = _stripes(12)
    imgs = small_contents.x_test[:3]
    fs = net(style)
    content_feats = net(small_contents.x_train[:3])[-1]
    c, st = alt.stylization_losses(net, imgs, content_feats, [alt.channel_stats(f) for f in fs])
    for i in range(3):
        torch.testing.assert_close(st[i], alt.style_loss(net(imgs[i : i + 1]), fs))
        torch.testing.assert_close(c[i], F.mse_loss(net(imgs[i : i + 1])[-1], content_feats[i : i + 1]))


@pytest.mark.parametrize("norm", ["bn", "in"])
def test_stylization_experiment_trains_each_seed_as_alone(small_contents, norm):
    style, seeds, steps, B, lr, w = _stripes(12), (4, 9), 6, 4, 0.01, 10.0
    res = alt.stylization_experiment(small_contents, style, norms=(norm,), seeds=seeds, steps=steps,
                                     batch_size=B, lr=lr, style_weight=w, net_seed=1, channels=4,
                                     net_channels=(4, 8, 8), n_show=2)
    r = res[norm]
    assert r["style"].shape == r["content"].shape == (2,) and r["images"].shape == (2, 2, 1, 12, 12)
    np.testing.assert_allclose(r["total"], r["content"] + w * r["style"], rtol=1e-6)
    net = alt.FeatureNet(channels=(4, 8, 8), seed=1)
    stats = [alt.channel_stats(f) for f in net(style)]
    x, xt = small_contents.x_train, small_contents.x_test
    for k, s in enumerate(seeds):  # the same run by hand, one model
        torch.manual_seed(s)
        model = alt.StyleNet(norm, 4)
        opt, gen = torch.optim.Adam(model.parameters(), lr=lr), torch.Generator().manual_seed(s)
        for _ in range(steps):
            xb = x[torch.randint(len(x), (B,), generator=gen)]
            c, st = alt.stylization_losses(net, model(xb), net(xb)[-1].detach(), stats)
            opt.zero_grad()
            (c + w * st).mean().backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            c, st = alt.stylization_losses(net, model(xt), net(xt)[-1], stats)
        np.testing.assert_allclose(r["style"][k], float(st.mean()), rtol=1e-4)
        np.testing.assert_allclose(r["content"][k], float(c.mean()), rtol=1e-4)


def test_stylization_experiment_refuses_bad_inputs(small_contents):
    with pytest.raises(ValueError, match="norm must be"):
        alt.StyleNet("ln")
    with pytest.raises(ValueError, match="one grey image"):
        alt.stylization_experiment(small_contents, _stripes(12)[0], steps=1)
    with pytest.raises(ValueError, match="steps"):
        alt.stylization_experiment(small_contents, _stripes(12), steps=0)


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


@pytest.mark.parametrize("device", DEVICES)
def test_experiments_run_on_the_given_device(device, device_spy, digits, small_contents):
    table = alt.cnn_table(alt.as_images(digits), kinds=("bn",), batch_sizes=(32,), seeds=(0, 1), steps=2,
                          device=device)
    assert table["bn", 32].shape == (2,)
    seqs = alt.as_sequences(digits)
    seqs = Split(seqs.x_train[:64], seqs.y_train[:64], seqs.x_test[:20], seqs.y_test[:20])
    model, hist = alt.train_rnn("batch", seqs, steps=2, seed=0, eval_every=1, device=device)
    assert {p.device.type for p in model.parameters()} == {device.type} and len(hist.test_acc) == 2
    r = alt.rnn_experiment(seqs, seeds=[0, 1], steps=2, eval_every=1, pad=1, n_single=3, device=device)
    assert r["batch"]["b1_max_diff"].shape == (2,)
    style = _stripes(12)
    st = alt.stylization_experiment(small_contents, style, norms=("in",), seeds=(0, 1), steps=2, batch_size=4,
                                    channels=4, net_channels=(4, 8, 8), n_show=2, device=device)
    assert st["in"]["images"].device.type == "cpu" and st["in"]["style"].shape == (2,)
    tr = alt.style_transfer(small_contents.x_test[:1], style, steps=2, device=device)
    assert tr["image"].device.type == "cpu" and tr["image"].shape == (1, 1, 12, 12)
    assert device_spy.moved(device)
    assert {d.type for d in device_spy.modules} == {device.type}
