"""Chapter 3's experiments: the noise, the ensemble's BN, the measures, and tiny end-to-end runs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from normlab import checks
from normlab.experiments import covariate_shift as cs
from normlab.runtime import ensemble
from normlab.runtime.data import load_digits
from normlab.runtime.train import device_of


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_noise_keeps_shape_and_ranges():
    gen = torch.Generator().manual_seed(0)
    out = cs.time_varying_noise(torch.zeros(1000, 7), 0.2, 1.1, gen)
    assert out.shape == (1000, 7)
    assert 0.1 - 1e-6 <= out.min() and out.max() <= 0.3 + 1e-6  # m ~ U(0.1, 0.3) where a = 0


def test_ics_of_each_member_is_the_ics_of_that_network_alone():
    torch.manual_seed(0)
    net = cs._build([6, 8, 8, 3], "relu", True, False, torch.ones(2), [0, 1], torch.Generator().manual_seed(0))
    x, y = torch.randn(2, 16, 6), torch.randint(0, 3, (2, 16))
    lr = torch.tensor([0.1, 0.5])
    out = cs.ics(net, x, y, lr, step_norm=0.3)
    got, got_eq = out["rel"], out["rel_eq"]  # (members, layers 2..3)
    for k in range(2):
        alone = ensemble.member(net, k).train()
        params = dict(alone.named_parameters())
        blocks = {name: int(name.split(".")[0]) // 4 for name in params}  # Linear, BN, probe, ReLU per layer

        def grads(p, alone=alone, k=k):
            loss = F.cross_entropy(torch.func.functional_call(alone, p, (x[k],)), y[k])
            return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))

        g = grads(params)
        for i, layer in enumerate(("4.weight", "8.weight"), 1):
            moved = {n: (t - lr[k] * g[n] if blocks[n] < i else t).detach().requires_grad_() for n, t in params.items()}
            G, G2 = g[layer], grads(moved)[layer]
            assert got[k, i - 1] == pytest.approx(((G - G2).norm() / G.norm()).item(), rel=1e-4)
            # equal-length step: the earlier layers move exactly 0.3 (l2) along -g
            earlier = torch.cat([g[n].flatten() for n in params if blocks[n] < i])
            step = {n: 0.3 * g[n] / earlier.norm() for n in params if blocks[n] < i}
            assert torch.cat([v.flatten() for v in step.values()]).norm().item() == pytest.approx(0.3)
            moved = {n: (t - step[n] if n in step else t).detach().requires_grad_() for n, t in params.items()}
            G2 = grads(moved)[layer]
            assert got_eq[k, i - 1] == pytest.approx(((G - G2).norm() / G.norm()).item(), rel=1e-4)


def test_drift_ratio_values_and_errors():
    ratio = cs.drift_ratio(np.array([-1.0, -1.0]), np.array([0.0, 1.0]), np.array([1.0, 3.0]))
    assert ratio == pytest.approx(1 / 3)  # median moves 1, mean spread (2 + 4) / 2
    with pytest.raises(ValueError, match="shapes"):
        cs.drift_ratio(np.zeros(3), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="2 recorded steps"):
        cs.drift_ratio(np.zeros(1), np.zeros(1), np.ones(1))


def test_steps_to_target_is_inf_when_never_reached():
    got = cs.steps_to_target([0, 10, 20], np.array([[0.1, 0.5, 0.95], [0.1, 0.2, 0.3]]), 0.9)
    assert got[0] == 20 and math.isinf(got[1])


def test_budget_rejects_unknown_scale():
    assert cs.budget("full")["fig1"] > cs.budget("quick")["fig1"]
    with pytest.raises(ValueError, match="scale"):
        cs.budget("huge")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"act": "tanh"}, "act must be"),
        ({"lr": [0.1, 0.2, 0.3]}, "lr has 3 entries"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"init_scale": 0.0}, "init_scale must be positive"),
        ({"probe_layer": 5}, "probe_layer"),
        ({"steps": 0}, "steps must be"),
        ({"seeds": []}, "seeds"),
    ],
)
def test_train_ensemble_rejects_bad_arguments(digits, kwargs, match):
    args = {"seeds": [0, 1], "use_bn": 1, "lr": 0.1, "steps": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        cs.train_ensemble(digits, **args, progress=False)


def test_members_do_not_interact(digits):
    alone = cs.train_ensemble(digits, seeds=[3], use_bn=0, lr=0.1, steps=20, progress=False)
    pair = cs.train_ensemble(digits, seeds=[3, 4], use_bn=[0, 0], lr=[0.1, 1e4], steps=20, progress=False)
    np.testing.assert_allclose(pair.train_loss[0], alone.train_loss[0], rtol=1e-5)  # the diverging one is ignored


def test_fig1_bn_learns_faster(digits):
    bn, plain = cs.fig1_experiment(digits, n_seeds=2, steps=100, lr=0.5, progress=False)
    assert bn.pct.shape == (2, 5, 3, 10)  # seeds, probes (step 0 and every 25), percentiles, units
    assert np.median(bn.test_acc[:, -1]) >= 0.85 > np.median(plain.test_acc[:, -1])
    assert np.median(cs.run_drift(plain)) > np.median(cs.run_drift(bn))


def test_lr_sweep_bn_survives_a_large_rate(digits):
    acc_bn, acc_plain, _ = cs.lr_sweep(digits, [10.0], n_seeds=2, steps=120, act="sigmoid", progress=False)
    assert acc_bn.shape == (1, 2, 13)  # rates, seeds, evaluations (step 0 and every 10)
    assert np.median(acc_bn[0, :, -1]) >= 0.6 and np.median(acc_plain[0, :, -1]) <= 0.2


def test_scale_output_decides_whether_the_output_layer_shares_the_initial_scale():
    gen = torch.Generator().manual_seed(0)
    sizes = [6, 8, 8, 3]
    base = cs._build(sizes, "relu", True, False, torch.ones(1), [5], gen)
    for scale_output in (True, False):
        net = cs._build(sizes, "relu", True, False, torch.full((1,), 10.0), [5], gen, scale_output)
        linears = [(m.weight, b.weight) for m, b in zip(net, base) if isinstance(m, ensemble.Linear)]
        torch.testing.assert_close(linears[0][0], 10 * linears[0][1])  # hidden layers: scaled
        torch.testing.assert_close(linears[-1][0], (10 if scale_output else 1) * linears[-1][1])


def test_largest_rate_per_seed_and_the_floor_for_a_seed_that_never_got_there():
    inf = np.inf
    steps = np.array([[10, inf, inf], [20, 30, inf], [inf, 40, inf]])  # (rates, seeds)
    assert cs.largest_rate([0.1, 1.0, 10.0], steps).tolist() == [1.0, 10.0, 0.1]
    with pytest.raises(ValueError, match="rates"):
        cs.largest_rate([0.1, 1.0], steps)
    assert cs.fastest_steps(steps, 300).tolist() == [10.0, 30.0, 300.0]  # never reached: the budget
    with pytest.raises(ValueError, match="rates, seeds"):
        cs.fastest_steps(np.ones(3), 300)


def test_lr_sweep_variants_trains_each_variant_from_the_same_seeds(digits):
    variants = {"bn": (True, 1.0), "plain": (False, 1.0), "plain_he": (False, 2**0.5)}
    acc, step = cs.lr_sweep_variants(digits, [0.1], variants, n_seeds=2, steps=20, eval_every=10, progress=False)
    assert list(acc) == list(variants) and all(a.shape == (1, 2, 3) for a in acc.values())
    alone = cs.train_ensemble(digits, seeds=cs.seeds_for(0, 2), use_bn=False, lr=0.1, init_scale=2**0.5,
                              scale_output=False, steps=20, hidden=(100, 100, 100), act="relu", eval_every=10)
    np.testing.assert_allclose(acc["plain_he"][0], alone.test_acc, atol=1e-6)


def test_init_sweep_bn_survives_a_tiny_scale(digits):
    acc_bn, acc_plain = cs.init_sweep(digits, [1e-3], n_seeds=2, steps=100, progress=False)
    assert np.median(acc_bn) >= 0.8 and np.median(acc_plain) <= 0.2


def test_smoothness_measures_are_santurkars_along_the_gradient():
    net = cs._build([6, 8, 3], "relu", False, False, torch.ones(1), [2], torch.Generator().manual_seed(0))
    x, y = torch.randn(1, 16, 6), torch.randint(0, 3, (1, 16))
    lr = torch.tensor([0.5])
    got = cs.smoothness(net, x, y, lr, (1.0, 3.0))
    alone = ensemble.member(net, 0)
    params = dict(alone.named_parameters())

    def loss_and_grads(p):
        loss = F.cross_entropy(torch.func.functional_call(alone, p, (x[0],)), y[0])
        return loss.detach().item(), torch.autograd.grad(loss, list(p.values()))

    loss0, g0 = loss_and_grads(params)
    g_norm = torch.sqrt(sum((g**2).sum() for g in g0))
    losses, changes = [loss0], []
    for mult in (1.0, 3.0):
        moved = {k: (t - 0.5 * mult * g).detach().requires_grad_() for (k, t), g in zip(params.items(), g0)}
        loss, g1 = loss_and_grads(moved)
        losses.append(loss)
        changes.append(float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g1, g0)))))
    assert got["loss_var"][0] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert got["grad_change"][0] == pytest.approx(max(changes), rel=1e-4)
    betas = [c / (0.5 * m * float(g_norm)) for c, m in zip(changes, (1.0, 3.0))]
    assert got["beta"][0] == pytest.approx(max(betas), rel=1e-4)


def test_noisy_experiment_records_ics_and_smoothness(digits):
    runs = cs.noisy_bn_experiment(digits, n_seeds=2, steps=40, hidden=(16, 16, 16), check_every=20, progress=False)
    assert set(runs) == set(cs.VARIANTS)
    assert sorted(runs["bn"].ics) == [1, 20, 40]
    assert runs["bn"].ics[1]["rel"].shape == (2, 3)  # seeds, layers 2..4 (the output layer included)
    assert all(runs["plain"].smooth[20][k].shape == (2,) for k in ("loss_var", "grad_change", "beta"))
    assert np.median(runs["bn"].train_loss.mean(1)) < np.median(runs["plain"].train_loss.mean(1))
    assert "rel_eq" not in runs["bn"].ics[1]  # no equal-length step asked for


def test_noisy_experiment_adds_a_he_initialized_network_and_equal_steps(digits):
    kw = dict(n_seeds=2, steps=20, hidden=(16, 16, 16), check_every=20, progress=False)
    runs = cs.noisy_bn_experiment(digits, variants=("plain", "plain_he"), ics_step_norm=0.1, **kw)
    assert list(runs) == ["plain", "plain_he"] and runs["plain"].ics[1]["rel_eq"].shape == (2, 3)
    # the same seeds: He's first layer is LeCun's times sqrt(2), so its members differ
    assert not np.allclose(runs["plain"].train_loss, runs["plain_he"].train_loss)
    alone = cs.noisy_bn_experiment(digits, variants=("plain",), **kw)["plain"]
    np.testing.assert_allclose(alone.train_loss, runs["plain"].train_loss, rtol=1e-5)
    with pytest.raises(ValueError, match="plain_he"):
        cs.noisy_bn_experiment(digits, variants=("he",), **kw)
    with pytest.raises(ValueError, match="ics_step_norm"):
        cs.noisy_bn_experiment(digits, variants=("plain",), ics_step_norm=0.0, **kw)


def test_self_checks_accept_the_reference_and_reject_a_wrong_answer(capsys):
    checks.check_drift_ratio(cs.drift_ratio)
    checks.check_noise(cs.time_varying_noise)
    assert capsys.readouterr().out.count("PASS") == 2
    with pytest.raises(AssertionError, match="drift ratio"):
        checks.check_drift_ratio(lambda p15, p50, p85: (p50.max(0) - p50.min(0)) / (p85 - p15).max(0))
    with pytest.raises(AssertionError, match="a = 0"):
        checks.check_noise(lambda a, mu_t, sigma_t, generator: cs.time_varying_noise(a, 0.0, sigma_t, generator))


def test_residual_member_is_the_pre_activation_network_written_out():
    x = torch.randn(2, 16, 6)
    init = torch.tensor([1.0, 2**0.5])
    for use_bn in (False, True):
        net = cs._build_residual([6, 8, 3], use_bn, init, [0, 1], blocks=2).train()
        got = net(x)
        for k in range(2):
            gen = torch.Generator().manual_seed(k)  # the member's seed draws its layers in order

            def w(a, b, scale, gen=gen):
                return torch.randn(a, b, generator=gen) * scale / math.sqrt(a)

            s = float(init[k])
            pre = (lambda z: F.relu(F.batch_norm(z, None, None, training=True))) if use_bn else F.relu
            z = x[k] @ w(6, 8, s)
            for _ in range(2):
                W1, W2 = w(8, 8, s), w(8, 8, s)
                z = z + pre(pre(z) @ W1) @ W2
            torch.testing.assert_close(got[k], pre(z) @ w(8, 3, 1.0), rtol=1e-4, atol=1e-5)


def test_residual_signal_grows_by_the_predicted_factor(digits):
    q = cs.residual_signal(digits, [1.0, 2**0.5], n_seeds=2, blocks=2, width=64)
    assert q.shape == (2, 2, 3) and (q > 0).all()
    growth = np.median(q[:, :, 1:] / q[:, :, :-1], axis=(1, 2))
    np.testing.assert_allclose(growth, [1.25, 2.0], rtol=0.2)  # 1 + s^4 / 4
    with pytest.raises(ValueError, match="init_scales"):
        cs.residual_signal(digits, [])


def test_residual_sweep_trains_and_refuses_what_it_cannot_measure(digits):
    acc, step = cs.lr_sweep_variants(digits, [0.1], {"bn": (True, 1.0), "plain": (False, 1.0)}, n_seeds=2,
                                     steps=30, hidden=(16,), residual=2, progress=False)
    assert acc["bn"].shape == (1, 2, len(step)) and acc["bn"][0, :, -1].min() > 0.5
    base = dict(seeds=[0], use_bn=True, lr=0.1, steps=2, act="relu", progress=False)
    for kwargs, match in [
        (dict(hidden=(16, 16), residual=1), "one width"),
        (dict(hidden=(16,), residual=1, act="sigmoid"), "relu"),
        (dict(hidden=(16,), residual=1, check_every=1), "check_every"),
        (dict(hidden=(16,), residual=1, use_noise=True), "no noise"),
        (dict(hidden=(16,), residual=-1), "non-negative"),
    ]:
        with pytest.raises(ValueError, match=match):
            cs.train_ensemble(digits, **{**base, **kwargs})


def test_block_growth_check_rejects_a_wrong_derivation(capsys):
    checks.check_block_growth(lambda s: 1 + s**4 / 4)
    assert "PASS block growth" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="growth of the mean square"):
        checks.check_block_growth(lambda s: 1 + s**2 / 2)  # one ReLU's halving forgotten


@pytest.mark.parametrize("device", DEVICES)
def test_experiments_run_on_the_given_device(device, device_spy, monkeypatch, digits):
    fit, trained_on = ensemble.fit, []

    def spy_fit(ens, *args, **kwargs):
        trained_on.append({p.device.type for p in ens.parameters()} | {device_of(ens).type})
        return fit(ens, *args, **kwargs)

    monkeypatch.setattr(ensemble, "fit", spy_fit)
    kw = dict(n_seeds=2, steps=4, progress=False)
    bn, plain = cs.fig1_experiment(digits, eval_every=2, device=device, **kw)
    noisy = cs.noisy_bn_experiment(digits, hidden=(8, 8), eval_every=2, check_every=2, ics_step_norm=0.1,
                                   variants=("noisy_bn", "plain"), device=device, **kw)
    acc, _ = cs.lr_sweep_variants(digits, [0.1], {"bn": (True, 1.0)}, hidden=(8,), residual=1, device=device,
                                  **kw)
    signal = cs.residual_signal(digits, [1.0], n_seeds=2, blocks=1, width=8, device=device)
    assert device_spy.moved(device)
    assert trained_on and all(kinds == {device.type} for kinds in trained_on)
    assert bn.test_acc.shape == (2, 3) and noisy["plain"].ics[2]["rel_eq"].shape == (2, 2)
    assert acc["bn"].shape[:2] == (1, 2) and signal.shape == (1, 2, 2)
    if device.type == "cpu":  # on the CPU under another name: bit for bit the default device's numbers
        default = cs.noisy_bn_experiment(digits, hidden=(8, 8), eval_every=2, check_every=2, ics_step_norm=0.1,
                                         variants=("noisy_bn", "plain"), **kw)
        for k in default:
            np.testing.assert_array_equal(default[k].train_loss, noisy[k].train_loss)
            np.testing.assert_array_equal(default[k].pct, noisy[k].pct)
            np.testing.assert_array_equal(default[k].ics[2]["rel"], noisy[k].ics[2]["rel"])
        np.testing.assert_array_equal(cs.fig1_experiment(digits, eval_every=2, **kw)[0].test_acc, bn.test_acc)
