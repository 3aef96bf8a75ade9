"""Chapter 5's experiments: the ensemble's normalizations against the modules, the measures, tiny runs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEVICES
from normlab import checks
from normlab import nn as normlab_nn
from normlab.experiments import small_batches as sb
from normlab.runtime import ensemble
from normlab.runtime.data import Split, load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_members_of_one_seed_share_weights_and_differ_in_norm_only():
    ens = sb.make_members([6, 16, 16, 3], ["bn", "brn", "gn", "ln"], seeds=[4, 9], groups=4)
    members = [ensemble.member(ens, k) for k in range(8)]  # kind-major: bn 4, bn 9, brn 4, ...
    kinds = [normlab_nn.BatchNorm1d, normlab_nn.BatchRenorm1d, nn.GroupNorm, nn.LayerNorm]
    for k, m in enumerate(members):
        assert type(m[1]) is kinds[k // 2] and type(m[4]) is kinds[k // 2]
        torch.testing.assert_close(m[0].weight, members[k % 2][0].weight, rtol=0, atol=0)
    assert not torch.equal(members[0][0].weight, members[1][0].weight)
    assert members[2][1].r_max == 1.0 and members[2][1].d_max == 0.0  # BN until the schedule relaxes it
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        sb.make_members([6, 16, 3], ["gn"], seeds=[0], groups=3)


def test_batch_mean_spread_follows_one_over_sqrt_b():
    x = torch.randn(5000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sizes = [2, 4, 8, 16, 32]
    mu, sd = sb.batch_stat_noise(x, sizes, n_batches=500, seed=0)
    slope, _ = sb.fit_slope(sizes, mu)
    assert abs(slope + 0.5) < 0.05
    assert mu[0] == pytest.approx(1 / math.sqrt(2), rel=0.1)
    assert (np.diff(sd) < 0).all()
    with pytest.raises(ValueError, match="batch_sizes"):
        sb.batch_stat_noise(x, [1, 4])
    with pytest.raises(ValueError, match="x must be"):
        sb.batch_stat_noise(torch.zeros(10), [2])


def test_fit_slope_recovers_a_power_law():
    b = np.array([2, 4, 8, 16])
    slope, intercept = sb.fit_slope(b, 3 * b**-0.5)
    assert slope == pytest.approx(-0.5) and intercept == pytest.approx(math.log(3))


def test_grad_accumulation_is_exact_without_bn_and_in_eval_mode_only():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))

    def mlp(norm):
        return nn.Sequential(nn.Linear(6, 8), norm, nn.ReLU(), nn.Linear(8, 3)).double()

    for norm in (nn.Identity(), nn.LayerNorm(8)):
        assert sb.grad_accumulation(mlp(norm), x, y, 4) < 1e-12
    bn_model = mlp(normlab_nn.BatchNorm1d(8))
    assert sb.grad_accumulation(bn_model, x, y, 1) < 1e-12
    assert sb.grad_accumulation(bn_model, x, y, 4) > 1e-3
    before = bn_model[1].running_mean.clone()
    bn_model.eval()
    assert sb.grad_accumulation(bn_model, x, y, 4) < 1e-12
    assert torch.equal(bn_model[1].running_mean, before)  # the call changed no buffer
    with pytest.raises(ValueError, match="micro-batches"):
        sb.grad_accumulation(bn_model, x, y, 5)


def test_self_checks_accept_the_reference(capsys):
    checks.check_grad_accumulation(sb.grad_accumulation)

    def reference_renorm(x, gamma, beta, rm, rv, r_max, d_max, eps):
        layer = (normlab_nn.BatchRenorm1d if x.dim() == 2 else normlab_nn.BatchRenorm2d)(
            x.shape[1], eps=eps, r_max=r_max, d_max=d_max, dtype=x.dtype)
        with torch.no_grad():
            layer.weight.copy_(gamma), layer.bias.copy_(beta)
            layer.running_mean.copy_(rm), layer.running_var.copy_(rv)
        return layer(x)

    checks.check_batch_renorm(reference_renorm)
    assert capsys.readouterr().out.count("PASS") == 2


def test_self_check_rejects_plain_batch_norm():
    def plain_bn(x, gamma, beta, rm, rv, r_max, d_max, eps):
        return torch.nn.functional.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)

    with pytest.raises(AssertionError, match="batch renorm"):
        checks.check_batch_renorm(plain_bn)


def test_train_norms_tiny_run_records_everything(digits):
    run = sb.train_norms(digits, seeds=[0, 1], batch_size=16, epochs=1, lr=0.05, progress=False)
    assert run.acc_eval.shape == run.acc_batch.shape == (4, 2)
    assert (run.acc_eval > 0.5).all()  # one epoch on the digits already learns
    assert run.renorm["r_clipped"].shape == (2, run.steps)
    assert run.renorm["r_max"][0, 0] == 1.0 and run.renorm["r_max"][0, -1] == 3.0
    assert run.kinds == list(sb.NORMS)


def test_grouped_training_reports_grouped_test_accuracy(digits):
    run = sb.train_norms(digits, seeds=[0], batch_size=16, epochs=1, lr=0.05, kinds=("bn", "gn"), sampler=1,
                         progress=False)
    assert run.acc_batch_grouped.shape == (2, 1)


def test_train_norms_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="kinds"):
        sb.train_norms(digits, seeds=[0], batch_size=8, epochs=1, lr=0.1, kinds=("bn", "xx"))
    with pytest.raises(ValueError, match="sampler"):
        sb.train_norms(digits, seeds=[0], batch_size=8, epochs=1, lr=0.1, sampler="grouped")
    with pytest.raises(ValueError, match="batch_size"):
        sb.train_norms(digits, seeds=[0], batch_size=1, epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        sb.train_norms(digits, seeds=[0], batch_size=8, epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="seed"):
        sb.seeds_for(-1, 3)


def test_renorm_trace_follows_the_schedule(digits):
    tr = sb.renorm_trace(digits, batch_size=4, steps=40, warmup=0.25, relax=0.5, progress=False)
    assert tr["r_max"][0] == 1.0 and tr["d_max"][0] == 0.0 and tr["r_max"][-1] == 3.0
    assert (tr["r_clipped"][:10] > 0.9).all()  # during warm-up (r_max = 1) nearly every r is clipped
    assert 0 < tr["test_acc"] <= 1


def test_batch_stats_sweep_leaves_the_model_alone(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), normlab_nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    before = model[1].running_mean.clone()
    acc = sb.batch_stats_sweep(model, digits, [2, 8])
    assert acc.shape == (2,) and torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_group_members_share_weights_per_seed_and_keep_their_group_size(arch):
    ens, members = sb.group_members(arch, seeds=[4, 9], group_sizes=(8, 2))
    assert members == [("bn", 2), ("bn", 8), ("brn", 2), ("brn", 8), ("gn", None), ("ln", None)]
    models = [ensemble.member(ens, k) for k in range(ens.members)]  # kind-major: (bn, 2) seed 4, seed 9, ...
    first = 1 if arch == "cnn" else 0  # the first layer with weights
    for k, m in enumerate(models):
        torch.testing.assert_close(m[first].weight, models[k % 2][first].weight, rtol=0, atol=0)
    assert not torch.equal(models[0][first].weight, models[1][first].weight)
    norm = first + 1
    assert [getattr(models[2 * i][norm], "virtual_batch_size", None) for i in range(6)] == [2, 8, 2, 8, None, None]
    assert isinstance(models[4][norm], normlab_nn.BatchRenorm2d if arch == "cnn" else normlab_nn.BatchRenorm1d)
    assert models[4][norm].r_max == 1.0  # BN until the schedule relaxes it
    ln = models[-1][norm]
    assert (ln.num_groups == 1) if arch == "cnn" else isinstance(ln, nn.LayerNorm)


def test_bn_with_groups_of_the_whole_batch_is_plain_bn(digits):
    """The member with B = the optimizer batch trains exactly as a plain BN model alone."""
    run = sb.group_size_sweep(digits, "mlp", seeds=[3], steps=20, lr=0.05, batch_size=16, group_sizes=(4, 16),
                              hidden=(32,), progress=False)
    assert run.err_eval[("bn", 16)].shape == (1,)
    model = sb._mlp(3, normlab_nn.BatchNorm1d, (64, 32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    draw = ensemble.member_batches([3 + 7919], len(digits.x_train), 16)
    for _ in range(20):
        idx = next(draw)[0]
        loss = nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    err = 100 * (1 - (model(digits.x_test).argmax(1) == digits.y_test).double().mean().item())
    assert run.err_eval[("bn", 16)][0] == pytest.approx(err, abs=1e-9)
    assert run.err("gn", 4).shape == (1,) and run.err("gn") is run.err_eval[("gn", None)]
    for table in (run.err_eval, run.err_batch, run.train_err_batch):
        assert all(0 <= v[0] <= 100 for v in table.values())


def test_group_size_sweep_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="divide the batch"):
        sb.group_size_sweep(digits, "mlp", seeds=[0], steps=2, lr=0.1, batch_size=32, group_sizes=(3,))
    with pytest.raises(ValueError, match="arch"):
        sb.group_size_sweep(digits, "rnn", seeds=[0], steps=2, lr=0.1)
    with pytest.raises(ValueError, match="group_sizes"):
        sb.group_members("mlp", [0], group_sizes=(1, 4))
    with pytest.raises(KeyError, match="no members"):
        sb.group_size_sweep(digits, "mlp", seeds=[0], steps=2, lr=0.1, group_sizes=(4,), hidden=(8,)).err("bn", 2)


@pytest.mark.parametrize("device", DEVICES)
def test_experiments_run_on_the_given_device(device, device_spy, digits):
    small = Split(digits.x_train[:128], digits.y_train[:128], digits.x_test[:64], digits.y_test[:64], "small")
    run = sb.train_norms(small, seeds=[0, 1], batch_size=16, epochs=1, lr=0.05, sampler=2, progress=False,
                         device=device)
    assert run.acc_eval.shape == (4, 2) and run.acc_batch_grouped.shape == (4, 2)
    assert run.renorm["r_clipped"].shape == (2, run.steps)
    group = sb.group_size_sweep(small, "cnn", seeds=[0, 1], steps=3, lr=0.05, batch_size=16, group_sizes=(4, 16),
                                eval_train=32, progress=False, device=device)
    assert group.err_eval[("bn", 4)].shape == (2,)
    trace = sb.renorm_trace(small, batch_size=4, steps=5, hidden=16, progress=False, device=device)
    assert trace["loss"].shape == (5,) and 0 <= trace["test_acc"] <= 1
    assert device_spy.moved(device)
    assert {d.type for d in device_spy.modules} == {device.type}


def test_the_cnn_takes_cifar10_sized_images_stored_flat():
    """At full scale Chapter 5's CNN reads CIFAR-10 (3, 32, 32) images stored as (N, 3072)."""
    net = sb.make_cnn(torch.nn.BatchNorm2d, (4, 8), image=(3, 32, 32))
    assert net(torch.randn(5, 3072)).shape == (5, 10)
    assert net[1].in_channels == 3 and net[-1].in_features == 8 * 16 * 16
    ens, members = sb.group_members("cnn", [0], group_sizes=(2,), channels=(4, 8), image=(3, 32, 32))
    assert ens(torch.randn(len(members), 4, 3072)).shape == (len(members), 4, 10)
