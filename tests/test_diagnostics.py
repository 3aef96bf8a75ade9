"""normlab.runtime.diagnostics: recorded activations, gradients and update ratios against direct computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.runtime import ensemble
from normlab.runtime.data import Split
from normlab.runtime.diagnostics import Diagnostics, UpdateRatios, saturated
from normlab.runtime.train import train


def mlp(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 6), act(), nn.Linear(6, 3))


def test_outputs_and_gradients_are_those_of_the_layers():
    model, x, y = mlp(), torch.randn(11, 5), torch.tensor([0, 1, 2] * 3 + [0, 1])
    with Diagnostics(model) as diag:
        F.cross_entropy(model(x), y).backward()
    assert diag.names == ["1", "3"]
    h1 = torch.tanh(model[0](x))
    torch.testing.assert_close(diag.outputs["1"], h1.detach())
    # the gradient with respect to the second tanh's output, by autograd directly
    a1 = torch.tanh(model[0](x))
    a3 = torch.tanh(model[2](a1)).detach().requires_grad_(True)
    F.cross_entropy(model[4](a3), y).backward()
    torch.testing.assert_close(diag.grads["3"], a3.grad)


def test_stats_summarize_the_recorded_tensors():
    model, x = mlp(1, nn.ReLU), torch.randn(40, 5)
    with Diagnostics(model) as diag:
        model(x).sum().backward()
    s = diag.stats()[0]
    a, g = diag.outputs["1"].double(), diag.grads["1"].double()
    assert s.kind == "ReLU" and s.name == "1"
    assert s.mean == pytest.approx(a.mean().item()) and s.std == pytest.approx(a.std().item())
    assert s.saturated == pytest.approx((a <= 0).double().mean().item())
    assert s.dead == pytest.approx((a <= 0).all(dim=0).double().mean().item())
    assert s.grad_std == pytest.approx(g.std().item())


def test_a_forward_pass_without_backward_has_no_gradient_stats():
    model = mlp()
    with Diagnostics(model) as diag, torch.no_grad():
        model(torch.randn(4, 5))
    assert all(np.isnan(s.grad_std) for s in diag.stats())


def test_hooks_are_removed_on_exit():
    model = mlp()
    with Diagnostics(model):
        pass
    assert not any(m._forward_hooks for m in model.modules())


def test_saturation_thresholds():
    t = torch.tensor([-0.99, -0.5, 0.0, 0.96, 0.98])
    assert saturated(t, "Tanh").tolist() == [True, False, False, False, True]
    assert saturated(torch.tensor([0.01, 0.5, 0.99]), "Sigmoid").tolist() == [True, False, True]
    assert saturated(torch.tensor([-1.0, 0.0, 2.0]), "ReLU").tolist() == [True, True, False]
    with pytest.raises(ValueError, match="kind"):
        saturated(t, "GELU")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="no layer"):
        Diagnostics(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="threshold"):
        Diagnostics(mlp(), threshold=1.5)
    with pytest.raises(ValueError, match="nothing recorded"):
        Diagnostics(mlp()).stats()
    with pytest.raises(ValueError, match="every"):
        UpdateRatios(mlp(), every=0)


def toy_split(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return Split(x, y, x[:16], y[:16], "toy")


def test_update_ratios_measure_the_optimizer_step():
    model = mlp(2)
    rec = UpdateRatios(model)
    assert rec.names == ["0.weight", "2.weight", "4.weight"]
    before = model[0].weight.detach().clone()
    train(model, toy_split(), steps=1, lr=0.1, batch_size=16, callback=rec, progress=False)
    after = model[0].weight.detach()
    assert rec.steps == [1]
    assert rec.history["0.weight"][0] == pytest.approx(((after - before).std() / after.std()).item())


def test_update_ratios_of_an_ensemble_are_per_member_and_match_each_member_alone():
    seeds, data = [3, 4], toy_split()
    ens = ensemble.stack([mlp(s) for s in seeds])
    rec = UpdateRatios(ens, members=2)
    ensemble.fit(ens, data, lr=0.1, seeds=seeds, steps=3, batch_size=16, after_step=lambda s, loss: rec(s, ens),
                 progress=False)
    assert len(rec.names) == 3 and rec.history[rec.names[0]][0].shape == (2,)
    for k, seed in enumerate(seeds):
        alone = mlp(seed)
        own = UpdateRatios(alone)
        train(alone, data, steps=3, lr=0.1, batch_size=16, seed=seed, callback=own, progress=False)
        got = [float(r[k]) for r in rec.history[rec.names[0]]]
        np.testing.assert_allclose(got, own.history["0.weight"], rtol=1e-4)


def test_update_ratios_reject_a_wrong_member_count():
    with pytest.raises(ValueError, match="members=3"):
        UpdateRatios(ensemble.stack([mlp(0), mlp(1)]), members=3)
