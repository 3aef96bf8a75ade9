"""The ensemble trainer: K models as one, each member exactly the model it would be alone."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import blob_split
from normlab import nn as normlab_nn
from normlab import precise_bn
from normlab.experiments import regularization as rg
from normlab.runtime import ensemble
from normlab.runtime.data import Split
from normlab.runtime.train import train

SEEDS = [3, 5, 8]


@pytest.fixture(scope="module")
def blobs():
    return blob_split(classes=4, features=10, n=200, n_train=160)


def _mlp(norm, seed, **kw):
    return rg.make_mlp(10, 4, width=12, norm=norm, seed=seed, virtual_batch_size=8 if norm == "ghost" else None, **kw)


def _assert_same_model(a, b, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key].float(), sb[key].float(), atol=atol, rtol=1e-4, msg=key)


def test_stack_then_member_gives_back_each_model():
    models = [_mlp("bn", s) for s in SEEDS]
    ens = ensemble.stack(models)
    assert ens.members == 3
    for k, m in enumerate(models):
        _assert_same_model(ensemble.member(ens, k), m, atol=0)


def _assert_members_train_as_alone(make, seeds, data, atol=1e-5, **kw):
    """Train make(seed) alone per seed and the stacked ensemble of them; compare member by member."""
    alone = [make(s) for s in seeds]
    ens = ensemble.stack([make(s) for s in seeds])
    for m, s in zip(alone, seeds):
        train(m, data, seed=s, progress=False, **kw)
    ensemble.fit(ens, data, seeds=seeds, progress=False, **kw)
    for k, m in enumerate(alone):
        _assert_same_model(ensemble.member(ens, k), m, atol=atol)
    return ens


@pytest.mark.parametrize("norm", ["bn", "ghost", "none"])
def test_each_member_trains_exactly_as_it_would_alone(blobs, norm):
    _assert_members_train_as_alone(lambda s: _mlp(norm, s), SEEDS, blobs, steps=25, lr=0.05, batch_size=32)


def test_population_norm_members_match_the_chapter_fit(blobs):
    alone = [rg.fit(_mlp("population", s), blobs, steps=12, batch_size=40, lr=0.05, seed=s) for s in SEEDS]
    ens = ensemble.stack([_mlp("population", s) for s in SEEDS])
    ensemble.fit(ens, blobs, steps=12, batch_size=40, lr=0.05, seeds=SEEDS, progress=False)
    for k, m in enumerate(alone):
        _assert_same_model(ensemble.member(ens, k), m)


def test_normlab_batch_norm_and_renorm_fold_into_channels(blobs):
    def model(seed, norm):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 12), norm(12), nn.ReLU(), nn.Linear(12, 4))

    for norm in (normlab_nn.BatchNorm1d, lambda c: normlab_nn.BatchRenorm1d(c, r_max=1.5, d_max=0.5)):
        _assert_members_train_as_alone(lambda s, norm=norm: model(s, norm), SEEDS, blobs, steps=15, lr=0.05,
                                       batch_size=16)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_lstm_members_train_with_adam_as_alone(blobs, norm):
    seqs = Split(blobs.x_train.reshape(-1, 5, 2), blobs.y_train, blobs.x_test.reshape(-1, 5, 2), blobs.y_test)

    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(normlab_nn.LastHidden(2, 6, norm, max_steps=5), nn.Linear(6, 4))

    ens = _assert_members_train_as_alone(model, SEEDS, seqs, atol=1e-4, steps=12, lr=0.01, batch_size=16,
                                         optimizer="adam")
    assert isinstance(ens[0], ensemble.LSTM) and ens(seqs.x_test).shape == (3, len(seqs.x_test), 4)
    got = ensemble.accuracy(ens, seqs.x_test, seqs.y_test)
    for k in range(3):
        m = ensemble.member(ens, k).eval()
        assert got[k] == pytest.approx((m(seqs.x_test).argmax(1) == seqs.y_test).double().mean().item())
    if norm == "batch":  # batch statistics of test batches, and the running ones left as they were
        before = {k: v.clone() for k, v in ens.state_dict().items()}
        from normlab.runtime.train import accuracy

        two = ensemble.batch_accuracy(ens, seqs.x_test, seqs.y_test, 2)
        for k in range(3):
            want = accuracy(ensemble.member(ens, k), seqs.x_test, seqs.y_test, batch_size=2, train_mode=True)
            assert two[k] == pytest.approx(want)
        for key, value in ens.state_dict().items():
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_convolutional_members_train_as_alone(blobs, norm):
    """Stacked Conv1d layers (im2col), a circular-padded one and Unflatten (vmapped), between folded BN or GroupNorm."""
    def model(seed):
        torch.manual_seed(seed)
        layer = {"bn": lambda: nn.BatchNorm1d(6), "gn": lambda: nn.GroupNorm(2, 6), "ln": lambda: nn.GroupNorm(1, 6)}
        return nn.Sequential(nn.Unflatten(1, (1, 10)), nn.Conv1d(1, 6, 3, bias=False), layer[norm](), nn.ReLU(),
                             nn.Conv1d(6, 6, 3, stride=2, padding=1),
                             nn.Conv1d(6, 6, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(24, 4))

    ens = _assert_members_train_as_alone(model, SEEDS, blobs, steps=15, lr=0.05, batch_size=16)
    assert [type(layer).__name__ for layer in ens][:6] == ["PerExample", "Conv", type(ens[2]).__name__, "ReLU",
                                                            "Conv", "Vmapped"]
    assert ens(blobs.x_test).shape == (3, len(blobs.x_test), 4)
    for k in range(3):  # member k of the ensemble computes what member(ens, k) computes
        torch.testing.assert_close(ens(blobs.x_test)[k], ensemble.member(ens, k).eval()(blobs.x_test),
                                   atol=1e-5, rtol=1e-4)


def test_images_go_in_with_their_channel_axis(blobs):
    images = Split(blobs.x_train[:, :9].reshape(-1, 1, 3, 3), blobs.y_train, blobs.x_test[:, :9].reshape(-1, 1, 3, 3),
                   blobs.y_test)

    def model(seed):  # 2-D convolutions run as one grouped convolution: strides, padding, a 3x2 kernel
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 5, (3, 2), stride=(2, 1), padding=(1, 0), bias=False), nn.Flatten(),
                             nn.Linear(20, 4))

    ens = _assert_members_train_as_alone(model, SEEDS, images, steps=10, lr=0.05, batch_size=16)
    assert ens.example_dims == 3 and ens(images.x_test).shape == (3, len(images.x_test), 4)
    assert isinstance(ens[3], ensemble.Conv) and ens[3].kernel_size == (3, 2)
    for k in range(3):
        torch.testing.assert_close(ens(images.x_test)[k], ensemble.member(ens, k).eval()(images.x_test),
                                   atol=1e-5, rtol=1e-4)


def test_accuracy_takes_one_set_for_all_members_or_one_set_each(blobs):
    models = [rg.fit(_mlp("bn", s), blobs, steps=20, batch_size=32, lr=0.05, seed=s) for s in SEEDS]
    ens = ensemble.stack(models)
    x, y = blobs.x_test, blobs.y_test
    shared = ensemble.accuracy(ens, x, y, batch_size=7)
    for k, m in enumerate(models):
        assert shared[k] == pytest.approx((m.eval()(x).argmax(1) == y).double().mean().item())
    parts = [slice(0, 20), slice(10, 30), slice(20, 40)]  # member k on its own examples
    own = ensemble.accuracy(ens, torch.stack([x[p] for p in parts]), torch.stack([y[p] for p in parts]), batch_size=6)
    for k, (m, p) in enumerate(zip(models, parts)):
        assert own[k] == pytest.approx((m(x[p]).argmax(1) == y[p]).double().mean().item())
    with pytest.raises(ValueError, match="do not match"):
        ensemble.accuracy(ens, x, y[:5])


def test_eval_mode_passes_run_in_chunks_with_the_numbers_of_one_pass(blobs, monkeypatch):
    """Eval mode: each example on its own, so chunks of EVAL_CHUNK give one pass's logits and accuracy."""
    models = [rg.fit(_mlp("bn", s), blobs, steps=20, batch_size=32, lr=0.05, seed=s) for s in SEEDS]
    ens = ensemble.stack(models).eval()
    x, y = blobs.x_test, blobs.y_test
    with torch.no_grad():
        whole = ens(x)  # (K, N, C), one pass
    monkeypatch.setattr(ensemble, "EVAL_CHUNK", 7)  # len(x) is not a multiple: a short last chunk
    seen = []
    ens.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    torch.testing.assert_close(ensemble.eval_logits(ens, x), whole, atol=1e-6, rtol=1e-5)
    assert seen == [7] * (len(x) // 7) + [len(x) % 7]
    one_pass = (whole.argmax(-1) == y).double().mean(1).numpy()
    np.testing.assert_array_equal(ensemble.accuracy(ens, x, y), one_pass)
    single = ensemble.member(ens, 0).eval()  # one model: examples on axis 0
    torch.testing.assert_close(ensemble.eval_logits(single, x), whole[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        ensemble.eval_logits(ens.train(), x)


def test_pooling_runs_per_example(blobs):
    images = Split(blobs.x_train[:, :9].reshape(-1, 1, 3, 3), blobs.y_train, blobs.x_test[:, :9].reshape(-1, 1, 3, 3),
                   blobs.y_test)

    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
                             nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

    ens = _assert_members_train_as_alone(model, SEEDS, images, steps=10, lr=0.05, batch_size=16)
    assert isinstance(ens[2], ensemble.PerExample) and isinstance(ens[4], ensemble.PerExample)


def test_evaluate_gives_each_members_numbers(blobs):
    models = [rg.fit(_mlp("bn", s), blobs, steps=20, batch_size=32, lr=0.05, seed=s) for s in SEEDS]
    got = ensemble.evaluate(ensemble.stack(models), blobs)
    for k, m in enumerate(models):
        want = rg.evaluate(m, blobs)
        for key, value in want.items():
            assert got[key][k] == pytest.approx(value, abs=1e-5), key


def test_precise_bn_on_the_ensemble_is_precise_bn_per_member(blobs):
    models = [_mlp("bn", s) for s in SEEDS]
    ens = ensemble.stack(models)
    precise_bn(ens, [blobs.x_train[:80], blobs.x_train[80:]])
    for k, m in enumerate(models):
        precise_bn(m, [blobs.x_train[:80], blobs.x_train[80:]])
        _assert_same_model(ensemble.member(ens, k), m)


def test_a_diverged_member_leaves_the_others_alone(blobs):
    ens = ensemble.stack([_mlp("bn", s) for s in SEEDS])
    clean = ensemble.stack([_mlp("bn", s) for s in SEEDS])
    with torch.no_grad():
        ens[0].weight[1].fill_(float("nan"))  # member 1 is broken from the start
    loss = ensemble.fit(ens, blobs, steps=10, lr=0.05, batch_size=32, seeds=SEEDS, progress=False)
    ref = ensemble.fit(clean, blobs, steps=10, lr=0.05, batch_size=32, seeds=SEEDS, progress=False)
    assert np.isnan(loss[1]).all()
    np.testing.assert_allclose(loss[[0, 2]], ref[[0, 2]], rtol=1e-5)


def test_dropout_masks_differ_between_members(blobs):
    ens = ensemble.stack([_mlp("none", 0, dropout=0.5) for _ in range(2)])  # identical members
    ens.train()
    out = ens(blobs.x_train[:50])
    assert not torch.allclose(out[0], out[1])


def test_errors_say_what_is_wrong(blobs):
    with pytest.raises(ValueError, match="at least one model"):
        ensemble.stack([])
    with pytest.raises(ValueError, match="layer 0 differs"):
        ensemble.stack([nn.Sequential(nn.Linear(10, 4)), nn.Sequential(nn.ReLU())])
    with pytest.raises(ValueError, match="sizes differ"):
        ensemble.stack([nn.Sequential(nn.Conv1d(1, 2, 3)), nn.Sequential(nn.Conv1d(1, 2, 5))])
    ens = ensemble.stack([_mlp("bn", s) for s in SEEDS])
    with pytest.raises(ValueError, match="one seed per member"):
        ensemble.fit(ens, blobs, steps=2, lr=0.1, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"expected input \(3, N, \.\.\.\)"):
        ens(torch.zeros(2, 5, 10))
    with pytest.raises(IndexError, match="out of range"):
        ensemble.member(ens, 3)
    with pytest.raises(ValueError, match="optimizer must be"):
        ensemble.fit(ens, blobs, steps=2, lr=0.1, seeds=SEEDS, optimizer="rmsprop")
    with pytest.raises(ValueError, match="Adam takes one"):
        ensemble.fit(ens, blobs, steps=2, lr=[0.1, 0.2, 0.3], seeds=SEEDS, optimizer="adam")
    lstms = [nn.Sequential(normlab_nn.LastHidden(2, 6, norm)) for norm in ("layer", "layer")]
    lstms[1][0].lstm.cell.momentum = 0.5
    with pytest.raises(ValueError, match="LSTM cells differ"):
        ensemble.stack(lstms)


def test_members_of_different_norms_at_one_depth_train_as_alone(blobs):
    def model(seed, norm):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 12), norm(), nn.ReLU(), nn.Linear(12, 4))

    norms = [lambda: normlab_nn.BatchNorm1d(12), lambda: nn.LayerNorm(12), lambda: nn.GroupNorm(4, 12),
             lambda: nn.GroupNorm(4, 12), nn.Identity]
    ens = _assert_members_train_as_alone(lambda s: model(s, norms[s]), list(range(len(norms))), blobs, steps=15,
                                         lr=0.05, batch_size=16)
    assert isinstance(ens[1], ensemble.Grouped) and ens[1].sizes == [1, 1, 2, 1]


def test_per_member_learning_rates_and_given_batches(blobs):
    lrs = [0.01, 0.05, 0.2]
    alone = [_mlp("bn", s) for s in SEEDS]
    for m, s, lr in zip(alone, SEEDS, lrs):
        train(m, blobs, steps=10, lr=lr, batch_size=16, momentum=0.0, seed=s, progress=False)
    ens = ensemble.stack([_mlp("bn", s) for s in SEEDS])
    draw = ensemble.member_batches(SEEDS, len(blobs.x_train), 16)
    seen = []
    ensemble.fit(ens, blobs, lr=lrs, momentum=0.0, batches=[next(draw) for _ in range(10)],
                 before_step=seen.append, progress=False)
    assert seen == list(range(1, 11))
    for k, m in enumerate(alone):
        _assert_same_model(ensemble.member(ens, k), m)


def test_batch_accuracy_is_train_mode_accuracy_and_changes_nothing(blobs):
    from normlab.runtime.train import accuracy

    models = [rg.fit(_mlp("bn", s), blobs, steps=20, batch_size=32, lr=0.05, seed=s) for s in SEEDS]
    ens = ensemble.stack(models)
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    got = ensemble.batch_accuracy(ens, blobs.x_test, blobs.y_test, 8)
    for k, m in enumerate(models):
        assert got[k] == pytest.approx(accuracy(m, blobs.x_test, blobs.y_test, batch_size=8, train_mode=True))
    for key, value in ens.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_one_norm_type_with_different_settings_stacks_as_separate_groups(blobs):
    """Ghost batch norm and renorm with different virtual batch sizes at one depth: each member keeps
    its own (the stacked layer must not take the first model's setting for all)."""
    def model(seed, norm):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 12), norm(), nn.ReLU(), nn.Linear(12, 4))

    norms = [lambda: normlab_nn.GhostBatchNorm1d(12, virtual_batch_size=4),
             lambda: normlab_nn.GhostBatchNorm1d(12, virtual_batch_size=8),
             lambda: normlab_nn.BatchRenorm1d(12, r_max=1.5, d_max=0.5, virtual_batch_size=4),
             lambda: normlab_nn.BatchRenorm1d(12, r_max=1.5, d_max=0.5, virtual_batch_size=16)]
    ens = _assert_members_train_as_alone(lambda s: model(s, norms[s]), list(range(len(norms))), blobs, steps=15,
                                         lr=0.05, batch_size=16)
    assert isinstance(ens[1], ensemble.Grouped) and ens[1].sizes == [1, 1, 1, 1]
