"""Chapter 4's layers and tools: ghost batch norm, population norm and precise_bn."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.nn import BatchNorm1d, GhostBatchNorm1d, GhostBatchNorm2d, PopulationNorm1d, PopulationNorm2d

pytestmark = pytest.mark.usefixtures("float64")


def _pair(ghost, reference, shape, steps=4, seed=0):
    """Run ghost and reference side by side for several train/eval steps; compare everything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in ((ghost.weight, reference.weight), (ghost.bias, reference.bias)):
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(a)
    for step in range(steps):
        train = step % 3 != 2
        ghost.train(train)
        reference.train(train)
        x = torch.randn(shape, generator=gen) * 3 + 1
        xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        og, orf = ghost(xg), reference(xr)
        torch.testing.assert_close(og, orf, rtol=1e-10, atol=1e-10)
        grad = torch.randn(og.shape, generator=gen)
        og.backward(grad)
        orf.backward(grad)
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-9, atol=1e-10)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(ghost, name).grad, getattr(reference, name).grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ghost, name), getattr(reference, name))


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5)])
@pytest.mark.parametrize("virtual", [8, 100])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_with_a_virtual_batch_at_least_the_batch_is_batch_norm(shape, virtual, momentum):
    _pair(GhostBatchNorm1d(3, virtual, momentum=momentum), nn.BatchNorm1d(3, momentum=momentum), shape)


def test_ghost_2d_with_a_large_virtual_batch_is_batch_norm_2d():
    _pair(GhostBatchNorm2d(3, 64), nn.BatchNorm2d(3), (6, 3, 4, 5))


@pytest.mark.parametrize("shape", [(12, 3), (10, 3), (11, 3, 4)])
def test_ghost_normalizes_each_virtual_batch_on_its_own(shape):
    torch.manual_seed(0)
    layer = GhostBatchNorm1d(3, 4, momentum=0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x = torch.randn(shape) * 2 + 3
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xg)
    chunks = xr.split(4)  # the last one holds the remainder
    expected = torch.cat([F.batch_norm(c, None, None, layer.weight, layer.bias, True) for c in chunks])
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape)
    torch.testing.assert_close(torch.autograd.grad(out, xg, grad)[0], torch.autograd.grad(expected, xr, grad)[0])
    # Running statistics: one update from the count-weighted means of the groups' statistics.
    dims = [0] + list(range(2, x.dim()))
    counts = torch.tensor([c[:, 0].numel() for c in chunks], dtype=x.dtype)
    w = (counts / counts.sum()).unsqueeze(1)
    means = torch.stack([c.detach().mean(dims) for c in chunks])
    variances = torch.stack([c.detach().var(dims) for c in chunks])
    torch.testing.assert_close(layer.running_mean, 0.5 * (w * means).sum(0))
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * (w * variances).sum(0))
    assert int(layer.num_batches_tracked) == 1


def test_ghost_output_does_not_depend_on_examples_outside_its_virtual_batch():
    torch.manual_seed(1)
    layer = GhostBatchNorm1d(5, 4)
    x = torch.randn(16, 5)
    y = x.clone()
    y[4:] = torch.randn(12, 5) * 10  # change every example outside the first virtual batch
    torch.testing.assert_close(layer(x)[:4], layer(y)[:4])
    assert not torch.allclose(layer(x)[4:8], layer(y)[4:8])


def test_ghost_eval_is_batch_norm_eval_and_state_dicts_interchange():
    torch.manual_seed(2)
    ghost = GhostBatchNorm2d(3, 2)
    for _ in range(3):
        ghost(torch.randn(8, 3, 2, 2) + 1)
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(ghost.state_dict())
    ghost.eval()
    reference.eval()
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(ghost(x), reference(x))
    assert set(ghost.state_dict()) == set(nn.BatchNorm2d(3).state_dict())


def test_ghost_errors():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm1d(3, 0)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm1d(3, 2.0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm1d(3, 2)(torch.randn(5, 3))  # the remainder is one example
    with pytest.raises(RuntimeError, match="should contain"):
        GhostBatchNorm1d(4, 2)(torch.randn(6, 3))
    with pytest.raises(ValueError, match="expected 4D input"):
        GhostBatchNorm2d(3, 2)(torch.randn(6, 3))


def test_ghost_keeps_low_precision_dtypes():
    layer = GhostBatchNorm1d(3, 4, dtype=torch.float32)  # float32 parameters and statistics
    out = layer(torch.randn(12, 3, dtype=torch.float32).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.float32


def _mlp(norm, dropout=0.0):
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 7), norm(7), nn.ReLU(), nn.Linear(7, 3)
    )


def test_population_norm_training_output_ignores_the_rest_of_the_batch():
    layer = PopulationNorm1d(4)
    x = torch.randn(10, 4) * 3 + 2
    normlab.precise_bn(nn.Sequential(layer), [x])
    torch.testing.assert_close(layer.running_mean, x.mean(0))
    torch.testing.assert_close(layer.running_var, x.var(0))
    layer.train()
    alone = torch.cat([layer(x[i : i + 1]) for i in range(10)])  # a batch of one works: no batch stats
    torch.testing.assert_close(layer(x), alone)
    torch.testing.assert_close(layer(x), (x - x.mean(0)) / torch.sqrt(x.var(0) + layer.eps))
    layer.eval()
    torch.testing.assert_close(layer(x), alone)


def test_population_norm_gradient_treats_the_statistics_as_constants():
    layer = PopulationNorm2d(2)
    x = torch.randn(4, 2, 3, 3) + 1
    normlab.precise_bn(layer, [x])
    layer.train()
    xr = x.clone().requires_grad_()
    layer(xr).sum().backward()
    expected = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).view(1, 2, 1, 1).expand_as(x)
    torch.testing.assert_close(xr.grad, expected)


def test_population_norm_needs_running_statistics():
    with pytest.raises(ValueError, match="track_running_stats"):
        PopulationNorm1d(3, track_running_stats=False)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, BatchNorm1d])
def test_precise_bn_is_the_exact_average_over_all_batches(norm):
    model = _mlp(norm, dropout=0.5)
    for _ in range(3):  # give the EMA something to forget
        model(torch.randn(16, 6) + 2)
    torch.manual_seed(4)
    batches = [torch.randn(n, 6) + 1 for n in (16, 5, 30)]
    tracked = int(model[4].num_batches_tracked)
    out = normlab.precise_bn(model, batches)
    assert out is model and not model.training
    # Directly: the BN layer's inputs with dropout off, concatenated; mean and unbiased variance.
    with torch.no_grad():
        inputs = torch.cat([model[3](model[1](model[0](b))) for b in batches])
    torch.testing.assert_close(model[4].running_mean, inputs.mean(0))
    torch.testing.assert_close(model[4].running_var, inputs.var(0))
    assert int(model[4].num_batches_tracked) == tracked


def test_precise_bn_uses_batch_statistics_upstream_and_accepts_pairs():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), BatchNorm1d(3))
    batches = [(torch.randn(8, 4) * 2, torch.zeros(8)) for _ in range(3)]
    normlab.precise_bn(model, batches)
    with torch.no_grad():
        first = torch.cat([model[0](x) for x, _ in batches])
        second = torch.cat([model[3](F.relu(F.batch_norm(model[0](x), None, None, model[1].weight,
                                                         model[1].bias, True))) for x, _ in batches])
    torch.testing.assert_close(model[1].running_mean, first.mean(0))
    torch.testing.assert_close(model[1].running_var, first.var(0))
    torch.testing.assert_close(model[4].running_mean, second.mean(0))
    torch.testing.assert_close(model[4].running_var, second.var(0))


def test_precise_bn_on_conv_statistics_are_per_channel_over_n_h_w():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    batches = [torch.randn(4, 2, 6, 5) for _ in range(2)]
    normlab.precise_bn(model, batches)
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in batches]).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(model[1].running_mean, h.mean(1))
    torch.testing.assert_close(model[1].running_var, h.var(1))


def test_precise_bn_errors():
    with pytest.raises(ValueError, match="no batch norm layers"):
        normlab.precise_bn(nn.Linear(3, 3), [torch.randn(4, 3)])
    with pytest.raises(ValueError, match="empty"):
        normlab.precise_bn(nn.BatchNorm1d(3), [])
    with pytest.raises(ValueError, match="track_running_stats"):
        normlab.precise_bn(nn.BatchNorm1d(3, track_running_stats=False), [torch.randn(4, 3)])
