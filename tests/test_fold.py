"""normlab.fold: a folded layer computes what the layer and its eval-mode BN computed."""

import pytest
import torch
from torch import nn

from normlab import nn as nl
from normlab.fold import fold_batch_norm, fold_model


def trained_bn(bn, channels_shape):
    """Give bn non-trivial running statistics and affine parameters, then switch it to eval mode."""
    bn.train()
    with torch.no_grad():
        for _ in range(3):
            bn(torch.randn(channels_shape) * 3 + 2)
        if bn.affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    return bn.eval()


CASES = [
    ("linear", lambda bias: nn.Linear(6, 4, bias=bias), (16, 6), (8, 4)),
    ("conv2d", lambda bias: nn.Conv2d(3, 4, 3, padding=1, bias=bias), (5, 3, 7, 7), (8, 4, 2, 2)),
    ("conv1d", lambda bias: nn.Conv1d(3, 4, 3, bias=bias), (5, 3, 9), (8, 4, 3)),
]


@pytest.mark.parametrize("name, make, x_shape, stats_shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bn_module", [nn, nl], ids=["torch.nn", "normlab.nn"])
@pytest.mark.parametrize("affine", [True, False])
def test_folded_layer_matches_layer_then_bn(name, make, x_shape, stats_shape, bias, bn_module, affine):
    torch.manual_seed(0)
    layer = make(bias)
    kind = "BatchNorm1d" if len(stats_shape) < 4 else "BatchNorm2d"
    bn = trained_bn(getattr(bn_module, kind)(4, affine=affine), stats_shape)
    x = torch.randn(x_shape)
    with torch.no_grad():
        expected = bn(layer(x))
        got = fold_batch_norm(layer, bn)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32


def test_folding_leaves_the_original_layer_alone():
    layer = nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    fold_batch_norm(layer, trained_bn(nn.BatchNorm1d(2), (8, 2)))
    torch.testing.assert_close(layer.weight, before)


def test_fold_model_folds_every_pair_and_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nl.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(256, 10), nn.BatchNorm1d(10)),  # nested
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 64))
    model.eval()
    folded = fold_model(model)
    assert not any(isinstance(m, (nn.BatchNorm1d, nl.BatchNorm2d)) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules()), "the original keeps its BN"
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not folded.training


@pytest.mark.parametrize(
    "layer, bn, message",
    [
        (nn.Linear(3, 2), nn.BatchNorm1d(2), "training mode"),
        (nn.Linear(3, 2), nn.BatchNorm1d(5).eval(), "2 output channels but bn normalizes 5"),
        (nn.ReLU(), nn.BatchNorm1d(2).eval(), "nn.Linear or nn.Conv"),
        (nn.Linear(3, 2), nn.LayerNorm(2), "BatchNorm module"),
        (nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False).eval(), "no running statistics"),
    ],
)
def test_bad_pairs_raise_value_errors(layer, bn, message):
    with pytest.raises(ValueError, match=message):
        fold_batch_norm(layer, bn)
