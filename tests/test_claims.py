"""normlab.claims and the "Claims, checked" page: one verdict per claim, recorded by one notebook, rendered."""

import ast
import re

import pytest

from conftest import ROOT, cell_source, load_notebook, notebook_paths
from normlab import claims
from normlab.claims import CLAIMS, VERDICTS, record

PAGE = ROOT / "claims.md"
GLUE = re.compile(r"\{glue:text\}`([^`]+)::(claim_\w+?)_(claim|verdict|evidence):s`")


def parse_cell(source):
    """Parse a code cell, with IPython magics (%pip, !ls) replaced by `pass`."""
    lines = [re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def is_record_call(node):
    """Whether node is `record(...)` or `claims.record(...)`."""
    func = getattr(node, "func", None)
    if isinstance(func, ast.Name):
        return func.id == "record"
    return isinstance(func, ast.Attribute) and func.attr == "record" and getattr(func.value, "id", "") == "claims"


def record_calls():
    """Every `claims.record(...)` / `record(...)` call in the chapters' notebooks, as dicts."""
    calls = []
    for path in notebook_paths():
        rel = str(path.relative_to(ROOT))
        for cell in load_notebook(path)["cells"]:
            if cell["cell_type"] != "code" or "record(" not in cell_source(cell):
                continue
            for node in ast.walk(parse_cell(cell_source(cell))):
                if not is_record_call(node):
                    continue
                args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
                kw = {k.arg: k.value.value if isinstance(k.value, ast.Constant) else None for k in node.keywords}
                assert args and isinstance(args[0], str), f"{rel}: record() needs the claim's key as a literal string"
                calls.append({"key": args[0], "verdict": args[1] if len(args) > 1 else None,
                              "section": kw.get("section"), "notebook": rel})
    return calls


def page_rows():
    """The rows of the table on claims.md, as lists of cells (header and separator left out)."""
    lines = [line for line in PAGE.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def labels_in(notebook):
    cells = load_notebook(ROOT / notebook)["cells"]
    return set(re.findall(r"^\(([\w-]+)\)=", "\n".join(cell_source(c) for c in cells if c["cell_type"] == "markdown"),
                          re.MULTILINE))


@pytest.fixture
def glued(monkeypatch):
    store = {}
    monkeypatch.setattr(claims, "glue", lambda name, value, display=True: store.__setitem__(name, (value, display)))
    return store


def test_verdicts_and_claims_are_the_seed_texts_ten():
    assert VERDICTS == ("supported", "partly", "not supported", "contested")
    assert len(CLAIMS) == 10 and all(s.endswith(".") for s in CLAIMS.values())


@pytest.mark.parametrize("bad, match", [
    (dict(key="ICS"), "unknown claim 'ICS'.*higher_lr"),
    (dict(verdict="holds"), "verdict 'holds' is not one of"),
    (dict(evidence="  "), "evidence must be a non-empty sentence"),
    (dict(evidence=None), "evidence must be a non-empty sentence"),
    (dict(section="ics lr"), "section must be a label"),
    (dict(section="(ics-lr)="), "section must be a label"),
])
def test_record_rejects_bad_input(bad, match, glued):
    args = dict(key="ics", verdict="supported", evidence="Measured.", section="ics-lr") | bad
    with pytest.raises(ValueError, match=match):
        record(args["key"], args["verdict"], args["evidence"], section=args["section"])
    assert not glued  # nothing is glued when the input is bad


def test_record_glues_claim_verdict_and_evidence_and_prints_them(glued, capsys):
    rec = record("higher_lr", "partly", " BN trains at 3x the rate. ", section="ics-lr")
    assert glued == {"claim_higher_lr_claim": (CLAIMS["higher_lr"], False),
                     "claim_higher_lr_verdict": ("partly", False),
                     "claim_higher_lr_evidence": ("BN trains at 3x the rate.", False)}
    assert (rec.key, rec.verdict, rec.section) == ("higher_lr", "partly", "ics-lr")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "partly" in out and CLAIMS["higher_lr"] in out


def test_every_claim_is_recorded_by_exactly_one_notebook():
    calls = record_calls()
    unknown = [f"{c['notebook']} records {c['key']!r}" for c in calls if c["key"] not in CLAIMS]
    assert not unknown, f"notebooks record claims that normlab.claims.CLAIMS does not have: {unknown}"
    for key in CLAIMS:
        where = [c["notebook"] for c in calls if c["key"] == key]
        assert where, f"no notebook records a verdict for claim {key!r} ({CLAIMS[key]})"
        assert len(where) == 1, f"claim {key!r} is recorded more than once: {where}"


def test_recorded_verdicts_and_sections_are_valid():
    for c in record_calls():
        assert c["verdict"] is None or c["verdict"] in VERDICTS, (
            f"{c['notebook']} records {c['key']!r} with verdict {c['verdict']!r}, not one of {VERDICTS}")
        assert c["section"] in labels_in(c["notebook"]), (
            f"{c['notebook']} records {c['key']!r} with section={c['section']!r}, a label it does not define")


def test_page_has_one_row_per_claim_in_order():
    rows = page_rows()
    keys = []
    for row in rows:
        assert len(row) == 4, f"a row of claims.md has {len(row)} cells, expected 4: {row}"
        found = GLUE.search(row[0])
        assert found, f"the claim cell of a row glues no claim_<key>_claim: {row[0]}"
        keys.append(found.group(2).removeprefix("claim_"))
    assert keys == list(CLAIMS), f"claims.md rows {keys}, expected {list(CLAIMS)}"


def test_page_rows_render_what_the_recording_notebook_glued():
    calls = {c["key"]: c for c in record_calls()}
    for row, key in zip(page_rows(), CLAIMS):
        assert key in calls, f"claims.md shows claim {key!r}, which no notebook records"
        notebook = calls[key]["notebook"]
        for cell, field in zip([row[0], row[2], row[3]], ["claim", "verdict", "evidence"]):
            assert f"{{glue:text}}`{notebook}::claim_{key}_{field}:s`" in cell, (
                f"claims.md, row {key!r}: the {field} cell should glue claim_{key}_{field} from {notebook}")
        section = calls[key]["section"]
        assert f"{{ref}}`{section}`" in row[1], (
            f"claims.md, row {key!r}: the experiment should link {section}, the section {notebook} records")
        chapter = notebook.rsplit("/", 1)[0] + "/index"
        assert f"{{doc}}`{chapter}`" in row[1], f"claims.md, row {key!r}: link the chapter page {chapter}"


def test_every_verdict_on_the_page_was_produced_by_a_notebook():
    recorded = {(c["notebook"], c["key"]) for c in record_calls()}
    for notebook, name, _ in GLUE.findall(PAGE.read_text(encoding="utf-8")):
        key = name.removeprefix("claim_")
        assert (notebook, key) in recorded, f"claims.md glues {name} from {notebook}, which records no such claim"
