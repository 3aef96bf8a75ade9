"""normlab.setup: seeds, scale, device, the one printed line."""

import random

import numpy as np
import pytest
import torch

import normlab


@pytest.fixture(autouse=True)
def keep_threads():
    """setup() pins torch's threads at quick scale: give the rest of the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def draws():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_same_seed_gives_the_same_draws_and_another_seed_does_not():
    normlab.setup(seed=3, verbose=False)
    a = draws()
    normlab.setup(seed=3, verbose=False)
    assert draws() == a
    normlab.setup(seed=4, verbose=False)
    assert all(x != y for x, y in zip(draws(), a))


def test_reads_seed_and_scale_from_the_environment(monkeypatch):
    monkeypatch.setenv("NORMLAB_SEED", "7")
    monkeypatch.setenv("NORMLAB_SCALE", "full")
    ctx = normlab.setup(verbose=False)
    assert (ctx.seed, ctx.scale, ctx.quick) == (7, "full", False)


def test_defaults_are_seed_0_and_quick_scale(monkeypatch):
    monkeypatch.delenv("NORMLAB_SEED", raising=False)
    monkeypatch.delenv("NORMLAB_SCALE", raising=False)
    ctx = normlab.setup(verbose=False)
    assert (ctx.seed, ctx.scale, ctx.quick) == (0, "quick", True)
    assert ctx.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_prints_one_line_naming_device_scale_and_versions(capsys):
    normlab.setup(seed=1, scale="quick")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    for word in ("device=", "scale=quick", "seed=1", "torch " + torch.__version__, "numpy"):
        assert word in lines[0]


@pytest.mark.parametrize(
    "env, value, message",
    [
        ("NORMLAB_SEED", "abc", "NORMLAB_SEED='abc' is not an integer"),
        ("NORMLAB_SEED", "-1", "seed must be in"),
        ("NORMLAB_SCALE", "huge", "expected one of ('quick', 'full')"),
    ],
)
def test_bad_environment_values_raise_value_errors(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError) as err:
        normlab.setup(verbose=False)
    assert message in str(err.value)


def test_a_non_integer_seed_argument_is_rejected():
    with pytest.raises(ValueError, match="seed must be an int"):
        normlab.setup(seed=1.5, verbose=False)


def test_quick_scale_pins_torch_to_one_thread_and_full_scale_leaves_it(monkeypatch):
    torch.set_num_threads(2)
    normlab.setup(scale="full", verbose=False)
    assert torch.get_num_threads() == 2
    normlab.setup(scale="quick", verbose=False)
    assert torch.get_num_threads() == 1


def test_set_threads_sets_torch_threads_and_returns_nothing_to_display(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert normlab.set_threads(2) is None  # a lab's last line: no stray "Out[...]"
    assert torch.get_num_threads() == 2
    normlab.set_threads(1)
    assert torch.get_num_threads() == 1


def test_set_threads_never_exceeds_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    normlab.set_threads(2)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    normlab.set_threads(2)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_set_threads_rejects_a_count_that_is_not_a_positive_int(n):
    with pytest.raises(ValueError, match="positive int"):
        normlab.set_threads(n)
