"""The book's figure helpers."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from normlab.runtime.plotting import color, log_axis  # noqa: E402

SIZES = [2, 4, 8, 16, 32, 64]


def _drawn(ax, axis, minor=False):
    ax.figure.canvas.draw()
    lo, hi = sorted(getattr(ax, f"get_{axis}lim")())
    labels = getattr(ax, f"get_{axis}ticklabels")(minor=minor)
    return [t.get_text() for t in labels if t.get_text() and lo <= t.get_position()[axis == "y"] <= hi]


def _sweep():
    fig, ax = plt.subplots()
    ax.plot(SIZES, [0.7, 0.5, 0.35, 0.25, 0.18, 0.12])
    return fig, ax


def test_matplotlib_alone_labels_minor_ticks_over_a_set_of_batch_sizes():
    """The defect log_axis removes: lab-set labels at 2 ... 64 with 3x10^0, 2x10^1 ... among them."""
    fig, ax = _sweep()
    ax.set(xscale="log", yscale="log")
    ax.set_xticks(SIZES, [str(s) for s in SIZES])
    assert _drawn(ax, "x", minor=True) and _drawn(ax, "y", minor=True)
    plt.close(fig)


def test_log_axis_labels_only_its_ticks_in_plain_numbers():
    fig, ax = _sweep()
    log_axis(ax, "x", ticks=SIZES)
    log_axis(ax, "y")
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert _drawn(ax, "x") == ["2", "4", "8", "16", "32", "64"]
    assert _drawn(ax, "y") == ["0.2", "0.5"]  # 1, 2 and 5 times the powers of ten in range
    assert not ax.get_xticklabels(minor=True) and not ax.get_yticklabels(minor=True)
    plt.close(fig)


def test_log_axis_rejects_an_unknown_axis_and_color_an_unknown_method():
    fig, ax = _sweep()
    with pytest.raises(ValueError, match="axis"):
        log_axis(ax, "z")
    plt.close(fig)
    with pytest.raises(ValueError, match="no colour"):
        color("dropconnect")
