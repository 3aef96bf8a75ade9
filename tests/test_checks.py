"""normlab.checks: a correct solution passes, a wrong one fails with a message that helps."""

import importlib
import pkgutil
import re

import numpy as np
import pytest

from conftest import ROOT, cell_source, load_notebook
from normlab import checks, scratch


def forward(x, gamma, beta, eps):
    return scratch.batch_norm_forward(x, gamma, beta, None, None, eps=eps)[0]


def backward(dout, x, gamma, eps):
    _, cache = scratch.batch_norm_forward(x, gamma, np.zeros_like(gamma), None, None, eps=eps)
    return scratch.batch_norm_backward(dout, cache)


def running(rm, rv, x, momentum):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    n = x.size // x.shape[1]
    return (1 - momentum) * rm + momentum * x.mean(axes), (1 - momentum) * rv + momentum * x.var(axes) * n / (n - 1)


def test_correct_solutions_pass(capsys):
    checks.check_forward(forward)
    checks.check_backward(backward)
    checks.check_running_stats(running)
    assert capsys.readouterr().out.count("PASS") == 3


def test_forward_that_forgets_beta_is_caught_with_the_element_and_values():
    def wrong(x, gamma, beta, eps):
        return forward(x, gamma, np.zeros_like(beta), eps)

    message = r"forward, x of shape \(4, 3\): out: .* first at index \(0, 0\): expected .*, got"
    with pytest.raises(AssertionError, match=message):
        checks.check_forward(wrong)


def test_forward_that_only_handles_2d_input_is_caught_on_the_4d_case():
    def flat_only(x, gamma, beta, eps):
        mu, var = x.mean(0), x.var(0)
        return gamma * (x - mu) / np.sqrt(var + eps) + beta

    with pytest.raises((AssertionError, ValueError)):
        checks.check_forward(flat_only)


def test_backward_that_ignores_the_mean_path_is_caught_naming_dx():
    def naive(dout, x, gamma, eps):
        dx, dgamma, dbeta = backward(dout, x, gamma, eps)
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
        return dout * (gamma / np.sqrt(x.var(axes) + eps)).reshape(shape), dgamma, dbeta

    with pytest.raises(AssertionError, match="dx"):
        checks.check_backward(naive)


def test_running_stats_with_the_biased_variance_are_caught_naming_new_var():
    def biased(rm, rv, x, momentum):
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        return (1 - momentum) * rm + momentum * x.mean(axes), (1 - momentum) * rv + momentum * x.var(axes)

    with pytest.raises(AssertionError, match="new_var"):
        checks.check_running_stats(biased)


def test_missing_return_value_is_named():
    with pytest.raises(AssertionError, match="got None"):
        checks.check_forward(lambda x, g, b, e: None)


def test_assert_close_reports_shape_mismatch():
    with pytest.raises(AssertionError, match=r"shape \(2,\), expected \(3,\)"):
        checks.assert_close("v", np.zeros(2), np.zeros(3))


def test_torch_checks_pass_correct_solutions_and_catch_wrong_ones(capsys):
    import torch

    from normlab.fold import fold_batch_norm

    def backward(g, x_hat, invstd, w):
        dims = [0] + list(range(2, g.dim()))
        shape = (1, -1) + (1,) * (g.dim() - 2)
        n = g.numel() // g.shape[1]
        db, dw = g.sum(dims), (g * x_hat).sum(dims)
        return (w * invstd / n).view(shape) * (n * g - db.view(shape) - x_hat * dw.view(shape)), dw, db

    checks.check_bn_backward(backward)
    checks.check_cumulative_average(lambda r, b, k: r + (b - r) / k)
    checks.check_fold(fold_batch_norm)
    assert capsys.readouterr().out.count("PASS") == 3

    def no_mean_path(g, x_hat, invstd, w):
        dx, dw, db = backward(g, x_hat, invstd, w)
        return g * (w * invstd).view((1, -1) + (1,) * (g.dim() - 2)), dw, db

    with pytest.raises(AssertionError, match="grad_input"):
        checks.check_bn_backward(no_mean_path)
    with pytest.raises(AssertionError, match="after batch 1"):
        checks.check_cumulative_average(lambda r, b, k: 0.9 * r + 0.1 * b)

    def fold_ignoring_bias(layer, bn):
        folded = fold_batch_norm(layer, bn)
        with torch.no_grad():
            folded.bias.zero_()
        return folded

    with pytest.raises(AssertionError, match="fold, Linear with bias: output"):
        checks.check_fold(fold_ignoring_bias)


CHECKS = [name for name in checks.__all__ if name.startswith("check_")]


@pytest.mark.parametrize("name", CHECKS)
def test_every_check_says_not_attempted_to_the_stub_and_returns(name, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise 4: Some title (write your solution here)")

    assert getattr(checks, name)(stub) is None  # no exception: "Run All" goes on
    out = capsys.readouterr().out
    assert out.startswith("NOT ATTEMPTED Exercise 4: Some title: nothing to check yet") and "PASS" not in out
    assert not checks.passed(stub)


def test_solution_or_reference_uses_the_function_only_after_its_check_passed(capsys):
    def wrong(x, gamma, beta, eps):
        return forward(x, gamma, beta, eps) + 1

    def fixed(x, gamma, beta, eps):  # the student's next attempt: a new function object
        return forward(x, gamma, beta, eps)

    with pytest.raises(AssertionError):
        checks.check_forward(wrong)
    assert checks.solution_or_reference(wrong, forward) is forward
    assert "wrong has not passed its self-check yet" in capsys.readouterr().out
    assert checks.solution_or_reference(fixed, forward) is forward  # not checked yet
    checks.check_forward(fixed)
    assert checks.passed(fixed) and checks.solution_or_reference(fixed, forward) is fixed
    assert not checks.passed(wrong)


def test_adain_check_passes_the_reference_and_catches_the_unbiased_variance(capsys):
    import torch

    from normlab.experiments.alternatives import adain

    checks.check_adain(adain)
    assert "PASS AdaIN" in capsys.readouterr().out

    def unbiased(content, style, eps):
        vc, mc = torch.var_mean(content, (2, 3), keepdim=True)
        vs, ms = torch.var_mean(style, (2, 3), keepdim=True)
        return (content - mc) / torch.sqrt(vc + eps) * torch.sqrt(vs + eps) + ms

    with pytest.raises(AssertionError, match="AdaIN"):
        checks.check_adain(unbiased)


def test_steps_to_target_check_passes_the_reference_and_catches_a_strict_comparison(capsys):
    from normlab.experiments.covariate_shift import steps_to_target

    checks.check_steps_to_target(steps_to_target)
    assert "PASS steps to target" in capsys.readouterr().out

    def strict(eval_step, curve, target):  # "above" instead of "at least": misses a run at 0.8 exactly
        hit = np.asarray(curve) > target
        return np.where(hit.any(-1), np.asarray(eval_step, float)[hit.argmax(-1)], np.inf)

    with pytest.raises(AssertionError, match="at the target exactly"):
        checks.check_steps_to_target(strict)


def test_block_checks_pass_a_block_written_without_the_library_and_catch_a_missing_relu_mask(capsys):
    def block(x, w, gamma, beta, eps):
        a = x @ w
        mu, var = a.mean(0), a.var(0)
        x_hat = (a - mu) / np.sqrt(var + eps)
        h = gamma * x_hat + beta
        return np.maximum(h, 0), (x, w, h, x_hat, gamma, np.sqrt(var + eps))

    def block_back(dout, cache):
        x, w, h, x_hat, gamma, std = cache
        dh = dout * (h > 0)
        dbeta, dgamma = dh.sum(0), (dh * x_hat).sum(0)
        da = gamma / (len(x) * std) * (len(x) * dh - dbeta - x_hat * dgamma)
        return da @ w.T, x.T @ da, dgamma, dbeta

    checks.check_block_forward(block)
    checks.check_block_backward(block_back, block)
    assert capsys.readouterr().out.count("PASS") == 2
    assert checks.passed(block) and checks.passed(block_back)

    def no_mask(dout, cache):
        x, w, h, x_hat, gamma, std = cache
        return block_back(dout, (x, w, np.ones_like(h), x_hat, gamma, std))

    with pytest.raises(AssertionError, match="block backward, .*: dx"):
        checks.check_block_backward(no_mask, block)
    with pytest.raises(AssertionError, match="block forward, .*: out"):
        checks.check_block_forward(lambda x, w, g, b, e: (x @ w, None))  # no BN, no ReLU


def bn_module(unbiased=True, count=True, eval_mode=True):
    """A BatchNorm2d module written without the library; each flag set to False plants one typical bug."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Module(nn.Module):
        def __init__(self, num_features, eps=1e-5, momentum=0.1):
            super().__init__()
            self.eps, self.momentum = eps, momentum
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0))

        def forward(self, x):
            if eval_mode and not self.training:
                stats = (self.running_mean, self.running_var)
                return F.batch_norm(x, *stats, self.weight, self.bias, False, 0.0, self.eps)
            with torch.no_grad():
                self.num_batches_tracked += int(count)
                m = self.momentum or 1 / max(int(self.num_batches_tracked), 1)
                var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=int(unbiased))
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var, m)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    return Module


def test_bn_module_check_passes_the_library_and_a_module_written_without_it(capsys):
    from normlab import nn as normlab_nn

    checks.check_bn_module(normlab_nn.BatchNorm2d)
    checks.check_bn_module(bn_module())
    assert capsys.readouterr().out.count("PASS BatchNorm2d module") == 2


@pytest.mark.parametrize("bug, message", [
    ({"unbiased": False}, r"momentum=0.1, training batch 1: running_var: "),
    ({"count": False}, r"momentum=0.1, training batch 1: num_batches_tracked: "),
    ({"eval_mode": False}, r"momentum=0.1, eval mode: running_mean changed \(eval mode must leave the buffers"),
])
def test_bn_module_check_names_the_quantity_and_the_batch_of_a_typical_bug(bug, message):
    with pytest.raises(AssertionError, match=message):
        checks.check_bn_module(bn_module(**bug))


def test_bn_module_check_catches_buffers_registered_as_parameters():
    from torch import nn

    class AllParameters(bn_module()):
        def __init__(self, num_features, eps=1e-5, momentum=0.1):
            super().__init__(num_features, eps, momentum)
            self.running_mean = nn.Parameter(self.running_mean)

    with pytest.raises(AssertionError, match=r"momentum=0.1: parameters \['bias', 'running_mean', 'weight'\]"):
        checks.check_bn_module(AllParameters)


def test_bn_module_check_says_not_attempted_to_the_student_editions_stubs(capsys):
    from torch import nn

    class Stub(nn.Module):  # what the student edition's MyBatchNorm2d is before the student writes it
        def __init__(self, num_features, eps=1e-5, momentum=0.1):
            super().__init__()
            raise NotImplementedError("Exercise 2: Your own BatchNorm2d (write your solution here)")

    class HalfDone(bn_module()):  # __init__ written, forward still the stub
        def forward(self, x):
            raise NotImplementedError("Exercise 2: Your own BatchNorm2d (write your solution here)")

    for cls in (Stub, HalfDone):
        assert checks.check_bn_module(cls) is None
        out = capsys.readouterr().out
        assert out.startswith("NOT ATTEMPTED Exercise 2: Your own BatchNorm2d: nothing to check yet"), out
        assert "PASS" not in out and not checks.passed(cls)


# The second exercises of the labs of Chapters 3 to 7: each check passes a solution written
# without the reference and catches a typical mistake.


def test_largest_rate_check(capsys):
    def mine(lrs, steps):
        lrs, reached = np.asarray(lrs, float), np.isfinite(steps)
        best = np.where(reached, lrs[:, None], -np.inf).max(0)
        return np.where(reached.any(0), best, lrs.min())

    checks.check_largest_rate(mine)
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="largest rate"):  # the last rate listed, not the largest
        checks.check_largest_rate(lambda lrs, st: np.array([lrs[np.isfinite(st[:, j])][-1]
                                                            if np.isfinite(st[:, j]).any() else min(lrs)
                                                            for j in range(st.shape[1])]))


def _ghost_running(rm, rv, x, v, momentum, unbiased=True):
    groups = [x[i : i + v] for i in range(0, len(x), v)]
    w = np.array([len(g) for g in groups]) / len(x)
    mean = sum(wi * g.mean(0) for wi, g in zip(w, groups))
    var = sum(wi * g.var(0, ddof=1 if unbiased else 0) for wi, g in zip(w, groups))
    return (1 - momentum) * rm + momentum * mean, (1 - momentum) * rv + momentum * var


def test_ghost_running_check(capsys):
    checks.check_ghost_running(_ghost_running)
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="new_var"):
        checks.check_ghost_running(lambda rm, rv, x, v, m: _ghost_running(rm, rv, x, v, m, unbiased=False))
    with pytest.raises(AssertionError, match="new_var"):  # the whole batch's variance, not the ghost batches'
        checks.check_ghost_running(lambda rm, rv, x, v, m: _ghost_running(rm, rv, x, len(x), m))


def _measured(h, example, b, trials, rng, include_self=True):
    others = np.delete(h, example)[rng.integers(0, len(h) - 1, size=(trials, b - 1))]
    batch = np.concatenate([np.full((trials, 1), h[example]), others], axis=1) if include_self else others
    return float(((h[example] - batch.mean(1)) / np.sqrt(batch.var(1) + 1e-5)).std(ddof=1))


def test_measured_noise_check(capsys):
    checks.check_measured_noise(_measured)
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="measured noise"):  # the example left out of its own batch
        checks.check_measured_noise(lambda h, e, b, t, rng: _measured(h, e, b + 1, t, rng, include_self=False))


def test_ema_weights_check(capsys):
    def mine(m, steps):
        w = [m * (1 - m) ** (steps - k) for k in range(1, steps + 1)]
        return np.array([(1 - m) ** steps] + w)

    checks.check_ema_weights(mine)
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="EMA weights"):  # the batches in the wrong order
        checks.check_ema_weights(lambda m, s: np.concatenate([mine(m, s)[:1], mine(m, s)[1:][::-1]]))


def test_sequence_norm_check(capsys):
    def mine(h, kind, eps):
        axis = 1 if kind == "batch" else 2
        return (h - h.mean(axis, keepdim=True)) / (h.var(axis, unbiased=False, keepdim=True) + eps).sqrt()

    checks.check_sequence_norm(mine)
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="batch norm of h"):  # statistics over time and batch together
        checks.check_sequence_norm(lambda h, k, e: mine(h.reshape(1, -1, h.shape[2]), k, e).reshape(h.shape)
                                   if k == "batch" else mine(h, k, e))


def test_style_loss_check(capsys):
    def mine(fa, fb):
        total = 0.0
        for a, b in zip(fa, fb):
            for stat in (lambda f: f.mean((2, 3)), lambda f: (f.var((2, 3), unbiased=False) + 1e-5).sqrt()):
                total = total + ((stat(a) - stat(b)) ** 2).mean()
        return total

    checks.check_style_loss(mine)
    assert "PASS" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="style loss"):  # means only
        checks.check_style_loss(lambda fa, fb: sum(((a.mean((2, 3)) - b.mean((2, 3))) ** 2).mean()
                                                   for a, b in zip(fa, fb)))


def test_bn_only_and_beta_checks(capsys):
    from statistics import NormalDist

    from normlab.stats import batch_norm_layers

    def mine(model):
        for p in model.parameters():
            p.requires_grad_(False)
        bn = [p for m in batch_norm_layers(model) for p in (m.weight, m.bias)]
        for p in bn:
            p.requires_grad_(True)
        return sum(p.numel() for p in bn)

    checks.check_bn_only(mine)
    checks.check_beta_for_fraction(lambda q: NormalDist().inv_cdf(q))
    assert capsys.readouterr().out.count("PASS") == 2
    with pytest.raises(AssertionError, match="requires_grad"):  # gamma only
        checks.check_bn_only(lambda m: [p.requires_grad_(False) for p in m.parameters()]
                             and [m_.bias.requires_grad_(False) for m_ in batch_norm_layers(m)]
                             and [m_.weight.requires_grad_(True) for m_ in batch_norm_layers(m)] and 0)
    with pytest.raises(AssertionError, match="beta for a fraction 0.1"):  # the sign flipped
        checks.check_beta_for_fraction(lambda q: NormalDist().inv_cdf(1 - q))


def test_freeze_bn_check_passes_the_library_and_catches_eval_alone(capsys):
    from normlab.adapt import freeze_bn
    from normlab.stats import batch_norm_layers

    checks.check_freeze_bn(freeze_bn)
    assert "PASS" in capsys.readouterr().out

    def eval_only(model):
        for m in batch_norm_layers(model):
            m.eval()
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
        return model

    with pytest.raises(AssertionError, match="running_mean changed during training"):
        checks.check_freeze_bn(eval_only)  # undone by the next model.train()


def test_set_mode_check_passes_the_library_and_catches_bn_only_with_frozen_statistics(capsys):
    from normlab.adapt import freeze_bn
    from normlab.experiments import transfer as tr

    checks.check_set_mode(tr.set_mode)
    assert "PASS" in capsys.readouterr().out

    def frozen_bn_only(model, mode):
        tr.set_mode(model, mode)
        return freeze_bn(model) if mode == "bn_only" else model

    with pytest.raises(AssertionError, match="mode 'bn_only'"):
        checks.check_set_mode(frozen_bn_only)


CHAPTER_MODULES = sorted(m.name for m in pkgutil.iter_modules(checks.__path__) if not m.name.startswith("_"))


def _defined_checks(module_name):
    """The check_* functions defined in normlab.checks.<module_name> (not imported into it)."""
    module = importlib.import_module(f"normlab.checks.{module_name}")
    return {name for name, obj in vars(module).items()
            if name.startswith("check_") and callable(obj) and obj.__module__ == module.__name__}


def test_checks_has_one_module_per_chapter_and_each_check_is_defined_in_exactly_one():
    chapters = sorted(p.parent.name for p in (ROOT / "chapters").glob("*/index.md"))
    assert CHAPTER_MODULES == chapters
    homes = {}
    for module_name in CHAPTER_MODULES:
        for name in _defined_checks(module_name):
            homes.setdefault(name, []).append(module_name)
    assert {name: where for name, where in homes.items() if len(where) != 1} == {}
    assert sorted(homes) == sorted(CHECKS), "a check_* in a chapter module and in checks.__all__ differ"
    for name, (module_name,) in homes.items():
        assert getattr(checks, name) is getattr(importlib.import_module(f"normlab.checks.{module_name}"), name)


@pytest.mark.parametrize("module_name", CHAPTER_MODULES)
def test_each_chapter_modules_checks_are_called_by_a_lab_of_that_chapter(module_name):
    called = set()
    for path in sorted((ROOT / "chapters" / module_name).glob("*.ipynb")):
        for cell in load_notebook(path)["cells"]:
            if cell["cell_type"] == "code":
                called |= set(re.findall(r"\bchecks\.(check_\w+)\s*\(", cell_source(cell)))
    defined = _defined_checks(module_name)
    assert defined, f"normlab.checks.{module_name} defines no check"
    assert defined <= called, f"not called by a notebook of chapters/{module_name}: {sorted(defined - called)}"
