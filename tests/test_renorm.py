"""Batch renormalization (normlab.nn.BatchRenorm1d/2d) and its schedule: the properties Chapter 5 relies on."""

import copy
import math

import pytest
import torch
from torch import nn

from normlab import nn as nlnn

CASES = [(nlnn.BatchRenorm1d, nn.BatchNorm1d, (16, 5)), (nlnn.BatchRenorm1d, nn.BatchNorm1d, (6, 5, 3)),
         (nlnn.BatchRenorm2d, nn.BatchNorm2d, (4, 5, 3, 2))]
IDS = ["1d (N, C)", "1d (N, C, L)", "2d"]


def _pair(renorm_cls, bn_cls, C, **kwargs):
    """Return a renorm layer and a torch BN layer with the same random gamma, beta and running stats."""
    gen = torch.Generator().manual_seed(1)
    brn, bn = renorm_cls(C, dtype=torch.float64, **kwargs), bn_cls(C, dtype=torch.float64)
    with torch.no_grad():
        for layer in (brn, bn):
            layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            gen.manual_seed(1)  # the same draws for the second layer
    return brn, bn


@pytest.mark.parametrize("renorm_cls,bn_cls,shape", CASES, ids=IDS)
def test_same_parameters_buffers_and_state_dict_keys_as_torch(renorm_cls, bn_cls, shape):
    brn, bn = renorm_cls(shape[1]), bn_cls(shape[1])
    assert list(brn.state_dict()) == list(bn.state_dict())
    assert [n for n, _ in brn.named_parameters()] == [n for n, _ in bn.named_parameters()]
    bn.running_mean.fill_(0.5)
    brn.load_state_dict(bn.state_dict())  # loads in both directions
    bn.load_state_dict(brn.state_dict())
    assert torch.equal(brn.running_mean, bn.running_mean)


@pytest.mark.parametrize("renorm_cls,bn_cls,shape", CASES, ids=IDS)
def test_with_r_max_1_and_d_max_0_it_is_batch_norm_over_several_steps(renorm_cls, bn_cls, shape):
    brn, bn = _pair(renorm_cls, bn_cls, shape[1], r_max=1.0, d_max=0.0)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (step + 1) + step).requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        outs, grads = [], []
        for layer in (brn, bn):
            out = layer(x)
            g = torch.autograd.grad((out * dy).sum(), [x, layer.weight, layer.bias])
            outs.append(out)
            grads.append(g)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        for name, a, b in zip(("dx", "dgamma", "dbeta"), grads[0], grads[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"step {step}: {name}")
        torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
        assert brn.num_batches_tracked == bn.num_batches_tracked == step + 1


@pytest.mark.parametrize("renorm_cls,bn_cls,shape", CASES, ids=IDS)
def test_with_no_clipping_training_output_is_eval_output_with_pre_step_statistics(renorm_cls, bn_cls, shape):
    brn, _ = _pair(renorm_cls, bn_cls, shape[1], r_max=math.inf, d_max=math.inf)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    brn.eval()
    expected = brn(x)  # running statistics as they are before the training step
    brn.train()
    got = brn(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(brn.running_mean, torch.zeros_like(brn.running_mean))


def test_clipping_actually_changes_the_output():
    brn, bn = _pair(nlnn.BatchRenorm1d, nn.BatchNorm1d, 5, r_max=3.0, d_max=5.0)
    x = torch.randn(16, 5, dtype=torch.float64) * 3 + 2
    assert not torch.allclose(brn(x), bn(x))  # r, d != 1, 0 with these running statistics
    assert ((brn.last_r >= 1 / 3 - 1e-12) & (brn.last_r <= 3 + 1e-12)).all()
    assert (brn.last_d.abs() <= 5 + 1e-12).all()


def test_gradient_treats_r_and_d_as_constants():
    """The gradient equals that of BN's formula scaled by r and shifted by d with r, d fixed numbers."""
    brn, _ = _pair(nlnn.BatchRenorm1d, nn.BatchNorm1d, 5, r_max=10.0, d_max=10.0)  # limits that do not bind
    x = (torch.randn(16, 5, dtype=torch.float64) * 3 + 2).requires_grad_()
    dy = torch.randn(16, 5, dtype=torch.float64)
    rm, rv = brn.running_mean.clone(), brn.running_var.clone()
    (dx,) = torch.autograd.grad((brn(x) * dy).sum(), x)
    # The same computation where r and d are plain tensors computed outside autograd.
    x2 = x.detach().clone().requires_grad_()
    var, mu = torch.var_mean(x2, 0, correction=0)
    sigma_b = torch.sqrt(var + brn.eps)
    sigma = torch.sqrt(rv + brn.eps)
    r = (sigma_b.detach() / sigma).clamp(0.1, 10.0)
    d = ((mu.detach() - rm) / sigma).clamp(-10.0, 10.0)
    assert not torch.allclose(r, torch.ones_like(r)) and not torch.allclose(d, torch.zeros_like(d))
    out = brn.weight.detach() * ((x2 - mu) / sigma_b * r + d) + brn.bias.detach()
    (dx2,) = torch.autograd.grad((out * dy).sum(), x2)
    torch.testing.assert_close(dx, dx2, rtol=1e-12, atol=1e-12)
    # If r carried gradient, dx would differ: the same formula without the detach.
    x3 = x.detach().clone().requires_grad_()
    var3, mu3 = torch.var_mean(x3, 0, correction=0)
    sb3 = torch.sqrt(var3 + brn.eps)
    r_live = (sb3 / sigma).clamp(0.1, 10.0)
    out3 = brn.weight.detach() * ((x3 - mu3) / sb3 * r_live + d) + brn.bias.detach()
    (dx3,) = torch.autograd.grad((out3 * dy).sum(), x3)
    assert not torch.allclose(dx, dx3)


@pytest.mark.parametrize("renorm_cls,bn_cls,shape", CASES, ids=IDS)
def test_eval_mode_is_batch_norm_eval(renorm_cls, bn_cls, shape):
    brn, bn = _pair(renorm_cls, bn_cls, shape[1])
    brn.eval(), bn.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(brn(x), bn(x), rtol=1e-12, atol=1e-12)


def test_r_max_and_d_max_are_attributes_a_loop_may_change():
    brn = nlnn.BatchRenorm1d(3)
    brn.r_max, brn.d_max = math.inf, math.inf
    brn(torch.randn(4, 3))
    assert brn.r_max == math.inf and "r_max=inf" in repr(brn)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="r_max"):
        nlnn.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        nlnn.BatchRenorm1d(3, d_max=-1.0)
    brn = nlnn.BatchRenorm2d(3)
    with pytest.raises(ValueError, match="r_max"):
        brn.r_max = 0.9
    with pytest.raises(RuntimeError, match="channels"):  # BatchNorm's (torch's) type for this mistake
        brn(torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="channels"):
        brn.eval()(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4D"):
        brn(torch.randn(2, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        nlnn.BatchRenorm1d(3)(torch.randn(1, 3))


def test_float32_and_half_precision_inputs_keep_their_dtype():
    x = torch.randn(8, 4)
    assert nlnn.BatchRenorm1d(4)(x).dtype == torch.float32
    assert nlnn.BatchRenorm1d(4)(x.bfloat16()).dtype == torch.bfloat16


def test_schedule_is_bn_then_linear_then_the_targets():
    s = nlnn.renorm_schedule
    assert s(0, 10, 20, 3.0, 5.0) == (1.0, 0.0)
    assert s(9, 10, 20, 3.0, 5.0) == (1.0, 0.0)
    assert s(10, 10, 20, 3.0, 5.0) == (1.0, 0.0)
    assert s(20, 10, 20, 3.0, 5.0) == pytest.approx((2.0, 2.5))
    assert s(30, 10, 20, 3.0, 5.0) == (3.0, 5.0)
    assert s(10_000, 10, 20, 3.0, 5.0) == (3.0, 5.0)
    assert s(5, 0, 0, 3.0, 5.0) == (3.0, 5.0)
    assert s(11, 10, 20, math.inf, math.inf) == (math.inf, math.inf)
    assert s(10, 10, 20, math.inf, math.inf) == (1.0, 0.0)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="step"):
        nlnn.renorm_schedule(-1, 10, 20)
    with pytest.raises(ValueError, match="relax_steps"):
        nlnn.renorm_schedule(1, 10, 2.5)
    with pytest.raises(ValueError, match="r_max"):
        nlnn.renorm_schedule(1, 10, 20, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        nlnn.renorm_schedule(1, 10, 20, d_max=-0.1)


@pytest.mark.parametrize("cls,shape", [(nlnn.BatchRenorm1d, (12, 5)), (nlnn.BatchRenorm2d, (8, 3, 4, 2))])
def test_virtual_batches_renormalize_each_group_as_a_batch_of_its_own(cls, shape):
    """Groups of virtual_batch_size: each output (and gradient) is that of a layer that saw only its
    group, with the same pre-step running statistics; the running statistics take the groups' average."""
    v = 4 if shape[0] == 12 else 2
    torch.manual_seed(0)
    ghost = cls(shape[1], r_max=1.5, d_max=0.5, virtual_batch_size=v).double()
    with torch.no_grad():
        ghost.running_mean.uniform_(-1, 1), ghost.running_var.uniform_(0.5, 2)
        ghost.weight.uniform_(0.5, 1.5), ghost.bias.uniform_(-1, 1)
    alone = [copy.deepcopy(ghost) for _ in range(shape[0] // v)]
    for m in alone:
        m.virtual_batch_size = None
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    out = ghost(x)
    (dx,) = torch.autograd.grad((out * dy).sum(), x)
    xs, dys = x.detach().split(v), dy.split(v)
    outs, dxs = [], []
    for m, xg, dyg in zip(alone, xs, dys):
        xg = xg.clone().requires_grad_()
        o = m(xg)
        outs.append(o.detach())
        dxs.append(torch.autograd.grad((o * dyg).sum(), xg)[0])
    torch.testing.assert_close(out.detach(), torch.cat(outs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, torch.cat(dxs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_mean, torch.stack([m.running_mean for m in alone]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([m.running_var for m in alone]).mean(0))
    assert ghost.last_r.shape == (shape[0] // v, shape[1])
    torch.testing.assert_close(ghost.last_r, torch.stack([m.last_r for m in alone]))
    assert "virtual_batch_size=" in repr(ghost)


def test_virtual_batches_no_smaller_than_the_batch_are_the_plain_layer():
    torch.manual_seed(1)
    a = nlnn.BatchRenorm1d(5, r_max=2.0, d_max=1.0)
    b = copy.deepcopy(a)
    b.virtual_batch_size = 16
    x = torch.randn(16, 5) * 3
    for _ in range(3):
        torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)
    assert a.last_r.shape == b.last_r.shape == (5,)


def test_virtual_batches_must_divide_the_batch():
    with pytest.raises(ValueError, match="multiple of 4"):
        nlnn.BatchRenorm1d(3, virtual_batch_size=4)(torch.randn(10, 3))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            nlnn.BatchRenorm1d(3, virtual_batch_size=bad)
