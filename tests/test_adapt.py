"""normlab.adapt: AdaBN, frozen BN, BN-only parameters, Schneider et al.'s prior, TENT; the domain shifts."""

import copy
import math

import pytest
import torch
from torch import nn

from normlab import checks
from normlab.adapt import (
    adabn,
    bn_only_parameters,
    bn_statistics,
    entropy,
    freeze_bn,
    load_bn_statistics,
    mix_statistics,
    prior_adapt,
    tent,
    unfreeze_bn,
)
from normlab.experiments.transfer import make_cnn
from normlab.runtime.data import Split, add_noise, affine_shift, mnist1d_shifted
from normlab.stats import batch_norm_layers, precise_bn

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6),
                         nn.ReLU(), nn.Linear(6, 3))


def signals(n, seed=0, length=40):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, generator=gen).cumsum(dim=1) / 4  # smooth-ish 1-D signals


# --------------------------------------------------------------------------------------------
# AdaBN
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("scale, offset", [(2.0, 1.0), (0.5, -3.0), (3.0, 0.0)])
def test_adabn_recovers_an_affine_input_shift_exactly(scale, offset):
    # Bias-free first conv with valid padding, then BN: a x + b shifts each channel to a h + b sum(w).
    model = make_cnn(width=6, seed=1).double()
    x = signals(300)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eps = 1e-12  # with a tiny epsilon the two normalizations agree to rounding
    precise_bn(model, x.split(100))
    with torch.no_grad():
        clean = model(x)
    shifted = adabn(copy.deepcopy(model), (scale * x + offset).split(100))
    with torch.no_grad():
        torch.testing.assert_close(shifted(scale * x + offset), clean, rtol=1e-8, atol=1e-8)
        # ... while the source statistics do not recover it
        assert (model(scale * x + offset) - clean).abs().max() > 0.1


@pytest.mark.usefixtures("float64")
def test_adabn_recovers_a_shift_up_to_epsilon_at_the_default_epsilon():
    model = make_cnn(width=6, seed=2).double()
    x = signals(300, seed=1)
    precise_bn(model, x.split(100))
    with torch.no_grad():
        clean = model(x)
        shifted = adabn(copy.deepcopy(model), (2 * x + 1).split(100))(2 * x + 1)
    torch.testing.assert_close(shifted, clean, rtol=0, atol=1e-3)


def test_a_negative_scale_is_not_recovered_it_flips_every_feature():
    # BN undoes scale and offset, not sign: (-a h - (-a mu)) / (a sigma) = -(h - mu) / sigma.
    model = make_cnn(width=6, seed=3)
    x = signals(300, seed=2).float()
    precise_bn(model, x.split(100))
    with torch.no_grad():
        h, h_neg = model[2](model[1](model[0](x))), adabn(copy.deepcopy(model), (-x).split(100))[:3](-x)
    torch.testing.assert_close(h_neg, 2 * model[2].bias.view(1, -1, 1) - h, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("float64")
def test_adabn_sets_the_exact_mean_and_unbiased_variance_over_unequal_batches():
    model = mlp()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 5, generator=gen) * 2 + 1 for n in (3, 10, 6)]
    adabn(model, [(b, torch.zeros(len(b))) for b in batches])  # (input, label) pairs work; labels ignored
    x = torch.cat(batches)
    h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean(0))
    torch.testing.assert_close(model[1].running_var, h.var(0, unbiased=True))
    # During the pass, as in training, the first layer normalizes each batch with that batch's statistics.
    bn = model[1]
    h2 = torch.cat([model[3](model[2](
        (hb - hb.mean(0)) / torch.sqrt(hb.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias))
        for hb in (model[0](b) for b in batches)])
    torch.testing.assert_close(model[4].running_mean, h2.mean(0))
    torch.testing.assert_close(model[4].running_var, h2.var(0, unbiased=True))
    assert not model.training


def test_adabn_rejects_models_without_bn_and_empty_batches():
    with pytest.raises(ValueError, match="no batch norm"):
        adabn(nn.Linear(3, 2), [torch.randn(4, 3)])
    with pytest.raises(ValueError, match="empty"):
        adabn(mlp(), [])
    with pytest.raises(ValueError, match="track_running_stats"):
        adabn(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, track_running_stats=False)), [torch.randn(4, 5)])


def test_statistics_snapshot_and_restore_round_trip():
    model = mlp()
    before = bn_statistics(model)
    adabn(model, [torch.randn(20, 5) * 3])
    assert not torch.equal(model[1].running_mean, before[0][0])
    load_bn_statistics(model, before)
    for (m, v), layer in zip(before, (model[1], model[4])):
        assert torch.equal(layer.running_mean, m) and torch.equal(layer.running_var, v)
    with pytest.raises(ValueError, match="2 \\(mean, var\\) pairs"):
        load_bn_statistics(model, before[:1])
    with pytest.raises(ValueError, match="shape"):
        load_bn_statistics(model, [(torch.zeros(3), torch.ones(3))] * 2)


# --------------------------------------------------------------------------------------------
# eval() vs requires_grad=False vs freeze_bn
# --------------------------------------------------------------------------------------------


def sgd_steps(model, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen) * 2 + 1
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_freeze_bn_keeps_statistics_and_affine_parameters_while_the_rest_trains():
    model = freeze_bn(mlp())
    bn = model[1]
    stats, gamma, w = bn.running_mean.clone(), bn.weight.clone(), model[0].weight.clone()
    sgd_steps(model)  # calls model.train(): the freeze survives it
    assert not bn.training
    assert torch.equal(bn.running_mean, stats) and torch.equal(bn.weight, gamma)
    assert not torch.equal(model[0].weight, w)
    assert bn.weight not in set(p for p in model.parameters() if p.requires_grad)


def test_eval_alone_is_undone_by_train_and_requires_grad_alone_leaves_the_statistics_moving():
    model = mlp()
    model[1].eval()
    sgd_steps(model)  # model.train() switches the layer back: its statistics move
    assert model[1].training and model[1].num_batches_tracked > 0
    model = mlp()
    for p in (model[1].weight, model[1].bias):
        p.requires_grad_(False)
    stats, gamma = model[1].running_mean.clone(), model[1].weight.clone()
    sgd_steps(model)
    assert torch.equal(model[1].weight, gamma)  # the affine parameters are frozen ...
    assert not torch.equal(model[1].running_mean, stats)  # ... the statistics are not


def test_unfreeze_bn_undoes_the_freeze_also_on_a_copy():
    model = copy.deepcopy(freeze_bn(mlp()))
    unfreeze_bn(model)
    sgd_steps(model)
    assert model[1].training and model[1].weight.requires_grad and model[1].num_batches_tracked > 0


def test_bn_only_parameters_are_the_affine_parameters_in_order():
    model = mlp()
    assert bn_only_parameters(model) == [model[1].weight, model[1].bias, model[4].weight, model[4].bias]
    with pytest.raises(ValueError, match="affine=False"):
        bn_only_parameters(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)))
    with pytest.raises(ValueError, match="no batch norm"):
        bn_only_parameters(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Schneider et al.'s prior
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("float64")
def test_mix_statistics_weights_source_and_batch_by_pseudo_sample_size():
    x = torch.randn(4, 3, 5)
    mu_s, var_s = torch.randn(3), torch.rand(3) + 0.5
    var_b, mu_b = torch.var_mean(x, dim=(0, 2), correction=0)
    for n_prior, w in ((0, 0.0), (4, 0.5), (12, 0.75), (math.inf, 1.0)):
        mean, var = mix_statistics(mu_s, var_s, x, n_prior)
        torch.testing.assert_close(mean, w * mu_s + (1 - w) * mu_b)
        torch.testing.assert_close(var, w * var_s + (1 - w) * var_b)


@pytest.mark.usefixtures("float64")
def test_prior_zero_is_train_mode_bn_and_infinity_is_the_source_model():
    model = mlp()
    adabn(model, [torch.randn(50, 5) * 2])
    source = bn_statistics(model)
    x = torch.randn(6, 5) + 1
    with torch.no_grad():
        eval_out = model(x)
        reference = copy.deepcopy(model).train()
        train_out = reference(x)
        prior_adapt(model, source, 0)
        torch.testing.assert_close(model(x), train_out)
        assert not model.training
        for (m, v), layer in zip(source, (model[1], model[4])):  # the source statistics are back after the pass
            assert torch.equal(layer.running_mean, m) and torch.equal(layer.running_var, v)
        prior_adapt(model, source, math.inf)
        torch.testing.assert_close(model(x), eval_out)


@pytest.mark.usefixtures("float64")
def test_prior_mixes_layer_by_layer_and_survives_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    source = [(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([2.0, 0.5, 1.0]))]
    x = torch.randn(8, 4)
    prior_adapt(model, source, 24)
    with torch.no_grad():
        h = model[0](x)
        mean, var = mix_statistics(*source[0], h, 24)  # w = 24 / 32
        expected = (h - mean) / torch.sqrt(var + model[1].eps) * model[1].weight + model[1].bias
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(copy.deepcopy(model)(x), expected)


def test_prior_rejects_bad_pseudo_sample_sizes_and_statistics():
    model = mlp()
    source = bn_statistics(model)
    for bad in (-1, float("nan"), "8", True):
        with pytest.raises(ValueError, match="n_prior"):
            prior_adapt(model, source, bad)
    with pytest.raises(ValueError, match="one per BN layer"):
        prior_adapt(model, source[:1], 8)


# --------------------------------------------------------------------------------------------
# TENT
# --------------------------------------------------------------------------------------------


def test_tent_trains_only_gamma_and_beta_and_lowers_the_entropy():
    model = mlp(seed=3)
    adabn(model, [torch.randn(64, 5)])
    x = torch.randn(64, 5) * 2 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        h0 = entropy(copy.deepcopy(model).train()(x)).mean()
    tent(model, [x] * 10, lr=0.05)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.weight", "1.bias", "4.weight", "4.bias"}  # statistics and other weights untouched
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    with torch.no_grad():
        assert entropy(copy.deepcopy(model).train()(x)).mean() < h0 - 0.01


def test_tent_reports_each_batch_s_logits_before_adapting_to_it():
    model = mlp(seed=4)
    adabn(model, [torch.randn(64, 5)])
    batches = [torch.randn(16, 5) * 2 + 1 for _ in range(3)]
    seen, ref = [], copy.deepcopy(model)
    tent(model, batches, lr=0.05, steps=2, on_batch=seen.append)
    assert len(seen) == 3 and all(s.shape == (16, 3) and not s.requires_grad for s in seen)
    # the first batch's logits are the unadapted model's, with that batch's statistics
    with torch.no_grad():
        torch.testing.assert_close(seen[0], copy.deepcopy(ref).train()(batches[0]))
    # the second batch's are the model's after the first batch's two updates
    tent(ref, batches[:1], lr=0.05, steps=2)
    with torch.no_grad():
        torch.testing.assert_close(seen[1], copy.deepcopy(ref).train()(batches[1]))


def test_tent_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        tent(mlp(), [torch.randn(4, 5)], lr=0)
    with pytest.raises(ValueError, match="steps"):
        tent(mlp(), [torch.randn(4, 5)], steps=0)
    with pytest.raises(ValueError, match="at least 2"):
        tent(mlp(), [torch.randn(1, 5)])
    with pytest.raises(ValueError, match="empty"):
        tent(mlp(), [])


def test_entropy_of_uniform_and_certain_predictions():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(4), 0.0]))


# --------------------------------------------------------------------------------------------
# Domain shifts and the exercises' self-checks
# --------------------------------------------------------------------------------------------


def test_domain_shifts_transform_inputs_and_keep_labels():
    x = torch.randn(10, 4)
    data = Split(x, torch.arange(10) % 2, x[:4], torch.arange(4) % 2, name="toy")
    shifted = affine_shift(data, 2.0, 1.0)
    torch.testing.assert_close(shifted.x_train, 2 * x + 1)
    assert torch.equal(shifted.y_test, data.y_test)
    noisy = add_noise(data, 0.5, seed=1)
    assert torch.equal(noisy.x_train, add_noise(data, 0.5, seed=1).x_train)
    assert 0.2 < (noisy.x_train - x).std() < 0.8
    for bad in ({"scale": 0}, {"offset": float("inf")}):
        with pytest.raises(ValueError):
            affine_shift(data, **bad)
    with pytest.raises(ValueError, match="std"):
        add_noise(data, -1.0)


def test_mnist1d_shifted_changes_the_generator_and_rejects_unknown_parameters():
    shifted = mnist1d_shifted(num_samples=200, shear_scale=1.5)
    assert shifted.x_train.shape == (160, 40) and shifted.num_classes == 10
    with pytest.raises(ValueError, match="unknown MNIST-1D generator parameters"):
        mnist1d_shifted(num_samples=200, sheer_scale=1.5)


def test_check_adabn_passes_a_correct_solution_and_catches_an_ema(capsys):
    checks.check_adabn(lambda model, batches: adabn(model, batches))
    assert "PASS" in capsys.readouterr().out

    def ema(model, batches):  # the running statistics' own update, batch after batch
        model.train()
        with torch.no_grad():
            for b in batches:
                model(b)
        return model.eval()

    with pytest.raises(AssertionError, match="AdaBN, MLP with two BN layers, BN layer 0: running_mean"):
        checks.check_adabn(ema)

    def mean_of_batch_stats(model, batches):  # averages per-batch statistics: wrong for unequal sizes
        for m in batch_norm_layers(model):
            m.momentum = None
        return ema(model, batches)

    with pytest.raises(AssertionError, match="AdaBN"):
        checks.check_adabn(mean_of_batch_stats)


def test_check_prior_mix_passes_a_correct_solution_and_catches_wrong_ones(capsys):
    checks.check_prior_mix(mix_statistics)
    assert "PASS" in capsys.readouterr().out

    def unbiased(mu_s, var_s, x, n_prior):  # the batch's unbiased variance instead of BN's biased one
        n = x.numel() // x.shape[1]
        w = 1.0 if math.isinf(n_prior) else n_prior / (n_prior + x.shape[0])
        mean_b, var_b = mix_statistics(mu_s, var_s, x, 0)
        return w * mu_s + (1 - w) * mean_b, w * var_s + (1 - w) * var_b * n / (n - 1)

    with pytest.raises(AssertionError, match="var"):
        checks.check_prior_mix(unbiased)

    def swapped(mu_s, var_s, x, n_prior):  # the weights the wrong way round
        mean_b, var_b = mix_statistics(mu_s, var_s, x, 0)
        w = 1.0 if math.isinf(n_prior) else n_prior / (n_prior + x.shape[0])
        return (1 - w) * mu_s + w * mean_b, (1 - w) * var_s + w * var_b

    with pytest.raises(AssertionError, match="n_prior=0: mean"):
        checks.check_prior_mix(swapped)
