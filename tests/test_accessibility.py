"""_ext/accessibility.py: the repairs it makes to the theme's HTML, on the HTML the theme writes."""

import sys

from bs4 import BeautifulSoup

from conftest import ROOT

sys.path.insert(0, str(ROOT / "_ext"))

import accessibility  # noqa: E402  (the book's local extension, imported from _ext)

SIDEBAR = """<ul class="nav bd-sidenav">
<li class="toctree-l1 has-children"><a class="reference internal" href="a/index.html">1. Chapter A</a><details>
<summary><span class="toctree-toggle" role="presentation"><i class="fa-solid fa-chevron-down"></i></span></summary>
<ul><li class="toctree-l2"><a class="reference internal" href="a/lab.html">1.1 Lab</a></li></ul></details></li>
<li class="toctree-l1 has-children"><details open="open"><summary><p class="caption">Part two</p></summary>
<ul><li class="toctree-l2"><a href="b.html">B</a></li></ul></details></li>
</ul>"""


def test_an_icon_only_toggle_is_named_for_its_chapter_and_a_captioned_one_is_left_alone():
    soup = BeautifulSoup(SIDEBAR, "html.parser")
    accessibility.name_toggles(soup)
    first, second = soup.select("details > summary")
    assert first["aria-label"] == "Show or hide the pages of 1. Chapter A"
    assert not second.get("aria-label")  # its caption text names it already


def test_the_generator_is_wrapped_once_and_names_the_soup_it_returns():
    calls = []

    def generate(kind="sidebar"):
        calls.append(kind)
        return BeautifulSoup(SIDEBAR, "html.parser")

    context = {"generate_toctree_html": generate, "body": "<p>x</p>"}
    accessibility._repair(None, "page", "page.html", context, None)
    accessibility._repair(None, "page", "page.html", context, None)  # a second handler call
    soup = context["generate_toctree_html"]("sidebar")
    assert calls == ["sidebar"] and soup.select_one("summary")["aria-label"].endswith("Chapter A")


def test_bibliography_entries_become_list_items():
    body = '<div role="list" class="citation-list"><div class="citation" id="a" role="doc-biblioentry"></div></div>'
    context = {"body": body}
    accessibility._repair(None, "references", "page.html", context, None)
    assert 'role="doc-biblioentry"' not in context["body"] and 'role="listitem"' in context["body"]
