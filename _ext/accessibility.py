"""Sphinx extension: repair the theme's HTML where axe-core's WCAG 2.1 A/AA rules find it wanting.

The browser test (``tests/site/test_browser.py``) runs axe-core on every page of both editions and
fails on any violation. Three came from HTML that neither our pages nor our notebooks write:

- ``summary-name``: the sidebar's chevrons that fold a chapter's pages are ``<summary>`` elements
  holding only an icon (pydata-sphinx-theme's ``generate_toctree_html``), so a screen reader
  announces an unnamed control. Each gets an ``aria-label`` naming the chapter it folds.
- ``aria-deprecated-role`` and ``aria-required-children``: docutils marks each bibliography entry
  ``role="doc-biblioentry"``, a role WAI-ARIA 1.2 deprecated, inside a ``role="list"`` whose
  children then count as no list items. Each entry becomes ``role="listitem"``.

Link colour inside the exercise boxes (axe's ``color-contrast``) is fixed in ``_static/course.css``.
"""

from __future__ import annotations


def name_toggles(soup) -> None:
    """Give every icon-only ``<summary>`` in a sidebar soup an aria-label naming what it folds."""
    for summary in soup.select("details > summary"):
        if summary.get("aria-label") or summary.get_text(strip=True):
            continue
        item = summary.find_parent("li")
        link = item.find("a", recursive=False) if item is not None else None
        title = link.get_text(" ", strip=True) if link is not None else "this part"
        summary["aria-label"] = f"Show or hide the pages of {title}"


def _named(generate):
    """Wrap the theme's toctree generator so that every soup it returns has named toggles."""
    if getattr(generate, "names_toggles", False):
        return generate

    def generate_named(*args, **kwargs):
        soup = generate(*args, **kwargs)
        if hasattr(soup, "select"):  # a BeautifulSoup (the theme caches it: naming twice is a no-op)
            name_toggles(soup)
        return soup

    generate_named.names_toggles = True
    return generate_named


def _repair(app, pagename, templatename, context, doctree):
    if "generate_toctree_html" in context:
        context["generate_toctree_html"] = _named(context["generate_toctree_html"])
    body = context.get("body")
    if body and 'role="doc-biblioentry"' in body:
        context["body"] = body.replace('role="doc-biblioentry"', 'role="listitem"')


def setup(app):
    # after the theme's own html-page-context handlers (priority 500), which add the generator
    app.connect("html-page-context", _repair, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
