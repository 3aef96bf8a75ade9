"""Self-checks of "The alternatives: LayerNorm, InstanceNorm, GroupNorm, RMSNorm" (``chapters/alternatives``).

- ``lab.ipynb``: ``check_group_norm``, ``check_layer_norm_backward``;
- ``lab_style.ipynb``: ``check_adain``, ``check_style_loss``;
- ``lab_rnn.ipynb``: ``check_steps_to_target`` (its reference is in ``experiments.covariate_shift``,
  but only this lab asks for it), ``check_sequence_norm``.
"""

from __future__ import annotations

import numpy as np

from normlab import scratch
from normlab.checks._common import _pass, _self_check, assert_close, assert_tuple_close


def _norm_cases(seed=0):
    """Yield (description, x) float64 inputs (N, C, *) with channel counts that several group counts divide."""
    rng = np.random.default_rng(seed)
    for shape in [(2, 6, 5), (3, 4, 2, 3), (1, 8, 4), (4, 6)]:
        yield f"x of shape {shape}", rng.normal(1.0, 2.0, size=shape)


@_self_check
def check_group_norm(fn, eps=1e-5):
    """Check ``fn(x, num_groups, weight, bias, eps) -> out`` against ``scratch.group_norm`` (float64).

    Cases include num_groups = 1 (layer norm) and num_groups = C (instance norm).
    """
    rng = np.random.default_rng(3)
    n = 0
    for desc, x in _norm_cases():
        C = x.shape[1]
        for G in sorted({1, 2, C}):
            w, b = rng.normal(1.0, 0.3, size=C), rng.normal(0.0, 0.3, size=C)
            expected, _ = scratch.group_norm(x, G, w, b, eps)
            got = fn(x.copy(), G, w.copy(), b.copy(), eps)
            assert_close(f"group norm, {desc}, num_groups={G}: out", got, expected)
            n += 1
    _pass("group norm", n)


@_self_check
def check_layer_norm_backward(fn, eps=1e-5):
    """Check ``fn(dout, x, weight, eps) -> (dx, dweight, dbias)`` for layer norm over the last dim of x (N, D)."""
    rng = np.random.default_rng(4)
    cases = [(4, 5), (2, 8), (6, 3), (1, 7)]
    for shape in cases:
        x = rng.normal(0.5, 2.0, size=shape)
        w, b = rng.normal(1.0, 0.3, size=shape[1]), rng.normal(size=shape[1])
        dout = rng.normal(size=shape)
        _, cache = scratch.layer_norm(x, shape[1], w, b, eps)
        expected = scratch.layer_norm_backward(dout, cache)
        got = fn(dout.copy(), x.copy(), w.copy(), eps)
        assert_tuple_close(f"layer norm backward, x of shape {shape}", got, expected, ("dx", "dweight", "dbias"))
    _pass("layer norm backward", len(cases))


@_self_check
def check_adain(fn):
    """Check ``fn(content, style, eps) -> out``: adaptive instance normalization of (N, C, H, W)
    features, statistics per example and channel over space (biased variance, eps inside the root);
    the style may have another H, W. The reference is ``experiments.alternatives.adain``."""
    import torch

    from normlab.experiments.alternatives import adain

    gen = torch.Generator().manual_seed(8)
    cases = [("same sizes", (2, 3, 6, 6), (2, 3, 6, 6), 1e-5),
             ("a smaller style", (1, 4, 7, 5), (1, 4, 3, 3), 1e-5),
             ("eps 0.1 (inside the square root)", (2, 2, 4, 4), (2, 2, 5, 5), 0.1),
             ("one channel", (3, 1, 5, 5), (3, 1, 2, 6), 1e-5)]
    for desc, c_shape, s_shape, eps in cases:
        content = torch.randn(c_shape, generator=gen, dtype=torch.float64) * 3 + 1
        style = torch.randn(s_shape, generator=gen, dtype=torch.float64) * 0.5 - 2
        got = fn(content.clone(), style.clone(), eps)
        assert_close(f"AdaIN, {desc}", got, adain(content, style, eps).numpy(), rtol=1e-9, atol=1e-12)
    _pass("AdaIN", len(cases))


@_self_check
def check_steps_to_target(fn):
    """Check ``fn(eval_step, curve, target) -> steps``: per run (row of curve), the first evaluation
    step whose accuracy is at least target, inf where it never is. The reference is
    ``experiments.covariate_shift.steps_to_target``."""
    from normlab.experiments.covariate_shift import steps_to_target

    steps = np.array([25, 50, 75, 100])
    cases = [("three runs", steps, np.array([[0.2, 0.6, 0.85, 0.9], [0.5, 0.81, 0.7, 0.95], [0.1, 0.2, 0.3, 0.4]]),
              0.8),
             ("a run at the target exactly", steps, np.array([[0.3, 0.8, 0.9, 0.9]]), 0.8),
             ("reached at the first evaluation", steps, np.array([[0.9, 0.95, 0.97, 0.99]]), 0.8),
             ("one run as a 1-D curve", np.array([10, 20, 30]), np.array([0.1, 0.5, 0.7]), 0.6)]
    for desc, eval_step, curve, target in cases:
        got = fn(eval_step, curve, target)
        assert_close(f"steps to {target:g}, {desc}", got, steps_to_target(eval_step, curve, target))
    _pass("steps to target", len(cases))


@_self_check
def check_sequence_norm(fn):
    """Check ``fn(h, kind, eps) -> (T, B, H)`` for a sequence batch h (T, B, H), training mode.

    kind "batch": each time step's features normalized over the batch (mean and biased variance
    over B, per step and feature: recurrent BN's statistics per time step). kind "layer": each
    example's features normalized over its H features (per step and example). No affine.
    """
    import torch

    gen = torch.Generator().manual_seed(9)
    cases = [(5, 4, 3), (1, 6, 8), (3, 2, 5)]
    for shape in cases:
        h = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + torch.arange(shape[0]).view(-1, 1, 1)
        for kind, dim in (("batch", 1), ("layer", 2)):
            var, mean = torch.var_mean(h, dim=dim, correction=0, keepdim=True)
            got = fn(h.clone(), kind, 1e-5)
            assert_close(f"{kind} norm of h {shape}", got, ((h - mean) / torch.sqrt(var + 1e-5)).numpy())
    _pass("sequence normalization (batch and layer)", 2 * len(cases))


@_self_check
def check_style_loss(fn):
    """Check ``fn(fa, fb) -> loss``: summed over two lists of (N, C, H, W) features, the mean squared
    difference of per-example, per-channel means plus that of standard deviations
    (``alternatives.style_loss``; the spatial sizes of a pair may differ)."""
    import torch

    from normlab.experiments.alternatives import style_loss

    gen = torch.Generator().manual_seed(11)

    def feats(*shapes, scale=1.0):
        return [torch.randn(s, generator=gen, dtype=torch.float64) * scale + 0.5 for s in shapes]

    cases = [("one layer", feats((2, 3, 4, 4)), feats((2, 3, 4, 4), scale=2.0)),
             ("two layers, other sizes", feats((1, 4, 8, 8), (1, 2, 4, 4)), feats((1, 4, 5, 5), (1, 2, 3, 3))),
             ("the same features", feats((3, 2, 6, 6)) * 1, None)]
    for desc, fa, fb in cases:
        fb = fb if fb is not None else [f.clone() for f in fa]
        got = fn([f.clone() for f in fa], [f.clone() for f in fb])
        assert_close(f"style loss, {desc}", float(got), float(style_loss(fa, fb)), rtol=1e-9, atol=1e-12)
    _pass("style loss", len(cases))
