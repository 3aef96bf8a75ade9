"""normlab.kernels against torch.nn.functional.batch_norm: outputs, gradients, running statistics.

Without a CUDA GPU the kernels run in Triton's interpreter (slow): the shapes are small, and the
"small tiles" configuration forces several tiles per program, several programs per channel (the
split reduction and its merge) and several channel groups, as large inputs get on a GPU.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from normlab import checks
from normlab import kernels as K  # before anything imports triton: it sets TRITON_INTERPRET without a GPU

if not K.available():
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(params=["default", "small_tiles"])
def config(request, monkeypatch):
    """Run a test with the default launch configuration and with tiny tiles and channel groups."""
    if request.param == "small_tiles":
        tile = 256 if "large_offset" in request.node.name else 32  # the 65,536-element test: fewer tiles
        monkeypatch.setattr(K, "CONFIG", K.KernelConfig(tile=tile, group_bytes=1, programs_per_sm=2))
    return request.param


def make(shape, dtype=torch.float32, channels_last=False, seed=0, offset=1.0):
    """Return (x, weight, bias, running_mean, running_var) on DEVICE; x has the given layout."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    rm = torch.randn(C, generator=gen, dtype=torch.float64)
    rv = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(DEVICE, dtype), w.to(DEVICE, stat), b.to(DEVICE, stat), rm.to(DEVICE, stat), rv.to(DEVICE, stat))


def run(fn, x, w, b, rm, rv, training, grad_seed=1, **kwargs):
    """Return (out, dx, dw, db, running_mean, running_var) after one forward and backward of fn."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm, rv = rm.clone(), rv.clone()
    out = fn(x, rm, rv, w, b, training=training, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    dy = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE, out.dtype)
    out.backward(dy)
    return out.detach(), x.grad, w.grad, b.grad, rm, rv


def reference(x, w, b, rm, rv, training, **kwargs):
    """F.batch_norm in float64 (half inputs upcast: the kernels compute in fp32, round only at the end)."""
    got = run(F.batch_norm, x.double(), w.double(), b.double(), rm.double(), rv.double(), training, **kwargs)
    return got


def assert_matches(got, expected, dtype):
    tol = TOL[dtype]
    names = ("out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")
    for name, g, e in zip(names, got, expected):
        # Gradients of half inputs round like the outputs; sums over many elements get a looser atol.
        scale = e.abs().max().item() + 1
        torch.testing.assert_close(g.double(), e.double(), rtol=tol, atol=tol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [
    (8, 1, 5, 5),  # C = 1
    (4, 3, 7, 7),  # C = 3, 7x7 (49 positions: no power of two)
    (16, 5, 1, 1),  # H*W = 1
    (3, 4, 13, 11),  # N*H*W = 429, not a multiple of any block
    (6, 4),  # (N, C)
    (5, 3, 9),  # (N, C, L)
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_training_matches_f_batch_norm(shape, config):
    x, w, b, rm, rv = make(shape)
    assert_matches(run(K.batch_norm, x, w, b, rm, rv, True), reference(x, w, b, rm, rv, True), torch.float32)


@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (16, 5, 1, 1), (2, 6, 3, 5)], ids=str)
def test_channels_last_training_matches_and_keeps_the_layout(shape, config):
    x, w, b, rm, rv = make(shape, channels_last=True)
    got = run(K.batch_norm, x, w, b, rm, rv, True)
    assert_matches(got, reference(x, w, b, rm, rv, True), torch.float32)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (6, 4)], ids=str)
def test_eval_matches_f_batch_norm_and_is_differentiable(shape, channels_last, config):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-D input")
    x, w, b, rm, rv = make(shape, channels_last=channels_last)
    got = run(K.batch_norm, x, w, b, rm, rv, False)
    assert_matches(got, reference(x, w, b, rm, rv, False), torch.float32)
    assert torch.equal(got[4], rm) and torch.equal(got[5], rv)  # eval leaves the running statistics alone


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_half_inputs_keep_fp32_statistics(dtype, training, channels_last):
    if not K.dtype_supported(dtype, DEVICE):
        pytest.skip(f"{dtype} needs compute capability 8.0+ (this GPU: {torch.cuda.get_device_capability()})")
    x, w, b, rm, rv = make((4, 3, 7, 7), dtype=dtype, channels_last=channels_last)
    got = run(K.batch_norm, x, w, b, rm, rv, training)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[4].dtype == torch.float32 and got[5].dtype == torch.float32
    assert_matches(got, reference(x, w, b, rm, rv, training), dtype)
    if training:  # statistics of the rounded input, accumulated in fp32: as exact as fp32 input
        exp = reference(x, w, b, rm, rv, True)
        torch.testing.assert_close(got[5].double(), exp[5], rtol=1e-5, atol=1e-6)


def test_float64_input_matches_to_round_off():
    x, w, b, rm, rv = make((4, 3, 5, 6), dtype=torch.float64)
    assert_matches(run(K.batch_norm, x, w, b, rm, rv, True), reference(x, w, b, rm, rv, True), torch.float64)


def test_without_weight_bias_or_running_statistics(config):
    x, *_ = make((5, 3, 4, 4))
    for kwargs in ({}, {"weight": None, "bias": torch.zeros(3, device=DEVICE)}):
        a = x.clone().requires_grad_()
        r = x.clone().double().requires_grad_()
        out = K.batch_norm(a, None, None, training=True, **kwargs)
        ref = F.batch_norm(r, None, None, training=True, **{k: v if v is None else v.double()
                                                            for k, v in kwargs.items()})
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
        out.pow(2).sum().backward()
        ref.pow(2).sum().backward()
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=2e-5, atol=2e-5)


def test_momentum_and_eps_follow_pytorch():
    x, w, b, rm, rv = make((6, 2, 3, 3))
    got = run(K.batch_norm, x, w, b, rm, rv, True, momentum=0.3, eps=1e-3)
    assert_matches(got, reference(x, w, b, rm, rv, True, momentum=0.3, eps=1e-3), torch.float32)


def test_frozen_bn_backpropagates_to_the_input_only():
    x, w, b, rm, rv = make((4, 3, 5, 5))
    x = x.requires_grad_()
    K.batch_norm(x, rm, rv, w, b, training=False).sum().backward()
    expected = (w * torch.rsqrt(rv + 1e-5)).view(1, 3, 1, 1).expand_as(x)  # d out / d x = w / sqrt(var + eps)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_strided_input_is_copied_then_normalized():
    x, w, b, rm, rv = make((4, 3, 8, 10))
    x = x[:, :, ::2, 1::3]  # neither NCHW nor channels_last
    assert K.layout_of(x)[0] is None
    out = K.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, w, b, training=True), rtol=2e-5, atol=2e-5)


def test_strided_weights_and_running_statistics_are_accepted_and_updated_in_place():
    """Views into larger buffers, which F.batch_norm accepts: same outputs, gradients, statistics."""
    x, w, b, rm, rv = make((4, 3, 5, 5))
    wide = lambda t: torch.stack([t, torch.full_like(t, 7.0)], 1)  # noqa: E731  (C, 2): column 0 is t
    for training in (True, False):
        got_w, got_b = (wide(t).requires_grad_() for t in (w, b))
        got_rm, got_rv = wide(rm), wide(rv)
        xa = x.clone().requires_grad_()
        out = K.batch_norm(xa, got_rm[:, 0], got_rv[:, 0], got_w[:, 0], got_b[:, 0], training=training)
        assert not got_rm[:, 0].is_contiguous() and not got_w[:, 0].is_contiguous()
        exp = reference(x, w, b, rm, rv, training)
        gen = torch.Generator().manual_seed(1)
        out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE, out.dtype))
        got = (out.detach(), xa.grad, got_w.grad[:, 0], got_b.grad[:, 0], got_rm[:, 0], got_rv[:, 0])
        assert_matches(got, exp, torch.float32)
        assert torch.all(got_w.grad[:, 1] == 0) and torch.all(got_rm[:, 1] == 7.0)  # the other column untouched


def test_cpu_tensors_for_compiled_kernels_raise_a_value_error_that_says_what_to_do(monkeypatch):
    if DEVICE == "cpu":  # no GPU here: make the module believe it compiles, as it does with CUDA present
        monkeypatch.setattr(K, "interpreted", lambda: False)
    with pytest.raises(ValueError, match=r"input is on cpu.*move the tensors there"):
        K.batch_norm(torch.randn(4, 3), None, None, training=True)


def test_bfloat16_is_supported_from_compute_capability_8(monkeypatch):
    assert K.dtype_supported(torch.bfloat16, "cpu")  # CPU tensors: the interpreter runs every dtype
    monkeypatch.setattr(K, "interpreted", lambda: False)
    for capability, ok in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert K.dtype_supported(torch.bfloat16, "cuda") is ok, capability
        assert K.dtype_supported(torch.float16, "cuda") and K.dtype_supported(torch.float32, "cuda")


@pytest.mark.parametrize("config", ["default", "small_tiles"], indirect=True)
def test_large_offset_variance_stays_within_1e_3_of_float64(config):
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn((16, 1, 64, 64), generator=gen)).to(DEVICE)  # float32, n = 65,536
    rm, rv = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    K.batch_norm(x, rm, rv, training=True, momentum=1.0)  # momentum 1: running_var = this batch's unbiased var
    exact = x.double().var().item()
    assert abs(rv.item() - exact) / exact < 1e-3, (rv.item(), exact)
    # The one-pass formula E[x^2] - E[x]^2 in fp32 misses by far more: the reason for Welford.
    one_pass = (x.pow(2).mean() - x.mean() ** 2).item()
    assert abs(one_pass - exact) / exact > 1e-2


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        # torch's types: IndexError for an input without a channel axis, RuntimeError for eval without statistics
        ((torch.zeros(5),), {"training": True}, IndexError, "at least 2 dimensions"),
        ((torch.zeros(4, 3, dtype=torch.int64),), {"training": True}, ValueError, "dtype"),
        ((torch.zeros(1, 3),), {"training": True}, ValueError, "more than 1 value per channel"),
        ((torch.zeros(4, 3),), {"training": False}, RuntimeError, "running_mean and running_var"),
        ((torch.zeros(4, 3),), {"training": True, "weight": torch.ones(2)}, RuntimeError, "3 elements"),
        ((torch.zeros(4, 3),), {"training": True, "eps": 0.0}, ValueError, "eps"),
    ],
)
def test_bad_input_raises_naming_the_problem(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        K.batch_norm(args[0].to(DEVICE), None, None, **kwargs)


def test_missing_triton_raises_a_clear_import_error_only_when_called(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "normlab.kernels._triton", None)
    monkeypatch.delattr(K, "_triton", raising=False)
    assert not K.available()
    with pytest.raises(ImportError, match="needs triton"):
        K.batch_norm(torch.zeros(4, 3, device=DEVICE), None, None, training=True)


def test_a_triton_older_than_3_counts_as_missing(monkeypatch):
    """torch 2.1 to 2.3 bring triton 2.x, whose interpreter has no CPU backend: the lab then says
    the kernels are skipped instead of failing."""
    import triton

    monkeypatch.setattr(triton, "__version__", "2.1.0")
    assert not K.available()
    monkeypatch.setattr(triton, "__version__", "3.0.0")
    assert K.available()


@pytest.mark.skipif(DEVICE != "cuda", reason="realistic sizes only on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(32, 256, 28, 28), (64, 64, 56, 56), (256, 2048, 7, 7), (256, 1000)], ids=str)
def test_gpu_sizes_match_f_batch_norm(shape, channels_last, dtype):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-D input")
    x, w, b, rm, rv = make(shape, dtype=dtype, channels_last=channels_last)
    got = run(K.batch_norm, x, w, b, rm, rv, True)
    tol = TOL[dtype] * 5
    exp = reference(x, w, b, rm, rv, True)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * (e.abs().max().item() + 1))


# The lab's Triton exercise (checks.check_triton_sums): one program per channel, written here
# without the course's kernels, and two typical mistakes (switched on by the last two arguments).
_triton, tl = K.triton_modules()


@_triton.jit
def _sums_per_channel(x_ptr, dy_ptr, mean_ptr, invstd_ptr, sum_dy_ptr, sum_dyxh_ptr, N, C, M,
                      BLOCK: tl.constexpr, ALL_SAMPLES: tl.constexpr = True, MASKED: tl.constexpr = True):
    c = tl.program_id(0)
    mu, rs = tl.load(mean_ptr + c), tl.load(invstd_ptr + c)
    s_dy = tl.zeros((BLOCK,), tl.float32)
    s_dyxh = tl.zeros((BLOCK,), tl.float32)
    for n in range(N if ALL_SAMPLES else 1):
        for m0 in range(0, M, BLOCK):
            m = m0 + tl.arange(0, BLOCK)
            offs = (n * C + c) * M + m
            inside = offs < N * C * M  # the bug below reads the next channel, never past the tensor
            ok = (m < M) & inside if MASKED else inside
            dy = tl.load(dy_ptr + offs, mask=ok, other=0.0)
            x = tl.load(x_ptr + offs, mask=ok, other=0.0)
            s_dy += dy
            s_dyxh += dy * (x - mu) * rs
    tl.store(sum_dy_ptr + c, tl.sum(s_dy, axis=0))
    tl.store(sum_dyxh_ptr + c, tl.sum(s_dyxh, axis=0))


def test_triton_sums_check_passes_a_correct_kernel_and_marks_it_passed(capsys):
    checks.check_triton_sums(_sums_per_channel)
    assert "PASS Triton per-channel sums" in capsys.readouterr().out
    assert checks.passed(_sums_per_channel)


@pytest.mark.parametrize("bug", [{"ALL_SAMPLES": False}, {"MASKED": False}], ids=["first_sample_only", "unmasked"])
def test_triton_sums_check_catches_a_kernel_that_skips_samples_or_reads_past_its_channel(bug):
    class Wrong:  # launches the same kernel with one of the bugs switched on
        fn = _sums_per_channel.fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: _sums_per_channel[grid](*args, **kwargs, **bug)

    with pytest.raises(AssertionError, match=r"Triton channel sums, x of shape .*: sum_dy"):
        checks.check_triton_sums(Wrong())


def test_channel_sums_with_the_course_kernel_match_float64():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1).to(memory_format=torch.channels_last)
    dy = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)  # NCHW: another layout than x
    mean, invstd = x.mean((0, 2, 3)), torch.rsqrt(x.var((0, 2, 3), correction=0) + 1e-5)
    sum_dy, sum_dyxh = K.channel_sums(dy.to(DEVICE), x.to(DEVICE), mean.to(DEVICE), invstd.to(DEVICE))
    x_hat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    torch.testing.assert_close(sum_dy.cpu(), dy.sum((0, 2, 3)))
    torch.testing.assert_close(sum_dyxh.cpu(), (dy * x_hat).sum((0, 2, 3)))


def test_a_kernel_cell_runs_without_triton_and_its_check_says_skipped(monkeypatch, capsys):
    monkeypatch.setattr(K, "available", lambda: False)
    triton, tl = K.triton_modules()

    @triton.jit
    def kernel(x_ptr, BLOCK: tl.constexpr):
        return x_ptr

    assert kernel(3, 4) == 3 and tl.constexpr is None
    checks.check_triton_sums(kernel)
    assert capsys.readouterr().out.startswith("SKIPPED the Triton kernel's check: triton is not installed")
    assert not checks.passed(kernel)
