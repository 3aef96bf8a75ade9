"""Chapter 6's experiments: the normalizations as one operation over different axes.

- A small CNN on 8x8 digits with one of six normalizations after each convolution (none, batch,
  layer, instance, group, RMS), trained at a normal and at a tiny batch size, for equal epochs or
  equal steps (``cnn_table``).
- Instance statistics as "style": adaptive instance normalization (Huang & Belongie 2017) and an
  image optimized to carry one input's content with another's statistics (``style_transfer``);
  a feed-forward stylization network with instance, batch or no normalization, judged on content
  images it never trained on (``stylization_experiment``, after Ulyanov et al. 2016).
- An LSTM classifier reading digits row by row with no, layer or per-step batch normalization
  (``train_rnn``), evaluated at batch size 1 and on sequences longer than in training.

The lab notebooks in ``chapters/alternatives/`` call these functions and assert what the chapter
claims.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from normlab._validate import check_positive_int, is_int
from normlab.experiments import seeds_for
from normlab.nn import LastHidden
from normlab.runtime import ensemble
from normlab.runtime.data import Split
from normlab.runtime.train import accuracy, show_progress, train

__all__ = [
    "CNN_NORMS",
    "RNN_NORMS",
    "LABELS",
    "budget",
    "seeds_for",
    "ChannelRMSNorm",
    "make_norm",
    "DigitCNN",
    "as_images",
    "train_cnn",
    "cnn_table",
    "channel_stats",
    "adain",
    "FeatureNet",
    "style_transfer",
    "STYLE_NORMS",
    "StyleNet",
    "stylization_losses",
    "stylization_experiment",
    "as_sequences",
    "pad_front",
    "SeqClassifier",
    "train_rnn",
    "seq_accuracy",
    "rnn_experiment",
]

CNN_NORMS = ("none", "bn", "ln", "in", "gn", "rms")
RNN_NORMS = ("none", "layer", "batch")
LABELS = {"none": "none", "bn": "BatchNorm", "ln": "LayerNorm", "in": "InstanceNorm", "gn": "GroupNorm",
          "rms": "RMSNorm", "layer": "LayerNorm", "batch": "BatchNorm per step"}


def budget(scale="quick"):
    """Return the seeds, epochs and steps per experiment for a scale ('quick' or 'full')."""
    if scale == "quick":
        return {"seeds": 8, "cnn_epochs": 1, "rnn_steps": 250, "style_steps": 150, "stylenet_steps": 150,
                "time_repeat": 15}
    if scale == "full":
        return {"seeds": 8, "cnn_epochs": 10, "rnn_steps": 3000, "style_steps": 600, "stylenet_steps": 1000,
                "time_repeat": 51}
    raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")


# --------------------------------------------------------------------------------------------
# Six normalizations in one CNN
# --------------------------------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """RMSNorm over (C, H, W) of each example with a per-channel gain (no mean, no shift)."""

    def __init__(self, num_channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x):
        ms = x.pow(2).mean((1, 2, 3), keepdim=True)  # (N, 1, 1, 1): one statistic per example
        return x * torch.rsqrt(ms + self.eps) * self.weight[:, None, None]


def make_norm(kind, channels, groups=4):
    """Return the normalization layer for (N, C, H, W) activations: one of ``CNN_NORMS``.

    'ln' is GroupNorm with one group (layer norm over (C, H, W), per-channel affine, as Wu & He
    define it for CNNs); 'in' is GroupNorm with C groups (instance norm with an affine). Chapter 10
    also takes 'frn': ``normlab.normfree.FilterResponseNorm2d``, whose learned threshold replaces
    the ReLU (``DigitCNN`` leaves the ReLU out after it), and 'ws_gn': GroupNorm, to follow the
    weight-standardized convolutions ``DigitCNN`` then uses (Qiao et al. 2019).
    """
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    if kind == "in":
        return nn.GroupNorm(channels, channels)
    if kind == "gn":
        if channels % groups:
            raise ValueError(f"groups={groups} does not divide channels={channels}")
        return nn.GroupNorm(groups, channels)
    if kind == "rms":
        return ChannelRMSNorm(channels)
    if kind == "frn":
        from normlab.normfree import FilterResponseNorm2d

        return FilterResponseNorm2d(channels)
    if kind == "ws_gn":  # the GroupNorm half; DigitCNN standardizes the convolutions' weights
        return make_norm("gn", channels, groups)
    raise ValueError(f"kind must be one of {CNN_NORMS}, 'frn' or 'ws_gn', got {kind!r}")


class DigitCNN(nn.Sequential):
    """conv3x3(1->c1) - norm - ReLU - conv3x3 stride 2 (c1->c2) - norm - ReLU - flatten - linear.

    With norm "frn" each ReLU is left out: the FRN layer's thresholded linear unit takes its place.
    With norm "ws_gn" the convolutions are ``normlab.normfree.WSConv2d``, followed by GroupNorm.

    Input (N, 1, 8, 8); the second convolution gives (N, c2, 4, 4), flattened for the linear layer
    (no global pooling: where a stroke is matters for a digit). An ``nn.Sequential``, so that
    ``normlab.runtime.ensemble`` stacks it.
    """

    def __init__(self, norm="bn", c1=16, c2=32, classes=10, groups=4):
        bias = norm == "none"  # a shift before a mean-subtracting norm is cancelled by it
        act = nn.Identity if norm == "frn" else nn.ReLU  # FRN ends in its own thresholded unit
        if norm == "ws_gn":
            from normlab.normfree import WSConv2d as conv
        else:
            conv = nn.Conv2d
        super().__init__(
            conv(1, c1, 3, padding=1, bias=bias), make_norm(norm, c1, groups), act(),
            conv(c1, c2, 3, stride=2, padding=1, bias=bias), make_norm(norm, c2, groups), act(),
            nn.Flatten(), nn.Linear(c2 * 16, classes),  # (N, c2, 4, 4) -> (N, c2 * 16) -> (N, classes)
        )


def as_images(data):
    """Return a copy of a digits Split with inputs shaped (N, 1, 8, 8)."""
    if data.x_train.shape[1] != 64:
        raise ValueError(f"expected 8x8 digits (64 features), got {data.x_train.shape[1]}")
    return Split(data.x_train.reshape(-1, 1, 8, 8), data.y_train, data.x_test.reshape(-1, 1, 8, 8), data.y_test,
                 data.name + " (images)")


def train_cnn(kind, images, batch_size=32, epochs=3, lr=0.05, seed=0, device="cpu"):
    """Train a DigitCNN with one normalization; return its test accuracy in eval mode.

    Equal epochs at every batch size; the learning rate scales linearly with the batch,
    ``lr * batch_size / 32`` (as Wu & He did); SGD with momentum 0.9.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("epochs", epochs)
    images = images.to(device)
    torch.manual_seed(seed)
    model = DigitCNN(kind).to(device)
    steps = max(1, epochs * len(images.x_train) // batch_size)
    train(model, images, steps=steps, lr=lr * batch_size / 32, batch_size=batch_size, seed=seed, progress=False)
    return accuracy(model, images.x_test, images.y_test)


def cnn_table(images, kinds=CNN_NORMS, batch_sizes=(32, 2), seeds=(0, 1, 2), epochs=3, lr=0.05, steps=None,
              progress=None, device="cpu"):
    """Return {(kind, batch_size): (S,) array of test accuracies}, one entry per seed.

    Each entry is ``train_cnn(kind, images, batch_size, epochs, lr, seed)`` for every seed, the
    seeds trained together as one ``normlab.runtime.ensemble``: equal epochs at every batch size, so a
    batch of 2 makes 16 times the updates of a batch of 32. With ``steps``, every batch size makes
    that many updates instead (equal steps; ``epochs`` is then unused); the learning rate is
    ``lr * batch_size / 32`` either way.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    if steps is None:
        check_positive_int("epochs", epochs)
    else:
        check_positive_int("steps", steps)
    images = images.to(device)
    table = {}
    for k in kinds:
        for b in batch_sizes:
            check_positive_int("batch_size", b)
            models = []
            for s in seeds:
                torch.manual_seed(s)  # as train_cnn
                models.append(DigitCNN(k))
            ens = ensemble.stack(models).to(device)
            n_steps = max(1, epochs * len(images.x_train) // b) if steps is None else steps
            ensemble.fit(ens, images, lr=lr * b / 32, seeds=seeds, steps=n_steps, batch_size=b, progress=progress)
            table[k, b] = ensemble.accuracy(ens, images.x_test, images.y_test)
    return table


# --------------------------------------------------------------------------------------------
# RMSNorm vs LayerNorm: time
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Instance statistics as style
# --------------------------------------------------------------------------------------------


def channel_stats(f, eps=1e-5):
    """Return the per-example, per-channel mean and standard deviation of f (N, C, H, W): (N, C, 1, 1) each."""
    if f.dim() != 4:
        raise ValueError(f"expected features (N, C, H, W), got shape {tuple(f.shape)}")
    var, mean = torch.var_mean(f, (2, 3), correction=0, keepdim=True)
    return mean, torch.sqrt(var + eps)


def adain(content, style, eps=1e-5):
    """Adaptive instance normalization: instance-normalize ``content``, then give it ``style``'s statistics.

    content, style: (N, C, H, W) features (style may have another H, W). Returns (N, C, H, W).
    """
    if content.dim() != 4 or style.dim() != 4 or content.shape[:2] != style.shape[:2]:
        raise ValueError(f"content {tuple(content.shape)} and style {tuple(style.shape)} must be (N, C, *, *) alike")
    mc, sc = channel_stats(content, eps)
    ms, ss = channel_stats(style, eps)
    return (content - mc) / sc * ss + ms


class FeatureNet(nn.Module):
    """A fixed, randomly initialized feature extractor: three conv3x3 + ReLU layers (the second strided).

    Random convolutional features are enough to show statistics as style on small images; its
    weights never train. Returns the feature maps of every layer.
    """

    def __init__(self, channels=(32, 64, 64), seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers, c_in = [], 1
        for i, c in enumerate(channels):
            conv = nn.Conv2d(c_in, c, 3, stride=2 if i == 1 else 1, padding=1)
            with torch.no_grad():
                conv.weight.normal_(0.0, math.sqrt(2.0 / (9 * c_in)), generator=gen)  # He init
                conv.bias.zero_()
            layers.append(conv)
            c_in = c
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x):
        feats = []
        for conv in self.layers:
            x = torch.relu(conv(x))
            feats.append(x)
        return feats


def style_loss(fa, fb):
    """Huang and Belongie's style loss between two lists of features (N, C, H, W), layer by layer.

    Summed over the layers: the mean squared difference of the per-example, per-channel means plus
    that of the standard deviations (``channel_stats``). The spatial sizes of a pair may differ.
    """
    loss = 0.0
    for a, b in zip(fa, fb):
        ma, sa = channel_stats(a)
        mb, sb = channel_stats(b)
        loss = loss + F.mse_loss(ma, mb) + F.mse_loss(sa, sb)
    return loss


def style_transfer(content, style, steps=150, style_weight=10.0, lr=0.05, seed=0, device="cpu"):
    """Optimize an image to carry ``content``'s features with ``style``'s channel statistics.

    content, style: (1, 1, H, W) images. The target at the last layer is
    ``adain(f(content), f(style))``; the loss adds the squared differences of per-channel means and
    standard deviations at every layer (Huang & Belongie's style loss). The image starts from the
    content. Returns a dict: 'image' (1, 1, H, W, on the CPU), and the style loss of the content
    image, of the result, and of the style image against itself (0).
    device: where the feature network and the image live, e.g. ``ctx.device``.
    """
    for name, t in (("content", content), ("style", style)):
        if t.dim() != 4 or t.shape[:2] != (1, 1):
            raise ValueError(f"{name} must be one grey image (1, 1, H, W), got {tuple(t.shape)}")
    check_positive_int("steps", steps)
    content, style = content.to(device), style.to(device)
    net = FeatureNet(seed=seed).to(device)
    fs = net(style)
    target = adain(net(content)[-1], fs[-1]).detach()
    img = content.clone().requires_grad_()
    opt = torch.optim.Adam([img], lr=lr)
    for _ in range(steps):
        f = net(img)
        loss = F.mse_loss(f[-1], target) + style_weight * style_loss(f, fs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {"image": img.detach().cpu(), "style_loss_before": float(style_loss(net(content), fs)),
                "style_loss_after": float(style_loss(net(img), fs))}


STYLE_NORMS = ("none", "bn", "in")


class StyleNet(nn.Sequential):
    """A feed-forward stylization network: conv3x3 (1->c) - norm - ReLU - conv3x3 (c->c) - norm - ReLU - conv3x3 (c->1).

    Maps a grey image (N, 1, H, W) to one of the same size (zero padding), as Ulyanov et al.'s
    generators do at a much smaller size; ``norm`` is one of ``STYLE_NORMS`` (``make_norm``'s
    'none', 'bn', 'in'). An ``nn.Sequential``, so that ``normlab.runtime.ensemble`` stacks it.
    """

    def __init__(self, norm="in", channels=8):
        if norm not in STYLE_NORMS:
            raise ValueError(f"norm must be one of {STYLE_NORMS}, got {norm!r}")
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(1, channels, 3, padding=1, bias=bias), make_norm(norm, channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias), make_norm(norm, channels), nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )


def stylization_losses(net, images, content_feats, style_stats):
    """Per-image content and style losses of ``images`` (M, 1, H, W) under the loss network ``net``.

    content_feats: the last layer's features of the content images (M, C, h, w); style_stats:
    one (mean, sd) pair per layer from ``channel_stats`` of the style image. The content loss is
    the mean squared difference of the last layer's features; the style loss is, summed over the
    layers, the mean squared difference of the channel means plus that of the channel standard
    deviations (for one image, ``style_loss``). Returns two (M,) tensors.
    """
    feats = net(images)
    content = (feats[-1] - content_feats).pow(2).mean((1, 2, 3))
    style = images.new_zeros(len(images))
    for f, (ms, ss) in zip(feats, style_stats):
        m, sd = channel_stats(f)
        style = style + (m - ms).pow(2).mean((1, 2, 3)) + (sd - ss).pow(2).mean((1, 2, 3))
    return content, style


def stylization_experiment(contents, style, norms=STYLE_NORMS, seeds=(0,), steps=200, batch_size=8, lr=0.01,
                           style_weight=10.0, net_seed=0, channels=8, net_channels=(16, 32, 32), n_show=4,
                           progress=None, device="cpu"):
    """Train a feed-forward ``StyleNet`` per norm and seed to restyle content images; measure on held-out ones.

    Ulyanov et al.'s setting, scaled down: one style, a generator trained with Adam on batches of
    ``contents.x_train`` (N, 1, H, W) to minimize content loss + ``style_weight`` * style loss
    (``stylization_losses``) under a fixed random ``FeatureNet`` (``net_channels``, seed ``net_seed``);
    the generator has ``channels`` channels. Then, in eval
    mode (BN with its running statistics), the losses on ``contents.x_test``, images it never saw.
    The seeds of one norm train together as one ``normlab.runtime.ensemble``; seed s fixes the generator's
    initial weights (the same for every norm, up to the layers that differ) and its batches.
    Returns {norm: {'style', 'content', 'total': (S,) mean held-out losses per seed,
    'train_style': (S,) style loss on the last training batch, 'images': (S, n_show, 1, H, W) the
    first ``n_show`` held-out images restyled, on the CPU}}.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if style.dim() != 4 or style.shape[:2] != (1, 1):
        raise ValueError(f"style must be one grey image (1, 1, H, W), got {tuple(style.shape)}")
    x_train, x_test = contents.x_train, contents.x_test
    if x_train.dim() != 4 or x_train.shape[1] != 1:
        raise ValueError(f"contents must be grey images (N, 1, H, W), got {tuple(x_train.shape)}")
    contents, style = contents.to(device), style.to(device)
    x_train, x_test = contents.x_train, contents.x_test
    net = FeatureNet(channels=net_channels, seed=net_seed).to(device)
    with torch.no_grad():
        style_stats = [channel_stats(f) for f in net(style)]
        test_feats = net(x_test)[-1]
    K, n = len(seeds), len(x_train)
    out = {}
    for norm in norms:
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(StyleNet(norm, channels))
        ens = ensemble.stack(models).to(device)
        opt = torch.optim.Adam(ens.parameters(), lr=lr)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        ens.train()
        for _ in tqdm(range(steps), desc=f"StyleNet {norm}", disable=not show_progress(progress), leave=False):
            idx = torch.stack([torch.randint(n, (batch_size,), generator=g) for g in gens])  # (K, B)
            x = x_train[idx]  # (K, B, 1, H, W): member k's batch
            with torch.no_grad():
                cf = net(x.flatten(0, 1))[-1]
            c, st = stylization_losses(net, ens(x).flatten(0, 1), cf, style_stats)
            loss = (c + style_weight * st).view(K, batch_size).mean(1)  # (K,): each member's own loss
            opt.zero_grad()
            loss.sum().backward()  # the members share no parameter: the sum trains each on its own
            opt.step()
        train_style = st.detach().view(K, batch_size).mean(1)
        ens.eval()
        with torch.no_grad():
            y = ens(x_test)  # (K, N, 1, H, W)
            c, st = stylization_losses(net, y.flatten(0, 1), test_feats.repeat(K, 1, 1, 1), style_stats)
            c, st = c.view(K, -1).mean(1), st.view(K, -1).mean(1)
        out[norm] = {"style": st.double().cpu().numpy(), "content": c.double().cpu().numpy(),
                     "total": (c + style_weight * st).double().cpu().numpy(),
                     "train_style": train_style.double().cpu().numpy(), "images": y[:, :n_show].clone().cpu()}
    return out


# --------------------------------------------------------------------------------------------
# Recurrent networks
# --------------------------------------------------------------------------------------------


def as_sequences(data):
    """Return a copy of a digits Split whose inputs are (N, 8, 8) sequences: 8 rows of 8 pixels, top first."""
    if data.x_train.shape[1] != 64:
        raise ValueError(f"expected 8x8 digits (64 features), got {data.x_train.shape[1]}")
    return Split(data.x_train.reshape(-1, 8, 8), data.y_train, data.x_test.reshape(-1, 8, 8), data.y_test,
                 data.name + " (rows)")


def pad_front(x, steps, value=0.0):
    """Prepend ``steps`` rows of ``value`` to sequences x (N, T, D): the digit at the bottom of a taller canvas."""
    if x.dim() != 3:
        raise ValueError(f"x must be (N, T, D), got shape {tuple(x.shape)}")
    if not is_int(steps) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    return torch.cat([x.new_full((x.shape[0], steps, x.shape[2]), value), x], 1)


class SeqClassifier(nn.Sequential):
    """A NormLSTM reading (N, T, D), then a linear layer on its last hidden state.

    ``normlab.runtime.ensemble`` stacks it.
    """

    def __init__(self, norm, input_size=8, hidden_size=64, classes=10, max_steps=8):
        super().__init__(LastHidden(input_size, hidden_size, norm, max_steps=max_steps),
                         nn.Linear(hidden_size, classes))


def train_rnn(norm, seqs, steps=500, batch_size=32, lr=0.005, seed=0, eval_every=50, device="cpu"):
    """Train a SeqClassifier with Adam; return (model, History) with test accuracy every ``eval_every`` steps.

    device: where the model and batches live, e.g. ``ctx.device``.
    """
    seqs = seqs.to(device)
    torch.manual_seed(seed)
    model = SeqClassifier(norm, input_size=seqs.x_train.shape[2], max_steps=seqs.x_train.shape[1]).to(device)
    hist = train(model, seqs, steps=steps, lr=lr, batch_size=batch_size, optimizer="adam", seed=seed,
                 eval_every=eval_every, progress=False)
    return model, hist


@torch.no_grad()
def seq_accuracy(model, x, y, batch_size=None, train_mode=False):
    """Return accuracy on (x, y) in batches of ``batch_size`` (all at once when None).

    train_mode=True normalizes a per-step batch-norm model with the statistics of each test batch
    (its running statistics are restored afterwards); see ``normlab.runtime.train.accuracy``.
    """
    return accuracy(model, x, y, batch_size=batch_size, train_mode=train_mode)


def rnn_experiment(seqs, seeds, steps=300, batch_size=32, lr=0.005, pad=8, eval_every=25, n_single=100,
                   progress=None, device="cpu"):
    """Train a SeqClassifier per norm and seed; return what the lab plots and asserts.

    The seeds of one norm train together as one ``normlab.runtime.ensemble`` (Adam, each member on the
    batches ``train_rnn`` would draw for its seed; test accuracy in eval mode every
    ``eval_every`` steps and after the last). Returns a dict: 'eval_step' (E,); for each norm in
    ``RNN_NORMS`` a dict of arrays over seeds: 'curve' (S, E) test accuracy during training;
    'full' (S,) test accuracy in eval mode on the whole test set at once; 'b1_max_diff' (S,) the
    largest change of any logit when the first ``n_single`` test sequences are evaluated one at a
    time instead of together; 'long' (S,) accuracy with ``pad`` blank rows in front (sequences of
    T + pad steps); for 'batch' also 'batch2' (S,), accuracy with the statistics of test batches
    of 2 instead of the running ones.
    device: where the models and batches live, e.g. ``ctx.device``.
    """
    check_positive_int("steps", steps)
    check_positive_int("eval_every", eval_every)
    out = {"eval_step": np.array([s for s in range(1, steps + 1) if s % eval_every == 0 or s == steps])}
    seqs = seqs.to(device)
    x_long = pad_front(seqs.x_test, pad)
    x_some = seqs.x_test[:n_single]
    for norm in RNN_NORMS:
        models = []
        for s in seeds:
            torch.manual_seed(s)  # as train_rnn: the seed fixes the initial weights and the batches
            models.append(SeqClassifier(norm, input_size=seqs.x_train.shape[2], max_steps=seqs.x_train.shape[1]))
        ens = ensemble.stack(models).to(device)
        curve = []

        def measure(step, loss, ens=ens, curve=curve):
            if step in out["eval_step"]:
                curve.append(ensemble.accuracy(ens, seqs.x_test, seqs.y_test))

        ensemble.fit(ens, seqs, lr=lr, seeds=seeds, steps=steps, batch_size=batch_size, optimizer="adam",
                     after_step=measure, progress=progress)
        with torch.no_grad():
            logits = ens(x_some)  # (S, n_single, classes)
            one = torch.cat([ens(x_some[i : i + 1]) for i in range(len(x_some))], 1)
        rec = {"curve": np.stack(curve, 1), "full": ensemble.accuracy(ens, seqs.x_test, seqs.y_test),
               "b1_max_diff": (logits - one).abs().amax((1, 2)).double().cpu().numpy(),
               "long": ensemble.accuracy(ens, x_long, seqs.y_test)}
        if norm == "batch":
            rec["batch2"] = ensemble.batch_accuracy(ens, seqs.x_test, seqs.y_test, 2)
        out[norm] = rec
    return out
