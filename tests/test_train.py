"""normlab.runtime.train: a reproducible loop that learns, and an accuracy that can run in either mode."""

import pytest
import torch
from torch import nn

from normlab import nn as nl
from normlab.runtime import data
from normlab.runtime.train import accuracy, train


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32, bias=False), nl.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def test_training_learns_the_digits(digits):
    history = train(mlp(), digits, steps=150, lr=0.1, seed=0, eval_every=50, progress=False)
    assert history.eval_step == [50, 100, 150]
    assert len(history.train_loss) == 150
    assert history.final_test_acc > 0.9
    assert history.train_loss[-1] < history.train_loss[0]


def test_the_same_seed_gives_the_same_run(digits):
    a = train(mlp(), digits, steps=20, lr=0.1, seed=3, progress=False)
    b = train(mlp(), digits, steps=20, lr=0.1, seed=3, progress=False)
    c = train(mlp(), digits, steps=20, lr=0.1, seed=4, progress=False)
    assert a.train_loss == b.train_loss and a.train_loss != c.train_loss


def test_accuracy_in_train_mode_restores_the_running_statistics(digits):
    model = mlp()
    train(model, digits, steps=30, lr=0.1, progress=False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = accuracy(model, digits.x_test, digits.y_test, batch_size=4, train_mode=True)
    assert 0.0 <= acc <= 1.0 and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0, lr=0.1), "steps"),
        (dict(steps=5, lr=0.0), "lr"),
        (dict(steps=5, lr=0.1, batch_size=0), "batch_size"),
        (dict(steps=5, lr=0.1, optimizer="lbfgs"), "optimizer"),
        (dict(steps=5, lr=0.1, eval_every=0), "eval_every"),
    ],
)
def test_bad_arguments_raise_value_errors(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train(mlp(), digits, progress=False, **kwargs)


def test_callback_runs_after_every_step_and_training_mode_is_restored():
    from normlab.runtime.data import Split

    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.arange(40) % 2
    data = Split(x[:30], y[:30], x[30:], y[30:])
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    seen = []

    def callback(step, m):
        seen.append((step, m.training))
        m.eval()  # the loop must switch it back

    train(model, data, steps=4, lr=0.1, batch_size=8, progress=False, callback=callback)
    assert seen == [(1, True), (2, True), (3, True), (4, True)]
