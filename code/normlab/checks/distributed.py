"""Self-checks of "Batch norm across devices" (``chapters/distributed``).

``lab.ipynb``: ``check_merge_moments``, ``check_sync_backward``.
"""

from __future__ import annotations

from normlab.checks._common import _pass, _self_check, assert_close


def _rank_slices(seed, sizes, C, trailing=()):
    """A float64 global batch (N, C, *trailing) with a large offset, and its split into per-rank slices."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((sum(sizes), C, *trailing), generator=gen, dtype=torch.float64) * 2 + 1000
    return x, list(x.split(sizes))


@_self_check
def check_merge_moments(fn):
    """Check ``fn(counts, means, m2s) -> (mean, var)``: per-rank (count, mean, M2) merged into the global ones.

    counts: (R,) float64 values per channel on each rank; means, m2s: (R, C). Expected: the mean and
    the biased variance (C,) of all ranks' values together. Cases include a rank with one example,
    an empty rank (count 0, mean and M2 zeros) and values around 1000 (a one-pass formula loses digits).
    """
    import torch

    cases = [[4, 4], [7, 1, 3], [5, 0, 2], [1, 1], [3, 9, 2, 6]]
    for i, sizes in enumerate(cases):
        x, parts = _rank_slices(i, sizes, 5, (2,))
        counts = torch.tensor([p.numel() / 5 for p in parts], dtype=torch.float64)
        zero = torch.zeros(5, dtype=torch.float64)
        means = torch.stack([p.transpose(0, 1).reshape(5, -1).mean(1) if len(p) else zero for p in parts])
        m2s = torch.stack([((p.transpose(0, 1).reshape(5, -1) - m.unsqueeze(1)) ** 2).sum(1) if len(p) else zero
                           for p, m in zip(parts, means)])
        got = fn(counts.clone(), means.clone(), m2s.clone())
        if got is None or len(got) != 2:
            raise AssertionError(f"merge, ranks of {sizes}: expected (mean, var), got {got!r}")
        var, mean = torch.var_mean(x.transpose(0, 1).reshape(5, -1), dim=1, correction=0)
        for name, g, e in (("mean", got[0], mean), ("biased variance", got[1], var)):
            g = g.detach().numpy() if isinstance(g, torch.Tensor) else g
            assert_close(f"merge, ranks holding {sizes} examples: {name}", g, e.numpy(), rtol=1e-9, atol=1e-9)
    _pass("merge of per-rank moments", len(cases))


@_self_check
def check_sync_backward(fn):
    """Check ``fn(dy, x_hat, invstd, weight, sum_dy, sum_dy_xhat, n) -> dx`` for one rank's slice.

    dy, x_hat: this rank's (N_r, C, *) slices; invstd, weight: (C,); sum_dy, sum_dy_xhat: (C,) sums
    over *all* ranks (what the backward's all-reduce returns); n: values per channel over all ranks.
    Expected: the rank's slice of the input gradient of BN over the whole batch (torch autograd).
    """
    import torch

    cases = [([4, 4], ()), ([5, 1, 2], ()), ([2, 3], (3, 2)), ([1, 6], (4,))]
    for i, (sizes, trailing) in enumerate(cases):
        C = 3
        x, _ = _rank_slices(10 + i, sizes, C, trailing)
        gen = torch.Generator().manual_seed(20 + i)
        weight = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        torch.nn.functional.batch_norm(xr, None, None, weight, None, training=True).backward(dy)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        invstd = torch.rsqrt(var + 1e-5)
        shape = (1, C) + (1,) * (x.dim() - 2)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        n = x.numel() // C
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * x_hat).sum(dims)
        lo = 0
        for rank, size in enumerate(sizes):
            part = slice(lo, lo + size)
            lo += size
            got = fn(dy[part].clone(), x_hat[part].clone(), invstd.clone(), weight.clone(), sum_dy.clone(),
                     sum_dy_xhat.clone(), n)
            if got is None:
                raise AssertionError(f"sync backward, ranks of {sizes}, rank {rank}: got None")
            got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
            assert_close(f"sync backward, ranks holding {sizes} examples of shape {(C, *trailing)}, rank {rank}: dx",
                         got, xr.grad[part].numpy(), rtol=1e-7, atol=1e-9)
    _pass("synchronized backward", len(cases))
