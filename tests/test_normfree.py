"""normlab.normfree against the definitions in its papers, in float64 where numeric."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate
from torch import nn

from normlab import normfree as nf

TOL = dict(rtol=1e-10, atol=1e-12)  # float64
RELU_GAIN = math.sqrt(2 / (1 - 1 / math.pi))


def randn(*shape, seed=0, loc=0.0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc


def close(got, expected, **tol):
    torch.testing.assert_close(got, expected, **(tol or TOL))


# --------------------------------------------------------------------------------------------
# Weight standardization
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3), (6, 2, 5, 1)])
def test_standardized_weight_has_per_unit_mean_zero_and_variance_var_over_var_plus_eps(shape):
    w = randn(*shape, loc=0.3, scale=0.2)
    eps = 1e-5
    dims = tuple(range(1, len(shape)))
    var = w.var(dims, correction=0)
    w_hat = nf.standardize_weight(w, eps)
    assert w_hat.shape == w.shape
    close(w_hat.mean(dims), torch.zeros(shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    close(w_hat.var(dims, correction=0), var / (var + eps))


def test_standardize_weight_rejects_a_weight_of_one_dim():
    with pytest.raises(ValueError, match=r"weight has shape \(5,\), expected at least 2 dims"):
        nf.standardize_weight(randn(5))


def test_ws_linear_is_linear_with_the_standardized_weight():
    layer = nf.WSLinear(6, 4, dtype=torch.float64, eps=1e-4)
    x = randn(3, 6, seed=1)
    close(layer(x), F.linear(x, nf.standardize_weight(layer.weight.detach(), 1e-4), layer.bias.detach()))


@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2, padding=1, groups=2),
                                    dict(padding=1, padding_mode="reflect")])
def test_ws_conv2d_is_conv2d_with_the_standardized_weight(kwargs):
    layer = nf.WSConv2d(4, 6, 3, dtype=torch.float64, **kwargs)
    x = randn(2, 4, 7, 7, seed=1)
    ref = nn.Conv2d(4, 6, 3, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        ref.weight.copy_(nf.standardize_weight(layer.weight, layer.eps))
        ref.bias.copy_(layer.bias)
    close(layer(x), ref(x))


@pytest.mark.parametrize("make,x", [(lambda: nf.WSLinear(8, 3, eps=1e-14, dtype=torch.float64), randn(4, 8, seed=1)),
                                    (lambda: nf.WSConv2d(3, 2, 3, eps=1e-14, dtype=torch.float64),
                                     randn(2, 3, 5, 5, seed=1))])
def test_ws_layers_are_invariant_to_an_affine_change_of_a_units_weights(make, x):
    """W_i -> a W_i + b (a > 0) changes nothing; eps (tiny here) is what keeps it from being exact."""
    layer = make()
    before = layer(x).detach()
    with torch.no_grad():
        layer.weight[0].mul_(3.5).add_(-0.7)
        layer.weight[1].mul_(0.2).add_(2.0)
    close(layer(x), before, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [nf.WSLinear, nf.ScaledWSLinear])
def test_ws_layers_reject_a_non_positive_eps(cls):
    with pytest.raises(ValueError, match="eps must be a positive number, got 0"):
        cls(3, 2, eps=0)


# --------------------------------------------------------------------------------------------
# Nonlinearity gains and scaled weight standardization
# --------------------------------------------------------------------------------------------


def test_relu_gain_is_the_exact_formula():
    """Var[relu(z)] = E[relu(z)^2] - E[relu(z)]^2 = 1/2 - 1/(2 pi), so gamma = 1.71286 (not NFNets' 1.71396)."""
    assert abs(nf.nonlinearity_gain("relu") - RELU_GAIN) < 1e-10
    assert abs(nf.nonlinearity_gain("relu") ** -2 - (0.5 - 1 / (2 * math.pi))) < 1e-12
    assert abs(RELU_GAIN - 1.71286) < 1e-5


def test_quadrature_gain_of_a_relu_function_agrees_with_the_formula():
    assert abs(nf.nonlinearity_gain(lambda z: np.maximum(z, 0)) - RELU_GAIN) < 1e-10


def test_identity_gain_is_one():
    assert nf.nonlinearity_gain("identity") == 1.0
    assert abs(nf.nonlinearity_gain(lambda z: z) - 1.0) < 1e-12


@pytest.mark.parametrize("fn,gain", [(lambda z: 3 * z + 1, 1 / 3), (lambda z: z**2, 1 / math.sqrt(2))])
def test_quadrature_gain_of_a_polynomial_is_exact(fn, gain):
    """Var[3z + 1] = 9 and Var[z^2] = E[z^4] - 1 = 2."""
    assert abs(nf.nonlinearity_gain(fn) - gain) < 1e-12


def scipy_gain(fn):
    """1 / sqrt(Var[fn(z)]) by scipy's adaptive quadrature: a reference independent of normfree's."""
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = integrate.quad(lambda z: fn(z) * pdf(z), -np.inf, np.inf, epsabs=1e-13)[0]
    var = integrate.quad(lambda z: (fn(z) - mean) ** 2 * pdf(z), -np.inf, np.inf, epsabs=1e-13)[0]
    return 1 / math.sqrt(var)


@pytest.mark.parametrize("name,fn", [("tanh", math.tanh), ("gelu", lambda z: z * (1 + math.erf(z / math.sqrt(2))) / 2)])
def test_named_gains_match_an_independent_quadrature(name, fn):
    assert abs(nf.nonlinearity_gain(name) - scipy_gain(fn)) < 1e-8


def test_quadrature_gain_of_a_function_with_kinks_away_from_zero_matches_scipy():
    assert abs(nf.nonlinearity_gain(lambda z: np.clip(z, -1, 6)) - scipy_gain(lambda z: min(max(z, -1), 6))) < 1e-8


@pytest.mark.parametrize("fn,match", [("swish", "fn is 'swish', expected a function or one of"),
                                      (2.0, "fn is a float, expected a function"),
                                      (lambda z: np.ones_like(z), "fn.z. is constant"),
                                      (lambda z: np.full_like(z, np.nan), "expected a finite one"),
                                      (lambda z: z[:3], "fn returned shape")])
def test_nonlinearity_gain_rejects_what_has_no_gain(fn, match):
    with pytest.raises(ValueError, match=match):
        nf.nonlinearity_gain(fn)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3)])
def test_scaled_standardize_weight_is_the_formula(shape):
    w, gain = randn(*shape, loc=0.1), randn(shape[0], seed=1)
    dims = tuple(range(1, len(shape)))
    N = math.prod(shape[1:])
    mean, var = w.mean(dims, keepdim=True), w.var(dims, correction=0, keepdim=True)
    unit_gain = gain.reshape(-1, *[1] * len(dims))                         # (out, 1, ...)
    ref = 1.7 * unit_gain * (w - mean) / torch.sqrt(torch.clamp(N * var, min=1e-4))
    close(nf.scaled_standardize_weight(w, gain, gamma=1.7), ref)
    close(nf.scaled_standardize_weight(w, unit_gain, gamma=1.7), ref)
    close(nf.scaled_standardize_weight(w, None, gamma=1.7), ref / unit_gain)


def test_scaled_standardized_units_have_squared_norm_gamma_squared():
    """With torch's default init (var = 1 / (3N)), eps = 1e-4 on N * var changes nothing."""
    layer = nf.ScaledWSConv2d(64, 8, 3, gamma=1.5, dtype=torch.float64)
    w_hat = nf.scaled_standardize_weight(layer.weight.detach(), gamma=1.5)
    close(w_hat.pow(2).sum((1, 2, 3)), torch.full((8,), 1.5**2, dtype=torch.float64))


def test_eps_keeps_a_unit_of_equal_weights_finite():
    w = randn(3, 4)
    w[1] = 0.25
    assert torch.equal(nf.standardize_weight(w)[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(nf.scaled_standardize_weight(w)[1], torch.zeros(4, dtype=torch.float64))


def test_scaled_standardize_weight_rejects_a_gain_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"gain has shape \(3,\), expected \(5,\)"):
        nf.scaled_standardize_weight(randn(5, 4), randn(3))


def test_scaled_ws_linear_has_a_gain_of_ones_and_uses_the_scaled_weight():
    layer = nf.ScaledWSLinear(6, 4, gamma=2.0, dtype=torch.float64)
    assert isinstance(layer.gain, nn.Parameter) and layer.gain.dtype == torch.float64
    close(layer.gain.detach(), torch.ones(4, dtype=torch.float64))
    with torch.no_grad():
        layer.gain.copy_(randn(4, seed=2))
    x = randn(3, 6, seed=1)
    ref = F.linear(x, nf.scaled_standardize_weight(layer.weight, layer.gain, 2.0, 1e-4), layer.bias)
    close(layer(x), ref)
    layer.reset_parameters()
    close(layer.gain.detach(), torch.ones(4, dtype=torch.float64))


def test_scaled_ws_conv2d_is_conv2d_with_the_scaled_weight():
    layer = nf.ScaledWSConv2d(4, 6, 3, padding=1, groups=2, gamma=1.5, dtype=torch.float64)
    assert layer.gain.shape == (6,)
    x = randn(2, 4, 5, 5, seed=1)
    w = nf.scaled_standardize_weight(layer.weight, layer.gain, 1.5, 1e-4)
    close(layer(x), F.conv2d(x, w, layer.bias, padding=1, groups=2))


def test_scaled_ws_linear_after_relu_keeps_unit_variance():
    """relu then a layer with gamma = the relu gain: z ~ N(0, 1) in, variance 1 out (seeded, N = 20000)."""
    torch.manual_seed(0)
    layer = nf.ScaledWSLinear(256, 64, bias=False, gamma=nf.nonlinearity_gain("relu"), dtype=torch.float64)
    with torch.no_grad():
        out = layer(torch.relu(randn(20000, 256, seed=1)))
    assert abs(out.var().item() - 1) < 0.05
    assert abs(out.mean().item()) < 0.05  # the relu's mean is cancelled: each unit's weights sum to 0


# --------------------------------------------------------------------------------------------
# Adaptive gradient clipping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (5,), (4, 6), (3, 2, 3, 3)])
def test_unitwise_norm_matches_torch_linalg_norm(shape):
    x = randn(*shape)
    got = nf.unitwise_norm(x)
    if len(shape) <= 1:
        assert got.shape == ()
        close(got, torch.linalg.norm(x.reshape(-1)))
    else:
        assert got.shape == (shape[0],) + (1,) * (len(shape) - 1)
        close(got.reshape(-1), torch.linalg.norm(x.reshape(shape[0], -1), dim=1))


def param_with_grad(weight, grad):
    p = nn.Parameter(weight.clone())
    p.grad = grad.clone()
    return p


def test_agc_leaves_a_gradient_under_the_bound_untouched():
    w = randn(4, 6)
    g = 0.005 * w  # each row's norm is half of clipping * ||W_i||
    p = param_with_grad(w, g)
    nf.adaptive_grad_clip_([p], clipping=0.01)
    assert torch.equal(p.grad, g)


def test_agc_scales_each_unit_over_the_bound_to_clipping_times_its_weight_norm():
    w, g = randn(4, 6), randn(4, 6, seed=1)
    g[2] = 1e-4 * w[2]  # this row is under its bound and must stay as it is
    p = param_with_grad(w, g)
    nf.adaptive_grad_clip_(p, clipping=0.01)
    w_norm = torch.linalg.norm(w, dim=1)
    close(torch.linalg.norm(p.grad, dim=1)[[0, 1, 3]], 0.01 * w_norm[[0, 1, 3]])
    assert torch.equal(p.grad[2], g[2])
    # clipping rescales, never turns: each row keeps its direction
    close(p.grad / torch.linalg.norm(p.grad, dim=1, keepdim=True), g / torch.linalg.norm(g, dim=1, keepdim=True))


def test_agc_clips_a_bias_as_a_whole():
    b, g = randn(5), randn(5, seed=1)
    p = param_with_grad(b, g)
    nf.adaptive_grad_clip_(p, clipping=0.1)
    close(torch.linalg.norm(p.grad), 0.1 * torch.linalg.norm(b))
    close(p.grad / torch.linalg.norm(p.grad), g / torch.linalg.norm(g))


def test_agc_floors_a_zero_weights_norm_at_eps():
    p = param_with_grad(torch.zeros(3, 4, dtype=torch.float64), randn(3, 4))
    nf.adaptive_grad_clip_([p], clipping=0.01, eps=1e-3)
    close(torch.linalg.norm(p.grad, dim=1), torch.full((3,), 0.01 * 1e-3, dtype=torch.float64))


def test_agc_skips_parameters_without_a_gradient():
    frozen = nn.Parameter(randn(3, 4))
    p = param_with_grad(randn(3, 4), 100 * randn(3, 4, seed=1))
    nf.adaptive_grad_clip_(iter([frozen, p]))  # a generator, as model.parameters() gives
    assert frozen.grad is None
    close(torch.linalg.norm(p.grad, dim=1), 0.01 * torch.linalg.norm(p.detach(), dim=1))


@pytest.mark.parametrize("kwargs,name", [(dict(clipping=0), "clipping"), (dict(clipping=-0.1), "clipping"),
                                         (dict(clipping=True), "clipping"), (dict(eps=0.0), "eps"),
                                         (dict(eps="1e-3"), "eps")])
def test_agc_rejects_a_non_positive_clipping_or_eps(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive number"):
        nf.adaptive_grad_clip_([param_with_grad(randn(2, 2), randn(2, 2))], **kwargs)


# --------------------------------------------------------------------------------------------
# DyT and filter response normalization
# --------------------------------------------------------------------------------------------


def random_dyt(C):
    layer = nf.DyT(C, alpha_init=0.8).double()
    with torch.no_grad():
        layer.weight.copy_(randn(C, seed=5))
        layer.bias.copy_(randn(C, seed=6))
    return layer


def test_dyt_is_weight_times_tanh_of_alpha_x_plus_bias():
    layer = random_dyt(6)
    assert layer.alpha.shape == (1,) and layer.alpha.item() == pytest.approx(0.8, rel=1e-7)
    alpha, weight, bias = (p.detach() for p in (layer.alpha, layer.weight, layer.bias))
    x = randn(2, 3, 6, scale=3.0)
    close(layer(x), weight * torch.tanh(alpha * x) + bias)


def test_dyt_starts_as_tanh_of_alpha_x():
    x = randn(4, 5)
    close(nf.DyT(5).double()(x), torch.tanh(0.5 * x))


def test_dyt_passes_gradcheck():
    layer = random_dyt(4)
    x = randn(3, 4, scale=2.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a, w, b: torch.func.functional_call(
        layer, {"alpha": a, "weight": w, "bias": b}, (x,)), (x, *[p.detach().requires_grad_() for p in
                                                              (layer.alpha, layer.weight, layer.bias)]))


def test_dyt_rejects_an_input_whose_last_dim_is_not_num_features():
    with pytest.raises(ValueError, match=r"input has shape \(2, 5\), expected \(\*, 4\)"):
        nf.DyT(4)(torch.zeros(2, 5))


@pytest.mark.parametrize("args,name", [((0,), "num_features"), ((2.0,), "num_features"), ((4, "0.5"), "alpha_init")])
def test_dyt_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        nf.DyT(*args)


def random_frn(C):
    layer = nf.FilterResponseNorm2d(C).double()
    with torch.no_grad():
        layer.weight.copy_(randn(C, seed=5))
        layer.bias.copy_(randn(C, seed=6))
        layer.tau.copy_(randn(C, seed=7, scale=0.5))
    return layer


def frn_reference(x, weight, bias, tau, eps=1e-6):
    C = x.shape[1]
    nu2 = (x**2).mean(dim=(2, 3), keepdim=True)
    y = weight.view(1, C, 1, 1) * x / torch.sqrt(nu2 + eps) + bias.view(1, C, 1, 1)
    return torch.max(y, tau.view(1, C, 1, 1))


def test_frn_is_the_formula():
    layer = random_frn(3)
    x = randn(2, 3, 4, 5, loc=0.5, scale=2.0)
    close(layer(x), frn_reference(x, *(p.detach() for p in (layer.weight, layer.bias, layer.tau))))


def test_frn_is_the_same_in_train_and_eval_mode_and_for_a_batch_of_one():
    layer = random_frn(3)
    x = randn(4, 3, 5, 5)
    train = layer.train()(x)
    close(layer.eval()(x), train)
    close(layer(x[2:3]), train[2:3])


def test_frn_tlu_clamps_at_tau():
    layer = nf.FilterResponseNorm2d(2).double()
    with torch.no_grad():
        layer.tau.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    out = layer(randn(3, 2, 4, 4))
    assert out[:, 0].min().item() == 0.3 and out[:, 1].min().item() == -0.2
    assert (out[:, 1] == -0.2).any() and (out[:, 1] > -0.2).any()  # clamped where y < tau, y elsewhere


def test_frn_passes_gradcheck():
    layer = random_frn(2)
    x = randn(2, 2, 3, 3, scale=2.0).requires_grad_()
    params = [p.detach().requires_grad_() for p in (layer.weight, layer.bias, layer.tau)]
    assert torch.autograd.gradcheck(lambda x, w, b, t: torch.func.functional_call(
        layer, {"weight": w, "bias": b, "tau": t}, (x,)), (x, *params))


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 4, 3, 3)])
def test_frn_rejects_an_input_not_of_shape_n_c_h_w(shape):
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\)"):
        nf.FilterResponseNorm2d(3)(torch.zeros(shape))


# --------------------------------------------------------------------------------------------
# SkipInit and Fixup
# --------------------------------------------------------------------------------------------


def test_scale_zero_makes_a_residual_block_the_identity():
    branch = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5), nf.Scale(0.0)).double()
    x = randn(3, 5)
    close(x + branch(x), x, rtol=0, atol=0)
    (x + branch(x)).sum().backward()
    assert branch[3].scale.grad.abs().item() > 0  # and the scale learns from there


def test_scale_and_bias_multiply_and_add_their_scalar():
    x = randn(2, 3)
    close(nf.Scale(2.5).double()(x), 2.5 * x)
    close(nf.Bias(-1.5).double()(x), x - 1.5)
    assert nf.Bias().bias.shape == (1,) and nf.Bias().bias.item() == 0.0


@pytest.mark.parametrize("cls", [nf.Scale, nf.Bias])
def test_scale_and_bias_reject_a_non_number(cls):
    with pytest.raises(ValueError, match="init must be a finite number"):
        cls(True)


@pytest.mark.parametrize("L,m,expected", [(8, 2, 8**-0.5), (16, 3, 0.5), (1, 4, 1.0)])
def test_fixup_scale_is_l_to_the_minus_one_over_2m_minus_2(L, m, expected):
    assert nf.fixup_scale(L, m) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("args,match", [((8, 1), "layers_per_branch must be at least 2, got 1"),
                                        ((0, 2), "num_branches must be a positive int"),
                                        ((8, 2.0), "layers_per_branch must be a positive int")])
def test_fixup_scale_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        nf.fixup_scale(*args)


def test_fixup_init_zeroes_the_last_layer_and_scales_the_others_he_init():
    """Std of an inner layer: He's sqrt(2 / fan_in) times fixup_scale(L, m) (wide layers: 2% suffices)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 512))                    # m = 2
    conv = nn.Sequential(nf.Bias(), nn.Conv2d(32, 64, 4), nn.ReLU(), nn.Conv2d(64, 64, 3, bias=False),
                         nn.ReLU(), nn.Conv2d(64, 32, 3))                                          # m = 3
    nf.fixup_init_([mlp, conv], num_branches=8)
    for layer, fan_in, m in [(mlp[0], 512, 2), (conv[1], 32 * 4 * 4, 3), (conv[3], 64 * 3 * 3, 3)]:
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in) * nf.fixup_scale(8, m), rel=0.02)
    for last in (mlp[2], conv[5]):
        assert torch.count_nonzero(last.weight) == 0
    for layer in (mlp[0], mlp[2], conv[1], conv[5]):
        assert torch.count_nonzero(layer.bias) == 0
    assert conv[0].bias.item() == 0.0 and len(list(conv[0].parameters())) == 1  # the scalar Bias: no weight layer


def test_fixup_init_counts_the_branches_it_is_given_by_default():
    torch.manual_seed(0)
    branches = [nn.Sequential(nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 4)) for _ in range(4)]
    nf.fixup_init_(branches)
    std = torch.stack([b[0].weight for b in branches]).std().item()
    assert std == pytest.approx(math.sqrt(2 / 1024) * 4**-0.5, rel=0.02)


def test_fixup_init_rejects_a_branch_of_one_weight_layer_and_changes_nothing():
    good = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    before = good[1].weight.detach().clone()
    with pytest.raises(ValueError, match=r"branch 1 has 1 weight layer\(s\), expected at least 2"):
        nf.fixup_init_([good, nn.Sequential(nn.ReLU(), nn.Linear(3, 3))])
    assert torch.equal(good[1].weight, before)


@pytest.mark.parametrize("args,match", [(([],), "branches is empty"),
                                        (([nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))], 0), "num_branches")])
def test_fixup_init_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        nf.fixup_init_(*args)
