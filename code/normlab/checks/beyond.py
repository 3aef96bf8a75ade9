"""Self-checks of "Beyond batch norm: deep networks without it" (``chapters/beyond``).

- ``lab_diagnostics.ipynb``: ``check_record_outputs``, ``check_bn_output_std``.
- ``lab_normfree.ipynb``: ``check_bn_share``, ``check_agc``.
- ``lab_transformer.ipynb``: ``check_block_placement``, ``check_dyt``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from normlab.checks._common import _pass, _self_check, assert_close


@_self_check
def check_record_outputs(fn):
    """Check ``fn(model, x, kinds) -> {name: output}``: each layer of the kinds' output, by forward hooks.

    The hooks must be gone afterwards: a second forward pass may not change what was returned,
    and the model must have no forward hook left.
    """
    from normlab.experiments.beyond import make_deep_mlp
    from normlab.runtime.diagnostics import Diagnostics

    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    cases = [
        ("a tanh MLP with BN, Tanh layers", make_deep_mlp(64, 10, depth=3, width=16, bn=True, seed=1), (nn.Tanh,)),
        ("a ReLU MLP, ReLU layers", make_deep_mlp(64, 10, depth=4, width=8, activation="relu", seed=2), (nn.ReLU,)),
        ("a ReLU MLP, Linear layers", make_deep_mlp(64, 10, depth=2, width=8, activation="relu", seed=3),
         (nn.Linear,)),
    ]
    for desc, model, kinds in cases:
        with Diagnostics(model, kinds=kinds) as diag:
            with torch.no_grad():
                model(x)
        got = fn(model, x, kinds)
        if not isinstance(got, dict):
            raise AssertionError(f"{desc}: expected a dict name -> output, got {type(got).__name__}")
        if list(got) != diag.names:
            raise AssertionError(f"{desc}: recorded layers {list(got)}, expected {diag.names} (in forward order)")
        for name in diag.names:
            assert_close(f"{desc}: output of layer {name}", got[name], diag.outputs[name].numpy(), rtol=1e-6)
        hooks = [m for m in model.modules() if m._forward_hooks]
        if hooks:
            raise AssertionError(f"{desc}: {len(hooks)} layers still carry a forward hook: remove the handles")
    _pass("recorded outputs", len(cases))


@_self_check
def check_bn_output_std(fn):
    """Check ``fn(scale, fan_in, mean_square, eps) -> std``: BN's output std when the layer's variance nears eps."""
    from normlab.experiments.beyond import bn_output_std

    cases = [(1e-4, 64, 1.0, 1e-5), (1e-2, 50, 0.5, 1e-5), (1e-3, 100, 0.3, 1e-3), (3.0, 8, 2.0, 1e-5)]
    for scale, fan_in, q, eps in cases:
        assert_close(f"BN output std at scale {scale}, fan-in {fan_in}, mean square {q}, eps {eps}",
                     np.asarray(fn(scale, fan_in, q, eps), dtype=np.float64), bn_output_std(scale, fan_in, q, eps),
                     rtol=1e-9)
    _pass("BN output std", len(cases))


@_self_check
def check_bn_share(fn):
    """Check ``fn(x0_mean_square, blocks) -> (blocks,)``: De & Smith's branch share of each BN block at init."""
    from normlab.experiments.beyond import bn_share

    cases = [(1.0, 4), (1.85, 12), (0.3, 1), (7.5, 30)]
    for q0, blocks in cases:
        got = np.asarray(fn(q0, blocks), dtype=np.float64)
        if got.shape != (blocks,):
            raise AssertionError(f"x_0 of mean square {q0}, {blocks} blocks: expected shape ({blocks},), got "
                                 f"{got.shape}")
        assert_close(f"branch shares for x_0 of mean square {q0}, {blocks} blocks", got, bn_share(q0, blocks),
                     rtol=1e-9)
    _pass("branch shares", len(cases))


@_self_check
def check_agc(fn):
    """Check ``fn(weight, grad, clipping, eps) -> clipped grad``: adaptive gradient clipping of one (out, in) layer.

    Compared with ``normlab.normfree.adaptive_grad_clip_`` on cases where no unit, some units and
    every unit is clipped, and on a layer whose weights start at zero (eps decides). The inputs
    may not change.
    """
    from normlab.normfree import adaptive_grad_clip_

    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    grad = torch.randn(6, 5, generator=g, dtype=torch.float64)
    grad[:3] *= 0.001  # three units well under any threshold below
    cases = [("no unit clipped", w, grad * 1e-3, 0.1, 1e-3), ("some units clipped", w, grad, 0.01, 1e-3),
             ("every unit clipped", w, grad * 100, 0.01, 1e-3), ("zero weights: eps sets the limit",
                                                                 torch.zeros(4, 3, dtype=torch.float64),
                                                                 torch.ones(4, 3, dtype=torch.float64), 0.05, 1e-2)]
    for desc, weight, gr, clipping, eps in cases:
        expected = weight.clone()
        expected.grad = gr.clone()
        adaptive_grad_clip_([expected], clipping, eps)
        w_in, g_in = weight.clone(), gr.clone()
        got = fn(w_in, g_in, clipping, eps)
        if not (torch.equal(w_in, weight) and torch.equal(g_in, gr)):
            raise AssertionError(f"{desc}: your function changed its inputs; return a new tensor instead")
        if not isinstance(got, torch.Tensor) or got.shape != gr.shape:
            raise AssertionError(f"{desc}: expected a tensor of shape {tuple(gr.shape)}, got {got!r:.80}")
        assert_close(f"{desc}: clipped gradient", got.detach().numpy(), expected.grad.numpy(), rtol=1e-9)
    _pass("clipped gradients", len(cases))


@_self_check
def check_block_placement(fn):
    """Check ``fn(x, block) -> output``: a ``TransformerBlock``'s forward pass, pre-LN or post-LN, from its parts.

    fn gets the block's input (N, T, D) and the block, and must use ``block.attn``, ``block.mlp``,
    ``block.norm1``, ``block.norm2`` and ``block.place``; compared with the block's own forward.
    """
    from normlab.experiments.beyond import TransformerBlock

    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3))
    cases = 0
    for norm in ("ln", "dyt"):
        for place in ("pre", "post"):
            torch.manual_seed(cases)
            block = TransformerBlock(8, 2, norm, place)
            with torch.no_grad():
                got = fn(x.clone(), block)
                expected = block(x)
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
                raise AssertionError(f"{norm}, {place}-LN: expected a tensor of shape {tuple(expected.shape)}")
            assert_close(f"{norm} block, {place}-LN", got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
            cases += 1
    _pass("transformer blocks", cases)


@_self_check
def check_dyt(fn):
    """Check ``fn(x, alpha, weight, bias) -> y``: Dynamic Tanh, against ``normlab.normfree.DyT``."""
    from normlab.normfree import DyT

    g = torch.Generator().manual_seed(7)
    cases = [(torch.randn(3, 4, 6, generator=g), 0.5), (10 * torch.randn(2, 6, generator=g), 0.05),
             (torch.randn(5, 6, generator=g), 2.0)]
    for x, alpha in cases:
        layer = DyT(6, alpha_init=alpha)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 6))
            layer.bias.copy_(torch.linspace(-0.2, 0.3, 6))
            expected = layer(x)
            got = fn(x, layer.alpha.clone(), layer.weight.clone(), layer.bias.clone())
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            raise AssertionError(f"input {tuple(x.shape)}, alpha {alpha}: expected a tensor of the input's shape")
        assert_close(f"DyT of an input {tuple(x.shape)}, alpha {alpha}", got.numpy(), expected.numpy(), rtol=1e-6,
                     atol=1e-7)
    _pass("DyT outputs", len(cases))
