"""Many small models trained as one: the course's ensemble trainer.

A claim about training ("BN trains faster", "dropout hurts with BN") needs many seeds, and on a
2-core CPU a small MLP spends most of its time in Python and the dispatcher, not in arithmetic.
So the course trains K copies of a model (members: same architecture, different seeds or
settings) as one model whose tensors carry a leading member axis: activations are (K, N, D), one
batched matrix product runs every member's Linear layer, and each member draws its own
mini-batches. No operation mixes members, so member k follows exactly the path it would follow
alone (``tests/test_ensemble.py`` checks this against ``normlab.runtime.train.train``, step by step).

The normalization layers are the library's own modules, used unchanged: K members with D
features each are one layer with K * D channels. ``Folded`` moves the member axis into the
channels, (K, N, D) -> (N, K * D), calls the wrapped module and moves it back, so a
``normlab.nn.BatchNorm1d(K * D)`` normalizes every member's features over that member's batch,
keeps every member's running statistics, and works with ``precise_bn`` as it is. Ghost batch
norm, population norm and batch renormalization fold the same way (the trick is the one
``GhostBatchNorm`` uses for its virtual batches); batch norm of images, (K, N, C, H, W), folds
into (N, K * C, H, W) alike.

Convolutional and recurrent members: ``Conv`` stacks Conv1d/Conv2d layers (one grouped
convolution, or one batched product over the receptive fields); ``normlab.nn.LastHidden`` (an
LSTM) has a stacked version, ``LSTM``, that runs the library's own ``NormLSTMCell.step`` with a
member axis; ``PerExample`` runs Flatten, Unflatten and pooling; any other layer (a chapter's
own norm, a circular-padded convolution) is ``Vmapped``: the models' own modules with their
parameters stacked, mapped over the member axis by ``torch.func.vmap``.

    models = [make_mlp(40, 10, seed=s) for s in seeds]   # ordinary nn.Sequential models
    ens = stack(models)                                  # one Ensemble of len(seeds) members
    fit(ens, data, steps=600, batch_size=32, lr=0.05, seeds=seeds)
    evaluate(ens, data)["test_acc"]                      # (K,) one accuracy per member
    member(ens, 0)                                       # member 0 as a plain nn.Sequential again
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from normlab import nn as normlab_nn
from normlab._validate import check_positive_int, is_number
from normlab.normfree import (
    FilterResponseNorm2d,
    ScaledWSConv2d,
    ScaledWSLinear,
    WSConv2d,
    WSLinear,
    scaled_standardize_weight,
    standardize_weight,
)
from normlab.runtime.data import Split
from normlab.runtime.train import device_of, show_progress
from normlab.stats import is_batch_norm, precise_bn

__all__ = ["Linear", "Conv", "StandardizedLinear", "StandardizedConv", "Folded", "MemberNorm", "LSTM", "PerExample",
           "Vmapped", "Grouped", "Ensemble", "stack", "member", "member_batches", "member_loss", "SGD", "fit",
           "eval_logits", "evaluate", "accuracy", "batch_accuracy"]

# Eval-mode passes over a whole set run in chunks of this many examples. In eval mode every example
# is on its own, so the numbers are those of one pass; on a CPU a single pass over hundreds of
# examples for dozens of members outgrows the cache and takes about twice as long.
EVAL_CHUNK = 128

# Layers that act on each value (or each example's last axis) alone: they run on (K, N, D) as is.
_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Identity, nn.Dropout)
# Layers without parameters that act on each example alone (reshapes, pooling): run on K * N examples.
_PER_EXAMPLE = (nn.Flatten, nn.Unflatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.MaxPool1d, nn.MaxPool2d)


class Linear(nn.Module):
    """K stacked ``nn.Linear`` layers: (K, N, in) -> (K, N, out), one batched matrix product.

    weight: (K, in, out), member k's ``nn.Linear`` weight transposed (so that the batched product
    reads it contiguously, forward and backward); bias: (K, 1, out).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        if weight.dim() != 3 or bias.shape != (weight.shape[0], 1, weight.shape[2]):
            raise ValueError(f"weight must be (K, in, out) and bias (K, 1, out); got {tuple(weight.shape)}, "
                             f"{tuple(bias.shape)}")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)  # (K, N, out)

    def extra_repr(self):
        K, d_in, out = self.weight.shape
        return f"members={K}, in_features={d_in}, out_features={out}"


class Folded(nn.Module):
    """Run a per-channel layer of K * C channels on (K, N, C, ...) input: member k owns channels kC..(k+1)C-1."""

    def __init__(self, module: nn.Module, members: int):
        super().__init__()
        self.module, self.members = module, members

    def forward(self, x):
        K, N, C, *rest = x.shape
        if K != self.members:
            raise ValueError(f"expected {self.members} members on axis 0, got input of shape {tuple(x.shape)}")
        folded = x.transpose(0, 1).reshape(N, K * C, *rest)  # (N, K * C, ...): each member's channels
        return self.module(folded).reshape(N, K, C, *rest).transpose(0, 1)  # back to (K, N, C, ...)


class Conv(nn.Module):
    """K stacked ``nn.Conv1d`` or ``nn.Conv2d`` layers: (K, N, C, *S) -> (K, N, out, *S'), one call.

    weight: (K, out, C, *kernel), member k's kernel as its own layer holds it; bias: (K, out), or
    None. Two ways to run all members at once, each the faster on a CPU for its case (measured on
    small members, K = 8 and N = 64): a 2-D layer folds the members into the channels,
    (N, K * C, H, W), and runs one convolution with K groups; a 1-D layer is written as a matrix
    product (im2col): ``Tensor.unfold`` views every example's receptive fields, C * kernel values
    per output position, and one batched product multiplies each member's fields by its kernel.
    """

    def __init__(self, weight, bias, *, stride, padding, dilation):
        super().__init__()
        if weight.dim() not in (4, 5):
            raise ValueError(f"weight must be (K, out, C, *kernel) with 1 or 2 spatial axes, got {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.stride, self.padding = tuple(stride), tuple(padding)
        if any(d != 1 for d in dilation):
            raise ValueError(f"dilated convolutions are not supported, got dilation={tuple(dilation)}")

    @property
    def kernel_size(self):
        return tuple(self.weight.shape[3:])

    def kernel(self):
        """The weight the convolution uses, (K, out, C, *kernel): the stored one."""
        return self.weight

    def forward(self, x):
        K, N, C, *S = x.shape
        dims = self.weight.dim() - 3
        if len(S) != dims or K != self.weight.shape[0] or C != self.weight.shape[2]:
            raise ValueError(f"expected (K={self.weight.shape[0]}, N, C={self.weight.shape[2]}) and {dims} "
                             f"spatial axes, got shape {tuple(x.shape)}")
        out_channels = self.weight.shape[1]
        if dims == 2:  # members as groups of channels
            folded = x.transpose(0, 1).reshape(N, K * C, *S)
            bias = None if self.bias is None else self.bias.reshape(-1)
            y = F.conv2d(folded, self.kernel().reshape(K * out_channels, C, *self.kernel_size), bias,
                         stride=self.stride, padding=self.padding, groups=K)
            return y.reshape(N, K, out_channels, *y.shape[2:]).transpose(0, 1)
        pads = [q for p in reversed(self.padding) for q in (p, p)]
        cols = F.pad(x, pads) if any(self.padding) else x
        for axis, (k, st) in enumerate(zip(self.kernel_size, self.stride)):
            cols = cols.unfold(3 + axis, k, st)  # (K, N, C, *out positions, *kernel): a view
        out = cols.shape[3 : 3 + dims]
        order = [0, 1, *range(3, 3 + dims), 2, *range(3 + dims, 3 + 2 * dims)]  # (K, N, *out, C, *kernel)
        cols = cols.permute(order).reshape(K, N * math.prod(out), -1)  # (K, N * positions, C * kernel)
        kernels = self.kernel().reshape(K, out_channels, -1).transpose(1, 2)  # (K, C * kernel, out)
        y = cols @ kernels if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), cols, kernels)
        return y.reshape(K, N, *out, -1).movedim(-1, 2)  # (K, N, out channels, *out positions)

    def extra_repr(self):
        K, out, C = self.weight.shape[:3]
        return (f"members={K}, in_channels={C}, out_channels={out}, kernel={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class StandardizedLinear(Linear):
    """K stacked ``normlab.normfree.WSLinear`` (gain None) or ``ScaledWSLinear`` layers.

    weight (K, in, out) as ``Linear`` stores it; each member's units are standardized by the
    library's own functions, on the (K * out, in) matrix of all members' units. gain: (K, 1, out).
    """

    def __init__(self, weight, bias, eps, gain=None, gamma=1.0):
        super().__init__(weight, bias)
        self.eps, self.gamma = eps, gamma
        self.gain = None if gain is None else nn.Parameter(gain.clone())

    def forward(self, x):
        K, d_in, d_out = self.weight.shape
        rows = self.weight.transpose(1, 2).reshape(K * d_out, d_in)  # one row per unit of every member
        if self.gain is None:
            w = standardize_weight(rows, self.eps)
        else:
            w = scaled_standardize_weight(rows, self.gain.reshape(-1), self.gamma, self.eps)
        return torch.baddbmm(self.bias, x, w.reshape(K, d_out, d_in).transpose(1, 2))


class StandardizedConv(Conv):
    """K stacked ``normlab.normfree.WSConv2d`` layers: each member's output channels standardized."""

    def __init__(self, weight, bias, *, stride, padding, dilation, eps):
        super().__init__(weight, bias, stride=stride, padding=padding, dilation=dilation)
        self.eps = eps

    def kernel(self):
        return standardize_weight(self.weight.flatten(0, 1), self.eps).reshape(self.weight.shape)


class MemberNorm(nn.Module):
    """LayerNorm or GroupNorm on (K, N, C, ...): each example normalized alone, then member k's own gamma and beta.

    layer=True: ``nn.LayerNorm`` over the last axis of (K, N, D) input. Otherwise
    ``nn.GroupNorm`` with ``groups`` groups of channels (over the channels and any spatial axes;
    one group is layer norm over (C, ...) as Wu & He define it for CNNs). weight, bias: (K, 1, C).
    Like the torch modules, with the biased variance.
    """

    def __init__(self, weight, bias, groups: int, eps: float, layer: bool = False):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        self.groups, self.eps, self.layer = groups, eps, layer

    def forward(self, x):
        K, N, C, *rest = x.shape
        if self.layer:
            if rest:
                raise ValueError(f"a stacked LayerNorm takes (K, N, D) input, got shape {tuple(x.shape)}")
            normed = F.layer_norm(x, (C,), eps=self.eps)
        else:
            normed = F.group_norm(x.reshape(K * N, C, *rest), self.groups, eps=self.eps).reshape(x.shape)
        shape = (K, 1, C) + (1,) * len(rest)  # one gamma and beta per member and channel
        return normed * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self):
        kind = "LayerNorm" if self.layer else f"groups={self.groups}"
        return f"members={self.weight.shape[0]}, channels={self.weight.shape[2]}, {kind}, eps={self.eps}"


class LSTM(nn.Module):
    """K stacked ``normlab.nn.LastHidden`` layers: (K, N, T, D) -> (K, N, H), each member's final hidden state.

    ``cell`` is a ``normlab.nn.NormLSTMCell`` whose tensors carry the member axis (weights
    (K, 4H, D) and (K, 4H, H), bias and gains (K, 1, width), running statistics
    (max_steps, K, width)); its own ``step`` runs all members at once.
    """

    def __init__(self, cell: normlab_nn.NormLSTMCell, members: int):
        super().__init__()
        self.cell, self.members = cell, members

    def forward(self, x):
        K, N, T, _ = x.shape
        h = c = x.new_zeros(K, N, self.cell.hidden_size)
        for t in range(T):
            h, c = self.cell.step(x[:, :, t], h, c, t)
        return h

    def extra_repr(self):
        return f"members={self.members}"


class PerExample(nn.Module):
    """A layer without parameters that acts on each example alone (``nn.Flatten``, ``nn.Unflatten``,
    pooling), on (K, N, ...): the member and batch axes merged into one and split again afterwards."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class Vmapped(nn.Module):
    """K same-shaped modules of any type as one: their parameters and buffers stacked, run with ``torch.func.vmap``.

    For layers with no hand-written ensemble version (a chapter's own norm, a convolution with
    circular padding or groups). ``vmap`` maps the member axis of the input, of every parameter
    and of every buffer, so member k computes exactly what ``modules[k]`` computes on its slice
    (buffer updates in place included); dropout inside draws different masks per member.
    Parameters are (K, ...) with their names flattened ("0.weight" becomes "0__weight").
    """

    def __init__(self, modules):
        super().__init__()
        from torch.func import stack_module_state

        self.members = len(modules)
        params, buffers = stack_module_state(list(modules))
        self._names = {name.replace(".", "__"): name for name in [*params, *buffers]}
        for name, p in params.items():
            self.register_parameter(name.replace(".", "__"), nn.Parameter(p.detach().clone()))
        for name, b in buffers.items():
            self.register_buffer(name.replace(".", "__"), b.clone())
        self.template = [copy.deepcopy(modules[0]).to("meta")]  # in a list: not a submodule

    def _state(self):
        params = {self._names[n]: p for n, p in self.named_parameters(recurse=False)}
        buffers = {self._names[n]: b for n, b in self.named_buffers(recurse=False)}
        return params, buffers

    def forward(self, x):
        from torch.func import functional_call, vmap

        template = self.template[0]
        template.train(self.training)
        params, buffers = self._state()

        def one(p, b, xk):
            return functional_call(template, (p, b), (xk,))

        return vmap(one, randomness="different")(params, buffers, x)

    def module_of(self, k: int) -> nn.Module:
        """Member k as an ordinary module (a copy)."""
        one = copy.deepcopy(self.template[0]).to_empty(device="cpu")
        params, buffers = self._state()
        with torch.no_grad():
            for name, t in {**params, **buffers}.items():
                target = one.get_parameter(name) if name in params else one.get_buffer(name)
                target.copy_(t[k])
        return one.train(self.training)

    def extra_repr(self):
        return f"members={self.members}, module={type(self.template[0]).__name__}"


class Grouped(nn.Module):
    """Members of different layer types at one depth: consecutive members in groups, each its own layer."""

    def __init__(self, layers, sizes):
        super().__init__()
        self.layers, self.sizes = nn.ModuleList(layers), list(sizes)

    def forward(self, x):
        return torch.cat([layer(part) for layer, part in zip(self.layers, x.split(self.sizes))])


class Ensemble(nn.Sequential):
    """A sequence of ensemble layers on (K, N, ...) tensors; ``members`` is K.

    example_dims: the axes of one example (1 for features (D,), 2 for sequences (T, D)); an input
    without the member axis goes to every member.
    """

    def __init__(self, *layers, members: int, example_dims: int = 1):
        super().__init__(*layers)
        self.members, self.example_dims = members, example_dims

    def forward(self, x):
        if x.dim() == self.example_dims + 1:  # one input for every member: a view, no copy
            x = x.expand(self.members, *x.shape)
        if x.dim() != self.example_dims + 2 or x.shape[0] != self.members:
            raise ValueError(f"expected input ({self.members}, N, ...) of {self.example_dims + 2} axes, or (N, ...) of "
                             f"{self.example_dims + 1} for every member; got shape {tuple(x.shape)}")
        return super().forward(x)


def _stack_norm(layers):
    """One norm module of K * D channels from K norm modules of D channels (weights and buffers concatenated)."""
    first = layers[0]
    fused = copy.deepcopy(first)
    fused.num_features = first.num_features * len(layers)
    for name, t in list(first.named_parameters(recurse=False)) + list(first.named_buffers(recurse=False)):
        if t is None:
            continue
        if t.dim() == 0:  # num_batches_tracked: one counter, as every member counts the same steps
            continue
        joined = torch.cat([getattr(m, name).detach() for m in layers])
        if isinstance(t, nn.Parameter):
            setattr(fused, name, nn.Parameter(joined.clone()))
        else:
            setattr(fused, name, joined.clone())
    return fused


def _stack_layers(layers, i):
    """One ensemble layer from the K same-type layers found at depth i of the models.

    Parameters the models do not train (``requires_grad=False``, e.g. after ``freeze_bn``) are
    not trained in the ensemble either; the models must agree on which.
    """
    flags = [[p.requires_grad for p in layer.parameters()] for layer in layers]
    if any(f != flags[0] for f in flags):
        raise ValueError(f"layer {i}: the models differ in which parameters train (requires_grad)")
    stacked = _stack_layer(layers, i)
    params = list(stacked.parameters())  # one stacked tensor per parameter of the model's layer, in order
    assert len(params) == len(flags[0]), (type(stacked).__name__, len(params), len(flags[0]))
    for p, flag in zip(params, flags[0]):
        p.requires_grad_(flag)
    return stacked


def _stack_layer(layers, i):
    K, first = len(layers), layers[0]
    if isinstance(first, ScaledWSConv2d):
        raise ValueError(f"layer {i}: ScaledWSConv2d has no stacked version")
    if isinstance(first, nn.Linear):
        if any(layer.weight.shape != first.weight.shape for layer in layers):
            raise ValueError(f"layer {i}: Linear sizes differ between models")
        if first.bias is None:
            raise ValueError(f"layer {i}: a Linear layer without bias is not supported")
        weight = torch.stack([layer.weight.detach().T for layer in layers]).contiguous()  # (K, in, out)
        bias = torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1).clone()  # (K, 1, out)
        if isinstance(first, ScaledWSLinear):
            gain = torch.stack([layer.gain.detach() for layer in layers]).unsqueeze(1)  # (K, 1, out)
            return StandardizedLinear(weight, bias, first.eps, gain, first.gamma)
        if isinstance(first, WSLinear):  # a subclass of nn.Linear: stacked as one it would lose its standardization
            return StandardizedLinear(weight, bias, first.eps)
        return Linear(weight, bias)
    if is_batch_norm(first) or isinstance(first, FilterResponseNorm2d):  # per-channel: members fold into channels
        if any(layer.num_features != first.num_features for layer in layers):
            raise ValueError(f"layer {i}: norm sizes differ between models")
        return Folded(_stack_norm(layers), K)
    if isinstance(first, (nn.LayerNorm, nn.GroupNorm)):
        ln = isinstance(first, nn.LayerNorm)
        if ln and len(first.normalized_shape) != 1:
            raise ValueError(f"layer {i}: LayerNorm over more than the last axis is not supported")
        if not (first.elementwise_affine if ln else first.affine):
            raise ValueError(f"layer {i}: a {type(first).__name__} without affine parameters is not supported")
        weight = torch.stack([layer.weight.detach() for layer in layers]).unsqueeze(1).clone()  # (K, 1, D)
        bias = torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1).clone()
        return MemberNorm(weight, bias, 1 if ln else first.num_groups, first.eps, layer=ln)
    if (isinstance(first, (nn.Conv1d, nn.Conv2d)) and first.groups == 1 and first.padding_mode == "zeros"
            and not isinstance(first.padding, str) and all(d == 1 for d in first.dilation)):
        if any(layer.weight.shape != first.weight.shape for layer in layers):
            raise ValueError(f"layer {i}: convolution sizes differ between models")
        weight = torch.stack([layer.weight.detach() for layer in layers])  # (K, out, C, *kernel)
        bias = None if first.bias is None else torch.stack([layer.bias.detach() for layer in layers])
        if isinstance(first, WSConv2d):
            return StandardizedConv(weight, bias, stride=first.stride, padding=first.padding,
                                    dilation=first.dilation, eps=first.eps)
        return Conv(weight, bias, stride=first.stride, padding=first.padding, dilation=first.dilation)
    if isinstance(first, normlab_nn.LastHidden):
        return LSTM(_stack_cell([layer.lstm.cell for layer in layers], i), K)
    if isinstance(first, _ELEMENTWISE):
        return copy.deepcopy(first)
    if isinstance(first, _PER_EXAMPLE):
        return PerExample(copy.deepcopy(first))
    shapes = [[tuple(t.shape) for t in (*m.parameters(), *m.buffers())] for m in layers]
    if any(sh != shapes[0] for sh in shapes):
        raise ValueError(f"layer {i} ({type(first).__name__}): parameter shapes differ between models")
    return Vmapped(layers)  # any other layer: the models' own modules, mapped over the member axis


def _stack_cell(cells, i):
    """One NormLSTMCell holding K cells: parameters stacked first, running statistics on axis 1."""
    first = cells[0]
    config = (first.input_size, first.hidden_size, first.norm, first.max_steps, first.eps, first.momentum)
    if any((c.input_size, c.hidden_size, c.norm, c.max_steps, c.eps, c.momentum) != config for c in cells):
        raise ValueError(f"layer {i}: the LSTM cells differ between models")
    fused = copy.deepcopy(first)
    for name, p in first.named_parameters(recurse=False):
        joined = torch.stack([getattr(c, name).detach() for c in cells])  # (K, 4H, D) or (K, width)
        setattr(fused, name, nn.Parameter(joined if p.dim() == 2 else joined.unsqueeze(1).clone()))
    for name, _ in first.named_buffers(recurse=False):
        setattr(fused, name, torch.stack([getattr(c, name) for c in cells], 1).clone())  # (T, K, width)
    return fused


def _kind(layer):
    """What must agree for layers to stack as one: the type, and for layers without weights of
    their own shape (norms, dropout, ...) the settings ``extra_repr`` shows (a ghost batch size,
    eps, p), which the stacked layer takes from the first model."""
    if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return type(layer), ""  # their sizes are checked when they stack
    return type(layer), layer.extra_repr()


def _runs(layers):
    """Split layers into runs of consecutive layers of one kind (``_kind``): [(start, stop), ...]."""
    runs, start = [], 0
    for k in range(1, len(layers) + 1):
        if k == len(layers) or _kind(layers[k]) != _kind(layers[start]):
            runs.append((start, k))
            start = k
    return runs


def stack(models) -> Ensemble:
    """Return one ``Ensemble`` whose member k starts exactly as ``models[k]`` (an ``nn.Sequential``).

    The models must have the same depth and the same layer sizes. Supported layers: ``nn.Linear``;
    batch norm modules of ``torch.nn`` and ``normlab.nn`` (1d: BatchNorm, GhostBatchNorm,
    PopulationNorm, BatchRenorm; torch's 2d too) and ``normlab.normfree.FilterResponseNorm2d``,
    folded into channels; ``nn.LayerNorm`` and
    ``nn.GroupNorm``; element-wise layers (ReLU, Sigmoid, Tanh, GELU, Identity, Dropout);
    ``nn.Conv1d`` / ``nn.Conv2d`` (zero padding, no groups or dilation), ``nn.Flatten``,
    ``nn.Unflatten`` and pooling; ``normlab.nn.LastHidden`` (an LSTM reading (N, T, D)); any
    other layer runs ``Vmapped``. The first layer decides the input: (K, N, D) for most,
    (K, N, T, D) for an LSTM, (K, N, C, L) for a Conv1d, (K, N, C, H, W) for a Conv2d. Parameters
    that do not train in the models (``requires_grad=False``) do not train in the ensemble. At a
    depth where the models hold different layer types (BN in some, LayerNorm in others) or one
    type with different settings (ghost batches of 2 in some, of 8 in others), each run of
    consecutive models of one kind becomes its own group (``Grouped``): order the models by kind.
    """
    models = list(models)
    if not models:
        raise ValueError("stack needs at least one model")
    if any(not isinstance(m, nn.Sequential) for m in models):
        raise TypeError(f"stack takes nn.Sequential models, got {sorted({type(m).__name__ for m in models})}")
    K = len(models)
    depth = len(models[0])
    if any(len(m) != depth for m in models):
        raise ValueError(f"models differ in depth: {[len(m) for m in models]}")
    out = []
    for i in range(depth):
        layers = [m[i] for m in models]
        runs = _runs(layers)
        if len(runs) == 1:
            out.append(_stack_layers(layers, i))
            continue
        if any(isinstance(layer, nn.Linear) for layer in layers):
            raise ValueError(f"layer {i} differs between models: {sorted({type(x).__name__ for x in layers})}")
        out.append(Grouped([_stack_layers(layers[a:b], i) for a, b in runs], [b - a for a, b in runs]))
    first = models[0][0]
    kinds = {nn.Conv2d: 3, nn.Conv1d: 2, normlab_nn.LastHidden: 2}  # axes of one example (subclasses too)
    example_dims = next((d for kind, d in kinds.items() if isinstance(first, kind)), 1)
    return Ensemble(*out, members=K, example_dims=example_dims)


def _member_layer(layer, k, K):
    """Member k of one ensemble layer of K members, as an ordinary module (a copy)."""
    if isinstance(layer, Linear):
        _, d_in, d_out = layer.weight.shape
        if isinstance(layer, StandardizedLinear) and layer.gain is not None:
            lin = ScaledWSLinear(d_in, d_out, gamma=layer.gamma, eps=layer.eps)
            with torch.no_grad():
                lin.gain.copy_(layer.gain[k, 0])
        elif isinstance(layer, StandardizedLinear):
            lin = WSLinear(d_in, d_out, eps=layer.eps)
        else:
            lin = nn.Linear(d_in, d_out)
        with torch.no_grad():
            lin.weight.copy_(layer.weight[k].T)
            lin.bias.copy_(layer.bias[k, 0])
        return lin
    if isinstance(layer, Folded):
        norm = copy.deepcopy(layer.module)
        D = norm.num_features // K
        norm.num_features = D
        for name, t in list(norm.named_parameters(recurse=False)) + list(norm.named_buffers(recurse=False)):
            if t is not None and t.dim() == 1:
                part = t.detach()[k * D : (k + 1) * D].clone()
                setattr(norm, name, nn.Parameter(part, t.requires_grad) if isinstance(t, nn.Parameter) else part)
        return norm
    if isinstance(layer, MemberNorm):
        D = layer.weight.shape[2]
        norm = nn.LayerNorm(D, eps=layer.eps) if layer.layer else nn.GroupNorm(layer.groups, D, eps=layer.eps)
        with torch.no_grad():
            norm.weight.copy_(layer.weight[k, 0])
            norm.bias.copy_(layer.bias[k, 0])
        return norm
    if isinstance(layer, Vmapped):
        return layer.module_of(k)
    if isinstance(layer, PerExample):
        return copy.deepcopy(layer.module)
    if isinstance(layer, Conv):
        out, C = layer.weight.shape[1:3]
        cls = nn.Conv1d if len(layer.kernel_size) == 1 else nn.Conv2d
        extra = {}
        if isinstance(layer, StandardizedConv):
            cls, extra = WSConv2d, {"eps": layer.eps}
        conv = cls(C, out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                   bias=layer.bias is not None, **extra)
        with torch.no_grad():
            conv.weight.copy_(layer.weight[k])
            if layer.bias is not None:
                conv.bias.copy_(layer.bias[k])
        return conv
    if isinstance(layer, LSTM):
        c = layer.cell
        one = normlab_nn.LastHidden(c.input_size, c.hidden_size, c.norm, c.max_steps, c.eps, c.momentum)
        with torch.no_grad():
            for name, p in one.lstm.cell.named_parameters(recurse=False):
                p.copy_(getattr(c, name)[k].reshape(p.shape))
            for name, b in one.lstm.cell.named_buffers(recurse=False):
                b.copy_(getattr(c, name)[:, k])
        return one
    if isinstance(layer, Grouped):
        for sub, size in zip(layer.layers, layer.sizes):
            if k < size:
                return _member_layer(sub, k, size)
            k -= size
    return copy.deepcopy(layer)


def member(ens: Ensemble, k: int) -> nn.Sequential:
    """Return member k of ``ens`` as an ordinary ``nn.Sequential`` (a copy: training it leaves ``ens`` alone)."""
    if not 0 <= k < ens.members:
        raise IndexError(f"member {k} out of range for an ensemble of {ens.members}")
    return nn.Sequential(*[_member_layer(layer, k, ens.members) for layer in ens])


def member_batches(seeds, n: int, batch_size: int):
    """Yield (K, batch_size) index tensors forever: row k as ``train.train(seed=seeds[k])`` draws them."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    while True:
        yield torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in gens])


def member_loss(logits, y):
    """Per-member mean cross-entropy, (K,): logits (K, B, C), y (K, B)."""
    K, B, C = logits.shape
    return F.cross_entropy(logits.reshape(K * B, C), y.reshape(K * B), reduction="none").reshape(K, B).mean(1)


def _member_lr(lr, K):
    """lr as a (K, 1) tensor: one value for every member, or one per member."""
    t = torch.as_tensor(lr, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(K)
    if t.numel() != K:
        raise ValueError(f"lr has {t.numel()} entries, expected 1 or {K} (one per member)")
    if not (t > 0).all():
        raise ValueError(f"every lr must be positive, got {t.tolist()}")
    return t.reshape(K, 1)


def _member_params(module, first, count):
    """Yield (parameter, first member, members) for every parameter: which members' rows it holds."""
    if isinstance(module, Grouped):
        for sub, size in zip(module.layers, module.sizes):
            yield from _member_params(sub, first, size)
            first += size
        return
    for p in module.parameters(recurse=False):
        yield p, first, count
    for child in module.children():
        yield from _member_params(child, first, count)


class SGD:
    """SGD with momentum and weight decay, as ``torch.optim.SGD`` computes it, with one learning rate per member.

    Every parameter of an ensemble has its members on the leading axis (Linear: (K, ...); folded
    norms: (K * D,), member-major; a group's parameters: its own members), so ``p.view(k, -1)``
    gives each member its own row.
    """

    def __init__(self, ens, lr, momentum=0.0, weight_decay=0.0):
        lr = _member_lr(lr, ens.members)  # (K, 1)
        # One rate for all: torch's own arithmetic (add with alpha), so that results match it bit for bit.
        self.uniform = float(lr[0]) if bool((lr == lr[0]).all()) else None
        self.params = [(p, lr[a : a + k].to(p.device), k) for p, a, k in _member_params(ens, 0, ens.members)
                       if p.requires_grad]
        self.momentum, self.weight_decay = momentum, weight_decay
        self.buffers = [None] * len(self.params)

    def zero_grad(self):
        for p, _, _ in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for i, (p, lr, k) in enumerate(self.params):
            if p.grad is None:
                continue
            d_p = p.grad.view(k, -1)  # (members, values per member)
            if self.weight_decay:
                d_p = d_p.add(p.view(k, -1), alpha=self.weight_decay)
            if self.momentum:
                if self.buffers[i] is None:
                    self.buffers[i] = d_p.clone()
                else:
                    self.buffers[i].mul_(self.momentum).add_(d_p)
                d_p = self.buffers[i]
            if self.uniform is not None:
                p.view(k, -1).add_(d_p, alpha=-self.uniform)
            else:
                p.view(k, -1).sub_(lr * d_p)


def fit(
    ens: Ensemble,
    data: Split,
    *,
    lr,
    seeds=None,
    steps: int | None = None,
    batch_size: int = 64,
    batches=None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    refresh_every: int | None = None,
    before_step=None,
    after_step=None,
    before_update=None,
    progress: bool | None = None,
) -> np.ndarray:
    """Train every member with SGD on its own mini-batches; return the (K, steps) training losses.

    Batches: with ``seeds``, member k draws ``batch_size`` examples per step as
    ``normlab.runtime.train.train(..., seed=seeds[k])`` does, for ``steps`` steps; or ``batches``, a
    sequence of (K, B) index tensors (row k: member k's batch), one per step. SGD with momentum
    and weight decay acts on each value alone, so member k's run is the one it would have alone
    (dropout masks aside: they come from torch's global generator, seeded from ``seeds[0]``).
    lr: one learning rate, or one per member. optimizer: "sgd" (with ``momentum``) or "adam"
    (``torch.optim.Adam`` with its default betas, one learning rate for all: Adam acts on each
    value alone, so on stacked parameters it is every member's own Adam). refresh_every: recompute the statistics of
    population norm layers with ``precise_bn`` on the whole training set before the first step
    and every that many steps (default: every epoch, ``regularization.fit``'s schedule).
    before_step(step) and after_step(step, loss) run around each step (loss: (K,)), e.g. for a
    schedule or a measurement. before_update(ens) runs between the backward pass and the
    optimizer's update (e.g. gradient clipping). Leaves the ensemble in eval mode.
    """
    K, n = ens.members, len(data.x_train)
    if batches is None:
        if seeds is None:
            raise ValueError("pass seeds (one per member, with steps and batch_size) or batches")
        seeds = [int(s) for s in seeds]
        if len(seeds) != K:
            raise ValueError(f"need one seed per member: {K} members, {len(seeds)} seeds")
        check_positive_int("steps", steps)
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
        draw = member_batches(seeds, n, batch_size)
        batches = [next(draw) for _ in range(steps)]
        torch.manual_seed(seeds[0])  # dropout masks
    batches = list(batches)
    if not batches or any(b.dim() != 2 or b.shape[0] != K for b in batches):
        raise ValueError(f"batches must be a non-empty sequence of ({K}, B) index tensors")
    populations = [m for m in ens.modules() if isinstance(m, normlab_nn._PopulationNorm)]
    device = device_of(ens)
    x_all = data.x_train.to(device).expand(K, *data.x_train.shape)  # (K, n, D), a view

    def refresh():
        precise_bn(ens, [x_all])
        ens.train()

    if populations:
        refresh()
        refresh_every = refresh_every or max(1, n // batches[0].shape[1])
    if optimizer == "sgd":
        opt = SGD(ens, lr, momentum, weight_decay)
    elif optimizer == "adam":
        if not is_number(lr) or lr <= 0:
            raise ValueError(f"Adam takes one positive learning rate for every member, got {lr!r}")
        opt = torch.optim.Adam([p for p in ens.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    losses = []
    ens.train()
    bar = tqdm(batches, desc=f"{K} members", disable=not show_progress(progress), leave=False)
    for step, idx in enumerate(bar, 1):  # idx: (K, B)
        if before_step is not None:
            before_step(step)
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        loss = member_loss(ens(x), y)  # (K,)
        opt.zero_grad()
        loss.sum().backward()  # members share no weights: each gets the gradient of its own loss
        if before_update is not None:
            before_update(ens)
        opt.step()
        if populations and step % refresh_every == 0:
            refresh()
        losses.append(loss.detach())
        if after_step is not None:
            after_step(step, losses[-1])
    ens.eval()
    return torch.stack(losses, 1).cpu().numpy()


@torch.no_grad()
def eval_logits(model: nn.Module, x) -> torch.Tensor:
    """``model(x)`` for a model in eval mode, run in chunks of ``EVAL_CHUNK`` examples.

    x: (N, ...) one set for every member; returns the model's output, (K, N, C) for an ensemble
    or (N, C) for one model (the examples' axis is the first one with N entries: 1, else 0).
    """
    if model.training:
        raise ValueError("eval_logits needs a model in eval mode: in train mode batch statistics mix the chunks")
    outs = [model(x[i : i + EVAL_CHUNK]) for i in range(0, len(x), EVAL_CHUNK)]
    return torch.cat(outs, dim=1 if isinstance(model, Ensemble) else 0)


def evaluate(ens: Ensemble, data: Split) -> dict:
    """Return each member's train and test accuracy and cross-entropy in eval mode, and the gaps: (K,) arrays."""
    was = ens.training
    ens.eval()
    out = {}
    data = data.to(device_of(ens))
    for part, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        logits = eval_logits(ens, x)  # (K, N, C)
        out[f"{part}_acc"] = (logits.argmax(-1) == y).double().mean(1).cpu().numpy()
        out[f"{part}_loss"] = member_loss(logits, y.expand(ens.members, -1)).double().cpu().numpy()
    out["acc_gap"] = out["train_acc"] - out["test_acc"]
    out["loss_gap"] = out["test_loss"] - out["train_loss"]
    ens.train(was)
    return out


@torch.no_grad()
def accuracy(ens: Ensemble, x, y, batch_size: int | None = None, train_mode: bool = False) -> np.ndarray:
    """Return each member's accuracy on x, y: (K,). As ``normlab.runtime.train.accuracy``, for every member at once.

    x, y: one set for every member ((N, ...) and (N,)), or one per member ((K, N, ...) and (K, N)).
    By default in eval mode, in chunks of ``EVAL_CHUNK`` examples (the numbers of one pass over all
    of x); with ``batch_size``, on consecutive batches (the last one may be shorter).
    ``train_mode=True`` normalizes each batch (by default all of x) with its own statistics (what
    forgetting ``model.eval()`` does: the norm layers in training mode; dropout stays off);
    running statistics are saved and restored, so the call changes nothing.
    """
    own = x.dim() == ens.example_dims + 2  # one set per member: examples on axis 1
    N = x.shape[1] if own else len(x)
    if y.shape[-1] != N or (y.dim() == 2) != own:
        raise ValueError(f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)} do not match")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = batch_size or (N if train_mode else EVAL_CHUNK)
    device = device_of(ens)
    x, y = x.to(device), y.to(device)
    with _batch_statistics(ens, train_mode):
        correct = sum((ens(x[:, i : i + step] if own else x[i : i + step]).argmax(-1) == y[..., i : i + step]).sum(1)
                      for i in range(0, N, step))
    return (correct.double() / N).cpu().numpy()


def _uses_batch_statistics(module):
    """Whether a module normalizes with batch statistics in training mode (and keeps running ones)."""
    return is_batch_norm(module) or (isinstance(module, normlab_nn.NormLSTMCell) and module.norm == "batch")


@contextlib.contextmanager
def _batch_statistics(ens, on=True):
    """Within the block: ``ens`` in eval mode, its norm layers in training mode (if ``on``); afterwards
    every norm layer's running statistics are what they were, and the modes too."""
    norms = [m for m in ens.modules() if _uses_batch_statistics(m)] if on else []
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was = ens.training
    ens.eval()
    for m in norms:
        m.train()
    try:
        yield
    finally:
        for m, state in zip(norms, saved):
            m.load_state_dict(state)
        ens.train(was)


@torch.no_grad()
def batch_accuracy(ens: Ensemble, x, y, batch_size: int) -> np.ndarray:
    """Return each member's accuracy on x, y with the statistics of consecutive batches of ``batch_size`` (K,).

    The norm layers run in training mode (what forgetting ``model.eval()`` does) on each batch in
    turn; the rest of the model (dropout) in eval mode; running statistics are saved and restored,
    so the call changes nothing. A last short batch is left out (``accuracy(..., train_mode=True)``
    keeps it).
    """
    N = len(x)
    if not 2 <= batch_size <= N:
        raise ValueError(f"batch_size must be in [2, {N}], got {batch_size}")
    M = N // batch_size
    return accuracy(ens, x[: M * batch_size], y[: M * batch_size], batch_size, train_mode=True)
