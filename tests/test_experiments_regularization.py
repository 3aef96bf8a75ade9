"""Chapter 4's experiment functions: models, data subsets, the noise measurement, the variance shift."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEVICES, blob_split
from normlab import checks
from normlab.experiments import regularization as rg
from normlab.nn import GhostBatchNorm1d, PopulationNorm1d
from normlab.runtime import ensemble


@pytest.fixture(scope="module")
def tiny():
    return blob_split(classes=3, features=6, n=90, n_train=60)


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model)


def test_make_mlp_layers_and_dropout_placement():
    every = rg.make_mlp(6, 3, width=8, depth=3, dropout=0.5)
    assert _count(every, nn.BatchNorm1d) == 3 and _count(every, nn.Dropout) == 3
    last = rg.make_mlp(6, 3, width=8, depth=3, dropout=0.5, dropout_at="after_last")
    assert _count(last, nn.Dropout) == 1 and isinstance(last[-2], nn.Dropout)
    assert _count(rg.make_mlp(6, 3, norm="none"), nn.BatchNorm1d) == 0
    assert _count(rg.make_mlp(6, 3, norm="ghost", virtual_batch_size=4), GhostBatchNorm1d) == 2
    assert _count(rg.make_mlp(6, 3, norm="population"), PopulationNorm1d) == 2
    a, b = rg.make_mlp(6, 3, seed=1), rg.make_mlp(6, 3, seed=1)
    assert torch.equal(a[0].weight, b[0].weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"norm": "layer"}, "norm must be"), ({"dropout": 1.0}, "dropout"), ({"dropout_at": "first"}, "dropout_at"),
     ({"norm": "ghost"}, "virtual_batch_size"), ({"width": 0}, "width")],
)
def test_make_mlp_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rg.make_mlp(6, 3, **kwargs)


def test_subset_is_class_balanced_and_reproducible(tiny):
    sub = rg.subset(tiny, 31, seed=4)
    counts = torch.bincount(sub.y_train)
    assert len(sub.y_train) == 31 and counts.max() - counts.min() <= 1
    assert torch.equal(sub.x_train, rg.subset(tiny, 31, seed=4).x_train)
    assert not torch.equal(sub.x_train, rg.subset(tiny, 31, seed=5).x_train)
    assert torch.equal(sub.x_test, tiny.x_test)
    with pytest.raises(ValueError, match="n must be in"):
        rg.subset(tiny, 2)


def test_fit_refreshes_population_statistics_every_epoch(tiny):
    model = rg.make_mlp(6, 3, width=8, norm="population", seed=0)
    rg.fit(model, tiny, steps=12, batch_size=20, lr=0.05)  # 3 steps per epoch: refreshed after step 12
    assert not model.training
    with torch.no_grad():
        h = model[0](tiny.x_train)
    torch.testing.assert_close(model[1].running_mean, h.mean(0))
    torch.testing.assert_close(model[1].running_var, h.var(0))


def test_evaluate_reports_accuracies_losses_and_gaps(tiny):
    model = rg.fit(rg.make_mlp(6, 3, width=8), tiny, steps=30, batch_size=20, lr=0.1)
    r = rg.evaluate(model, tiny)
    assert r["acc_gap"] == pytest.approx(r["train_acc"] - r["test_acc"])
    assert r["loss_gap"] == pytest.approx(r["test_loss"] - r["train_loss"])
    assert r["train_acc"] > 0.9  # well-separated blobs


def test_noise_of_a_gaussian_unit_follows_the_delta_method_and_the_square_root_law():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    examples = (h - 0.5).abs().argmin(dim=0)  # z about 0.5 in every unit
    sizes = [64, 256, 1024]  # the first-order formula is off by O(1/B): about 10% at B = 16
    std, values = rg.normalized_value_noise(h, sizes, examples, trials=3000, seed=2)
    assert std.shape == (3, 3) and values[64].shape == (3000, 3)
    pred = rg.predicted_noise(h, sizes, examples)
    np.testing.assert_allclose(std, pred, rtol=0.06)
    # For a Gaussian (skew 0, kurtosis 3) the formula is sqrt((1 + z^2 / 2) / B).
    z = ((h - h.mean(0)) / h.std(0, correction=0))[examples, torch.arange(3)].numpy()
    np.testing.assert_allclose(pred, np.sqrt((1 + z**2 / 2) / np.array(sizes)[:, None]), rtol=0.02)
    assert rg.loglog_slope(sizes, std[:, 0]) == pytest.approx(-0.5, abs=0.05)


def test_noise_is_reproducible_and_checks_its_input():
    h = torch.randn(50, 2)
    a, _ = rg.normalized_value_noise(h, [4], [0, 1], trials=10, seed=3)
    b, _ = rg.normalized_value_noise(h, [4], [0, 1], trials=10, seed=3)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="examples"):
        rg.normalized_value_noise(h, [4], [0], trials=10)
    with pytest.raises(ValueError, match="batch sizes"):
        rg.normalized_value_noise(h, [1], [0, 1], trials=10)
    with pytest.raises(ValueError, match="examples, units"):
        rg.normalized_value_noise(h[:, 0], [4], [0], trials=10)


def test_loglog_slope_of_a_power_law():
    x = np.array([1.0, 2.0, 8.0, 32.0])
    assert rg.loglog_slope(x, 3 * x**-0.7) == pytest.approx(-0.7)


def test_variance_ratio_compares_running_and_test_time_variance():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x = torch.randn(200, 4)
    with torch.no_grad():
        model[1].running_var.copy_(2 * model[0](x).var(0))
    np.testing.assert_allclose(rg.variance_ratio(model, x)[0], 2.0, rtol=1e-5)
    with pytest.raises(ValueError, match="no batch norm"):
        rg.variance_ratio(nn.Linear(4, 3), x)


def test_predicted_variance_ratio_matches_real_dropout():
    torch.manual_seed(6)
    a = torch.relu(torch.randn(3000, 6) + 0.3)
    w = torch.randn(3, 6)
    drop = nn.Dropout(0.5).train()
    trained = torch.stack([drop(a) @ w.T for _ in range(30)]).reshape(-1, 3).var(0)
    measured = (trained / (a @ w.T).var(0)).numpy()
    np.testing.assert_allclose(rg.predicted_variance_ratio(a.numpy(), w.numpy(), 0.5), measured, rtol=0.03)
    np.testing.assert_allclose(rg.predicted_variance_ratio(a.numpy(), w.numpy(), 0.0), 1.0)
    with pytest.raises(ValueError, match="p must be"):
        rg.predicted_variance_ratio(a.numpy(), w.numpy(), 1.0)


def test_experiments_return_one_value_per_setting_and_seed(tiny):
    gap = rg.gap_vs_batch_size(tiny, [10, 20], [0, 1], epochs=2, progress=False)
    assert set(gap) == {"bn", "population", "none"} and gap["bn"]["acc_gap"].shape == (2, 2)
    table = rg.dropout_table(tiny, [0, 1], steps=10, progress=False)
    assert set(table) == set(rg.DROPOUT_CONFIGS) and table["BN"]["test_acc"].shape == (2,)
    shift = rg.variance_shift(tiny, [0], steps=10, batch_size=20, progress=False)
    assert len(shift) == 4 and all(r["ratio"].shape == (1,) for r in shift.values())
    ghost, steps = rg.ghost_batches(tiny, [0], small=5, large=20, epochs=1, progress=False)
    assert list(steps.values()) == [12, 3, 12, 12] and all(v.shape == (1,) for v in ghost.values())
    assert rg.ghost_size_sweep(tiny, [0, 1], [5, 20], batch_size=20, steps=5, progress=False).shape == (2, 2)


def test_ema_vs_precise_trains_the_same_network_for_every_momentum(tiny):
    r = rg.ema_vs_precise(tiny, [0, 1], momenta=(0.001, 0.5), steps=20, batch_size=20, precise_examples=60,
                          progress=False)
    np.testing.assert_array_equal(r[0.001]["precise"], r[0.5]["precise"])  # training ignores the momentum
    assert (r[0.001]["var_error"] > r[0.5]["var_error"]).all()  # after 20 steps, 0.001 is still near 1


def test_budget_and_seeds():
    assert rg.budget("full")["seeds"] > rg.budget("quick")["seeds"] >= 3
    assert rg.budget("quick")["table_seeds"] >= 5
    with pytest.raises(ValueError, match="scale"):
        rg.budget("huge")
    assert rg.seeds_for(2, 3) == [200, 201, 202]


def test_chapter_4_self_checks_pass_the_reference_and_catch_mistakes(capsys):
    def ghost(x, gamma, beta, v, eps):
        layer = GhostBatchNorm1d(x.shape[1], v, eps=eps, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(gamma))
            layer.bias.copy_(torch.as_tensor(beta))
        return layer(torch.as_tensor(x)).detach().numpy()

    checks.check_ghost_forward(ghost)
    checks.check_variance_shift(rg.predicted_variance_ratio)
    checks.check_predicted_noise(rg.predicted_noise)
    assert capsys.readouterr().out.count("PASS") == 3

    def gaussian_only(h, sizes, examples):  # drops the skewness and kurtosis terms
        z = (h - h.mean(0)) / h.std(0)
        z = z[np.asarray(examples), np.arange(h.shape[1])]
        return np.sqrt((1 + z**2 / 2) / np.asarray(sizes, float)[:, None])

    with pytest.raises(AssertionError, match="predicted noise for .* units"):
        checks.check_predicted_noise(gaussian_only)

    def whole_batch(x, gamma, beta, v, eps):  # ignores the virtual batches
        return ghost(x, gamma, beta, len(x), eps)

    with pytest.raises(AssertionError, match="virtual batches of 4"):
        checks.check_ghost_forward(whole_batch)

    def no_rescale(a, weight, p):  # forgets that kept inputs are divided by 1 - p
        test_var = (a @ weight.T).var(axis=0)
        return (test_var + p * (weight**2) @ (a**2).mean(axis=0)) / test_var

    with pytest.raises(AssertionError, match="ratio for a"):
        checks.check_variance_shift(no_rescale)


@pytest.mark.parametrize("device", DEVICES)
def test_experiments_run_on_the_given_device(device, device_spy, tiny):
    ens = rg.fit_seeds(tiny, [0, 1], steps=5, batch_size=20, lr=0.05, width=8, norm="population", device=device)
    assert device_spy.moved(device)
    assert {p.device.type for p in ens.parameters()} == {device.type}
    model = rg.make_mlp(6, 3, width=8, dropout=0.5, seed=0, device=device)
    assert {p.device.type for p in model.parameters()} == {device.type}
    rg.fit(model, tiny, steps=5, batch_size=20, lr=0.05)
    assert rg.evaluate(model, tiny)["train_acc"] >= 0 and rg.variance_ratio(model, tiny.x_test)[1].shape == (8,)
    gap = rg.gap_vs_batch_size(tiny, [20], [0, 1], norms=("bn", "population"), epochs=1, width=8, progress=False,
                               device=device)
    shift = rg.variance_shift(tiny, [0, 1], steps=5, batch_size=20, width=8, progress=False, device=device)
    ema = rg.ema_vs_precise(tiny, [0, 1], momenta=(0.1,), steps=5, batch_size=20, width=8, precise_examples=60,
                            progress=False, device=device)
    ghost, _ = rg.ghost_batches(tiny, [0], small=5, large=20, epochs=1, width=8, progress=False, device=device)
    assert gap["bn"]["test_acc"].shape == (1, 2) and shift["dropout before BN"]["ratio"].shape == (2,)
    assert ema[0.1]["var_error"].shape == (2,) and all(v.shape == (1,) for v in ghost.values())
    if device.type == "cpu":  # on the CPU under another name: bit for bit the default device's numbers
        again = rg.ema_vs_precise(tiny, [0, 1], momenta=(0.1,), steps=5, batch_size=20, width=8,
                                  precise_examples=60, progress=False)
        for key in ("ema", "precise", "var_error"):
            np.testing.assert_array_equal(again[0.1][key], ema[0.1][key])
        again = rg.variance_shift(tiny, [0, 1], steps=5, batch_size=20, width=8, progress=False)
        for name in shift:
            np.testing.assert_array_equal(again[name]["ratio"], shift[name]["ratio"])
        np.testing.assert_array_equal(ensemble.evaluate(ens, tiny)["test_acc"],
                                      ensemble.evaluate(rg.fit_seeds(tiny, [0, 1], steps=5, batch_size=20, lr=0.05,
                                                                     width=8, norm="population"), tiny)["test_acc"])
