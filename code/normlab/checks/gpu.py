"""Self-checks of "Batch norm on the GPU: fused Triton kernels" (``chapters/gpu``).

``lab.ipynb``: ``check_chan_merge``, ``check_channel_sums``, ``check_triton_sums``.
"""

from __future__ import annotations

import numpy as np

from normlab.checks._common import _pass, _raise_if_stub, _self_check, assert_close, assert_tuple_close, expect_tuple


@_self_check
def check_chan_merge(fn):
    """Check ``fn(a, b) -> (n, mean, M2)``: Chan's merge of two (n, mean, M2) summaries, float64.

    Cases: equal and unequal halves, a large offset, one side empty (n = 0), and a merge of many chunks.
    """
    rng = np.random.default_rng(4)

    def summary(x):
        if len(x) == 0:
            return (0.0, 0.0, 0.0)
        return (float(len(x)), float(x.mean()), float(((x - x.mean()) ** 2).sum()))

    cases = [("equal halves", rng.normal(2, 3, 100), 50), ("unequal parts", rng.normal(-1, 0.5, 37), 5),
             ("a large offset", 1e4 + rng.normal(size=64), 20), ("an empty first part", rng.normal(size=9), 0),
             ("an empty second part", rng.normal(size=9), 9)]
    for desc, x, k in cases:
        got = fn(summary(x[:k]), summary(x[k:]))
        expect_tuple(f"Chan merge, {desc}", got, ("n", "mean", "M2"))
        for name, g, e in zip(("n", "mean", "M2"), got, summary(x)):
            assert_close(f"Chan merge, {desc}: {name}", float(g), e, rtol=1e-9, atol=1e-9)
    x = rng.normal(5, 2, 1000)
    acc = (0.0, 0.0, 0.0)
    for part in np.array_split(x, 16):
        acc = fn(acc, summary(part))
    assert_close("Chan merge of 16 chunks, left to right: M2", float(acc[2]), summary(x)[2], rtol=1e-9)
    _pass("Chan merge", len(cases) + 1)


def _sums_case(shape, gen, channels_last=False):
    """x and dy of ``shape`` (float64, drawn from gen), x's per-channel mean and invstd, and the
    backward's two per-channel sums (sum dy, sum dy * x_hat) they give."""
    import torch

    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    invstd = torch.rsqrt(x.var(dims, correction=0) + 1e-5)
    cshape = (1, shape[1]) + (1,) * (x.dim() - 2)
    expected = (dy.sum(dims), (dy * (x - mean.view(cshape)) * invstd.view(cshape)).sum(dims))
    return x, dy, mean, invstd, expected


@_self_check
def check_channel_sums(fn):
    """Check ``fn(dy, x, mean, invstd) -> (sum_dy, sum_dy_xhat)``: the backward's two (C,) per-channel sums.

    x and dy are (N, C), (N, C, L) or (N, C, H, W) float64 tensors (one of them channels_last);
    x_hat = (x - mean) * invstd per channel, and both sums run over every axis but the channel axis.
    """
    import torch

    gen = torch.Generator().manual_seed(6)
    cases = [((8, 3), False), ((4, 2, 5), False), ((3, 4, 5, 6), False), ((2, 3, 7, 7), True), ((5, 1, 1, 1), False)]
    for shape, channels_last in cases:
        x, dy, mean, invstd, expected = _sums_case(shape, gen, channels_last)
        got = fn(dy.clone(), x.clone(), mean.clone(), invstd.clone())
        desc = f"x of shape {shape}" + (" (channels_last)" if channels_last else "")
        assert_tuple_close(f"channel sums, {desc}", got, [e.numpy() for e in expected], ("sum_dy", "sum_dy_xhat"),
                           rtol=1e-9, atol=1e-9)
    _pass("per-channel sums", len(cases))


@_self_check
def check_triton_sums(kernel):
    """Check a Triton kernel for the backward's two per-channel sums, one program per channel.

    The kernel's signature is ``(x_ptr, dy_ptr, mean_ptr, invstd_ptr, sum_dy_ptr, sum_dyxh_ptr, N,
    C, M, BLOCK)``; ``normlab.kernels.channel_sums`` launches it on float32 data of shapes (N, C),
    (N, C, L) and (N, C, H, W), some with more positions per channel than one block of 32, some with
    a partial last block, and compares with the float64 sums. Compiled on a CUDA GPU, interpreted
    without one. Without triton installed it says so and returns (the kernel is not marked passed).
    """
    import torch

    from normlab import kernels as K

    _raise_if_stub(kernel)
    if not K.available():
        print(f"SKIPPED the Triton kernel's check: triton is not installed ({K.INSTALL_HINT}).")
        return False
    device = "cuda" if torch.cuda.is_available() and not K.interpreted() else "cpu"
    gen = torch.Generator().manual_seed(8)
    shapes = [(8, 3), (4, 2, 5), (3, 4, 6, 6), (2, 3, 70), (5, 1, 1, 1), (1, 2, 64)]
    for shape in shapes:
        x, dy, mean, invstd, expected = _sums_case(shape, gen)
        args = (t.float().to(device) for t in (dy, x, mean, invstd))
        got = K.channel_sums(*args, kernel=kernel, block=32)
        for name, g, e in zip(("sum_dy", "sum_dy_xhat"), got, expected):
            assert_close(f"Triton channel sums, x of shape {shape}: {name}", g, e.numpy(), rtol=1e-5, atol=1e-4)
    _pass(f"Triton per-channel sums ({'compiled' if device == 'cuda' else 'interpreted'})", len(shapes))
