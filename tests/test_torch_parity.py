"""normlab against PyTorch on PyTorch's own test samples (its OpInfo and ModuleInfo databases).

PyTorch describes its operators (``op_db``) and modules (``module_db``) by entries that generate
sample inputs: ordinary ones and the degenerate ones its own tests run, such as zero-size
batches, a 1-D empty input, absent running statistics, ``momentum=None`` and negative momenta.
Every sample of the batch-norm entries runs here through torch and through normlab, each on its
own copy of the same values, in three memory layouts of the input (contiguous, a strided view,
channels_last for 4-D and 5-D input), and the two must agree:

- ``normlab.functional.batch_norm`` (and ``normlab.kernels.batch_norm``) against
  ``F.batch_norm``: output (values and strides), the gradients of input, weight and bias for one
  fixed random cotangent, and the running statistics it updates in place;
- the NumPy references of ``normlab.scratch`` against ``F.layer_norm``, ``F.group_norm``,
  ``F.instance_norm`` and ``F.rms_norm``: output and gradients;
- ``normlab.nn``'s BatchNorm1d/2d/3d, SyncBatchNorm (no process group), GhostBatchNorm1d/2d and
  BatchRenorm1d/2d (at the settings where they are batch norm) against torch's module, built
  from the same constructor arguments with the same state, over several forward steps that
  alternate training and eval: outputs, gradients and every buffer after every step.

Where torch raises for a sample, normlab must raise an exception of the same type. A sample that
uses an argument a NumPy reference does not take is filtered under a named reason and counted,
and every test asserts a minimum number of samples compared, so it cannot pass vacuously. Each
test prints its counts (``pytest -s`` shows them).
"""

from __future__ import annotations

import collections
import inspect
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab import functional as NF
from normlab import kernels as K  # before torch's test package imports triton: it sets TRITON_INTERPRET
from normlab import scratch


def _torch_test_databases():
    """Return torch's op_db and module_db (and hypothesis's settings before), undoing what importing
    torch's test package does to this process.

    ``torch.testing._internal.common_utils`` (which needs ``expecttest``) is written for torch's own
    test runner: on import it loads a hypothesis profile of its own (10 examples, no database),
    seeds the random generators, would freeze ``torch.backends``' flags (assigning one would then
    raise) and wraps TorchScript calls. The other test files of a session must see none of that.
    """
    try:
        import hypothesis
    except ImportError:
        hypothesis = None
    saved_profile = hypothesis.settings.default if hypothesis else None
    saved_env = dict(os.environ)
    saved_random = random.getstate(), np.random.get_state()
    disable_global_flags = torch.backends.disable_global_flags
    script_calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    torch.backends.disable_global_flags = lambda: None  # common_utils calls it on import: not in this process
    try:
        with torch.random.fork_rng(devices=[]):
            from torch.testing._internal.common_methods_invocations import op_db
            from torch.testing._internal.common_modules import module_db
    finally:
        if hypothesis:
            hypothesis.settings.register_profile("normlab-before-torch-tests", parent=saved_profile)
            hypothesis.settings.load_profile("normlab-before-torch-tests")
        for key in set(os.environ) - set(saved_env):  # e.g. TORCHINDUCTOR_CACHE_DIR
            del os.environ[key]
        os.environ.update(saved_env)
        random.setstate(saved_random[0])
        np.random.set_state(saved_random[1])
        torch.backends.disable_global_flags = disable_global_flags
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
    return op_db, module_db, saved_profile


op_db, module_db, _HYPOTHESIS_BEFORE = _torch_test_databases()
LAYOUTS = ("contiguous", "strided", "channels_last")
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
F64_TOL = {"rtol": 1e-10, "atol": 1e-10}
# normlab.kernels runs on the CUDA GPU where there is one (compiled), else on the CPU (interpreted).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype):
    return F64_TOL if dtype == torch.float64 else {}  # float32: assert_close's defaults


def _close(got, want, what, dtype):
    if got is None or want is None:
        assert got is None and want is None, f"{what}: normlab gives {got!r}, torch {want!r}"
        return
    got = torch.as_tensor(got)
    torch.testing.assert_close(got, want, equal_nan=True, **_tol(dtype), msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# Memory layouts
# --------------------------------------------------------------------------------------------


def _strided(v):
    """Return v's values in a view that skips every other element of its last axis longer than 1.

    The skipped elements hold NaN, so that a read of the wrong element shows in the result.
    """
    if v.dim() == 0:
        return v.clone()
    d = max((i for i, s in enumerate(v.shape) if s > 1), default=v.dim() - 1)
    shape = list(v.shape)
    shape[d] *= 2
    buf = torch.full(shape, float("nan"), dtype=v.dtype, device=v.device)
    view = buf[(slice(None),) * d + (slice(None, None, 2),)]
    view.copy_(v)
    return view


def relayout(t, layout, device="cpu"):
    """Return a new leaf tensor on ``device`` with t's values (and requires_grad) in ``layout``; None where
    the layout does not apply.

    "contiguous": a contiguous copy; "strided": a strided view (``_strided``); "channels_last":
    channels_last for 4-D, channels_last_3d for 5-D tensors, not applicable to others.
    """
    v = t.detach().to(device)
    if layout == "contiguous":
        out = v.clone(memory_format=torch.contiguous_format)
    elif layout == "strided":
        out = _strided(v)
    elif v.dim() in _CHANNELS_LAST:
        out = v.clone(memory_format=_CHANNELS_LAST[v.dim()])
    else:
        return None
    return out.requires_grad_(t.requires_grad)


def vector_copy(t, layout, device="cpu"):
    """A per-channel vector (weight, bias, running statistics): strided in the "strided" layout, else contiguous."""
    if t is None:
        return None
    v = t.detach().to(device)
    out = _strided(v) if layout == "strided" else v.clone()
    return out.requires_grad_(t.requires_grad)


def _cotangent(shape, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


@dataclass
class Tally:
    """What one test compared: samples with values, samples where both sides raised, and the rest."""

    compared: int = 0
    both_raised: int = 0
    strided_inputs: int = 0  # compared samples whose input really was non-contiguous
    filtered: collections.Counter = field(default_factory=collections.Counter)
    notes: collections.Counter = field(default_factory=collections.Counter)  # compared, with a caveat

    def report(self, name):
        print(f"\n{name}: compared {self.compared} (non-contiguous input {self.strided_inputs}), "
              f"both raised {self.both_raised}, filtered {dict(self.filtered)}"
              + (f", notes {dict(self.notes)}" if self.notes else ""))

    def count_input(self, x):
        self.compared += 1
        self.strided_inputs += not x.is_contiguous()


def _both_raise(ours, ref, what):
    """Assert that normlab raised where torch raised, an exception of torch's type (or a subclass)."""
    assert isinstance(ours, Exception), f"{what}: torch raises {type(ref).__name__}: {ref}; normlab does not"
    assert isinstance(ours, type(ref)), (
        f"{what}: torch raises {type(ref).__name__}: {ref}; normlab {type(ours).__name__}: {ours}"
    )


def _raises_only_if(ours, ref, what):
    """Return True when both raised (checked); fail when only one did."""
    if isinstance(ref, Exception):
        _both_raise(ours, ref, what)
        return True
    if isinstance(ours, Exception):
        raise AssertionError(f"{what}: torch returns a result, normlab raises {type(ours).__name__}: {ours}") from ours
    return False


# --------------------------------------------------------------------------------------------
# 1. F.batch_norm's OpInfo samples through normlab.functional.batch_norm (and normlab.kernels)
# --------------------------------------------------------------------------------------------

BN_OPS = [op for op in op_db if op.name == "nn.functional.batch_norm"]
_BN_SIGNATURE = inspect.signature(F.batch_norm)
_VECTORS = ("running_mean", "running_var", "weight", "bias")


def _op_id(op):
    return f"{op.name}.{op.variant_test_name or 'default'}"


def test_importing_torchs_test_databases_left_this_process_alone():
    assert not torch.backends.flags_frozen()  # torch.backends.cudnn.benchmark = True still works
    hypothesis = pytest.importorskip("hypothesis")
    now = hypothesis.settings.default  # torch's profile would have 10 examples and no database
    assert (now.max_examples, now.database) == (_HYPOTHESIS_BEFORE.max_examples, _HYPOTHESIS_BEFORE.database)


def test_the_two_batch_norm_opinfo_entries_and_the_signature():
    assert sorted(op.variant_test_name for op in BN_OPS) == ["", "without_cudnn"]
    assert inspect.signature(NF.batch_norm).parameters.keys() == _BN_SIGNATURE.parameters.keys()
    assert inspect.signature(K.batch_norm).parameters.keys() == _BN_SIGNATURE.parameters.keys()


def _samples(op, dtype):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # make_tensor draws from the global generator
        return list(op.sample_inputs("cpu", dtype, requires_grad=True))


def _bn_arguments(sample):
    """The sample's call of F.batch_norm as a dict of named arguments, defaults filled in."""
    bound = _BN_SIGNATURE.bind(sample.input, *sample.args, **sample.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@dataclass
class Outcome:
    out: torch.Tensor
    grads: dict
    buffers: dict


def _run_batch_norm(fn, args, layout, seed, device="cpu"):
    """Call fn on a fresh copy of args (in layout, on device); backward a fixed cotangent. Outcome or the exception."""
    a = dict(args, input=relayout(args["input"], layout, device))
    a.update({k: vector_copy(args[k], layout, device) for k in _VECTORS})
    try:
        out = fn(**a)
    except Exception as exc:  # noqa: BLE001  compared with torch's
        return exc
    if out.requires_grad:
        out.backward(_cotangent(out.shape, out.dtype, seed, device))
    leaves = {k: a[k] for k in ("input", "weight", "bias") if a[k] is not None and a[k].requires_grad}
    return Outcome(out.detach(), {k: v.grad for k, v in leaves.items()},
                   {k: a[k] for k in ("running_mean", "running_var")})


def _compare_outcomes(ours, ref, what, dtype):
    _close(ours.out, ref.out, f"{what}: output", dtype)
    if ref.out.numel():
        assert ours.out.stride() == ref.out.stride(), (
            f"{what}: output strides {ours.out.stride()}, torch's {ref.out.stride()}"
        )
    assert ours.grads.keys() == ref.grads.keys()
    for k in ref.grads:
        _close(ours.grads[k], ref.grads[k], f"{what}: grad of {k}", dtype)
    for k in ref.buffers:
        _close(ours.buffers[k], ref.buffers[k], f"{what}: {k} after the call", dtype)


def _batch_norm_parity(fn, op, dtype, layout, device="cpu"):
    tally = Tally()
    for i, sample in enumerate(_samples(op, dtype)):
        args = _bn_arguments(sample)
        what = f"sample {i}: input {tuple(sample.input.shape)}, " + ", ".join(
            f"{k}={'None' if v is None else tuple(v.shape) if isinstance(v, torch.Tensor) else v}"
            for k, v in args.items() if k != "input")
        if relayout(args["input"], layout) is None:
            tally.filtered[f"no {layout} layout for {args['input'].dim()}-D input"] += 1
            continue
        ref = _run_batch_norm(F.batch_norm, args, layout, i, device)
        ours = _run_batch_norm(fn, args, layout, i, device)
        if _raises_only_if(ours, ref, what):
            tally.both_raised += 1
            continue
        _compare_outcomes(ours, ref, what, dtype)
        tally.count_input(relayout(args["input"], layout))
    return tally


# Samples compared per layout (of 12 per entry): channels_last applies to the 4-D samples only.
_MIN_BN = {"contiguous": 12, "strided": 12, "channels_last": 2}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("op", BN_OPS, ids=_op_id)
def test_functional_batch_norm_matches_torch_on_every_opinfo_sample(op, dtype, layout):
    tally = _batch_norm_parity(NF.batch_norm, op, dtype, layout)
    tally.report(f"normlab.functional.batch_norm, {_op_id(op)}, {dtype}, {layout}")
    assert tally.compared >= _MIN_BN[layout]
    if layout == "strided":
        assert tally.strided_inputs >= 10


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_triton_kernels_match_torch_on_every_opinfo_sample(dtype, layout):
    """The same samples through normlab.kernels (Triton's interpreter on a CPU); the default entry only."""
    if not K.available():
        pytest.skip("triton is not installed")
    op = next(op for op in BN_OPS if not op.variant_test_name)
    tally = _batch_norm_parity(K.batch_norm, op, dtype, layout, KERNEL_DEVICE)
    tally.report(f"normlab.kernels.batch_norm, {dtype}, {layout}")
    assert tally.compared >= _MIN_BN[layout]


def _case(shape, rm=None, rv=None, w=None, b=None, **kwargs):
    """F.batch_norm's named arguments: input of ``shape``, per-channel vectors of the given sizes (None: absent)."""
    gen = torch.Generator().manual_seed(len(shape) + sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()

    def vec(n, low, grad):
        return None if n is None else (torch.rand(n, generator=gen, dtype=torch.float64) + low).requires_grad_(grad)

    args = {"input": x, "running_mean": vec(rm, -0.5, False), "running_var": vec(rv, 0.5, False),
            "weight": vec(w, 0.5, True), "bias": vec(b, -0.5, True)}
    return {**{k: p.default for k, p in _BN_SIGNATURE.parameters.items()}, **args, **kwargs}


# Degenerate arguments beyond torch's samples, each with the exception torch raises (None: a result).
_DEGENERATE = {
    "batch_of_one_eval": (_case((1, 3), 3, 3, 3, 3), None),  # no batch statistics
    "batch_of_one_eval_4d": (_case((1, 3, 1, 1), 3, 3, 3, 3), None),
    "batch_of_one_train": (_case((1, 3), 3, 3, training=True), ValueError),  # one value per channel
    "one_value_per_channel_3d_train": (_case((1, 3, 1), training=True), ValueError),
    "batch_of_one_with_space_train": (_case((1, 3, 2), 3, 3, 3, 3, training=True), None),  # 2 values
    "single_channel_train": (_case((2, 1, 3, 3), 1, 1, 1, 1, training=True), None),
    "eval_without_running_stats": (_case((4, 3), training=False), RuntimeError),
    "eval_without_running_var": (_case((4, 3), 3, None), RuntimeError),
    "train_without_running_var": (_case((4, 3), 3, None, training=True), ValueError),
    "wrong_weight_size": (_case((4, 3), 3, 3, 4, 3, training=True), RuntimeError),
    "wrong_running_var_size": (_case((4, 3), 3, 4, training=True), RuntimeError),
    "input_1d_train": (_case((5,), training=True), IndexError),  # no channel axis
    "input_1d_eval": (_case((5,), 5, 5), RuntimeError),  # C counts as 0
    "input_0d_train": (_case((), training=True), IndexError),
    "empty_batch_wrong_stat_sizes": (_case((0, 3), 2, 2, training=True), None),  # torch checks nothing
    "empty_batch_eval_without_stats": (_case((0, 3, 2), None, None, 3, 3), None),
    "empty_channels_with_weight": (_case((2, 0, 3), None, None, 0, training=True), IndexError),  # weight[0]
    "empty_channels": (_case((2, 0, 3), training=True), None),
    "empty_space": (_case((2, 3, 0), 3, 3, 3, 3, training=True), None),
    "eps_zero_train": (_case((4, 3), training=True, eps=0.0), ValueError),
    "eps_zero_eval": (_case((4, 3), 3, 3, eps=0.0), None),
    "eps_negative_eval": (_case((4, 3), 3, 3, eps=-1.0), ValueError),
    "momentum_none": (_case((4, 3), 3, 3, training=True, momentum=None), TypeError),
    "momentum_above_one": (_case((4, 3, 2), 3, 3, training=True, momentum=1.5), None),
    "weight_without_bias": (_case((4, 3, 2), 3, 3, 3, None, training=True), None),
    "bias_without_weight": (_case((4, 3, 2), 3, 3, None, 3, training=True), None),
}


@pytest.mark.parametrize("name", sorted(_DEGENERATE))
@pytest.mark.parametrize("impl", ["functional", "kernels"])
def test_degenerate_arguments_behave_as_in_torch(impl, name):
    """Hand-written edge cases: the same result, or an exception of torch's type."""
    if impl == "kernels" and not K.available():
        pytest.skip("triton is not installed")
    fn, device = (NF.batch_norm, "cpu") if impl == "functional" else (K.batch_norm, KERNEL_DEVICE)
    args, error = _DEGENERATE[name]
    ref = _run_batch_norm(F.batch_norm, args, "contiguous", 0, device)
    assert type(ref) is error if error else isinstance(ref, Outcome), f"torch's behaviour changed: {ref!r}"
    ours = _run_batch_norm(fn, args, "contiguous", 0, device)
    if not _raises_only_if(ours, ref, name):
        _compare_outcomes(ours, ref, name, torch.float64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_triton_kernels_update_non_contiguous_running_statistics_in_place(dtype, channels_last, training):
    """Running statistics that are strided views (buf[::2]) are read, and updated in place, like torch's."""
    if not K.available():
        pytest.skip("triton is not installed")
    gen, dev = torch.Generator().manual_seed(3), KERNEL_DEVICE
    C = 3
    x = (torch.randn(4, C, 3, 2, generator=gen, dtype=dtype) * 2 + 1).to(dev)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = (torch.rand(C, generator=gen, dtype=dtype) + 0.5).to(dev), torch.randn(C, generator=gen, dtype=dtype).to(dev)
    bufs = {side: (torch.randn(2 * C, generator=torch.Generator().manual_seed(4), dtype=dtype).to(dev),
                   (torch.rand(2 * C, generator=torch.Generator().manual_seed(5), dtype=dtype) + 0.5).to(dev))
            for side in ("ours", "torch")}
    untouched = bufs["ours"][0][1::2].clone(), bufs["ours"][1][1::2].clone()
    for step in range(3):  # the in-place updates accumulate
        outs, grads = {}, {}
        for side, fn in (("ours", K.batch_norm), ("torch", F.batch_norm)):
            rm, rv = bufs[side][0][::2], bufs[side][1][::2]
            assert not rm.is_contiguous() and not rv.is_contiguous()
            ptrs = rm.data_ptr(), rv.data_ptr()
            xa = (x * (1 + step)).detach().requires_grad_()
            out = fn(xa, rm, rv, w, b, training=training, momentum=0.3)
            out.backward(_cotangent(out.shape, out.dtype, step, dev))
            assert (rm.data_ptr(), rv.data_ptr()) == ptrs
            outs[side], grads[side] = out.detach(), xa.grad
        _close(outs["ours"], outs["torch"], f"step {step}: output", dtype)
        _close(grads["ours"], grads["torch"], f"step {step}: grad of input", dtype)
        for k in (0, 1):
            _close(bufs["ours"][k][::2], bufs["torch"][k][::2], f"step {step}: running statistic {k}", dtype)
    assert torch.equal(bufs["ours"][0][1::2], untouched[0]) and torch.equal(bufs["ours"][1][1::2], untouched[1])
    if not training:
        assert torch.equal(bufs["ours"][0], bufs["torch"][0])  # eval: nothing written


# --------------------------------------------------------------------------------------------
# 2. layer, group, instance and RMS norm: OpInfo samples against normlab.scratch (NumPy)
# --------------------------------------------------------------------------------------------

NORM_OPS = {op.name: op for op in op_db if op.name in (
    "nn.functional.layer_norm", "nn.functional.group_norm", "nn.functional.instance_norm",
    "nn.functional.rms_norm")}


def _numpy(t):
    return None if t is None else t.detach().numpy()


def _scratch_call(name, a):
    """Map F.<name>'s named arguments to normlab.scratch: (filter reason or None, forward).

    forward() calls the NumPy version and returns (out, backward), backward(dout) -> (dx, dweight,
    dbias); None where a filtered sample cannot even be passed.
    """
    x, w = _numpy(a["input"]), _numpy(a.get("weight"))
    eps = a["eps"]
    if name == "rms_norm" and eps is None:
        eps = torch.finfo(a["input"].dtype).eps  # F.rms_norm's default; scratch.rms_norm takes it explicitly
    if eps < 0:
        return "negative eps (the NumPy references take eps >= 0)", lambda: _scratch_forward(name, a, x, w, eps)
    if name == "instance_norm" and not a["use_input_stats"]:
        return "use_input_stats=False (the NumPy instance_norm keeps no running statistics)", None
    return None, lambda: _scratch_forward(name, a, x, w, eps)


def _scratch_forward(name, a, x, w, eps):
    b = _numpy(a.get("bias"))
    if name == "layer_norm":
        out, cache = scratch.layer_norm(x, a["normalized_shape"], w, b, eps)
        return out, lambda d: scratch.layer_norm_backward(d, cache)
    if name == "group_norm":
        out, cache = scratch.group_norm(x, a["num_groups"], w, b, eps)
        return out, lambda d: scratch.group_norm_backward(d, cache)
    if name == "instance_norm":
        out, cache = scratch.instance_norm(x, w, b, eps)
        return out, lambda d: scratch.instance_norm_backward(d, cache)
    out, cache = scratch.rms_norm(x, a["normalized_shape"], w, eps)
    return out, lambda d: (*scratch.rms_norm_backward(d, cache), None)


# Samples compared (with values) per op and layout; the rest are filtered, or not 4-D / 5-D.
_MIN_NORM = {
    ("layer_norm", "contiguous"): 5, ("layer_norm", "strided"): 5,
    ("group_norm", "contiguous"): 17, ("group_norm", "strided"): 17,
    ("instance_norm", "contiguous"): 9, ("instance_norm", "strided"): 9, ("instance_norm", "channels_last"): 4,
    ("rms_norm", "contiguous"): 5, ("rms_norm", "strided"): 5,
}


@pytest.mark.parametrize(("name", "layout"), sorted(_MIN_NORM), ids=lambda v: v)
def test_numpy_norms_match_torch_on_every_opinfo_sample(name, layout):
    op = NORM_OPS[f"nn.functional.{name}"]
    fn = getattr(F, name)
    signature = inspect.signature(fn)
    tally = Tally()
    for i, sample in enumerate(_samples(op, torch.float64)):
        bound = signature.bind(sample.input, *sample.args, **sample.kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        what = f"{name} sample {i}: input {tuple(sample.input.shape)}"
        x = relayout(a["input"], layout)
        if x is None:
            tally.filtered[f"no {layout} layout for {a['input'].dim()}-D input"] += 1
            continue
        a["input"] = x
        for k in ("weight", "bias", "running_mean", "running_var"):
            if k in a:
                a[k] = vector_copy(a[k], layout)
        reason, forward = _scratch_call(name, a)
        if reason is not None:
            tally.filtered[reason] += 1
            if forward is not None:  # a refusal with a ValueError, not a wrong answer
                with pytest.raises(ValueError):
                    forward()
            continue
        if name == "instance_norm" and a["running_mean"] is not None:
            # Output and gradients use the input's statistics; torch's running-statistics update,
            # which the NumPy version does not make, is not compared.
            tally.notes["running-statistics update not compared (the NumPy version keeps none)"] += 1
        try:
            ref = fn(**a)
        except Exception as exc:  # noqa: BLE001
            with pytest.raises(type(exc)):
                forward()
            tally.both_raised += 1
            continue
        out, backward = forward()
        _close(out, ref.detach(), f"{what}: output", torch.float64)
        cot = _cotangent(ref.shape, ref.dtype, i)
        ref.backward(cot)
        dx, dw, db = backward(cot.numpy())
        _close(dx, a["input"].grad, f"{what}: grad of input", torch.float64)
        for g, k in ((dw, "weight"), (db, "bias")):
            t = a.get(k)
            _close(g, None if t is None else t.grad, f"{what}: grad of {k}", torch.float64)
        tally.count_input(x)
    tally.report(f"normlab.scratch.{name}, {layout}")
    assert tally.compared >= _MIN_NORM[name, layout]


# --------------------------------------------------------------------------------------------
# 3. BatchNorm1d/2d/3d's ModuleInfo samples through normlab.nn's drop-ins
# --------------------------------------------------------------------------------------------

BN_MODULES = {m.module_cls.__name__: m for m in module_db
              if m.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}
STEPS = 3  # forward steps per sample, alternating training and eval


def _build_batch_norm(kind, named, x):
    return getattr(nl, kind)(**named), getattr(nn, kind)(**named)


def _build_sync(kind, named, x):
    # torch's SyncBatchNorm outside a process group is batch norm on any device: compare with it.
    return nl.SyncBatchNorm(**named, process_group=None), nn.SyncBatchNorm(**named, process_group=None)


def _build_ghost(kind, named, x):
    # virtual_batch_size = the batch (the boundary): one ghost batch, which is batch norm.
    cls = getattr(nl, "Ghost" + kind)
    return cls(virtual_batch_size=max(x.shape[0], 1), **named), getattr(nn, kind)(**named)


def _build_renorm(kind, named, x):
    if not named["track_running_stats"]:
        return "track_running_stats=False (BatchRenorm always keeps running statistics: it corrects towards them)"
    cls = getattr(nl, kind.replace("BatchNorm", "BatchRenorm"))
    kwargs = {k: v for k, v in named.items() if k != "track_running_stats"}
    # r_max = 1 and d_max = 0 clip r to 1 and d to 0: BatchRenorm is then batch norm (its docstring).
    return cls(r_max=1.0, d_max=0.0, **kwargs), getattr(nn, kind)(**named)


_IMPLS = {"BatchNorm": _build_batch_norm, "SyncBatchNorm": _build_sync, "GhostBatchNorm": _build_ghost,
          "BatchRenorm": _build_renorm}
_MODULE_CASES = [
    (kind, impl, layout)
    for kind, impls, ranks in (
        ("BatchNorm1d", _IMPLS, (2, 3)),
        ("BatchNorm2d", _IMPLS, (4,)),
        ("BatchNorm3d", ("BatchNorm", "SyncBatchNorm"), (5,)),  # no 3-D ghost or renorm modules
    )
    for impl in impls
    for layout in LAYOUTS
    if layout != "channels_last" or any(r in _CHANNELS_LAST for r in ranks)
]
# Samples compared (of 8 for BatchNorm1d, 7 for 2d and 3d, each for training=True and False).
_MIN_MODULE = {"BatchNorm1d": 16, "BatchNorm2d": 14, "BatchNorm3d": 14}


def test_sync_batch_norm_takes_every_constructor_argument_of_torchs():
    ours, theirs = inspect.signature(nl.SyncBatchNorm).parameters, inspect.signature(nn.SyncBatchNorm).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].kind == theirs[k].kind and ours[k].default == theirs[k].default for k in theirs)
    for kind in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
        ours, theirs = (inspect.signature(getattr(m, kind)).parameters for m in (nl, nn))
        assert list(ours) == list(theirs)


def _randomize(module):
    """Give torch's module a state that is not its initial one (so that copying it matters)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5 if name == "weight"
                    else torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen, dtype=torch.float64))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
            module.num_batches_tracked.fill_(2)


def _compare_state(ours, ref, at):
    """Parameters and buffers (running_mean, running_var, num_batches_tracked: exactly) of the two modules."""
    for kind in ("named_parameters", "named_buffers"):
        got, want = dict(getattr(ours, kind)()), dict(getattr(ref, kind)())
        assert got.keys() == want.keys(), f"{at}: {kind[6:]} {sorted(got)}, torch's {sorted(want)}"
        for k in want:
            _close(got[k].detach(), want[k].detach(), f"{at}: {k} after the step", torch.float64)


def _step(module, x, mode, seed):
    """One forward (and backward) in ``mode``: the outcome, or the exception."""
    module.train(mode)
    for p in module.parameters():
        p.grad = None
    try:
        out = module(x)
    except Exception as exc:  # noqa: BLE001
        return exc
    out.backward(_cotangent(out.shape, out.dtype, seed))
    grads = {"input": x.grad, **{k: p.grad for k, p in module.named_parameters()}}
    return Outcome(out.detach(), grads, {})  # the buffers: _compare_state


@pytest.mark.parametrize(("kind", "impl", "layout"), _MODULE_CASES, ids=lambda v: v)
def test_modules_match_torchs_batch_norm_on_every_moduleinfo_sample(kind, impl, layout):
    info = BN_MODULES[kind]
    build = _IMPLS[impl]
    tally = Tally()
    for training in (True, False):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            samples = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                              training=training)
        for i, sample in enumerate(samples):
            c = sample.constructor_input
            named = inspect.signature(getattr(nn, kind)).bind(*c.args, **c.kwargs)
            named.apply_defaults()
            named = dict(named.arguments, device="cpu", dtype=torch.float64)
            (x0,) = sample.forward_input.args
            what = f"{impl} as {kind}, sample {sample.desc or i!r} ({training=}), input {tuple(x0.shape)}"
            if relayout(x0, layout) is None:
                tally.filtered[f"no {layout} layout for {x0.dim()}-D input"] += 1
                continue
            built = build(kind, named, x0)
            if isinstance(built, str):
                tally.filtered[built] += 1
                continue
            ours, ref = built
            _randomize(ref)
            ours.load_state_dict(ref.state_dict())
            for step in range(STEPS):
                mode = training if step % 2 == 0 else not training
                values = x0.detach() * (1 + 0.25 * step) + 0.5 * step
                xs = [relayout(values, layout).requires_grad_() for _ in range(2)]
                at = f"{what}, step {step} ({'train' if mode else 'eval'})"
                got, want = _step(ours, xs[0], mode, seed=10 * i + step), _step(ref, xs[1], mode, seed=10 * i + step)
                if _raises_only_if(got, want, at):
                    tally.both_raised += 1
                else:
                    _compare_outcomes(got, want, at, torch.float64)
                _compare_state(ours, ref, at)  # after every step, one that raised too
            tally.count_input(relayout(x0, layout))
    tally.report(f"normlab.nn.{impl} as torch.nn.{kind}, {layout}")
    minimum = _MIN_MODULE[kind] - (4 if impl == "BatchRenorm" else 0)  # its filtered samples
    assert tally.compared >= minimum


# Module edge cases beyond torch's samples: (class, constructor kwargs, input shape, modes of the
# steps, the exception torch raises at the first step, None: results at every step).
_MODULE_DEGENERATE = {
    "batch_of_one_eval": ("BatchNorm1d", {}, (1, 3), (False, False), None),
    "batch_of_one_train": ("BatchNorm1d", {}, (1, 3), (True,), ValueError),
    "batch_of_one_eval_untracked": ("BatchNorm1d", {"track_running_stats": False}, (1, 3), (False,), ValueError),
    "one_pixel_batch_of_one_train": ("BatchNorm2d", {}, (1, 3, 1, 1), (True,), ValueError),
    "one_pixel_batch_of_one_eval": ("BatchNorm2d", {}, (1, 3, 1, 1), (False,), None),
    "4d_input_to_1d": ("BatchNorm1d", {}, (4, 3, 2, 2), (True,), ValueError),
    "3d_input_to_2d": ("BatchNorm2d", {}, (4, 3, 2), (True,), ValueError),
    "channel_mismatch": ("BatchNorm2d", {}, (4, 5, 2, 2), (True,), RuntimeError),
    "channel_mismatch_eval": ("BatchNorm2d", {}, (4, 5, 2, 2), (False,), RuntimeError),
    "any_channels_without_affine_or_stats": (
        "BatchNorm2d", {"affine": False, "track_running_stats": False}, (4, 5, 2, 2), (True, False), None),
    "momentum_zero": ("BatchNorm2d", {"momentum": 0.0}, (3, 3, 2, 2), (True, False, True), None),
    "momentum_one": ("BatchNorm2d", {"momentum": 1.0}, (3, 3, 2, 2), (True, False, True), None),
    "cumulative_average_five_steps": ("BatchNorm1d", {"momentum": None}, (5, 3, 2), (True,) * 4 + (False,), None),
    "zero_batch_eval_then_train": ("BatchNorm2d", {}, (0, 3, 2, 2), (False, True, False), None),
}
_SYNC_TAKES_ANY_RANK = {"4d_input_to_1d", "3d_input_to_2d"}  # SyncBatchNorm takes any input of 2 or more dims


def _module_degenerate_cases():
    for name, (kind, _, _, _, _) in sorted(_MODULE_DEGENERATE.items()):
        for impl in _IMPLS:
            if impl in ("GhostBatchNorm", "BatchRenorm") and kind == "BatchNorm3d":
                continue
            yield name, impl


@pytest.mark.parametrize(("name", "impl"), list(_module_degenerate_cases()), ids=lambda v: v)
def test_module_edge_cases_behave_as_in_torch(name, impl):
    kind, kwargs, shape, modes, error = _MODULE_DEGENERATE[name]
    named = inspect.signature(getattr(nn, kind)).bind(3, **kwargs)  # 3 channels ("mismatch": the input has 5)
    named.apply_defaults()
    named = dict(named.arguments, device="cpu", dtype=torch.float64)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    built = _IMPLS[impl](kind, named, x0)
    if isinstance(built, str):
        pytest.skip(built)
    ours, ref = built
    _randomize(ref)
    ours.load_state_dict(ref.state_dict())
    if impl == "SyncBatchNorm" and name in _SYNC_TAKES_ANY_RANK:
        error = None
    for step, mode in enumerate(modes):
        values = x0 * (1 + 0.25 * step) + 0.5 * step
        got, want = (_step(m, values.clone().requires_grad_(), mode, seed=step) for m in (ours, ref))
        at = f"{impl} as {kind}, {name}, step {step} ({'train' if mode else 'eval'})"
        if step == 0:
            assert type(want) is error if error else isinstance(want, Outcome), f"torch's behaviour changed: {want!r}"
        if not _raises_only_if(got, want, at):
            _compare_outcomes(got, want, at, torch.float64)
        _compare_state(ours, ref, at)  # after every step, one that raised too
