"""normlab.experiments.pytorch: the CNN, the experiments' shapes and behaviours, their argument checks."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEVICES
from normlab import nn as normlab_nn
from normlab.experiments import pytorch as ex
from normlab.runtime.data import Split
from normlab.runtime.train import accuracy, train


def tiny_split(n_train=48, n_test=20, seed=0):
    """A random stand-in for the digits: 64 features, 10 classes."""
    gen = torch.Generator().manual_seed(seed)
    return Split(
        torch.randn(n_train, 64, generator=gen),
        torch.arange(n_train) % 10,
        torch.randn(n_test, 64, generator=gen),
        torch.arange(n_test) % 10,
        name="tiny",
    )


def layer_types(model):
    return [type(m) for m in model]


def test_make_cnn_maps_rows_of_64_pixels_to_10_logits():
    model = ex.make_cnn("before", channels=(4, 6))
    assert model(torch.randn(5, 64)).shape == (5, 10)


def test_placement_changes_the_order_of_bn_and_relu():
    before = layer_types(ex.make_cnn("before", channels=(4,)))
    after = layer_types(ex.make_cnn("after", channels=(4,)))
    assert before[1:4] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert after[1:4] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]


def test_both_placements_start_from_the_same_weights_for_the_same_seed():
    models = []
    for placement in ex.PLACEMENTS:
        torch.manual_seed(3)
        models.append(ex.make_cnn(placement, channels=(4, 6)))
    a, b = ([p for p in m.parameters()] for m in models)
    assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def test_bias_switch_and_norm_class_are_honoured():
    model = ex.make_cnn("after", bias=True, channels=(4,), norm=normlab_nn.BatchNorm2d)
    conv = next(m for m in model if isinstance(m, nn.Conv2d))
    assert conv.bias is not None
    assert sum(isinstance(m, normlab_nn.BatchNorm2d) for m in model) == 1
    assert ex.make_cnn(channels=(4,))[1].bias is None  # no bias by default


@pytest.mark.parametrize(
    "kwargs",
    [{"placement": "middle"}, {"channels": ()}, {"channels": (4, 0)}, {"bias": 1}, {"num_classes": 0},
     {"head": "relu"}, {"placement": "after", "head": "plain", "channels": (4,)}],
)
def test_make_cnn_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ex.make_cnn(**kwargs)


def test_heads_equalize_what_the_pool_sees():
    bn, relu, pool = nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d
    ends = {(p, h): layer_types(ex.make_cnn(p, channels=(4, 6), head=h))[-5:-2]
            for p in ex.PLACEMENTS for h in ex.HEADS}
    assert ends["before", "plain"] == [bn, relu, pool] and ends["after", "plain"] == [nn.Conv2d, relu, pool]
    assert ends["before", "bn"] == ends["after", "bn"] == [relu, bn, pool]
    counts = {k: sum(isinstance(m, bn) for m in ex.make_cnn(k[0], channels=(4, 6), head=k[1]))
              for k in [("before", "plain"), ("before", "bn"), ("after", "plain"), ("after", "bn")]}
    assert counts == {("before", "plain"): 2, ("before", "bn"): 3, ("after", "plain"): 1, ("after", "bn"): 2}
    for p in ex.PLACEMENTS:  # no head named: the placement's natural ending, the nets of earlier editions
        assert layer_types(ex.make_cnn(p, channels=(4,))) == layer_types(
            ex.make_cnn(p, channels=(4,), head=ex.NATURAL_HEAD[p]))


def test_every_placement_and_head_starts_from_the_same_weights_for_the_same_seed():
    weights = []
    for p in ex.PLACEMENTS:
        for h in ex.HEADS:
            torch.manual_seed(3)
            model = ex.make_cnn(p, channels=(4, 6), head=h)
            weights.append([m.weight for m in model if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert all(len(w) == 3 and all(torch.equal(a, b) for a, b in zip(w, weights[0])) for w in weights)


def test_validation_split_holds_out_part_of_the_training_set_only():
    data = tiny_split()
    split = ex.validation_split(data, 10, seed=4)
    assert (len(split.x_train), len(split.x_test)) == (38, 10)
    rows = torch.cat([split.x_train, split.x_test])
    assert torch.equal(rows[rows[:, 0].argsort()], data.x_train[data.x_train[:, 0].argsort()])  # a partition
    assert torch.equal(ex.validation_split(data, 10, seed=4).x_test, split.x_test)  # the seed decides
    assert not torch.equal(ex.validation_split(data, 10, seed=5).x_test, split.x_test)
    for bad in (0, 47):
        with pytest.raises(ValueError, match="val_size"):
            ex.validation_split(data, bad, seed=0)


def run_small(data=None, nets=None, **kwargs):
    args = dict(steps=2, lrs=(0.01, 0.05), tune_seeds=[7], val_size=10, batch_size=8, channels=(4, 4),
                progress=False) | kwargs
    return ex.placement_experiment(data or tiny_split(), [0, 1], nets=nets, **args)


def test_placement_experiment_returns_one_accuracy_and_model_per_seed_and_net():
    result = run_small()
    assert result.nets == [("before", "plain"), ("before", "bn"), ("after", "plain"), ("after", "bn")]
    for net in result.nets:
        for acc in (result.acc[net], result.acc_precise[net]):
            assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
        assert len(result.models[net]) == 2 and not result.models[net][0].training
        assert result.lr[net] in (0.01, 0.05) and len(result.val_acc[net]) == 2
    for head in ex.HEADS:
        cmp = result.paired(head, precise=True)
        assert cmp.n == 2 and cmp.mean == pytest.approx(
            100 * (result.mean("before", head, True) - result.mean("after", head, True)))


def test_placement_result_summaries_and_the_choice_of_statistics():
    r = ex.PlacementResult(
        seeds=[0, 1, 2], lrs=[0.1],
        acc={("before", "bn"): [0.9, 0.8, 0.85], ("after", "bn"): [0.95, 0.9, 0.8]},
        acc_precise={("before", "bn"): [0.9, 0.9, 0.9], ("after", "bn"): [0.8, 0.8, 0.8]},
    )
    assert r.mean("before", "bn") == pytest.approx(0.85)
    assert r.std("before", "bn") == pytest.approx(0.05)  # sample standard deviation
    assert r.paired("bn").n_positive == 1 and r.paired("bn").diffs == pytest.approx([-5.0, -10.0, 5.0])
    assert r.paired("bn", precise=True).n_positive == 3 and r.paired("bn", precise=True).above(5.0)  # +10 each
    with pytest.raises(ValueError, match="placement"):
        r.mean("middle", "bn")
    with pytest.raises(ValueError, match="head"):
        r.mean("before", "relu")
    with pytest.raises(ValueError, match="no network"):
        r.paired("plain")


def test_recompute_bn_statistics_averages_the_batches_and_leaves_the_model_alone():
    model = ex.make_cnn(channels=(4,)).train()
    x = torch.randn(30, 64) * 3 + 1
    before = copy.deepcopy(model.state_dict())
    precise = ex.recompute_bn_statistics(model, x, batch_size=10)
    bn = precise[2]
    conv_out = model[1](model[0](x))  # (30, 4, 8, 8): what the BN sees
    batch_means = torch.stack([conv_out[i : i + 10].mean(dim=(0, 2, 3)) for i in (0, 10, 20)])
    assert torch.allclose(bn.running_mean, batch_means.mean(0), atol=1e-5)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1 and not precise.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched


@pytest.mark.parametrize("kwargs", [{"batch_size": 1}, {"x": torch.randn(1, 64)}, {"model": nn.Linear(64, 10)}])
def test_recompute_bn_statistics_rejects_bad_arguments(kwargs):
    args = {"model": ex.make_cnn(channels=(4,)), "x": torch.randn(8, 64)} | kwargs
    with pytest.raises(ValueError):
        ex.recompute_bn_statistics(**args)


def test_placement_experiment_tunes_on_held_out_examples_and_trains_each_seed_as_train_does():
    data = tiny_split()
    nets = [("before", "bn"), ("after", "plain")]
    result = run_small(data, nets, steps=6)
    tune = ex.validation_split(data, 10, seed=7)
    for net in nets:
        val = []
        for lr in (0.01, 0.05):  # the tuning, one run per rate
            torch.manual_seed(7)
            model = ex.make_cnn(net[0], channels=(4, 4), head=net[1])
            train(model, tune, steps=6, lr=lr, batch_size=8, seed=7, progress=False)
            val.append(accuracy(ex.recompute_bn_statistics(model, tune.x_train, batch_size=8), tune.x_test,
                                tune.y_test))
        assert result.val_acc[net] == pytest.approx(val)
        assert result.lr[net] == (0.05 if val[1] > val[0] else 0.01)  # ties: the smaller rate
        for j, seed in enumerate([0, 1]):
            torch.manual_seed(seed)
            model = ex.make_cnn(net[0], channels=(4, 4), head=net[1])
            history = train(model, data, steps=6, lr=result.lr[net], batch_size=8, seed=seed, progress=False)
            assert result.acc[net][j] == pytest.approx(history.final_test_acc, abs=1e-9)
            precise = ex.recompute_bn_statistics(model, data.x_train, batch_size=8)
            assert result.acc_precise[net][j] == pytest.approx(accuracy(precise, data.x_test, data.y_test))
            for a, b in zip(result.models[net][j].state_dict().values(), model.state_dict().values()):
                torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"seeds": [0]}, "at least 2 seeds"), ({"seeds": [1, 1]}, "distinct"), ({"tune_seeds": []}, "tune_seeds"),
     ({"lrs": ()}, "lrs"), ({"lrs": (0.1, -0.1)}, "lrs"), ({"nets": [("before", "relu")]}, "net"),
     ({"data": (torch.zeros(4, 64), torch.zeros(4))}, "Split")],
)
def test_placement_experiment_rejects_bad_arguments(kwargs, match):
    args = dict(data=tiny_split(), seeds=[0, 1], steps=1, lrs=(0.01,), tune_seeds=[0], val_size=10) | kwargs
    with pytest.raises(ValueError, match=match):
        ex.placement_experiment(args.pop("data"), args.pop("seeds"), **args)


def test_eval_pitfall_shapes_and_it_leaves_the_running_statistics_alone():
    data = tiny_split()
    models = [ex.make_cnn(channels=(4,)).eval() for _ in range(2)]
    with torch.no_grad():  # give the buffers values to protect
        for m in models:
            m[2].running_mean.fill_(0.5)
    eval_acc, train_acc = ex.eval_pitfall(models, data.x_test, data.y_test, [1, 4])
    assert eval_acc.shape == (2,) and train_acc.shape == (2, 2)
    assert all(torch.all(m[2].running_mean == 0.5) for m in models)


@pytest.mark.parametrize("models, sizes", [([], [1]), (["m"], []), (["m"], [0])])
def test_eval_pitfall_rejects_bad_arguments(models, sizes):
    models = [ex.make_cnn(channels=(4,)) for _ in models]
    with pytest.raises(ValueError):
        ex.eval_pitfall(models, torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), sizes)


def test_momentum_none_vs_ema_returns_errors_per_batch_and_the_cumulative_average_wins_when_stationary():
    run = ex.momentum_none_vs_ema(300, batch_size=8, num_features=16, seed=1)
    assert list(run["k"][:3]) == [1, 2, 3] and len(run["k"]) == 300
    for name in ("cumulative", "ema"):
        assert run[name]["mean_err"].shape == (300,) and run[name]["var_err"].shape == (300,)
    assert run["cumulative"]["mean_err"][-1] < run["ema"]["mean_err"][-1]


def test_momentum_none_vs_ema_the_ema_wins_when_the_mean_drifts():
    run = ex.momentum_none_vs_ema(300, batch_size=8, num_features=16, drift=3.0, seed=1)
    assert run["ema"]["mean_err"][-1] < run["cumulative"]["mean_err"][-1]


@pytest.mark.parametrize(
    "kwargs",
    [{"num_batches": 0}, {"batch_size": 1}, {"num_features": 0}, {"momentum": 0.0}, {"momentum": 1.5},
     {"momentum": None}, {"drift": float("nan")}],
)
def test_momentum_none_vs_ema_rejects_bad_arguments(kwargs):
    args = {"num_batches": 5} | kwargs
    with pytest.raises(ValueError):
        ex.momentum_none_vs_ema(args.pop("num_batches"), **args)


def test_fold_speedup_times_both_models_each_round():
    model = ex.make_cnn(channels=(4,)).eval()
    out = ex.fold_speedup(model, torch.randn(2, 64), rounds=2, min_run_time=0.001)
    for key in ("unfolded", "folded", "ratio"):
        assert out[key].shape == (2,) and np.all(out[key] > 0)
    assert np.allclose(out["ratio"], out["unfolded"] / out["folded"])
    assert out["best_ratio"] == pytest.approx(out["unfolded"].min() / out["folded"].min())


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"min_run_time": 0.0}, {"num_threads": 0}])
def test_fold_speedup_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ex.fold_speedup(ex.make_cnn(channels=(4,)), torch.randn(2, 64), **kwargs)


def test_fold_speedup_rejects_a_model_that_is_not_a_module():
    with pytest.raises(ValueError, match="nn.Module"):
        ex.fold_speedup(lambda x: x, torch.randn(2, 64))


@pytest.mark.parametrize("device", DEVICES)
def test_experiments_run_on_the_given_device(device, device_spy):
    result = run_small(nets=[("before", "plain"), ("after", "bn")], device=device)
    for net in result.nets:
        assert len(result.acc_precise[net]) == 2
        assert all(p.device.type == device.type for m in result.models[net] for p in m.parameters())
    assert device_spy.moved(device)
    assert {d.type for d in device_spy.modules} == {device.type}
