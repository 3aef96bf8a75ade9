"""Chapter 9's experiments and self-checks: fast versions of what the lab asserts."""

import numpy as np
import pytest
import torch

from conftest import DEVICES
from normlab import checks
from normlab.distributed import launch, merge_moments
from normlab.experiments import distributed as ed
from normlab.runtime.data import load_digits


@pytest.fixture(scope="module")
def digits():
    data = load_digits(seed=0)
    data.x_train, data.y_train = data.x_train[:200], data.y_train[:200]
    return data


@pytest.fixture(scope="module")
def trained(digits):
    return launch(ed.train_worker, 2, digits, [5], 2, 50, timeout=120)


def test_sync_bn_under_ddp_is_single_process_training_on_the_global_batch(digits, trained):
    sync = [r[(5, "sync")] for r in trained]
    idx = sync[0]["first_batch"]
    single = ed.grad_single(digits, 5, idx)
    for r in sync:
        torch.testing.assert_close(r["first_grad"], single, rtol=1e-9, atol=1e-12)
    reference = ed.train_single(digits, 5, 4, 50)
    loss = (sync[0]["loss"] + sync[1]["loss"]) / 2  # the global batch's loss: the mean of the halves
    assert abs(loss - reference["loss"]).max() < 1e-8
    assert sync[0]["acc"] == sync[1]["acc"] == reference["acc"]


def test_per_device_bn_is_gradient_accumulation_over_the_slices(digits, trained):
    local = [r[(5, "local")] for r in trained]
    idx = local[0]["first_batch"]
    accumulated = ed.grad_accumulated(digits, 5, idx, k=2)
    torch.testing.assert_close(local[0]["first_grad"], accumulated, rtol=1e-9, atol=1e-12)
    single = ed.grad_single(digits, 5, idx)
    assert (accumulated - single).norm() / single.norm() > 1e-3  # and not the global batch's gradient


def test_per_device_bn_trains_as_one_process_with_bn_per_group(digits):
    # at 8 per device: the whole run agrees to rounding (at 2 per device BN is chaotic; the lab shows it)
    runs = launch(ed.train_worker, 2, digits, [5], 8, 60, timeout=120)
    loss = (runs[0][(5, "local")]["loss"] + runs[1][(5, "local")]["loss"]) / 2
    ghost = ed.train_single(digits, 5, 16, 60, ghost=8)
    assert abs(loss - ghost["loss"]).max() < 1e-12


def test_per_device_sweep_members_train_as_single_runs(digits):
    sweep = ed.per_device_sweep(digits, [5, 6], [4, 8], world=2, steps=40, progress=False)
    assert list(sweep) == [4, 8] and sweep[4]["local"].shape == (2,)
    for b in (4, 8):
        for k, s in enumerate([5, 6]):  # float32 ensemble against float64 runs alone
            alone = ed.train_single(digits, s, 2 * b, 40, ghost=b)["acc"]
            assert abs(sweep[b]["local"][k] - alone) <= 0.01
            assert abs(sweep[b]["sync"][k] - ed.train_single(digits, s, 2 * b, 40)["acc"]) <= 0.01
    with pytest.raises(ValueError, match="per_device_sizes"):
        ed.per_device_sweep(digits, [5], [1], world=2, steps=5)


def test_running_statistics_identical_with_sync_and_apart_without(trained):
    for a, b in zip(trained[0][(5, "sync")]["bn"], trained[1][(5, "sync")]["bn"]):
        assert torch.equal(a, b)
    for a, b in zip(trained[0][(5, "local")]["bn"], trained[1][(5, "local")]["bn"]):
        assert (a - b).abs().max() > 1e-3


def test_frozen_statistics_make_accumulation_exact(digits):
    idx = torch.arange(16)
    from normlab.stats import precise_bn

    model = ed.make_model(digits.num_features, digits.num_classes, 1)
    x, y = digits.x_train[idx].double(), digits.y_train[idx]
    precise_bn(model, [x])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(ed.grad_accumulated(digits, 1, idx, k=4, frozen=True), full, rtol=1e-9, atol=1e-12)


def test_resnet50_layout_matches_torchvision_counts():
    channels = ed.resnet50_bn_channels()
    assert len(channels) == 53 and sum(channels) == 26560
    assert ed.resnet50_num_parameters() == 25_557_032


def test_sync_traffic_counts():
    t = ed.sync_traffic([4, 8], 1000, world=3)
    assert t["forward_values"] == 9 + 17 and t["backward_values"] == 24 and t["collectives"] == 4
    assert t["forward_received"] == 2 * 26 and t["ratio"] == pytest.approx(50 / 1000)
    with pytest.raises(ValueError, match="channels"):
        ed.sync_traffic([], 10, 2)
    with pytest.raises(ValueError, match="world"):
        ed.sync_traffic([4], 10, 0)


def test_budget_and_seeds():
    assert ed.budget("quick")["world"] >= 2
    assert ed.seeds_for(2, 3) == [200, 201, 202]
    with pytest.raises(ValueError, match="scale"):
        ed.budget("huge")


# ---- self-checks: pass a correct solution, catch a wrong one ----------------------------------


def good_merge(counts, means, m2s):
    count, mean, m2 = merge_moments(counts, means, m2s)
    return mean, m2 / count


def mean_of_means(counts, means, m2s):  # forgets to weight by the counts
    live = counts > 0
    return means[live].mean(0), (m2s.sum(0) / counts.sum())


def test_check_merge_moments_passes_a_correct_merge(capsys):
    checks.check_merge_moments(good_merge)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [mean_of_means])
def test_check_merge_moments_catches_a_wrong_merge(wrong):
    with pytest.raises(AssertionError, match="merge, ranks holding"):
        checks.check_merge_moments(wrong)


def good_backward(dy, x_hat, invstd, weight, sum_dy, sum_dy_xhat, n):
    shape = (1, -1) + (1,) * (dy.dim() - 2)
    return (weight * invstd / n).view(shape) * (n * dy - sum_dy.view(shape) - x_hat * sum_dy_xhat.view(shape))


def local_backward(dy, x_hat, invstd, weight, sum_dy, sum_dy_xhat, n):  # the rank's own sums and count
    dims = [0] + list(range(2, dy.dim()))
    n_local = dy.numel() // dy.shape[1]
    return good_backward(dy, x_hat, invstd, weight, dy.sum(dims), (dy * x_hat).sum(dims), n_local)


def test_check_sync_backward_passes_a_correct_backward(capsys):
    checks.check_sync_backward(good_backward)
    assert "PASS" in capsys.readouterr().out


def test_check_sync_backward_catches_local_sums():
    with pytest.raises(AssertionError, match="sync backward"):
        checks.check_sync_backward(local_backward)


@pytest.mark.parametrize("device", DEVICES)
def test_experiments_run_on_the_given_device(digits, device, device_spy):
    run = ed.train_single(digits, 5, 4, 5, device=device)
    assert all(v.device.type == device.type for v in run["state"].values())
    np.testing.assert_allclose(run["loss"], ed.train_single(digits, 5, 4, 5)["loss"], rtol=1e-9, atol=1e-12)
    sweep = ed.per_device_sweep(digits, [5, 6], [2], world=2, steps=3, progress=False, device=device)
    assert sweep[2]["sync"].shape == (2,)
    idx = torch.arange(8)
    single = ed.grad_single(digits, 5, idx, device=device)
    accumulated = ed.grad_accumulated(digits, 5, idx, 2, device=device)
    assert single.device.type == accumulated.device.type == "cpu"  # to compare with the DDP workers'
    torch.testing.assert_close(single, ed.grad_single(digits, 5, idx), rtol=1e-9, atol=1e-12)
    assert device_spy.moved(device)
