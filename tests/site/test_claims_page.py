"""The built "Claims, checked" page: a computed verdict per claim, its registered criteria and their results.

Needs `make book` first (the glued verdicts exist only in executed notebooks).
"""

import html
import re
from html.parser import HTMLParser

import pytest

from conftest import ROOT
from normlab.runtime.claims import CLAIMS, REGISTRY, VERDICTS

PAGE = ROOT / "_build" / "html" / "claims.html"


class Tables(HTMLParser):
    """Collect the text of every table cell: tables -> rows -> cells."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables and self.tables[-1]:
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


@pytest.fixture(scope="module")
def page():
    if not PAGE.exists():
        pytest.fail(f"no {PAGE.relative_to(ROOT)}: run `make book` first")
    return PAGE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def rows(page):
    parser = Tables()
    parser.feed(page)
    tables = [t for t in parser.tables if t and t[0][:1] == ["Claim"]]
    assert len(tables) == 1, f"expected one table whose first header is 'Claim', found {len(tables)}"
    header, *body = tables[0]
    assert header == ["Claim", "Verdict", "Tested in"]
    return body


def test_one_row_per_claim_in_order(rows):
    assert [row[0] for row in rows] == list(CLAIMS.values())


@pytest.mark.parametrize("i, key", list(enumerate(CLAIMS)))
def test_row_has_a_computed_verdict_and_a_link(rows, i, key):
    claim, verdict, where = rows[i]
    assert verdict in VERDICTS, f"claim {key!r}: verdict cell {verdict!r} is not one of {VERDICTS}"
    assert where, f"claim {key!r}: the 'tested in' cell is empty"


def _text(page_html):
    """The visible text, with Sphinx's smart quotes turned back into the registry's plain ones."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", page_html))
    for curly, plain in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"'), ("\u2013", "--")):
        text = text.replace(curly, plain)
    return " ".join(text.split())


@pytest.mark.parametrize("key", list(CLAIMS))
def test_each_claim_shows_criteria_outcomes_and_an_interval(page, key):
    claim = REGISTRY[key]
    heading = f"<h2>{claim.text}"
    assert heading in page, f"claim {key!r}: no section headed {claim.text!r}"
    section = _text(page.split(heading, 1)[1].split("<h2>", 1)[0])
    for c in claim.criteria:
        assert c.says in section, f"claim {key!r}: criterion {c.name!r} is not shown"
    outcomes = re.findall(r"outcome: (met|not shown|reversed|not tested)\b", section)
    assert len(outcomes) >= len(claim.criteria), f"claim {key!r}: not every criterion shows its outcome"
    result = section[section.index("Result"):]
    assert "95% CI [" in result or "not measured" in result, f"claim {key!r}: the result shows no interval"
