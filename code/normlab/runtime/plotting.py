"""One figure style for the whole book: a colour-blind-safe palette, the same colour per method."""

from __future__ import annotations

import matplotlib as mpl
from matplotlib import ticker

__all__ = ["OKABE_ITO", "COLORS", "color", "use_style", "log_axis"]

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
