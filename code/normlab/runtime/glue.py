"""``glue(name, value)``: a measured value for the website's text, or a printed line elsewhere.

In the book build, myst_nb's ``glue`` stores the value, and the page's text shows it where it
says ``{glue:text}`name```. Outside the book (Colab, Jupyter, a script) there is no page: the
value is printed as ``name = value``, which is how the Colab edition's text names it. Every lab
imports this one function in its first cell; ``normlab.runtime.claims`` glues its verdicts with it.
"""

from __future__ import annotations

try:
    from myst_nb import glue as _book_glue
except ImportError:  # no myst_nb: not the book build
    _book_glue = None

__all__ = ["glue"]


def glue(name: str, value, display: bool = True, *, quiet: bool = False):
    """Glue ``value`` under ``name`` for the book; outside it, print ``name = value`` unless ``quiet``.

    ``display`` is myst_nb's: whether the cell's output shows the value too (the labs pass False).
    """
    if _book_glue is not None:
        _book_glue(name, value, display=display)
    elif not quiet:
        print(f"{name} = {value}")
