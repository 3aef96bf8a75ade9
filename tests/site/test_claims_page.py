"""The built "Claims, checked" page: one row per claim, each with a verdict and evidence from the notebooks.

Needs `make book` first (the glued verdicts exist only in executed notebooks).
"""

from html.parser import HTMLParser

import pytest

from conftest import ROOT
from normlab.claims import CLAIMS, VERDICTS

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
def rows():
    if not PAGE.exists():
        pytest.fail(f"no {PAGE.relative_to(ROOT)}: run `make book` first")
    parser = Tables()
    parser.feed(PAGE.read_text(encoding="utf-8"))
    tables = [t for t in parser.tables if t and t[0][:1] == ["Claim"]]
    assert len(tables) == 1, f"expected one table whose first header is 'Claim', found {len(tables)}"
    header, *body = tables[0]
    assert header == ["Claim", "Experiment", "Verdict", "Evidence"]
    return body


def test_one_row_per_claim_in_order(rows):
    assert [row[0] for row in rows] == list(CLAIMS.values())


@pytest.mark.parametrize("i, key", list(enumerate(CLAIMS)))
def test_row_has_a_verdict_an_experiment_and_evidence(rows, i, key):
    claim, experiment, verdict, evidence = rows[i]
    assert verdict in VERDICTS, f"claim {key!r}: verdict cell {verdict!r} is not one of {VERDICTS}"
    assert experiment, f"claim {key!r}: the experiment cell is empty"
    assert len(evidence) > 20 and any(ch.isdigit() for ch in evidence), (
        f"claim {key!r}: the evidence cell should be a sentence with measured numbers, got {evidence!r}")
