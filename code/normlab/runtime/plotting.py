"""One figure style for the whole book: a colour-blind-safe palette, the same colour per method.

``simulate_cvd`` shows a colour (or a rendered figure) as a reader with a colour-vision deficiency
sees it, and ``delta_e`` measures how far apart two colours look; the tests check with both that
the palette's colours stay apart under the three dichromacies.

``audit`` lists what a reader of the website would find wrong with a figure: text that the page
shrinks below a readable size, legend entries told apart by colour alone, tick labels that overlap.
With ``NORMLAB_AUDIT_FIGURES=1`` (``make notebooks`` sets it), ``use_style`` makes IPython show every
figure with its audit beside the image, as a JSON output that no page or notebook displays, and the
notebook test (``tests/nbval_stubs.py``) fails on any finding. The book's build and a reader's run
leave it out: their outputs stay the figures alone.
"""

from __future__ import annotations

import os

import matplotlib as mpl
import numpy as np
from matplotlib import ticker
from matplotlib.collections import Collection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

__all__ = [
    "OKABE_ITO", "COLORS", "CVD", "COLUMN_PX", "MIN_TEXT_PX", "AUDIT_MIME", "AUDIT_ENV",
    "color", "use_style", "log_axis", "audit", "hex_to_rgb", "simulate_cvd", "delta_e",
]

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
    if os.environ.get(AUDIT_ENV) == "1":
        _show_audits()


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


# How wide the website shows a figure in a 1280 px window (sphinx-book-theme's text column, measured;
# tests/site/test_browser.py checks it): a wider image is shrunk to fit, and its text with it.
# Colab and Jupyter show figures at full size.
COLUMN_PX = 684
# The smallest text a figure may show on the page, in CSS pixels (the body text is 16 px).
MIN_TEXT_PX = 11.0
AUDIT_MIME = "application/vnd.normlab.figure-audit+json"
AUDIT_ENV = "NORMLAB_AUDIT_FIGURES"  # "1": show each figure's audit beside it (the notebook test)


def _texts(fig):
    """Every piece of text a reader sees in ``fig``: titles, labels, tick labels, legends, notes."""
    texts = list(fig.texts)
    for name in ("_suptitle", "_supxlabel", "_supylabel"):
        texts.append(getattr(fig, name, None))
    legends = list(fig.legends)
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            texts += axis.get_ticklabels(which="both")
        legends.append(ax.get_legend())
    for legend in filter(None, legends):
        texts += [*legend.get_texts(), legend.get_title()]
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def _dashes(artist):
    # The drawn dash pattern: a legend's patch copies it from the artist it stands for, but its
    # get_linestyle() then still says "solid"; custom dashes read as "--" there too.
    _offset, dashes = getattr(artist, "_dash_pattern", (0, None))
    return None if dashes is None else tuple(round(float(d), 2) for d in dashes)


def _style(handle):
    """What, besides its colour, tells a legend entry apart: marker, line style, width, hatch."""
    if isinstance(handle, Line2D):
        face = handle.get_markerfacecolor()
        filled = not (isinstance(face, str) and face.lower() == "none")
        ls = handle.get_linestyle() if handle.get_linestyle() in ("None", " ", "") else _dashes(handle)
        return ("line", handle.get_marker(), ls, round(handle.get_linewidth(), 1), filled)
    if isinstance(handle, Patch):
        return ("patch", handle.get_hatch(), _dashes(handle), handle.get_fill())
    if isinstance(handle, Collection):
        paths = handle.get_paths()
        shape = paths[0].vertices.round(3).tobytes() if paths else b""
        return ("collection", type(handle).__name__, shape, str(handle.get_linestyle()), handle.get_hatch())
    return ("other", id(handle))  # an unknown kind of entry: assume it is told apart


def audit(fig, column_px: float = COLUMN_PX) -> list[str]:
    """What a reader of the website would find wrong with ``fig``, one sentence each; [] when nothing.

    - text smaller than ``MIN_TEXT_PX`` once the page fits the image into a column ``column_px`` wide;
    - two entries of one legend that differ by colour only (no marker, line style, width or hatch);
    - tick labels of one axis that overlap.
    """
    fig.draw_without_rendering()  # lays out ticks and text as a draw would, without the pixels
    renderer = fig.canvas.get_renderer()
    width_px = fig.get_tightbbox(renderer).width * fig.dpi + 2 * 0.1 * fig.dpi  # the saved image, tight
    shrink = min(1.0, column_px / width_px)
    problems = []
    small = sorted(
        {(round(t.get_fontsize() * fig.dpi / 72 * shrink, 1), t.get_text()) for t in _texts(fig)}
    )
    small = [(px, text) for px, text in small if px < MIN_TEXT_PX]
    if small:
        shown = ", ".join(f"{text!r}" for _, text in small[:3]) + (" ..." if len(small) > 3 else "")
        problems.append(
            f"text renders at {small[0][0]} px on the page, below {MIN_TEXT_PX:g} px ({shown}); the "
            f"image is {width_px:.0f} px wide and shrinks to {column_px} px: make it narrower or the text larger"
        )
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes]
    for legend in filter(None, legends):
        seen = {}
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            key = _style(handle)
            if key in seen:
                problems.append(
                    f"legend entries {seen[key]!r} and {text.get_text()!r} differ by colour only: "
                    "give each a marker or line style of its own"
                )
            seen.setdefault(key, text.get_text())
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text().strip()]
            boxes = [(t.get_window_extent(renderer), t.get_text()) for t in labels]
            clashes = [(a, b) for i, (box, a) in enumerate(boxes) for other, b in boxes[i + 1 :] if box.overlaps(other)]
            if clashes:
                problems.append(
                    f"{len(clashes)} pairs of tick labels of an {name} axis overlap, "
                    f"first {clashes[0][0]!r} and {clashes[0][1]!r}"
                )
    return problems


def _show_audits() -> None:
    """In IPython, display every figure with its ``audit`` under ``AUDIT_MIME`` (once per session)."""
    try:
        from IPython import get_ipython
        from IPython.core.formatters import JSONFormatter
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or AUDIT_MIME in shell.display_formatter.formatters:
        return

    class AuditFormatter(JSONFormatter):
        # It answers for figures itself: IPython clears every formatter's Figure entry whenever
        # matplotlib's inline backend chooses its image formats, so for_type(Figure) would not last.
        format_type = AUDIT_MIME

        def __call__(self, obj):
            if not isinstance(obj, Figure):
                return None
            try:
                return {"problems": audit(obj)}
            except Exception as error:  # never a traceback under a reader's figure; the test reports it
                return {"problems": [f"the audit itself failed: {error!r}"]}

    shell.display_formatter.formatters[AUDIT_MIME] = AuditFormatter(parent=shell.display_formatter)


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
