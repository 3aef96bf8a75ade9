"""normlab.nn.SyncBatchNorm and normlab.distributed.launch, checked in real gloo process groups.

Parity: on every rank, SyncBatchNorm's output and input gradient equal those of torch.nn.BatchNorm
applied to the concatenated global batch (float64, 1e-10); the weight and bias gradients summed over
ranks equal the global ones; the running statistics are the global ones, on every rank. Each
launch runs many cases in one process group, since starting processes is the slow part.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from normlab import nn as normlab_nn
from normlab.distributed import DistributedError, launch, merge_moments

TOL = dict(rtol=1e-10, atol=1e-10)

# (name, per-rank batch sizes, trailing shape (C, *), layer options); per world size.
CASES = {
    2: [
        ("equal, 2-d", [8, 8], (5,), {}),
        ("equal, 4-d", [3, 3], (4, 3, 5), {}),
        ("unequal, 2-d", [7, 2], (3,), {}),
        ("unequal, 3-d", [2, 5], (3, 4), {}),
        ("one example on a rank", [1, 6], (4,), {}),
        ("no example on a rank", [0, 5], (3,), {}),
        ("momentum None", [4, 6], (3,), {"momentum": None}),
        ("no affine", [4, 4], (3, 2, 2), {"affine": False}),
        ("no running stats", [5, 3], (3,), {"track_running_stats": False}),
    ],
    3: [
        ("equal, 2-d", [4, 4, 4], (6,), {}),
        ("unequal, 4-d", [1, 4, 2], (3, 2, 3), {}),
        ("unequal, 5-d", [2, 1, 3], (2, 2, 2, 3), {}),
    ],
}


def _global_batch(case_id, sizes, trailing):
    """The same global batch, upstream gradient and parameters on every rank (and in the test)."""
    gen = torch.Generator().manual_seed(1000 + case_id)
    n = sum(sizes)
    C = trailing[0]
    x = torch.randn((2, n, *trailing), generator=gen, dtype=torch.float64) * 3 + 1  # two steps
    g = torch.randn((2, n, *trailing), generator=gen, dtype=torch.float64)
    weight = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=gen, dtype=torch.float64)
    return x, g, weight, bias


def _two_steps(layer, x, g):
    """Run two training steps; return per step (out, grad_input, grad_weight, grad_bias)."""
    steps = []
    for t in range(2):
        xt = x[t].clone().requires_grad_(True)
        out = layer(xt)
        (out * g[t]).sum().backward()
        grads = [None if p is None else p.grad.clone() for p in (layer.weight, layer.bias)]
        layer.zero_grad(set_to_none=True)
        steps.append((out.detach(), xt.grad, *grads))
    return steps


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def parity_worker(rank, world_size, cases):
    """Every case: this rank's slice through SyncBatchNorm for two steps, then an eval pass."""
    results = []
    for case_id, (_name, sizes, trailing, opts) in enumerate(cases):
        x, g, weight, bias = _global_batch(case_id, sizes, trailing)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        layer = normlab_nn.SyncBatchNorm(trailing[0], dtype=torch.float64, **opts)
        if layer.affine:
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
        steps = _two_steps(layer, x[:, lo:hi], g[:, lo:hi])
        layer.eval()
        with torch.no_grad():
            eval_out = layer(x[1, lo:hi])
        results.append({"steps": steps, "state": _state(layer), "eval": eval_out})
    return results


def _reference(case_id, sizes, trailing, opts):
    x, g, weight, bias = _global_batch(case_id, sizes, trailing)
    kind = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[len(trailing)]
    ref = kind(trailing[0], dtype=torch.float64, **opts)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(weight)
            ref.bias.copy_(bias)
    steps = _two_steps(ref, x, g)
    ref.eval()
    with torch.no_grad():
        eval_out = ref(x[1])
    return {"steps": steps, "state": _state(ref), "eval": eval_out}


def suite_worker(rank, world_size, cases, seed):
    """All the multi-process checks of one world size, in one process group (starting one is slow)."""
    out = {"parity": parity_worker(rank, world_size, cases), "pid": (rank, world_size, os.getpid(), dist.get_backend())}
    if world_size == 2:
        out["ddp"] = ddp_worker(rank, world_size, seed)
    if world_size == 3:
        out["group"] = group_worker(rank, world_size)
    return out


@pytest.fixture(scope="module")
def suites():
    return {world: launch(suite_worker, world, CASES[world], 3, timeout=90) for world in (2, 3)}


@pytest.fixture(params=[2, 3], ids=["world 2", "world 3"])
def parity(request, suites):
    world = request.param
    return world, CASES[world], [r["parity"] for r in suites[world]]


def test_sync_bn_equals_batch_norm_on_the_global_batch(parity):
    world, cases, results = parity
    for case_id, case in enumerate(cases):
        name, sizes, _, opts = case
        ref = _reference(case_id, *case[1:])
        for t in range(2):
            out, gx, gw, gb = ref["steps"][t]
            got = [r[case_id]["steps"][t] for r in results]  # per rank
            where = f"world {world}, {name}, step {t}"
            torch.testing.assert_close(torch.cat([s[0] for s in got]), out, **TOL, msg=f"{where}: output")
            torch.testing.assert_close(torch.cat([s[1] for s in got]), gx, **TOL, msg=f"{where}: input grad")
            if gw is not None:
                torch.testing.assert_close(sum(s[2] for s in got), gw, **TOL, msg=f"{where}: weight grad")
                torch.testing.assert_close(sum(s[3] for s in got), gb, **TOL, msg=f"{where}: bias grad")
        for rank, r in enumerate(results):
            assert r[case_id]["state"].keys() == ref["state"].keys(), name
            for key, value in ref["state"].items():  # running stats: global, and on every rank
                torch.testing.assert_close(r[case_id]["state"][key], value, **TOL, msg=f"{name}, rank {rank}: {key}")
        eval_out = torch.cat([r[case_id]["eval"] for r in results])
        if opts.get("track_running_stats", True):
            torch.testing.assert_close(eval_out, ref["eval"], **TOL, msg=f"{name}: eval output")
        else:  # no running statistics: eval mode uses each rank's own batch, unsynchronized, as torch's
            x, _, w, b = _global_batch(case_id, sizes, case[2])
            local = torch.cat([nn.functional.batch_norm(part, None, None, w if opts.get("affine", True) else None,
                                                        b if opts.get("affine", True) else None, training=True)
                               if len(part) else part for part in x[1].split(sizes)])
            torch.testing.assert_close(eval_out, local, **TOL, msg=f"{name}: eval output")


def test_running_statistics_are_bitwise_identical_on_every_rank(parity):
    _, cases, results = parity
    for case_id, (name, *_rest) in enumerate(cases):
        for key, value in results[0][case_id]["state"].items():
            for r in results[1:]:
                assert torch.equal(r[case_id]["state"][key], value), f"{name}: {key}"


def ddp_worker(rank, world_size, seed):
    """One DDP step of Linear -> SyncBatchNorm -> ReLU -> Linear; return the averaged gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    model = normlab_nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = DDP(model)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4 * world_size, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4 * world_size,), generator=gen)
    part = slice(4 * rank, 4 * rank + 4)
    nn.functional.cross_entropy(ddp(x[part]), y[part]).backward()  # local mean; DDP averages the grads
    return [p.grad.clone() for p in model.parameters()]


def test_ddp_gradients_equal_single_process_gradients_on_the_global_batch(suites):
    seed, world = 3, 2
    grads = [r["ddp"] for r in suites[world]]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4 * world, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4 * world,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    for rank_grads in grads:
        for got, p in zip(rank_grads, model.parameters()):
            torch.testing.assert_close(got, p.grad, **TOL)


def group_worker(rank, world_size):
    """Ranks {0, 1} synchronize with each other; rank 2 is a group of one (a world of one: plain BatchNorm)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2])]  # every rank creates every group
    layer = normlab_nn.SyncBatchNorm(3, process_group=groups[0 if rank < 2 else 1], dtype=torch.float64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank), dtype=torch.float64) + rank
    layer(x)
    return layer.running_mean.clone()


def test_process_group_limits_the_synchronization_to_its_ranks(suites):
    means = [r["group"] for r in suites[3]]
    xs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(r), dtype=torch.float64) + r for r in range(3)]
    torch.testing.assert_close(means[0], 0.1 * torch.cat(xs[:2]).mean(0), **TOL)
    torch.testing.assert_close(means[1], means[0], **TOL)
    torch.testing.assert_close(means[2], 0.1 * xs[2].mean(0), **TOL)  # a group of one is BatchNorm


# ---- outside a process group: exactly BatchNorm --------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3), (3, 4, 2, 5), (2, 4, 2, 2, 3)])
def test_without_a_process_group_it_is_batch_norm(shape):
    assert not dist.is_initialized()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    ref, ours = kind(4, dtype=torch.float64), normlab_nn.SyncBatchNorm(4, dtype=torch.float64)
    for mode in (True, False):
        ref.train(mode), ours.train(mode)
        x.grad = None
        ours(x).pow(2).sum().backward()
        gx = x.grad.clone()
        x.grad = None
        ref(x).pow(2).sum().backward()
        torch.testing.assert_close(gx, x.grad, **TOL)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, **TOL)


def test_state_dict_keys_match_torch():
    ours, ref = normlab_nn.SyncBatchNorm(5), nn.SyncBatchNorm(5)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())


def test_bad_input_raises():
    with pytest.raises(ValueError, match="at least 2D"):
        normlab_nn.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="num_features"):
        normlab_nn.SyncBatchNorm(0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        normlab_nn.SyncBatchNorm(3)(torch.randn(1, 3))


# ---- convert_sync_batchnorm --------------------------------------------------------------------


def _convnet():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), normlab_nn.BatchNorm2d(4, momentum=None)),
        nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5, affine=False), normlab_nn.GhostBatchNorm1d(5, 2),
    ).double()


def test_convert_replaces_every_batch_norm_and_keeps_parameters_and_buffers():
    torch.manual_seed(0)
    model = _convnet()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    model(x)  # running statistics that are not the initial ones
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    converted = normlab_nn.SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = [type(m).__name__ for m in converted.modules() if "Norm" in type(m).__name__]
    assert kinds == ["SyncBatchNorm", "SyncBatchNorm", "SyncBatchNorm", "GhostBatchNorm1d"]
    assert converted[1].weight is weight  # the same Parameter: an optimizer built before still sees it
    assert not converted[1].training and converted[3][1].momentum is None and not converted[6].affine
    assert converted.state_dict().keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_convert_round_trip_outputs_equal_the_original_model():
    torch.manual_seed(1)
    model = _convnet()
    reference = _convnet()
    reference.load_state_dict(model.state_dict())
    converted = normlab_nn.SyncBatchNorm.convert_sync_batchnorm(model)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), reference(x), **TOL)
    assert isinstance(normlab_nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3)), normlab_nn.SyncBatchNorm)
    back = _convnet()
    back.load_state_dict(converted.state_dict())  # and the state dict loads back into BatchNorm layers
    torch.testing.assert_close(back(x), reference(x), **TOL)


# ---- merge_moments -----------------------------------------------------------------------------


def test_merge_moments_equals_the_moments_of_the_union():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 4, generator=gen, dtype=torch.float64) * 5 + 100 for n in (3, 1, 0, 7)]
    counts = torch.tensor([len(p) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64)
                       for p in parts])
    count, mean, m2 = merge_moments(counts, means, m2s)
    union = torch.cat(parts)
    assert count == len(union)
    torch.testing.assert_close(mean, union.mean(0), **TOL)
    torch.testing.assert_close(m2, ((union - union.mean(0)) ** 2).sum(0), **TOL)
    with pytest.raises(ValueError, match="empty"):
        merge_moments(torch.zeros(2), means[:2], m2s[:2])
    with pytest.raises(ValueError, match="expected counts"):
        merge_moments(counts, means, m2s[:2])


# ---- launch ------------------------------------------------------------------------------------


def raising_worker(rank, world_size):
    if rank == 1:
        raise ArithmeticError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 would wait here for ever without the launcher
    return rank


def sleeping_worker(rank, world_size):
    time.sleep(60 if rank == 1 else 0)
    return rank


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_returns_results_in_rank_order_and_leaves_no_process(suites):
    for world, results in suites.items():
        pids = [r["pid"] for r in results]
        assert [p[:2] for p in pids] == [(r, world) for r in range(world)]
        assert {p[3] for p in pids} == {"gloo"}
        assert all(_gone(p[2]) for p in pids)


def test_a_raising_rank_stops_the_launch_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedError, match="(?s)rank 1 of 2 raised.*ArithmeticError: rank 1 fails on purpose"):
        launch(raising_worker, 2, timeout=60)
    assert time.monotonic() - start < 30  # not the 60 s collective timeout


def test_a_stuck_rank_times_out_and_is_killed():
    import multiprocessing

    start = time.monotonic()
    with pytest.raises(DistributedError, match="timed out"):
        launch(sleeping_worker, 2, timeout=3)
    assert time.monotonic() - start < 20
    assert not multiprocessing.active_children()


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        launch(raising_worker, 0)
    with pytest.raises(ValueError, match="importable"):
        launch(lambda rank, world: None, 2)
    with pytest.raises(ValueError, match="timeout"):
        launch(raising_worker, 2, timeout=-1)
