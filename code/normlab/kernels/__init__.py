"""Batch norm as fused Triton kernels: ``batch_norm`` with the signature of ``F.batch_norm``.

Training forward: a split Welford reduction per channel (partials merged by Chan's formula, fp32
accumulation), then normalize + affine in one pass. Training backward: the two per-channel sums
(sum dy, sum dy x_hat), then dx in one pass; dweight and dbias are those sums. Eval: one fused
pass, differentiable. The kernels themselves live in ``normlab.kernels._triton``.

Channels are processed in groups (``CONFIG.group_bytes``): a group's statistics pass is followed
by its normalize pass, so that when the group fits in the GPU's L2 cache the second read of x
(and of dy in the backward) comes from L2, not from memory.

Without a CUDA GPU the same kernels run in Triton's interpreter: importing this module sets
``TRITON_INTERPRET=1`` before triton is imported (correct, and slow: use small shapes).
Without triton installed, importing works and calling a kernel raises ``ImportError``
(``pip install "normlab[kernels]"`` installs it on Linux).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import torch

from normlab._validate import is_number
from normlab.functional import affine_grads, check_like_torch, empty_batch_norm

__all__ = ["CONFIG", "INSTALL_HINT", "KernelConfig", "available", "batch_norm", "channel_sums", "dtype_supported",
           "interpreted", "layout_of", "triton_modules"]

# Triton decides at import whether its language runs compiled or interpreted: set the switch first.
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class KernelConfig:
    """Launch parameters (the benchmark sweeps them on a GPU).

    tile: elements per tile (BLOCK_C * BLOCK_M) for 4-byte inputs; 16-bit inputs use twice as many.
    programs_per_sm: programs launched per SM for the split passes (per channel group).
    group_bytes: bytes of input per channel group (0: one group, all channels).
    num_warps: warps per program.
    """

    tile: int = 2048
    programs_per_sm: int = 4
    group_bytes: int = 24 * 2**20
    num_warps: int = 4


CONFIG = KernelConfig()
INSTALL_HINT = 'pip install "normlab[kernels]" (Linux only: triton has no macOS or Windows wheels)'
_INTERPRETER_PROGRAMS = 4  # few programs in the interpreter: each runs as Python, one after another
_ACC = {torch.float64: "float64"}  # accumulate in fp32 except for fp64 input


def interpreted() -> bool:
    """Return True when the kernels run in Triton's interpreter (no CUDA GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


MIN_TRITON = (3, 0)  # the kernels extra's floor: the 2.x that torch 2.1-2.3 bring have no CPU interpreter


def available() -> bool:
    """Return True when a triton that runs these kernels (3.0 or later) can be imported."""
    try:
        import triton
    except ImportError:
        return False
    release = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    return release >= MIN_TRITON


class _MissingTriton:
    """Stands in for ``triton`` and ``triton.language`` when triton is not installed."""

    def jit(self, fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)  # ``@triton.jit`` leaves the function as it is

    def __getattr__(self, name):
        return None  # ``tl.constexpr`` in a kernel's signature, evaluated when the cell runs


def triton_modules():
    """Return ``(triton, triton.language)`` for a notebook cell that defines a kernel.

    Without triton installed, two stand-ins: ``@triton.jit`` returns the function unchanged and
    ``tl.<name>`` is None, so the cell that defines the kernel still runs; launching it needs triton.
    """
    if not available():
        return _MissingTriton(), _MissingTriton()
    import triton
    import triton.language as tl

    return triton, tl


def dtype_supported(dtype, device="cuda") -> bool:
    """Return True when the kernels can run ``dtype`` on ``device``.

    Interpreted (no CUDA GPU), every dtype runs. Compiled, bfloat16 needs compute capability 8.0
    or more (Ampere and later): on a T4 (sm_75, Colab's free GPU) Triton's bfloat16 is patchy.
    """
    if dtype != torch.bfloat16 or interpreted() or torch.device(device).type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _kernels():
    if _LATE and interpreted():
        raise RuntimeError(
            "triton was imported before normlab.kernels, so it cannot run in its interpreter: "
            "import normlab.kernels first, or set TRITON_INTERPRET=1 before starting Python"
        )
    try:
        from normlab.kernels import _triton
    except ImportError as exc:
        raise ImportError(f"normlab.kernels needs triton ({exc}); install it with {INSTALL_HINT}") from exc
    return _triton


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def layout_of(x):
    """Return ("rows" | "planes", (N, C, M), (s_n, s_c, s_m)): the 3-D view the kernels use.

    "rows": channels contiguous (channels_last, or (N, C)); N is folded into M.
    "planes": positions contiguous (NCHW, (N, C, L)). Other strides: None (copy first).
    """
    N, C = x.shape[:2]
    M = x[0, 0].numel() if x.numel() else 0
    # Spatial axes merge into one M axis when their strides nest (true for both memory formats).
    sizes, strides = list(x.shape[2:]), list(x.stride()[2:])
    inner = [st for size, st in zip(sizes, strides) if size != 1]
    s_m = inner[-1] if inner else 1
    expect = s_m
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expect:
            return None, (N, C, M), None
        expect = expect * size
    s_n, s_c = x.stride(0), x.stride(1)
    if (C == 1 or s_c == 1) and (M == 1 or s_m == C) and (N == 1 or s_n == M * C):
        return "rows", (1, C, N * M), (0, 1, C)
    if (M == 1 or s_m == 1) and (C == 1 or s_c == M) and (N == 1 or s_n == C * M):
        return "planes", (N, C, M), (C * M, M, 1)
    return None, (N, C, M), None


class _Plan:
    """How one tensor is cut into tiles, channel groups and programs."""

    def __init__(self, x, n_tensors=1):
        mode, (N, C, M), strides = layout_of(x)
        if mode is None:
            raise ValueError(f"input strides {x.stride()} fit neither NCHW nor channels_last; call .contiguous()")
        self.mode, self.N, self.C, self.M = mode, N, C, M
        self.s_n, self.s_c, self.s_m = strides
        tile = CONFIG.tile * (2 if x.element_size() == 2 else 1)
        if mode == "rows":
            self.block_c = min(_pow2(C), 64)
            self.block_m = max(1, min(tile // self.block_c, _pow2(M)))
        else:
            self.block_m = min(_pow2(M), tile)
            self.block_c = max(1, min(tile // self.block_m, _pow2(C)))
        self.m_blocks = -(-M // self.block_m)
        self.n_items = N * self.m_blocks  # tiles per block of channels
        # Channel groups: whole channel blocks, about group_bytes of input each (times n_tensors read).
        per_channel = N * M * x.element_size() * n_tensors
        group = C if CONFIG.group_bytes <= 0 else max(1, CONFIG.group_bytes // max(per_channel, 1))
        group = max(self.block_c, group // self.block_c * self.block_c)
        self.groups = [(c0, min(c0 + group, C)) for c0 in range(0, C, group)]
        if interpreted() or x.device.type != "cuda":
            programs = _INTERPRETER_PROGRAMS
        else:
            programs = CONFIG.programs_per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
        blocks = -(-min(group, C) // self.block_c)
        self.split = max(1, min(self.n_items, -(-programs // blocks)))
        self.items_per_prog = -(-self.n_items // self.split)
        self.split = -(-self.n_items // self.items_per_prog)  # no program without work
        self.counters = -(-C // self.block_c)

    def grid(self, c0, c1):
        return (-(-(c1 - c0) // self.block_c), self.split)

    def args(self, c0, c1):
        """The shape arguments every kernel takes after its pointers."""
        return (self.C, c0, c1, self.M, self.s_n, self.s_c, self.s_m, self.n_items, self.items_per_prog,
                self.m_blocks)


def _acc(x):
    import triton.language as tl

    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _acc_torch(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _train_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    """Return (out, mean, invstd); updates running_mean / running_var in place when given."""
    k = _kernels()
    plan = _Plan(x)
    C, acc = plan.C, _acc_torch(x)
    out = torch.empty_like(x)
    mean = torch.empty(C, device=x.device, dtype=acc)
    invstd = torch.empty(C, device=x.device, dtype=acc)
    part = torch.empty((3, plan.split, C), device=x.device, dtype=acc)
    counters = torch.zeros(plan.counters, device=x.device, dtype=torch.int32)
    update = running_mean is not None
    rm = running_mean if update else mean
    rv = running_var if update else mean
    block_s = min(_pow2(plan.split), 64)
    for c0, c1 in plan.groups:
        # Statistics of this group of channels, then (from L2 if the group fits) its normalize pass.
        k.stats_kernel[plan.grid(c0, c1)](
            x, part, counters, mean, invstd, rm, rv, *plan.args(c0, c1), plan.split, plan.split, eps, momentum,
            C_CONTIG=plan.mode == "rows", UPDATE_RUNNING=update, ACC=_acc(x),
            BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, BLOCK_S=block_s, num_warps=CONFIG.num_warps,
        )
        k.affine_kernel[plan.grid(c0, c1)](
            x, out, invstd, mean, weight if weight is not None else mean, bias if bias is not None else mean,
            *plan.args(c0, c1), eps,
            C_CONTIG=plan.mode == "rows", A_IS_VAR=False, HAS_M=True, HAS_W=weight is not None,
            HAS_B=bias is not None, ACC=_acc(x), BLOCK_C=plan.block_c, BLOCK_M=plan.block_m,
            num_warps=CONFIG.num_warps,
        )
    return out, mean, invstd


def _affine(x, a, m, weight, bias, eps, a_is_var):
    """Return a * (x - m) + bias per channel (a = invstd, or rsqrt(var + eps) when a_is_var), times weight."""
    k = _kernels()
    plan = _Plan(x)
    out = torch.empty_like(x)
    full = (0, plan.C)  # one pass: no reason to group channels
    dummy = a
    k.affine_kernel[plan.grid(*full)](
        x, out, a, m if m is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy, *plan.args(*full), eps,
        C_CONTIG=plan.mode == "rows", A_IS_VAR=a_is_var, HAS_M=m is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, ACC=_acc(x), BLOCK_C=plan.block_c, BLOCK_M=plan.block_m,
        num_warps=CONFIG.num_warps,
    )
    return out


def _train_backward(x, dy, mean, invstd, weight, need_dx):
    """Return (dx or None, sum dy, sum dy x_hat), channel group by channel group.

    need_dx=False runs only the sums (the eval backward's dweight and dbias).
    """
    k = _kernels()
    plan = _Plan(x, n_tensors=2)  # the backward reads x and dy twice: groups are half as wide
    C, acc = plan.C, _acc_torch(x)
    sums = (torch.empty(C, device=x.device, dtype=acc), torch.empty(C, device=x.device, dtype=acc))
    dx = torch.empty_like(x) if need_dx else None
    part = torch.empty((2, plan.split, C), device=x.device, dtype=acc)
    counters = torch.zeros(plan.counters, device=x.device, dtype=torch.int32)
    count = float(plan.N * plan.M)
    for c0, c1 in plan.groups:
        k.grad_sums_kernel[plan.grid(c0, c1)](
            x, dy, mean, invstd, part, counters, *sums, *plan.args(c0, c1), plan.split, plan.split,
            C_CONTIG=plan.mode == "rows", ACC=_acc(x), BLOCK_C=plan.block_c, BLOCK_M=plan.block_m,
            BLOCK_S=min(_pow2(plan.split), 64), num_warps=CONFIG.num_warps,
        )
        if need_dx:
            k.dx_kernel[plan.grid(c0, c1)](
                x, dy, dx, mean, invstd, weight if weight is not None else mean, *sums, count, *plan.args(c0, c1),
                C_CONTIG=plan.mode == "rows", HAS_W=weight is not None, ACC=_acc(x),
                BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=CONFIG.num_warps,
            )
    return dx, sums[0], sums[1]


def channel_sums(dy, x, mean, invstd, kernel=None, block=64):
    """Return the backward's two per-channel sums (sum dy, sum dy * x_hat), (C,) tensors.

    x, dy: (N, C, *) on the kernels' device; mean, invstd: (C,). x_hat = (x - mean) * invstd per
    channel. The sums are float32 (float64 for float64 x). kernel=None runs the course's
    ``grad_sums_kernel``. Otherwise ``kernel`` is a kernel of the lab's exercise, launched on C
    programs (program c sums channel c), with the signature
    ``(x_ptr, dy_ptr, mean_ptr, invstd_ptr, sum_dy_ptr, sum_dyxh_ptr, N, C, M, BLOCK)``: x and dy
    are passed as contiguous (N, C, M) tensors (M = the product of the spatial axes), so element
    (n, c, m) is at offset (n * C + c) * M + m.
    """
    if kernel is None:
        x = x if layout_of(x)[0] is not None else x.contiguous()
        _, sum_dy, sum_dyxh = _train_backward(x, _like(dy, x), mean, invstd, None, need_dx=False)
        return sum_dy, sum_dyxh
    N, C = x.shape[:2]
    x3, dy3 = x.contiguous().view(N, C, -1), dy.contiguous().view(N, C, -1)
    acc = _acc_torch(x)
    sums = (torch.empty(C, device=x.device, dtype=acc), torch.empty(C, device=x.device, dtype=acc))
    kernel[(C,)](x3, dy3, mean.to(acc).contiguous(), invstd.to(acc).contiguous(), *sums, N, C, x3.shape[2],
                 BLOCK=block)
    return sums


def _like(dy, x):
    """Return dy with x's strides (the kernels index both with one set of strides)."""
    return dy if dy.stride() == x.stride() else torch.empty_like(x).copy_(dy)


class TrainBatchNorm(torch.autograd.Function):
    """Training-mode batch norm on Triton kernels; running statistics are updated in the forward."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = _train_forward(input, weight, bias, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, sum_dy, sum_dyxh = _train_backward(x, _like(grad_out, x), mean, invstd, weight, ctx.needs_input_grad[0])
        return dx, *affine_grads(ctx, weight, grad_out, sum_dy, sum_dyxh), None, None, None, None


class EvalBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm: one fused pass; its backward is dx = w * rsqrt(var + eps) * dy plus two sums."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps):
        ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return _affine(input, running_var, running_mean, weight, bias, eps, a_is_var=True)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rm, rv = ctx.saved_tensors
        dy = _like(grad_out, x)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _affine(dy, rv, None, weight, None, ctx.eps, a_is_var=True)
        if (weight is not None and ctx.needs_input_grad[1]) or (ctx.has_bias and ctx.needs_input_grad[2]):
            acc = _acc_torch(x)
            _, sum_dy, sum_dyxh = _train_backward(x, dy, rm.to(acc), torch.rsqrt(rv.to(acc) + ctx.eps), None, False)
            dw, db = affine_grads(ctx, weight, grad_out, sum_dy, sum_dyxh)
        return dx, dw, db, None, None, None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Raise where ``F.batch_norm`` raises (its exception types), then for what the kernels cannot run.

    Returns True for an empty input, which needs no kernel (``normlab.functional.empty_batch_norm``).
    """
    if check_like_torch(input, running_mean, running_var, weight, bias, training, eps):
        return True
    if input.dtype not in _DTYPES:
        raise ValueError(f"input has dtype {input.dtype}, expected one of {_DTYPES}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device}, input on {input.device}")
    if not is_number(momentum):
        raise TypeError(f"momentum must be a number, got {momentum!r}")
    if not interpreted() and input.device.type != "cuda":
        # Compiled Triton reads device memory only; it would fail with "cpu tensor?" deep inside.
        raise ValueError(
            f"input is on {input.device}, but with a CUDA GPU present normlab.kernels runs compiled, "
            "on the GPU: move the tensors there first (x.cuda(), or .to(ctx.device) in the labs), "
            "or use torch.nn.functional.batch_norm on the CPU"
        )
    if not dtype_supported(input.dtype, input.device):
        major, minor = torch.cuda.get_device_capability(input.device)
        raise ValueError(
            f"bfloat16 needs a GPU of compute capability 8.0 or more; this one is sm_{major}{minor}: "
            "use float16 or float32"
        )
    return False


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Apply batch norm to input (N, C, *) like ``torch.nn.functional.batch_norm``, on Triton kernels.

    input: (N, C), (N, C, L) or (N, C, H, W); NCHW or channels_last; fp16, bf16, fp32 (statistics
    in fp32) or fp64. training=True normalizes with the batch statistics and updates
    running_mean / running_var in place (unbiased variance; ``running = (1 - momentum) * running
    + momentum * batch``). training=False normalizes with the running statistics; both modes are
    differentiable in input, weight and bias. Returns a tensor with input's shape, dtype and strides.
    running_mean / running_var may be strided views (``buf[::2]``): the kernels update a contiguous
    copy, which is then written back into them. Degenerate inputs and bad arguments behave as in
    ``F.batch_norm`` (``normlab.functional.check_like_torch``): an empty input gives torch's empty
    result and leaves the running statistics alone.
    """
    if _check(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return empty_batch_norm(input, weight, bias)  # nothing to reduce or update: torch's result
    x = input
    if layout_of(x)[0] is None:
        x = x.contiguous()  # other strides: copy to NCHW first
    # The kernels index the per-channel vectors with stride 1. Strided ones (views into a larger
    # buffer, as F.batch_norm accepts) are copied; autograd carries the gradient back through the copy.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    rm = running_mean.contiguous() if running_mean is not None else None
    rv = running_var.contiguous() if running_var is not None else None
    if not training:
        return EvalBatchNorm.apply(x, weight, bias, rm, rv, float(eps))
    out = TrainBatchNorm.apply(x, weight, bias, rm, rv, float(momentum), float(eps))
    for given, used in ((running_mean, rm), (running_var, rv)):
        if given is not None and used is not given:  # write the updated copy back into the caller's view
            given.copy_(used)
    return out
