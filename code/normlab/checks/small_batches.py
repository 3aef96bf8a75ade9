"""Self-checks of "Small and non-i.i.d. batches" (``chapters/small_batches``).

``lab.ipynb``: ``check_batch_renorm``, ``check_grad_accumulation``.
"""

from __future__ import annotations

from normlab.checks._common import _pass, _self_check, assert_close


@_self_check
def check_batch_renorm(fn):
    """Check ``fn(x, gamma, beta, running_mean, running_var, r_max, d_max, eps) -> out`` (renorm, training).

    x: (N, C) or (N, C, H, W) float64 tensors; the reference is ``normlab.nn.BatchRenorm1d/2d``.
    The cases include limits that clip r and d and limits that do not.
    """
    import math

    import torch

    from normlab.nn import BatchRenorm1d, BatchRenorm2d

    gen = torch.Generator().manual_seed(5)
    cases = [((16, 4), 3.0, 5.0), ((4, 3), 1.5, 0.5), ((3, 2, 4, 5), 3.0, 5.0), ((8, 5), 1.0, 0.0),
             ((6, 3), math.inf, math.inf)]
    for shape, r_max, d_max in cases:
        C = shape[1]
        layer = (BatchRenorm1d if len(shape) == 2 else BatchRenorm2d)(C, r_max=r_max, d_max=d_max,
                                                                       dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) * 4 + 0.1)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
        args = [t.detach().clone() for t in (x, layer.weight, layer.bias, layer.running_mean, layer.running_var)]
        with torch.no_grad():
            got = fn(*args, r_max, d_max, layer.eps)
            expected = layer(x)
        if got is None:
            raise AssertionError(f"batch renorm, x of shape {shape}: got None (did the function forget to return?)")
        got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
        assert_close(f"batch renorm, x of shape {shape}, r_max={r_max}, d_max={d_max}: out", got,
                     expected.numpy(), rtol=1e-9, atol=1e-9)
    _pass("batch renormalization", len(cases))


@_self_check
def check_grad_accumulation(fn):
    """Check ``fn(model, x, y, k) -> relative difference`` against ``experiments.small_batches.grad_accumulation``.

    Cases: an MLP without normalization, with LayerNorm, with BN in train mode and with BN in eval
    mode, float64, k = 1, 2, 4.
    """
    import torch
    from torch import nn

    from normlab.experiments.small_batches import grad_accumulation
    from normlab.nn import BatchNorm1d

    torch.manual_seed(0)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    n = 0
    for name, norm, train in [("no norm", nn.Identity(), True), ("LayerNorm", nn.LayerNorm(8), True),
                              ("BN, train mode", BatchNorm1d(8), True), ("BN, eval mode", BatchNorm1d(8), False)]:
        model = nn.Sequential(nn.Linear(6, 8), norm, nn.ReLU(), nn.Linear(8, 3)).double()
        if not train:
            with torch.no_grad():
                model(x)  # give the eval-mode BN running statistics that are not (0, 1)
        model.train(train)
        for k in (1, 2, 4):
            expected = grad_accumulation(model, x, y, k)
            got = fn(model, x, y, k)
            if got is None:
                raise AssertionError(f"gradient accumulation, {name}, k={k}: got None")
            assert_close(f"gradient accumulation, {name}, k={k}: relative difference", float(got), expected,
                         rtol=1e-6, atol=1e-9)
            n += 1
    _pass("gradient accumulation", n)
