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


# lab_normfree: the residual network, its ensemble, AGC per member, De & Smith's prediction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(by.METHODS))
def test_the_stacked_resnets_compute_each_member_as_its_own_model(method):
    models = [by.make_resnet(64, 10, method=method, blocks=3, width=16, seed=s) for s in (0, 1, 2)]
    ens = by.stack_resnets(models).train()
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    out = ens(x).detach()
    for k, m in enumerate(models):
        ref = m.train()(x).detach()
        torch.testing.assert_close(out[k], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_every_method_has_the_same_layout_and_the_depth_it_names():
    for method in by.METHODS:
        net = by.make_resnet(64, 10, method=method, blocks=5, width=16)
        n_weights = sum(isinstance(m, nn.Linear) for m in net.modules())
        assert n_weights == 2 * 5 + 2, method
    with pytest.raises(ValueError, match="method"):
        by.make_resnet(64, 10, method="layernorm")


def test_skipinit_and_fixup_start_every_block_as_the_identity():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for method in ("skipinit", "fixup"):
        net = by.make_resnet(64, 10, method=method, blocks=4, width=16, seed=3)
        h = net.stem(x)
        for block in net.blocks:
            torch.testing.assert_close(block(h), h)
    fixup = by.make_resnet(64, 10, method="fixup", blocks=4, width=16, seed=3)
    assert float(fixup.head[-1].weight.detach().abs().max()) == 0.0  # Fixup's classifier starts at zero
    inner = fixup.blocks[0].branch[3].weight  # the branch's first layer: He's scale times L^(-1/2)
    assert abs(float(inner.detach().std()) / (math.sqrt(2 / 16) * 4**-0.5) - 1) < 0.25


def test_nf_blocks_divide_by_the_expected_std_and_scale_by_alpha():
    net = by.make_resnet(64, 10, method="nf", blocks=4, width=16)
    assert [round(b.beta**2, 6) for b in net.blocks] == [round(1 + i * by.NF_ALPHA**2, 6) for i in range(4)]
    assert all(b.scale == by.NF_ALPHA for b in net.blocks)


def test_clip_members_clips_each_member_as_agc_clips_its_model_alone():
    from normlab.normfree import adaptive_grad_clip_

    models = [by.make_resnet(64, 10, method="nf", blocks=2, width=8, seed=s) for s in (0, 1)]
    ens = by.stack_resnets(models).train()
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(3))
    (ens(x) * 50).logsumexp(-1).sum().backward()  # large gradients: many units get clipped
    by.clip_members_(ens, clipping=0.01)
    clipped = False
    for k, m in enumerate(models):
        (m.train()(x) * 50).logsumexp(-1).sum().backward()
        before = [p.grad.clone() for p in m.parameters()]
        adaptive_grad_clip_([p for name, p in m.named_parameters() if not name.startswith("head")], 0.01)
        clipped |= any(not torch.equal(b, p.grad) for b, p in zip(before, m.parameters()))
        member = ensemble_member_grads(ens, k)
        torch.testing.assert_close(member["stem.weight"], m.stem.weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(member["branch.weight"], m.blocks[1].branch[3].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(member["branch.gain"], m.blocks[1].branch[3].gain.grad, rtol=1e-4, atol=1e-7)
    assert clipped  # the case clips something, so the comparison means something
    del y


def ensemble_member_grads(ens, k):
    """Member k's gradients of the stem's weight and of block 1's second linear layer, in nn.Linear's layout."""
    branch = ens[2].branch[3]  # block 1 (ens[0] is the stem): ReLU, layer, ReLU, layer
    return {"stem.weight": ens[0].weight.grad[k].T, "branch.weight": branch.weight.grad[k].T,
            "branch.gain": branch.gain.grad[k, 0]}


def test_bn_share_follows_the_mean_square_that_each_block_adds():
    share = by.bn_share(2.0, 3)
    np.testing.assert_allclose(share, [1 / 3, 1 / 4, 1 / 5])
    assert by.bn_share(np.array([1.0, 2.0]), 2).shape == (2, 2)


def test_a_bn_resnet_at_initialization_follows_de_and_smiths_prediction(digits):
    r = by.residual_signal(digits, ["bn", "none", "skipinit"], [0, 1], blocks=6, width=32)
    bn = r["bn"]
    ratio = np.median(bn["share"] / by.bn_share(bn["skip"][:, 0], 6), axis=0)
    assert np.all(abs(ratio - 1) < 0.3)
    assert abs(np.median(r["none"]["share"]) - 0.5) < 0.1  # He init without BN: g = 2 per block, half each
    assert np.all(r["skipinit"]["share"] == 0)
    np.testing.assert_allclose(r["skipinit"]["skip"], r["skipinit"]["skip"][:, :1].repeat(7, 1), rtol=1e-6)


def test_fit_resnets_returns_one_result_per_rate_and_seed(digits):
    r = by.fit_resnets(digits, "nf", [0, 1], lrs=[0.05, 0.1], blocks=2, width=8, steps=5, progress=False)
    assert r["test_acc"].shape == r["train_loss"].shape == (2, 2)
    assert np.all(np.isfinite(r["train_loss"]))


def test_check_bn_share_and_check_agc_pass_the_references_and_catch_mistakes(capsys):
    checks.check_bn_share(by.bn_share)
    checks.check_agc(reference_agc)
    assert capsys.readouterr().out.count("PASS") == 2
    with pytest.raises(AssertionError):
        checks.check_bn_share(lambda q0, blocks: 1.0 / (q0 + np.arange(blocks)))  # off by one block
    with pytest.raises(AssertionError):
        checks.check_agc(lambda w, g, c, eps: g * torch.clamp(c * w.norm() / g.norm(), max=1.0))  # whole layer


def reference_agc(weight, grad, clipping, eps):
    w_norm = weight.norm(dim=1, keepdim=True).clamp_min(eps)
    g_norm = grad.norm(dim=1, keepdim=True)
    limit = clipping * w_norm
    return torch.where(g_norm > limit, grad * limit / g_norm.clamp_min(1e-6), grad)


# lab_transformer: the tiny transformer, its norms and placements, stacked
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows():
    from normlab.experiments.alternatives import as_sequences

    return as_sequences(load_digits(seed=0))


@pytest.mark.parametrize("norm", list(by.TOKEN_NORMS))
@pytest.mark.parametrize("place", by.PLACES)
def test_the_stacked_transformer_computes_each_member_as_its_own_model(norm, place):
    models = [by.TinyTransformer(8, 8, 10, norm=norm, place=place, width=16, layers=2, seed=s) for s in (0, 1, 2)]
    ens = by.StackedTransformer(models)
    x = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = ens(x)
        for k, m in enumerate(models):
            torch.testing.assert_close(out[k], m(x), rtol=1e-5, atol=1e-6)


def test_rms_norm_is_torchs_and_layer_norm_without_the_mean():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(5)) + 2.0
    ours = by.RMSNorm(16)
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        torch.testing.assert_close(ours(x), nn.RMSNorm(16, eps=1e-5)(x))
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(by.RMSNorm(16)(centred), nn.LayerNorm(16)(x), rtol=1e-4, atol=1e-5)


def test_post_ln_blocks_end_normalized_and_pre_ln_blocks_do_not():
    x = 3 * torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(6)) + 1
    post = by.TransformerBlock(16, 2, "ln", "post")
    pre = by.TransformerBlock(16, 2, "ln", "pre")
    with torch.no_grad():
        y = post(x)
        torch.testing.assert_close(y.mean(-1), torch.zeros(4, 6), atol=1e-5, rtol=0)
        assert float(pre(x).std(-1).mean()) > 2  # the residual stream keeps the input's scale
    with pytest.raises(ValueError, match="place"):
        by.TransformerBlock(16, 2, "ln", "middle")
    with pytest.raises(ValueError, match="kind"):
        by.make_token_norm("bn", 16)


def test_init_gradients_gives_one_norm_per_block_and_seed(rows):
    g = by.init_gradients(rows, [("ln", "pre"), ("dyt", "post")], [0, 1], layers=3)
    assert set(g) == {("ln", "pre"), ("dyt", "post")}
    assert all(v.shape == (2, 3) and np.all(v >= 0) for v in g.values())


def test_fit_transformers_trains_every_seed_on_its_own_batches(rows):
    r = by.fit_transformers(rows, [("rms", "pre")], [0, 1], steps=5, lr=3e-3, layers=1, width=16, progress=False)
    res = r[("rms", "pre")]
    assert res["test_acc"].shape == (2,) and res["loss"].shape == (2, 5)
    assert not np.allclose(res["loss"][0], res["loss"][1])  # different seeds, different batches


def test_check_block_placement_and_check_dyt_catch_mistakes(capsys):
    with pytest.raises(AssertionError):  # every block treated as pre-LN
        checks.check_block_placement(lambda x, b: x + b.attn(b.norm1(x)) + b.mlp(b.norm2(x + b.attn(b.norm1(x)))))
    with pytest.raises(AssertionError):  # alpha left out
        checks.check_dyt(lambda x, a, w, b: w * torch.tanh(x) + b)


def test_frn_cnns_stack_into_an_ensemble_whose_members_are_the_models():
    from normlab.experiments.alternatives import DigitCNN
    from normlab.normfree import FilterResponseNorm2d
    from normlab.runtime import ensemble

    models = []
    for s in (0, 1, 2):
        torch.manual_seed(s)
        models.append(DigitCNN("frn"))
        with torch.no_grad():  # move tau and the affine off their initial values
            for m in models[-1].modules():
                if isinstance(m, FilterResponseNorm2d):
                    m.tau.uniform_(-0.5, 0.5)
                    m.weight.uniform_(0.5, 1.5)
    assert not any(isinstance(m, nn.ReLU) for m in models[0])  # FRN's threshold replaces the ReLU
    ens = ensemble.stack(models)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = ens(x)
        for k, m in enumerate(models):
            torch.testing.assert_close(out[k], m(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ensemble.member(ens, k)(x), m(x), rtol=1e-5, atol=1e-6)


def test_weight_standardized_layers_stack_with_their_standardization():
    """WSLinear and WSConv2d subclass torch's layers: stacked as those they would lose the standardization."""
    from normlab.experiments.alternatives import DigitCNN
    from normlab.normfree import ScaledWSLinear, WSConv2d, WSLinear
    from normlab.runtime import ensemble

    models = []
    for s in (0, 1):
        torch.manual_seed(s)
        models.append(DigitCNN("ws_gn"))
    assert isinstance(models[0][0], WSConv2d)
    ens = ensemble.stack(models)
    assert isinstance(ens[0], ensemble.StandardizedConv)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for k, m in enumerate(models):
            torch.testing.assert_close(ens(x)[k], m(x), rtol=1e-5, atol=1e-6)
            back = ensemble.member(ens, k)
            assert isinstance(back[0], WSConv2d)
            torch.testing.assert_close(back(x), m(x), rtol=1e-5, atol=1e-6)
    for cls in (WSLinear, ScaledWSLinear):
        mlps = []
        for s in (0, 1):
            torch.manual_seed(s)
            mlps.append(nn.Sequential(cls(6, 5), nn.ReLU(), nn.Linear(5, 3)))
        ens = ensemble.stack(mlps)
        x = torch.randn(7, 6, generator=torch.Generator().manual_seed(10))
        with torch.no_grad():
            for k, m in enumerate(mlps):
                torch.testing.assert_close(ens(x)[k], m(x), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(ensemble.member(ens, k)(x), m(x), rtol=1e-5, atol=1e-6)
                assert type(ensemble.member(ens, k)[0]) is cls
