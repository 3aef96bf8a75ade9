"""Self-checks of "Batch norm as a PyTorch module" (``chapters/pytorch``).

``lab.ipynb``: ``check_bn_backward``, ``check_cumulative_average``, ``check_bn_module``, ``check_fold``.
"""

from __future__ import annotations

from normlab.checks._common import _pass, _self_check, assert_close, assert_tuple_close


def _torch_cases(seed=0):
    """Yield (description, x) float64 tensors: 2-D and 4-D, odd shapes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for shape in [(5, 3), (16, 4), (2, 3, 4, 5), (4, 2, 1, 3)]:
        yield f"x of shape {shape}", torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1


@_self_check
def check_bn_backward(fn):
    """Check ``fn(grad_out, x_hat, invstd, weight) -> (grad_input, grad_weight, grad_bias)`` (training mode)."""
    import torch

    from normlab.functional import batch_norm

    n = 0
    for desc, x in _torch_cases():
        C = x.shape[1]
        gen = torch.Generator().manual_seed(n)
        weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        bias = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()
        x = x.requires_grad_()
        out = batch_norm(x, None, None, weight, bias, training=True)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        expected = torch.autograd.grad(out, (x, weight, bias), grad_out)
        dims = [0] + list(range(2, x.dim()))
        shape = (1, C) + (1,) * (x.dim() - 2)
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            invstd = torch.rsqrt(var + 1e-5)
            x_hat = (x - mean.view(shape)) * invstd.view(shape)
            got = fn(grad_out.clone(), x_hat.clone(), invstd.clone(), weight.detach().clone())
        assert_tuple_close(f"backward, {desc}", got, [e.numpy() for e in expected],
                           ("grad_input", "grad_weight", "grad_bias"))
        n += 1
    _pass("autograd backward", n)


@_self_check
def check_cumulative_average(fn):
    """Check ``fn(running, batch_stat, k) -> new running``: the momentum=None update after batch k."""
    import torch

    from normlab.nn import BatchNorm1d

    gen = torch.Generator().manual_seed(3)
    bn = BatchNorm1d(4, momentum=None, dtype=torch.float64)
    running = bn.running_mean.clone()
    for k in range(1, 8):
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64) * k + k
        bn(x)
        running = fn(running.clone(), x.mean(0), k)
        assert_close(f"cumulative average after batch {k}", None if running is None else running.numpy(),
                     bn.running_mean.numpy())
    _pass("cumulative average (momentum=None)", 7)


@_self_check
def check_fold(fn):
    """Check ``fn(layer, bn) -> new layer`` computing bn(layer(x)) for Linear / Conv2d, with and without bias."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    cases = [
        ("Linear with bias", nn.Linear(5, 3), nn.BatchNorm1d(3), (8, 5)),
        ("Linear without bias", nn.Linear(5, 3, bias=False), nn.BatchNorm1d(3), (8, 5)),
        ("Conv2d with bias", nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), (3, 2, 6, 6)),
        ("Conv2d without bias", nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), (3, 2, 6, 6)),
    ]
    for desc, layer, bn, shape in cases:
        layer, bn = layer.double(), bn.double()
        with torch.no_grad():  # non-trivial statistics and affine parameters
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
        bn.eval()
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            expected = bn(layer(x))
            folded = fn(layer, bn)
            if not isinstance(folded, nn.Module):
                raise AssertionError(f"{desc}: expected an nn.Module, got {type(folded).__name__}")
            got = folded(x)
        assert_close(f"fold, {desc}: output", got.numpy(), expected.numpy())
    _pass("folding", len(cases))


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _bn_module_step(module, x, dy):
    """Run module on x and backpropagate sum(out * dy); return {quantity: tensor}: output, gradients, buffers."""
    import torch

    x = x.clone().requires_grad_()
    module.weight.grad = module.bias.grad = None
    out = module(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise AssertionError(f"expected an output of shape {tuple(x.shape)}, got {getattr(out, 'shape', out)!r}")
    if not out.requires_grad:
        raise AssertionError("the output has no gradient (was it computed under torch.no_grad()?)")
    (out * dy).sum().backward()
    got = {"output": out, "input gradient": x.grad, "weight gradient": module.weight.grad,
           "bias gradient": module.bias.grad}
    return got | {name: getattr(module, name).clone() for name in _BN_BUFFERS}


@_self_check
def check_bn_module(cls):
    """Check ``cls(num_features, eps=1e-5, momentum=0.1)``, a BatchNorm2d module, against torch.nn.BatchNorm2d.

    With momentum 0.1 and None, in float64: the parameters, the state_dict keys and a new module's values;
    state dicts that load both ways; five training batches of different means and scales (the output, the
    gradients of input, weight and bias, and the three buffers after each batch); then eval mode (the same
    quantities, and buffers left as they were).
    """
    import torch
    from torch import nn

    C, n = 3, 0
    gen = torch.Generator().manual_seed(8)
    for momentum in (0.1, None):
        case = f"momentum={momentum}"
        ours = cls(C) if momentum == 0.1 else cls(C, momentum=None)
        ref = nn.BatchNorm2d(C, momentum=momentum)
        if not isinstance(ours, nn.Module):
            raise AssertionError(f"{case}: expected an nn.Module, got {type(ours).__name__}")
        params = sorted(name for name, _ in ours.named_parameters())
        if params != ["bias", "weight"]:
            raise AssertionError(f"{case}: parameters {params}, expected ['bias', 'weight'] (the running "
                                 "statistics and the counter are buffers: register_buffer)")
        if list(ours.state_dict()) != list(ref.state_dict()):
            raise AssertionError(f"{case}: state_dict keys {list(ours.state_dict())}, "
                                 f"expected {list(ref.state_dict())}")
        for key, expected in ref.state_dict().items():  # a new module: gamma 1, beta 0, mean 0, var 1, count 0
            got = ours.state_dict()[key]
            if got.dtype != expected.dtype:
                raise AssertionError(f"{case}, a new module: {key} has dtype {got.dtype}, expected {expected.dtype}")
            assert_close(f"{case}, a new module: {key}", got, expected.numpy())
        ours, ref = ours.double(), ref.double()
        with torch.no_grad():  # a random gamma and beta; running statistics away from 0 and 1
            for t, low in ((ref.weight, 0.5), (ref.bias, -1.0), (ref.running_mean, -1.0), (ref.running_var, 0.5)):
                t.copy_(low + torch.rand(C, generator=gen, dtype=torch.float64))
        for src, dst, what in ((ref, ours, "torch's state dict into your module"),
                               (ours, ref, "your state dict into torch's module")):
            try:
                dst.load_state_dict(src.state_dict())
            except RuntimeError as err:
                raise AssertionError(f"{case}: loading {what} failed: {err}") from None
        for batch in range(1, 7):  # five training batches, then one in eval mode
            training = batch <= 5
            where = f"{case}, training batch {batch}" if training else f"{case}, eval mode"
            if not training:
                before = {name: getattr(ours, name).clone() for name in _BN_BUFFERS}
                ours.eval()
                ref.eval()
            x = torch.randn(4, C, 3, 2, generator=gen, dtype=torch.float64) * (0.5 + batch) + 2 * batch - 5
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            try:
                got = _bn_module_step(ours, x, dy)
            except AssertionError as err:
                raise AssertionError(f"{where}: {err}") from None
            if not training:
                for name in _BN_BUFFERS:
                    assert_close(f"{where}: {name} changed (eval mode must leave the buffers as they are)",
                                 got[name], before[name].numpy())
            for name, expected in _bn_module_step(ref, x, dy).items():
                assert_close(f"{where}: {name}", got[name], expected.detach().numpy())
            n += 1
    _pass("BatchNorm2d module", n)
