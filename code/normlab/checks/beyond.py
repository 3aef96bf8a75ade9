"""Self-checks of "Beyond batch norm: deep networks without it" (``chapters/beyond``).

- ``lab_diagnostics.ipynb``: ``check_record_outputs``, ``check_bn_output_std``.
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
