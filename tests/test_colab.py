"""coursekit.colab: MyST in a notebook's markdown becomes CommonMark that Colab and Jupyter render.

These tests use a small stand-in for the built site; tests/site/test_colab_edition.py checks the
edition `make colab` writes from the real one.
"""

import pytest

from coursekit.colab import MYST, Site, convert_markdown, make_colab_notebook

BASE = "https://example.org/course/"


def site():
    s = Site.__new__(Site)  # what Site reads from the built book, given directly
    s.base_url = BASE
    s.references_page = BASE + "references.html"
    s.references = {"ioffe2015batch": "Ioffe & Szegedy, 2015", "santurkar2018how": "Santurkar et al., 2018"}
    s.titles = {"ex-a-forward": "The forward pass"}
    s.inventory = {
        "std:doc": {"chapters/a/index": ("chapters/a/index.html", "Chapter A"),
                    "chapters/a/lab": ("chapters/a/lab.html", "Lab A"), "claims": ("claims.html", "Claims")},
        "std:label": {"a-sec": ("chapters/a/lab.html#a-sec", "A section"),
                      "ex-a-forward": ("chapters/a/lab.html#ex-a-forward", "Exercise")},
        "std:term": {"eval mode": ("glossary.html#term-eval-mode", "-")},
    }
    return s


def convert(text, glued=None):
    return convert_markdown(text, "chapters/a/lab", site(), glued or {})


def test_a_glued_value_is_formatted_as_on_the_website_and_named():
    out = convert("Accuracy {glue:text}`acc:.1f`%, seeds {glue:text}`n:d`, word {glue:text}`word`.",
                  {"acc": 97.04, "n": 8, "word": "holds"})
    assert out == "Accuracy **97.0** (`acc`)%, seeds **8** (`n`), word **holds** (`word`)."
    assert convert("verdict: **{glue:text}`word`**.", {"word": "met"}) == "verdict: **met** (`word`)."
    assert convert("{glue:text}`n:d` examples", {"n": 2000.0}) == "**2000** (`n`) examples"  # as myst-nb does


def test_doc_ref_and_term_become_links_to_the_website():
    out = convert("See {doc}`index`, {doc}`the claims <../../claims>`, {ref}`a-sec`, "
                  "{ref}`this one <a-sec>`, {ref}`ex-a-forward` and {term}`eval mode`.")
    assert out == (f"See [Chapter A]({BASE}chapters/a/index.html), [the claims]({BASE}claims.html), "
                   f"[A section]({BASE}chapters/a/lab.html#a-sec), [this one]({BASE}chapters/a/lab.html#a-sec), "
                   f"[Exercise: The forward pass]({BASE}chapters/a/lab.html#ex-a-forward) and "
                   f"[eval mode]({BASE}glossary.html#term-eval-mode).")


def test_citations_become_author_year_links_to_the_references():
    out = convert("as shown {cite}`ioffe2015batch,santurkar2018how`.")
    assert out == f"as shown ([Ioffe & Szegedy, 2015; Santurkar et al., 2018]({BASE}references.html))."


def test_exercises_and_solutions_become_headings_and_blockquotes_and_labels_go():
    text = ("(a-sec)=\n## A section\n\n```{exercise} The forward pass\n:label: ex-a-forward\n:class: integration\n\n"
            "Write it.\n\n$$x$$\n```\n\n````{solution} ex-a-forward\n:class: dropdown\n\nLike this:\n\n"
            "```python\ny = x\n```\n````\n\n:::{note}\nA note.\n:::\n")
    out = convert(text)
    assert out == ("## A section\n\n#### Exercise: The forward pass\n\n> Write it.\n>\n> $$x$$\n\n"
                   "#### Solution: The forward pass\n\n> Like this:\n>\n> ```python\n> y = x\n> ```\n\n"
                   "**Note**\n\n> A note.\n")
    assert not MYST.search(out)


@pytest.mark.parametrize("text, message", [("{glue:text}`missing:.1f`", "does not glue"),
                                           ("{ref}`nowhere`", "names nothing"),
                                           ("{cite}`nobody2020`", "references.bib")])
def test_a_dangling_reference_is_an_error_naming_it(text, message):
    with pytest.raises(KeyError, match=message):
        convert(text)


@pytest.mark.parametrize("text", ["{ref}`x`", "```{exercise} T\n", "(label)=", ":label: x", ":::{note}"])
def test_the_myst_scan_catches_what_the_converter_removes(text):
    assert MYST.search(text)


def test_a_notebook_keeps_its_code_and_gets_a_note_after_its_title(monkeypatch):
    s = site()
    monkeypatch.setattr(s, "glued", lambda doc: {"acc": 0.5}, raising=False)
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Lab A\n"]},
                    {"cell_type": "code", "metadata": {}, "source": "print(1)", "outputs": [{"x": 1}],
                     "execution_count": 3},
                    {"cell_type": "markdown", "metadata": {}, "source": "Got {glue:text}`acc:.0%`."}]}
    out = make_colab_notebook(nb, "chapters/a/lab", s)
    assert [c["cell_type"] for c in out["cells"]] == ["markdown", "markdown", "code", "markdown"]
    assert "Colab edition" in out["cells"][1]["source"] and f"{BASE}chapters/a/lab.html" in out["cells"][1]["source"]
    assert out["cells"][2]["source"] == "print(1)" and out["cells"][2]["outputs"] == []
    assert out["cells"][3]["source"] == "Got **50%** (`acc`)."
    assert nb["cells"][1]["outputs"] == [{"x": 1}], "the source notebook is left as it was"
