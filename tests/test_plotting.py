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


# Colour-vision deficiencies: the palette under Machado et al.'s simulation.

from itertools import combinations  # noqa: E402

import numpy as np  # noqa: E402

from normlab.runtime.plotting import COLORS, CVD, OKABE_ITO, delta_e, hex_to_rgb, simulate_cvd  # noqa: E402

APART = 15.0  # CIE76 units; 2.3 is just noticeable, and thin lines and small markers need far more


def test_the_simulation_keeps_greys_and_maps_red_and_green_together_for_a_deuteranope():
    grey = np.array([0.5, 0.5, 0.5])
    for kind in CVD:
        np.testing.assert_allclose(simulate_cvd(grey, kind), grey, atol=2e-3)
    red, green = hex_to_rgb("#d62728"), hex_to_rgb("#2ca02c")  # matplotlib's default red and green
    assert delta_e(red, green) > 60
    assert delta_e(simulate_cvd(red, "deuteranopia"), simulate_cvd(green, "deuteranopia")) < APART


def _rendered_line_colours(hexes):
    """Draw one thick line per colour, render the figure, and read each line's pixel colour back."""
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    for i, h in enumerate(hexes):
        ax.plot([0, 1], [i, i], color=h, lw=8, solid_capstyle="butt")
    ax.set(xlim=(0, 1), ylim=(-1, len(hexes)))
    ax.axis("off")
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255  # (H, W, 3)
    to_pixel = ax.transData.transform
    height = image.shape[0]
    pixels = []
    for i in range(len(hexes)):
        x, y = to_pixel((0.5, i))
        pixels.append(image[int(round(height - y)), int(round(x))])
    plt.close(fig)
    return np.array(pixels)


@pytest.mark.parametrize("kind", sorted(CVD))
def test_every_pair_of_the_books_colours_stays_apart_in_a_rendered_figure(kind):
    hexes = sorted(set(COLORS.values()))
    pixels = _rendered_line_colours(hexes)
    np.testing.assert_allclose(pixels, [hex_to_rgb(h) for h in hexes], atol=2 / 255)  # the render is faithful
    seen = simulate_cvd(pixels, kind)
    names = {v: k for k, v in OKABE_ITO.items()}
    close = [(names[hexes[a]], names[hexes[b]], round(float(delta_e(seen[a], seen[b])), 1))
             for a, b in combinations(range(len(hexes)), 2) if delta_e(seen[a], seen[b]) < APART]
    assert not close, f"under {kind}, these colours of the book come within {APART} of each other: {close}"


def test_bad_cvd_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        simulate_cvd([0.1, 0.2, 0.3], "monochromacy")
    with pytest.raises(ValueError, match="axis of 3"):
        simulate_cvd([0.1, 0.2], "protanopia")
    with pytest.raises(ValueError, match="rrggbb"):
        hex_to_rgb("#fff")


# The figure audit: what a reader of the website would find wrong with a figure.

from normlab.runtime.plotting import COLUMN_PX, MIN_TEXT_PX, audit, use_style  # noqa: E402


@pytest.fixture
def styled():
    with matplotlib.rc_context():
        use_style()
        yield
    plt.close("all")


def test_a_figure_with_told_apart_series_readable_text_and_spaced_ticks_passes(styled):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2], "o-", label="BN")
    ax.plot([1, 2], [2, 1], "s--", label="no BN")
    ax.bar([3, 4], [1, 2], label="ghost", hatch="//")
    ax.bar([3, 4], [1, 2], label="dropout")
    ax.legend()
    assert audit(fig) == []


def test_legend_entries_that_differ_by_colour_alone_are_named(styled):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2], label="BN")
    ax.plot([1, 2], [2, 1], label="no BN")
    ax.legend()
    (problem,) = audit(fig)
    assert "'BN' and 'no BN' differ by colour only" in problem
    fig, ax = plt.subplots()
    ax.bar([1], [1], label="BN")
    ax.bar([2], [1], label="GN")
    fig.legend()
    assert "'BN' and 'GN' differ by colour only" in audit(fig)[0]


def test_a_wide_figure_shrunk_into_the_column_has_text_too_small_to_read(styled):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    (problem,) = audit(fig)
    assert f"below {MIN_TEXT_PX:g} px" in problem and f"shrinks to {COLUMN_PX} px" in problem
    assert audit(fig, column_px=10_000) == []  # shown at full size (Colab), the same text is large enough
    fig, ax = plt.subplots()
    ax.set_title("small print", fontsize=6)
    assert "'small print'" in audit(fig)[0]


def test_overlapping_tick_labels_are_named(styled):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_xticks(range(12), [f"label {i}" for i in range(12)])
    (problem,) = audit(fig)
    assert "of an x axis overlap, first 'label 0' and 'label 1'" in problem


def test_in_ipython_the_audit_is_shown_only_when_asked_for(styled, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    from normlab.runtime.plotting import AUDIT_ENV, AUDIT_MIME

    monkeypatch.delenv(AUDIT_ENV, raising=False)
    shell = InteractiveShell.instance()
    try:
        use_style()  # a reader's run, and the book's: the figures alone
        fig, ax = plt.subplots()
        assert AUDIT_MIME not in shell.display_formatter.format(fig)[0]
    finally:
        InteractiveShell.clear_instance()


def test_in_ipython_every_figure_is_shown_with_its_audit(styled, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.pylabtools import select_figure_formats

    from normlab.runtime.plotting import AUDIT_ENV, AUDIT_MIME

    monkeypatch.setenv(AUDIT_ENV, "1")  # as make notebooks sets it
    shell = InteractiveShell.instance()
    try:
        use_style()
        select_figure_formats(shell, {"png"})  # what the inline backend does: it clears every Figure printer
        fig, ax = plt.subplots()
        ax.plot([1, 2], [1, 2], label="BN")
        ax.plot([1, 2], [2, 1], label="no BN")
        ax.legend()
        data, _ = shell.display_formatter.format(fig)
        assert "image/png" in data and "differ by colour only" in data[AUDIT_MIME]["problems"][0]
        assert AUDIT_MIME not in shell.display_formatter.format(ax)[0]  # only figures carry one
    finally:
        InteractiveShell.clear_instance()


def test_series_coloured_by_an_array_are_audited_like_named_colours(styled):
    fig, ax = plt.subplots()
    shades = plt.cm.viridis(np.linspace(0, 0.9, 2))  # RGBA rows, not names
    ax.plot([1, 2], [1, 2], color=shades[0], label="layer 1")
    ax.plot([1, 2], [2, 1], color=shades[1], lw=2.2, label="classifier")
    ax.legend()
    assert audit(fig) == []  # told apart by their widths


def test_step_histograms_told_apart_by_line_style_pass_and_by_colour_alone_fail(styled):
    values = np.linspace(-2, 2, 50)
    fig, ax = plt.subplots()
    for ls, label in [(":", "B = 8"), ("-", "B = 128")]:
        ax.hist(values, histtype="step", ls=ls, label=label)
    ax.legend()
    assert audit(fig) == []
    fig, ax = plt.subplots()
    for label in ["B = 8", "B = 128"]:
        ax.hist(values, histtype="step", label=label)
    ax.legend()
    assert "differ by colour only" in audit(fig)[0]
