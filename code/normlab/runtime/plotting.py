"""One figure style for the whole book: a colour-blind-safe palette, the same colour per method.

``simulate_cvd`` shows a colour (or a rendered figure) as a reader with a colour-vision deficiency
sees it, and ``delta_e`` measures how far apart two colours look; the tests check with both that
the palette's colours stay apart under the three dichromacies.
"""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
from matplotlib import ticker

__all__ = ["OKABE_ITO", "COLORS", "CVD", "color", "use_style", "log_axis", "hex_to_rgb", "simulate_cvd", "delta_e"]

# Okabe & Ito's palette, distinguishable under the common colour-vision deficiencies.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}

# The same method has the same colour in every chapter.
COLORS = {
    "bn": OKABE_ITO["blue"],
    "plain": OKABE_ITO["vermillion"],
    "reference": OKABE_ITO["black"],
    "staged": OKABE_ITO["orange"],
    "fast": OKABE_ITO["green"],
    "ln": OKABE_ITO["sky"],
    "gn": OKABE_ITO["purple"],
    "in": OKABE_ITO["yellow"],
    # Chapter 2: BN after the ReLU (BN before it, the paper's placement, is "bn"); running averages.
    "bn_after": OKABE_ITO["green"],
    "cumulative": OKABE_ITO["blue"],
    "ema": OKABE_ITO["orange"],
    # Chapter 4: normalization with fixed statistics, none at all, dropout, ghost batches, precise BN.
    "population": OKABE_ITO["green"],
    "none": OKABE_ITO["vermillion"],
    "dropout": OKABE_ITO["orange"],
    "ghost": OKABE_ITO["purple"],
    "precise": OKABE_ITO["green"],
    # Chapter 5: batch renormalization.
    "brn": OKABE_ITO["green"],
    # Chapter 7: adaptation methods and fine-tuning modes; source and target domains.
    "source": OKABE_ITO["vermillion"],
    "adabn": OKABE_ITO["blue"],
    "prior": OKABE_ITO["green"],
    "tent": OKABE_ITO["purple"],
    "frozen": OKABE_ITO["orange"],
    "head": OKABE_ITO["sky"],
    "bn_only": OKABE_ITO["green"],
    "clean": OKABE_ITO["black"],
    "affine": OKABE_ITO["orange"],
    "noise": OKABE_ITO["sky"],
    "generator": OKABE_ITO["purple"],
    # Chapter 9: per-device BN under data parallelism, synchronized BN.
    "local": OKABE_ITO["vermillion"],
    "sync": OKABE_ITO["blue"],
    # Chapter 10: a plain network at its activation's gain (at torch's default init it is "plain").
    "gain": OKABE_ITO["orange"],
    # Chapter 10: the residual network without BN (no normalization at all is "none").
    "skipinit": OKABE_ITO["green"],
    "fixup": OKABE_ITO["orange"],
    "ws_gn": OKABE_ITO["purple"],
    "nf": OKABE_ITO["sky"],
    # Chapter 10's transformer: RMSNorm and DyT beside LayerNorm ("ln").
    "rms": OKABE_ITO["green"],
    "dyt": OKABE_ITO["orange"],
}


def color(method: str) -> str:
    """Return the book's colour for a method name (see ``COLORS``)."""
    try:
        return COLORS[method]
    except KeyError:
        raise ValueError(f"no colour for {method!r}; known: {sorted(COLORS)}") from None


def use_style() -> None:
    """Apply the book's matplotlib style to every later figure."""
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": 110,
            "axes.prop_cycle": mpl.cycler(color=list(OKABE_ITO.values())[1:] + ["#000000"]),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.frameon": False,
            "font.size": 10,
        }
    )


def log_axis(ax, axis: str = "x", ticks=None) -> None:
    """Put one axis of ``ax`` on a log scale, labelled in plain numbers and with no minor ticks.

    ticks: where the labels go, e.g. the batch sizes a sweep ran; by default 1, 2 and 5 times each
    power of ten. Matplotlib's own log axis labels its minor ticks (as 3x10^1, 6x10^-1) when it
    spans about a decade, and those labels overprint ticks a lab sets itself.
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    getattr(ax, f"set_{axis}scale")("log")
    which = ax.xaxis if axis == "x" else ax.yaxis
    if ticks is None:
        which.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        which.set_major_locator(ticker.FixedLocator([float(t) for t in ticks]))
    which.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    which.set_minor_locator(ticker.NullLocator())


# Machado, Oliveira & Fernandes (2009), "A physiologically-based model for simulation of color vision
# deficiency", IEEE TVCG 15(6): their matrices at severity 1 (the dichromacies), acting on linear RGB.
CVD = {
    "protanopia": ((0.152286, 1.052583, -0.204868), (0.114503, 0.786281, 0.099216), (-0.003882, -0.048116, 1.051998)),
    "deuteranopia": ((0.367322, 0.860646, -0.227968), (0.280085, 0.672501, 0.047413), (-0.011820, 0.042940, 0.968881)),
    "tritanopia": ((1.255528, -0.076749, -0.178779), (-0.078411, 0.930809, 0.147602), (0.004733, 0.691367, 0.303900)),
}


def hex_to_rgb(code: str) -> np.ndarray:
    """Return '#rrggbb' as sRGB values in [0, 1], shape (3,)."""
    code = code.lstrip("#")
    if len(code) != 6:
        raise ValueError(f"expected a colour '#rrggbb', got {code!r}")
    return np.array([int(code[i : i + 2], 16) / 255 for i in (0, 2, 4)])


def _linear(srgb):
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _srgb(linear):
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def simulate_cvd(rgb, kind: str) -> np.ndarray:
    """Return sRGB colours as a dichromat of ``kind`` (a key of ``CVD``) sees them (Machado et al. 2009).

    rgb: sRGB values in [0, 1], shape (..., 3): one colour, or a rendered figure (H, W, 3).
    """
    if kind not in CVD:
        raise ValueError(f"kind must be one of {sorted(CVD)}, got {kind!r}")
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb must end in an axis of 3 (R, G, B), got shape {rgb.shape}")
    return _srgb(_linear(rgb) @ np.array(CVD[kind]).T)


def _lab(rgb):
    """CIELAB (D65 white) of sRGB colours, shape (..., 3)."""
    xyz = _linear(np.asarray(rgb, dtype=np.float64)) @ np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > 216 / 24389, np.cbrt(t), (24389 / 27 * t + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e(rgb1, rgb2) -> np.ndarray:
    """Return the CIE 1976 colour difference between sRGB colours (about 2.3 is just noticeable)."""
    return np.linalg.norm(_lab(rgb1) - _lab(rgb2), axis=-1)
