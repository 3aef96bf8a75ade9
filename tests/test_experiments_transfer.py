"""Chapter 7's experiments: small, fast versions of each, checking shapes, protocol and invariants."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEVICES
from normlab import adapt
from normlab.experiments import transfer as tr
from normlab.runtime.data import Split
from normlab.runtime.train import accuracy, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def toy(n_train=200, n_test=100, length=40, seed=0):
    """Ten classes of noisy 1-D bumps at class-dependent positions: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)

    def part(n):
        y = torch.arange(n) % 10
        pos = torch.arange(length).view(1, -1)
        x = torch.exp(-((pos - 3 - 3.5 * y.view(-1, 1)) ** 2) / 4) + 0.3 * torch.randn(n, length, generator=gen)
        return x, y

    return Split(*part(n_train), *part(n_test), name="toy")


def test_budget_and_seeds():
    assert tr.budget("quick")["seeds"] >= 3
    assert tr.budget("full")["source_steps"] > tr.budget("quick")["source_steps"]
    with pytest.raises(ValueError, match="scale"):
        tr.budget("huge")
    assert tr.seeds_for(2, 3) == [200, 201, 202]
    with pytest.raises(ValueError):
        tr.seeds_for(-1, 3)


def test_make_cnn_has_a_bias_free_first_conv_followed_by_bn_and_a_linear_head():
    model = tr.make_cnn(width=8)
    assert model(torch.randn(5, 40)).shape == (5, 10)
    assert model[1].bias is None and isinstance(model[2], nn.BatchNorm1d)
    assert isinstance(model[-1], nn.Linear)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in tr.make_cnn(width=8, norm=False).modules())
    with pytest.raises(ValueError, match="length"):
        tr.make_cnn(length=8)


def test_labelled_split_is_class_balanced_and_disjoint_from_validation():
    data = toy()
    part, (xv, yv) = tr.labelled_split(data, 20, 50, seed=1)
    assert torch.bincount(part.y_train, minlength=10).tolist() == [2] * 10
    assert len(yv) == 50
    rows = {tuple(r.tolist()) for r in part.x_train}
    assert not rows & {tuple(r.tolist()) for r in xv}
    with pytest.raises(ValueError):
        tr.labelled_split(data, 5, 10)  # fewer than one example per class


def test_finetune_chooses_the_rate_on_the_labelled_examples_alone():
    data = toy()
    part, _ = tr.labelled_split(data, 50, 1, seed=2)
    # the last fifth of the round-robin order holds one example per class: the held-out set
    assert sorted(part.y_train[-10:].tolist()) == list(range(10))
    model = tr.train_source(data, 0, steps=20, width=8)
    acc, lr = tr.finetune(model, part, "head", lrs=(0.001, 0.1), steps=5, seed=2)
    assert lr in (0.001, 0.1) and 0 <= acc <= 1
    # the rate is the one whose copy, trained on the first 40, has the lowest loss on the last 10
    losses = []
    for r in (0.001, 0.1):
        m = tr.set_mode(copy.deepcopy(model), "head")
        fit = Split(part.x_train[:40], part.y_train[:40], part.x_test, part.y_test)
        train(m, fit, steps=5, lr=r, batch_size=10, seed=2, progress=False)
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(m.eval()(part.x_train[40:]), part.y_train[40:])))
    assert lr == (0.001, 0.1)[int(np.argmin(losses))]
    with pytest.raises(ValueError, match="n_select"):
        tr.finetune(model, part, "head", n_select=50)


def test_set_mode_trains_exactly_what_the_mode_says():
    def trainable(mode):
        model = tr.set_mode(tr.make_cnn(width=4), mode)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    every = {n for n, _ in tr.make_cnn(width=4).named_parameters()}
    bn = {n for n in every if n.split(".")[0] in ("2", "5", "8")}
    assert trainable("all_bn_train") == every
    assert trainable("all_bn_frozen") == every - bn
    assert trainable("head") == {"11.weight", "11.bias"}
    assert trainable("bn_only") == bn
    with pytest.raises(ValueError, match="mode"):
        tr.set_mode(tr.make_cnn(width=4), "everything")


def test_adaptation_and_finetuning_results_on_a_toy_problem():
    data = toy()
    seeds = [0, 1]
    models = [tr.train_source(data, s, steps=40, width=8) for s in seeds]
    targets = {"clean": data, "shifted": Split(2 * data.x_train + 1, data.y_train, 2 * data.x_test + 1, data.y_test)}
    res = tr.adaptation_results(models, targets, batch_sizes=(2, 50), priors=(0, math.inf), progress=False)
    assert set(res) == {"source", "adabn", "tent", ("prior", 0, 2), ("prior", 0, 50), ("prior", math.inf, 2),
                        ("prior", math.inf, 50)}
    for b in (2, 50):  # an infinite prior is the source model
        np.testing.assert_array_equal(res[("prior", math.inf, b)]["shifted"], res["source"]["shifted"])
    # ... which tr copies: check it against an actual evaluation of the prior-adapted model
    model = adapt.prior_adapt(copy.deepcopy(models[0]), adapt.bn_statistics(models[0]), math.inf)
    assert accuracy(model, targets["shifted"].x_test, targets["shifted"].y_test, batch_size=2) == \
        res["source"]["shifted"][0]
    # AdaBN on 2x + 1 equals AdaBN on x (the bias-free first layer), up to epsilon and rounding.
    np.testing.assert_allclose(res["adabn"]["shifted"], res["adabn"]["clean"], atol=0.011)
    ft = tr.finetune_results(models, {"shifted": targets["shifted"]}, seeds, labelled=(20,), lrs=(0.01,), steps=5,
                             progress=False)
    assert set(ft["acc"]) == {(20, m) for m in tr.MODES}
    assert all(ft["lr"][k]["shifted"].tolist() == [0.01, 0.01] for k in ft["lr"])
    np.testing.assert_array_equal(ft["source"]["shifted"], res["source"]["shifted"])
    assert models[0].training is False  # the source models are left as they were


def test_seeds_trained_together_give_what_each_seed_gives_alone():
    """train_sources, adaptation_results and finetune_results run the seeds as one ensemble: check each
    number against the same protocol run on one model at a time (within one test example: rounding)."""
    data, seeds, one = toy(), [0, 1], 1.5 / 100
    together = tr.train_sources(data, seeds, steps=30, width=8)
    alone = [tr.train_source(data, s, steps=30, width=8) for s in seeds]
    for a, b in zip(together, alone):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x.float(), y.float(), atol=1e-4, rtol=1e-4, msg=key)
    shifted = Split(2 * data.x_train + 1, data.y_train, 2 * data.x_test + 1, data.y_test)
    res = tr.adaptation_results(alone, {"shifted": shifted}, batch_sizes=(2,), priors=(8,), tent_batch=25,
                                progress=False)
    x, y = shifted.x_test, shifted.y_test
    for j, model in enumerate(alone):
        m = adapt.prior_adapt(copy.deepcopy(model), adapt.bn_statistics(model), 8)
        assert res[("prior", 8, 2)]["shifted"][j] == pytest.approx(accuracy(m, x, y, batch_size=2), abs=one)
        m = adapt.adabn(copy.deepcopy(model), shifted.x_train.split(500))
        assert res["adabn"]["shifted"][j] == pytest.approx(accuracy(m, x, y), abs=one)
        m = adapt.tent(copy.deepcopy(model), x.split(25), lr=1e-3)
        assert res["tent"]["shifted"][j] == pytest.approx(accuracy(m, x, y, batch_size=25, train_mode=True), abs=one)
    lrs = (0.003, 0.03)
    ft = tr.finetune_results(alone, {"shifted": shifted}, seeds, labelled=(20,), lrs=lrs, steps=8, batch_size=10,
                             progress=False)
    for mode in tr.MODES:
        for j, model in enumerate(alone):
            part, _ = tr.labelled_split(shifted, 20, 1, seed=seeds[j])
            a, lr = tr.finetune(model, part, mode, lrs=lrs, steps=8, batch_size=10, seed=seeds[j])
            assert ft["acc"][(20, mode)]["shifted"][j] == pytest.approx(a, abs=one), mode
            assert ft["lr"][(20, mode)]["shifted"][j] == lr, mode


def test_adabn_vs_size_uses_the_first_n_target_inputs():
    data, seeds = toy(), [0, 1]
    models = [tr.train_source(data, s, steps=20, width=8) for s in seeds]
    shifted = Split(2 * data.x_train + 1, data.y_train, 2 * data.x_test + 1, data.y_test)
    res = tr.adabn_vs_size(models, {"shifted": shifted}, (10, 200), chunk=64)
    assert res["shifted"].shape == (2, 2)
    for i, n in enumerate((10, 200)):
        for j, model in enumerate(models):
            m = adapt.adabn(copy.deepcopy(model), shifted.x_train[:n].split(64))
            assert res["shifted"][i, j] == pytest.approx(accuracy(m, shifted.x_test, shifted.y_test), abs=1.5 / 100)
    assert models[0].training is False
    with pytest.raises(ValueError, match="sizes"):
        tr.adabn_vs_size(models, {"shifted": shifted}, (1, 10))


def test_tent_online_predicts_each_batch_before_adapting_to_it():
    data, seeds = toy(), [0, 1]
    models = [tr.train_source(data, s, steps=20, width=8) for s in seeds]
    shifted = Split(2 * data.x_train + 1, data.y_train, 2 * data.x_test + 1, data.y_test)
    res = tr.tent_online(models, {"shifted": shifted}, batch_size=33, passes=2, lr=0.01, order_seed=5)
    r = res["shifted"]
    assert r["tent"].shape == r["norm"].shape == (2, 2)
    # by hand, one model at a time: the same stream (100 = 33 + 33 + 34: the last one folded in)
    gen = torch.Generator().manual_seed(5)
    orders = [torch.randperm(100, generator=gen) for _ in range(2)]
    batches = [(p, order[a:b]) for p, order in enumerate(orders) for a, b in ((0, 33), (33, 66), (66, 100))]
    for j, model in enumerate(models):
        hits, norm, labels = np.zeros(2), np.zeros(2), []

        def stream(labels=labels):
            for p, idx in batches:
                labels.append((p, shifted.y_test[idx]))
                yield shifted.x_test[idx]

        def count(logits, labels=labels, hits=hits):
            p, y = labels[-1]
            hits[p] += int((logits.argmax(-1) == y).sum())

        adapt.tent(copy.deepcopy(model), stream(), lr=0.01, on_batch=count)
        for p, idx in batches:
            norm[p] += accuracy(model, shifted.x_test[idx], shifted.y_test[idx], train_mode=True) * len(idx)
        np.testing.assert_allclose(r["tent"][:, j], hits / 100, atol=1.5 / 100)  # rounding: one example
        np.testing.assert_allclose(r["norm"][:, j], norm / 100, atol=1.5 / 100)
    assert models[0].training is False
    with pytest.raises(ValueError, match="batch_size"):
        tr.tent_online(models, {"shifted": shifted}, batch_size=1)


def test_bn_only_vs_width_counts_parameters_and_trains_only_bn():
    res = tr.bn_only_vs_width(toy(), (4, 8), [0, 1], steps=5, full_width=8, progress=False)
    assert res["bn_only"].shape == (2, 2) and res["full"].shape == (2,)
    assert res["params"] == [4 * 4, 4 * 8]  # two BN layers, gamma and beta each
    assert ((0 <= res["gamma_small"]) & (res["gamma_small"] <= 1)).all()
    from normlab.experiments.regularization import make_mlp
    from normlab.runtime.train import train

    for j, seed in enumerate([0, 1]):  # the ensemble's numbers are those of each seed trained alone
        model = make_mlp(40, 10, width=8, seed=seed)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in adapt.bn_only_parameters(model):
            p.requires_grad_(True)
        train(model, toy(), steps=5, lr=0.5, batch_size=64, seed=seed, progress=False)
        assert res["bn_only"][1, j] == pytest.approx(accuracy(model, toy().x_test, toy().y_test), abs=0.015)
        gammas = torch.cat([p.detach() for p in adapt.bn_only_parameters(model)[0::2]])
        assert res["gamma_small"][1, j] == pytest.approx((gammas.abs() < 0.1).double().mean().item())


def test_summarize_formats_mean_and_sd_in_percent():
    assert tr.summarize([0.9, 0.92, 0.94]) == "92.0 ± 2.0"


def test_make_cnn_takes_each_normalization_and_instance_norm_ignores_a_per_example_affine_shift():
    kinds = {"bn": nn.BatchNorm1d, "none": nn.Identity, "gn": nn.GroupNorm, "in": nn.GroupNorm}
    for norm, kind in kinds.items():
        model = tr.make_cnn(width=8, norm=norm, seed=1)
        assert isinstance(model[2], kind) and model(torch.randn(4, 40)).shape == (4, 10)
    assert tr.make_cnn(width=8, norm="gn")[2].num_groups == 4 and tr.make_cnn(width=8, norm="in")[2].num_groups == 8
    with pytest.raises(ValueError, match="norm"):
        tr.make_cnn(width=8, norm="ln")
    with pytest.raises(ValueError, match="width"):
        tr.make_cnn(width=6, norm="gn")
    # a bias-free valid first conv, then one statistic per example and channel: a x + b, a > 0 and b per
    # example, leaves every output as it was (epsilon aside)
    model = tr.make_cnn(width=8, norm="in", seed=2).double().eval()
    x = torch.randn(6, 40, dtype=torch.float64)
    a, b = torch.rand(6, 1, dtype=torch.float64) + 0.5, torch.randn(6, 1, dtype=torch.float64)
    assert torch.allclose(model(a * x + b), model(x), atol=1e-4)
    assert not torch.allclose(tr.make_cnn(width=8, norm="none", seed=2).double()(a * x + b),
                              tr.make_cnn(width=8, norm="none", seed=2).double()(x), atol=1e-2)


def test_corruptions_build_the_suite_in_order_and_reject_unknown_kinds():
    data = toy()
    suite = tr.corruptions(data, seed=3)
    assert list(suite) == [(k, s) for k, sevs in tr.CORRUPTIONS.items() for s in sevs]
    noisy = [suite[("noise", s)] for s in tr.CORRUPTIONS["noise"]]
    spread = [float((d.x_test - data.x_test).std()) for d in noisy]
    assert spread == sorted(spread) and spread[0] == pytest.approx(tr.CORRUPTIONS["noise"][0], rel=0.1)
    flat = suite[("contrast", 0.1)]
    assert torch.allclose(flat.x_test.mean(1), data.x_test.mean(1), atol=1e-6)
    assert torch.equal(flat.y_test, data.y_test) and torch.equal(suite[("blur", 1.0)].y_train, data.y_train)
    assert list(tr.corruptions(data, suite={"blur": (1.0,)})) == [("blur", 1.0)]
    with pytest.raises(ValueError, match="unknown"):
        tr.corruptions(data, suite={"fog": (1,)})


def test_baseline_results_score_every_network_and_adabn_only_for_bn():
    data = toy()
    seeds = [0, 1]
    sources = {norm: tr.train_sources(data, seeds, steps=30, width=8, norm=norm) for norm in ("bn", "none", "in")}
    shifted = {"clean": data, "affine": tr.affine_shift(data, 2.0, 1.0)}
    res = tr.baseline_results(sources, shifted)
    assert set(res) == {"bn", "bn_adabn", "none", "in"} and all(v["clean"].shape == (2,) for v in res.values())
    for norm, models in sources.items():  # each network as trained, model by model
        want = [accuracy(m, data.x_test, data.y_test) for m in models]
        assert res[norm]["clean"] == pytest.approx(want, abs=1e-9)
    # instance norm and AdaBN both undo 2x + 1 exactly here; the source statistics do not
    assert res["in"]["affine"] == pytest.approx(res["in"]["clean"], abs=0.011)
    assert res["bn_adabn"]["affine"] == pytest.approx(res["bn_adabn"]["clean"], abs=0.011)


def test_finetune_vs_size_gives_each_network_one_row_per_size():
    data = toy(n_train=300)
    seeds = [0, 1]
    sources = {norm: tr.train_sources(data, seeds, steps=20, width=8, norm=norm) for norm in ("bn", "none")}
    out = tr.finetune_vs_size(sources, {"toy": data}, seeds, (10, 40), lrs=(0.01, 0.1), steps=5)
    assert set(out) == {"bn", "none"} and out["bn"]["toy"].shape == (2, 2)
    assert ((out["none"]["toy"] >= 0) & (out["none"]["toy"] <= 1)).all()
    # one size alone is finetune_results' all_bn_train row
    ref = tr.finetune_results(sources["none"], {"toy": data}, seeds, labelled=(40,), modes=("all_bn_train",),
                              lrs=(0.01, 0.1), steps=5)
    assert np.allclose(out["none"]["toy"][1], ref["acc"][(40, "all_bn_train")]["toy"])
    assert "toy" not in ref["adabn"]  # a network without BN has nothing to adapt


@pytest.mark.parametrize("device", DEVICES)
def test_experiments_run_on_the_given_device(device, device_spy):
    data, seeds = toy(n_train=100, n_test=50), [0, 1]
    shifted = {"shifted": Split(2 * data.x_train + 1, data.y_train, 2 * data.x_test + 1, data.y_test)}
    models = tr.train_sources(data, seeds, steps=5, width=4, device=device)
    model = tr.train_source(data, 0, steps=5, width=4, device=device)
    assert all(p.device.type == device.type for m in [*models, model] for p in m.parameters())
    res = tr.adaptation_results(models, shifted, batch_sizes=(25,), priors=(0,), tent_batch=25, progress=False,
                                device=device)
    assert res["adabn"]["shifted"].shape == (2,)
    ft = tr.finetune_results(models, shifted, seeds, labelled=(20,), modes=("head",), lrs=(0.01,), steps=3,
                             progress=False, device=device)
    assert ft["acc"][(20, "head")]["shifted"].shape == (2,)
    online = tr.tent_online(models, shifted, batch_size=25, passes=1, device=device)
    assert online["shifted"]["tent"].shape == (1, 2)
    bo = tr.bn_only_vs_width(data, (8,), seeds, steps=3, progress=False, device=device)
    assert bo["bn_only"].shape == (1, 2)
    assert device_spy.moved(device)
    if device.type == "cpu":  # the CPU under another name: exactly the numbers of the default device
        cpu = tr.adaptation_results(tr.train_sources(data, seeds, steps=5, width=4), shifted, batch_sizes=(25,),
                                    priors=(0,), tent_batch=25, progress=False)
        for method in res:
            np.testing.assert_array_equal(res[method]["shifted"], cpu[method]["shifted"])
