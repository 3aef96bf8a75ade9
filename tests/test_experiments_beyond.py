"""Chapter 10's experiments (normlab.experiments.beyond) and self-checks (normlab.checks.beyond)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab import checks
from normlab.experiments import beyond as by
from normlab.runtime.data import load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def test_the_deep_mlp_has_its_blocks_in_order():
    model = by.make_deep_mlp(64, 10, depth=3, width=8, activation="relu", bn=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 3 + ["Linear"]


def test_gain_init_draws_weights_at_the_activation_gain_over_root_fan_in():
    model = by.make_deep_mlp(64, 10, depth=2, width=400, activation="tanh", init="gain", seed=1)
    w = linears(model)[1].weight
    assert w.std().item() == pytest.approx(5 / 3 / math.sqrt(400), rel=0.02)
    assert all((m.bias == 0).all() for m in linears(model))


def test_a_number_init_scales_every_layer_the_classifier_included():
    model = by.make_deep_mlp(64, 10, depth=2, width=300, init=0.05, seed=2)
    for m in linears(model):
        assert m.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_one_seed_gives_the_same_weights():
    a, b = (by.make_deep_mlp(64, 10, depth=2, width=8, seed=3) for _ in range(2))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs,match", [({"init": "he"}, "init"), ({"init": -1.0}, "init"),
                                          ({"activation": "gelu"}, "activation"), ({"depth": 0}, "depth"),
                                          ({"bn": 1}, "bn")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        by.make_deep_mlp(64, 10, **kwargs)


def test_propagation_gives_one_row_per_seed_and_one_column_per_layer(digits):
    result = by.propagation(digits, [0, 1], depth=4, width=16, activation="tanh", batch_size=32)
    assert set(result) == set(by.NETS)
    for r in result.values():
        assert r["std"].shape == r["grad_std"].shape == r["saturated"].shape == (2, 4)
        assert len(r["outputs"]) == 4 and r["outputs"][0].shape == (32, 16)
    # BN keeps the signal's size; torch's default init lets it shrink layer after layer
    assert result["bn"]["std"][:, -1].min() > 0.5 > result["default"]["std"][:, -1].max()


def test_update_ratios_and_sweep_shapes(digits):
    ur = by.update_ratios(digits, [0, 1], depth=2, width=8, activation="tanh", steps=3, lr=0.1, progress=False)
    assert ur["bn"]["ratios"].shape == (3, 3, 2) and ur["bn"]["test_acc"].shape == (2,)
    sweep = by.init_sweep(digits, [0.01, 0.1], [0, 1, 2], bn=True, depth=2, width=8, steps=3, progress=False)
    assert sweep["test_acc"].shape == sweep["train_loss"].shape == (2, 3)


def test_bn_output_std_is_one_far_above_eps_and_falls_below_it():
    assert by.bn_output_std(1.0, 64, 1.0) == pytest.approx(1.0, abs=1e-6)
    assert by.bn_output_std(math.sqrt(1e-5 / 64), 64, 1.0) == pytest.approx(math.sqrt(0.5))
    # and it is what BatchNorm1d does
    torch.manual_seed(0)
    x = torch.randn(4096, 64, dtype=torch.float64)
    w = torch.randn(32, 64, dtype=torch.float64) * 1e-4
    out = nn.functional.batch_norm(x @ w.T, None, None, training=True, eps=1e-5)
    assert out.std().item() == pytest.approx(by.bn_output_std(1e-4, 64, 1.0), rel=0.03)


def test_budget_names_its_scales():
    assert by.budget("quick")["seeds"] >= 8
    with pytest.raises(ValueError, match="scale"):
        by.budget("huge")


def reference_record(model, x, kinds):
    from normlab.runtime.diagnostics import Diagnostics

    with Diagnostics(model, kinds=kinds) as diag, torch.no_grad():
        model(x)
    return dict(diag.outputs)


def test_check_record_outputs_passes_the_reference_and_catches_left_hooks(capsys):
    checks.check_record_outputs(reference_record)
    assert "PASS" in capsys.readouterr().out

    def leaves_hooks(model, x, kinds):
        out = {}
        for name, m in model.named_modules():
            if isinstance(m, kinds):
                m.register_forward_hook(lambda mod, i, o, name=name: out.__setitem__(name, o.detach()))
        model(x)
        return out

    with pytest.raises(AssertionError, match="hook"):
        checks.check_record_outputs(leaves_hooks)


def test_check_bn_output_std_passes_the_reference_and_catches_a_missing_eps(capsys):
    checks.check_bn_output_std(by.bn_output_std)
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(AssertionError):
        checks.check_bn_output_std(lambda s, f, q, eps: np.sqrt(s**2 * f * q / (s**2 * f * q)))
